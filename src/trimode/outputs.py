"""Typed results of a request: text, token ids, finish reason and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ForwardTrace:
    """One forward a request took part in.

    kind: ``prefill``, ``ar``, ``denoise``, ``commit``, ``draft`` or ``verify``.
    positions: offsets in the generated text that this forward unmasked (denoise),
        drafted (draft), accepted (verify, bonus included) or produced (prefill, ar, commit).
    tokens: the token ids at those positions.
    """

    kind: str
    positions: tuple[int, ...]
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability (natural log, raw model distribution) and the
    ``top`` most likely alternatives as (token_id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestMetrics:
    """nfe: every forward the request took part in, the prefill included (this equals the
    reference's count in all three modes: docs/spec.md 3.6, 4, 5.1; see README "Metrics").
    tokens_per_forward: generated tokens (a final stop token included) / nfe.
    acceptance_length: mean tokens committed per verify, bonus included (linear_spec only).
    latency_s: wall-clock seconds from the request's arrival to its end.
    ttft_s: wall-clock seconds from the request's arrival to its first committed token
        (a stop token counts).
    draft_proposed / draft_accepted: per draft slot i (index i - 1), how many verifies
        checked a draft there and how many accepted it (slot i is accepted only if slots
        1 .. i-1 were).
    mode_drafts: per mode, [drafts proposed, drafts accepted]; ``acceptance_rate`` divides.
    mode_tokens: generated tokens per mode that committed them (``auto`` switches).
    mode_switches: times the ``auto`` controller changed the request's mode or block length.
    """

    nfe: int = 0
    generated_tokens: int = 0
    acceptance_length: float | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    trace: list[ForwardTrace] | None = None
    draft_proposed: list[int] = field(default_factory=list)
    draft_accepted: list[int] = field(default_factory=list)
    mode_drafts: dict[str, list[int]] = field(default_factory=dict)
    mode_tokens: dict[str, int] = field(default_factory=dict)
    mode_switches: int = 0

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.nfe if self.nfe else 0.0

    @property
    def acceptance_rate(self) -> dict[str, float]:
        """Per mode that drafted: accepted / proposed drafts."""
        return {m: a / p for m, (p, a) in self.mode_drafts.items() if p}

    def note_verify(self, mode: str, drafts: int, accepted: int) -> None:
        """Count one verify of ``drafts`` drafts, the first ``accepted`` of them accepted."""
        grow = drafts - len(self.draft_proposed)
        if grow > 0:
            self.draft_proposed += [0] * grow
            self.draft_accepted += [0] * grow
        for i in range(drafts):
            self.draft_proposed[i] += 1
            self.draft_accepted[i] += i < accepted
        counts = self.mode_drafts.setdefault(mode, [0, 0])
        counts[0] += drafts
        counts[1] += accepted

    def to_dict(self) -> dict:
        out = {"nfe": self.nfe, "generated_tokens": self.generated_tokens,
               "tokens_per_forward": round(self.tokens_per_forward, 4),
               "acceptance_length": self.acceptance_length, "latency_s": round(self.latency_s, 4),
               "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4),
               "draft_slots": {"proposed": list(self.draft_proposed),
                               "accepted": list(self.draft_accepted)},
               "acceptance_rate": {m: round(r, 4) for m, r in self.acceptance_rate.items()},
               "mode_tokens": dict(self.mode_tokens), "mode_switches": self.mode_switches}
        if self.trace is not None:
            out["trace"] = [{"kind": t.kind, "positions": list(t.positions), "tokens": list(t.tokens)}
                            for t in self.trace]
        return out


@dataclass
class RequestOutput:
    """prompt_token_ids and token_ids exclude the stop token; finish_reason is ``stop``
    (EOS or a stop token id), ``length`` (max_tokens), ``abort`` (cancelled) or ``error``
    (the forward failed or gave non-finite logits; ``error`` says why). ``mode`` is the mode
    that ran (``auto`` resolved). ``logprobs`` is aligned with token_ids when requested."""

    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    mode: str = "ar"
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
