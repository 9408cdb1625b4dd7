"""The per-step ``auto`` controller (``AdaptivePolicy``): which exact mode and block length
each running auto request uses for its next cycle.

Before every decode forward, ``plan`` looks at the batch. Rows that are mid-cycle (a
linear_spec draft waiting for its verify) or not auto keep their step; the others are *free*
(between two cycles: ``Strategy.boundary``). For every width W the forward could be padded
to, each free row takes the option of at most W query tokens with the most expected tokens
per forward (``auto.expected_tokens`` of its running acceptance); the batch's expected
tokens / ``cost.seconds(rows, W)`` picks W. A free row then switches to its option there if
that beats its current option by more than the hysteresis (or its current one is wider than
W): a new strategy object ``resume``s after the pending token, so nothing committed changes
and no draft is ever half used. Output at temperature 0 is ar's; at temperature > 0 every
token is still drawn from ar's distribution (each cycle's verification guarantees it, and
the choice of mode depends only on the past).

``observe`` updates each request's acceptance after the forward: per verify, the adapter
drafts accepted and whether one was rejected (decayed counts, the MLE of a truncated
geometric run); linear_spec's first draft is the base model's own prediction (always right),
so it is left out. Integers and floats only; no tensors.
"""

from __future__ import annotations

from dataclasses import replace

from ..decoding.registry import STRATEGIES, strategy_class
from ..decoding.sequence import Sequence
from .auto import AdaptivePolicy, expected_tokens, step_width


class AutoState:
    """One auto request's controller state: its own params (mode auto), the (mode,
    block_length) options it may run, and its decayed acceptance counts."""

    def __init__(self, base, options: list[tuple[str, int]]):
        self.base = base
        self.options = options
        self.widest = max(step_width(m, b, base.draft_segments) for m, b in options)
        self.accepted = 0.0  # adapter drafts accepted (decayed)
        self.rejected = 0.0  # verifies that rejected an adapter draft (decayed)

    def alpha(self, policy: AdaptivePolicy, prior: float) -> float:
        """Running per-draft acceptance: the prior pulls a short history towards it."""
        weight = policy.prior_weight
        return (self.accepted + prior * weight) / (self.accepted + self.rejected + weight)


class Controller:
    """Plans each decode step of an engine whose ``EngineConfig.auto`` is adaptive."""

    def __init__(self, policy: AdaptivePolicy):
        self.policy = policy
        self.switches: list[tuple[str, str]] = []  # (from, to) in the last plan
        self.shared = [0.0, 0.0]  # every request's adapter drafts: accepted, rejections

    @property
    def prior(self) -> float:
        """What a request without history is assumed to accept (AdaptivePolicy.share)."""
        accepted, rejected = self.shared
        if not self.policy.share or accepted + rejected == 0:
            return self.policy.prior
        weight = self.policy.prior_weight
        return (accepted + self.policy.prior * weight) / (accepted + rejected + weight)

    def attach(self, seq: Sequence, options: list[tuple[str, int]], base) -> None:
        """Make ``seq`` (resolved to its first mode at admission) controlled."""
        seq.auto = AutoState(base, options)

    # ---------------------------------------------------------------- planning

    def _value(self, seq: Sequence, mode: str, block: int) -> tuple[float, int]:
        """(expected tokens per forward, width) of ``mode`` at ``block`` for ``seq``."""
        segments = seq.params.draft_segments
        block = max(1, min(block, seq.remaining))
        alpha = seq.auto.alpha(self.policy, self.prior)
        return expected_tokens(mode, block, alpha, segments), step_width(mode, block, segments)

    def _fixed(self, seq: Sequence) -> tuple[float, int]:
        """(expected tokens per forward, width) of a row that keeps its step."""
        p = seq.params
        if seq.auto is not None:
            return self._value(seq, p.mode, seq.block_length)
        width = strategy_class(p.mode).step_width(seq.block_length, seq.remaining,
                                                  p.draft_segments)
        if p.mode == "linear_spec":
            width += 1  # the draft's causal seed copy
        return (seq.metrics.tokens_per_forward if seq.metrics.nfe > 1 else 1.0), width

    def plan(self, seqs: list[Sequence]) -> None:
        """Switch the free auto rows of this decode step (``seqs``: its rows, in order)."""
        self.switches = []
        if all(seq.auto is None for seq in seqs):
            return
        fixed_tokens, fixed_width, free = 0.0, 1, []
        for seq in seqs:
            token = seq.strategy.boundary(seq) if seq.auto is not None else None
            if token is None:
                tokens, width = self._fixed(seq)
                fixed_tokens, fixed_width = fixed_tokens + tokens, max(fixed_width, width)
            else:
                options = [(*self._value(seq, m, b), (m, b)) for m, b in seq.auto.options]
                free.append((seq, token, options))
        if not free:
            return
        floor = max([fixed_width] + [min(w for _, w, _ in opts) for _, _, opts in free])
        widths = sorted({floor} | {w for _, _, opts in free for _, w, _ in opts if w > floor})
        best_rate, best_width = -1.0, floor
        for width in widths:
            total = fixed_tokens + sum(max(t for t, w, _ in opts if w <= width)
                                       for _, _, opts in free)
            rate = total / self.policy.cost.seconds(len(seqs), width)
            if rate > best_rate * (1 + 1e-9):
                best_rate, best_width = rate, width
        for seq, token, options in free:
            self._choose(seq, token, [o for o in options if o[1] <= best_width])

    def _choose(self, seq: Sequence, token: int, options) -> None:
        tokens, _, config = max(options, key=lambda o: (o[0], -o[1]))
        same = (lambda c: c[0] == "ar") if seq.params.mode == "ar" else \
            (lambda c: c == (seq.params.mode, seq.block_length))  # ar has no block length
        for t, _, c in options:
            if same(c) and t * (1 + self.policy.hysteresis) >= tokens:
                return
        mode, block = config
        before = seq.params.mode
        seq.params = replace(seq.auto.base, mode=mode,
                             block_length=block if mode != "ar" else seq.auto.base.block_length)
        seq.block_length = block
        seq.strategy = STRATEGIES[mode]()
        seq.strategy.resume(seq, token)
        seq.metrics.mode_switches += 1
        self.switches.append((before, mode))

    # ---------------------------------------------------------------- learning

    def observe(self, seqs: list[Sequence]) -> None:
        """Update the acceptance of every auto row of the decode step that just ran."""
        policy = self.policy
        for seq in seqs:
            state = seq.auto
            if seq.last_verify is None:
                if state is not None and seq.params.mode == "ar":  # drift back to the prior
                    state.accepted *= policy.idle_decay
                    state.rejected *= policy.idle_decay
                continue
            evidence = adapter_drafts(*seq.last_verify, seq.params.threshold)
            if evidence is None:
                continue
            drafts, accepted = evidence
            missed = float(accepted < drafts)
            d = policy.share_decay
            self.shared = [d * self.shared[0] + accepted, d * self.shared[1] + missed]
            if state is not None:
                state.accepted = policy.decay * state.accepted + accepted
                state.rejected = policy.decay * state.rejected + missed


def adapter_drafts(mode: str, drafts: int, accepted: int,
                   threshold: float | None) -> tuple[int, int] | None:
    """(adapter drafts verified, accepted) of one verify, or None if it says nothing about
    them. linear_spec's one-pass first draft is the base model's own prediction (always
    right), so it is left out."""
    if mode == "linear_spec" and not threshold:
        if accepted == 0:
            return None
        drafts, accepted = drafts - 1, accepted - 1
    return (drafts, accepted) if drafts > 0 else None
