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
    """

    nfe: int = 0
    generated_tokens: int = 0
    acceptance_length: float | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    trace: list[ForwardTrace] | None = None

    @property
    def tokens_per_forward(self) -> float:
        return self.generated_tokens / self.nfe if self.nfe else 0.0

    def to_dict(self) -> dict:
        out = {"nfe": self.nfe, "generated_tokens": self.generated_tokens,
               "tokens_per_forward": round(self.tokens_per_forward, 4),
               "acceptance_length": self.acceptance_length, "latency_s": round(self.latency_s, 4),
               "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4)}
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
