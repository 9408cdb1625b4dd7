"""``mode="auto"``: its two policies.

``AdaptivePolicy`` (the default) is a per-step controller (``controller.py``): each running
auto request switches among the exact modes (ar, linear_spec, quadratic_spec) and block
lengths between cycles, from its running acceptance, the forward-cost curve (``cost.py``)
and the batch. ``AutoPolicy`` picks ``ar`` or a parallel mode once, at admission, from the
load (diffusion included: the way to opt in to it), read from a ``crossover.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..defaults import PARALLEL_MODES
from .cost import ForwardCost


@dataclass(frozen=True)
class AutoPolicy:
    """How ``mode="auto"`` picks a mode when a request is admitted.

    The request runs ``parallel_mode`` while the load it joins (running requests plus the
    waiting queue, itself included, capped at the pool's rows) is at most
    ``max_parallel_batch``, and ``ar`` beyond that: parallel
    decoding pays while forwards are memory-bound and stops paying once the batch fills the
    device. The switch point is the crossover batch size measured by ``trimode bench`` /
    ``benchmarks/bench_engine.py`` on the target machine (0 = always ``ar``). The choice is
    made once; the output is exactly what the chosen mode gives alone.
    """

    parallel_mode: str = "linear_spec"
    max_parallel_batch: int = 4

    def __post_init__(self) -> None:
        if self.parallel_mode not in PARALLEL_MODES:
            raise ValueError(f"parallel_mode must be one of {', '.join(PARALLEL_MODES)}; "
                             f"got {self.parallel_mode!r}")
        if isinstance(self.max_parallel_batch, bool) or not isinstance(self.max_parallel_batch, int) \
                or self.max_parallel_batch < 0:
            raise ValueError(f"max_parallel_batch must be an integer >= 0; got {self.max_parallel_batch!r}")

    @property
    def candidates(self) -> tuple[str, str]:
        """The modes an auto request may end up in."""
        return ("ar", self.parallel_mode)

    def choose(self, batch_size: int) -> str:
        return self.parallel_mode if batch_size <= self.max_parallel_batch else "ar"

    @classmethod
    def from_crossover(cls, path) -> "AutoPolicy":
        """The policy a ``crossover.json`` written by ``trimode bench`` measured: the parallel
        mode that stays faster than ar up to the largest batch (ties: linear_spec, whose
        output is ar's), up to that batch. Raises ValueError for a file without ``modes`` or
        one where every mode's ``max_parallel_batch`` is unknown (null: ar won at the
        smallest batch size measured, which was above 1)."""
        import json
        from pathlib import Path

        try:
            modes = json.loads(Path(path).read_text())["modes"]
            known = {m: v["max_parallel_batch"] for m, v in modes.items() if m in PARALLEL_MODES}
            ranked = sorted(((int(b), m == "linear_spec", m) for m, b in known.items()
                             if b is not None), reverse=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a crossover.json written by trimode bench ({exc})") from None
        if not ranked and known:
            raise ValueError(f"{path}: ar was already faster at the smallest batch size measured "
                             "and smaller ones were not measured; rerun trimode bench with "
                             "--batch-sizes starting at 1")
        if not ranked:
            raise ValueError(f"{path}: no parallel mode measured")
        batch, _, mode = ranked[0]
        return cls(parallel_mode=mode, max_parallel_batch=batch)


EXACT_MODES = ("ar", "linear_spec", "quadratic_spec")  # the modes whose output is ar's


@dataclass(frozen=True)
class AdaptivePolicy:
    """``mode="auto"`` as a per-step controller (``engine/controller.py``, the default).

    Every step, each running auto request at a cycle boundary gets the exact mode in
    ``modes`` and the block length in ``block_lengths`` (or the request's own
    ``block_length`` when it gives one) with the best expected tokens per second for the
    whole batch, from its running draft acceptance (decayed counts: ``decay`` per verify,
    ``idle_decay`` per step without drafts, so an idle estimate drifts back to ``prior``
    with weight ``prior_weight``), the forward-cost curve ``cost`` and the other rows'
    widths. With ``share``, the prior is the engine-wide acceptance of every request's
    adapter drafts (decayed by ``share_decay`` per verify; ``prior`` until there is any), so
    a new request starts from what the model does on this traffic and an idle one drifts
    back to it. A row switches only for a gain above ``hysteresis`` (a fraction). Only the
    modes whose output is ar's take part (diffusion stays opt-in), so the output at
    temperature 0 is exactly ar's.
    """

    modes: tuple[str, ...] = EXACT_MODES
    block_lengths: tuple[int, ...] = (4, 8, 16)
    cost: ForwardCost = field(default_factory=ForwardCost.builtin)
    prior: float = 0.6
    prior_weight: float = 2.0
    decay: float = 0.8
    idle_decay: float = 0.97
    hysteresis: float = 0.05
    share: bool = True
    share_decay: float = 0.98

    def __post_init__(self) -> None:
        if not self.modes or any(m not in EXACT_MODES for m in self.modes):
            raise ValueError(f"modes must be a non-empty subset of {', '.join(EXACT_MODES)}; "
                             f"got {self.modes!r}")
        if not self.block_lengths or any(isinstance(b, bool) or not isinstance(b, int) or b < 2
                                         for b in self.block_lengths):
            raise ValueError(f"block_lengths must be integers >= 2; got {self.block_lengths!r}")
        for name in ("prior", "decay", "idle_decay", "share_decay"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)!r}")
        if not self.prior_weight > 0 or not self.hysteresis >= 0:
            raise ValueError("prior_weight must be > 0 and hysteresis >= 0; got "
                             f"{self.prior_weight!r}, {self.hysteresis!r}")
        if not isinstance(self.cost, ForwardCost):
            raise ValueError(f"cost must be a ForwardCost; got {self.cost!r}")

    @property
    def candidates(self) -> tuple[str, ...]:
        """The modes an auto request may run in."""
        return self.modes

    def choose(self, batch_size: int) -> str:
        """The mode an auto request starts in (the controller takes it from its first
        decode step)."""
        return "ar"

    def configs(self, block_length: int | None) -> list[tuple[str, int]]:
        """(mode, block_length) pairs a request may run; ``block_length``: the request's
        own (then only the mode is chosen), or None for ``block_lengths``."""
        lengths = (block_length,) if block_length else self.block_lengths
        return [(m, b) for m in self.modes for b in (lengths if m != "ar" else lengths[:1])]

    @classmethod
    def from_bench(cls, path, **kw) -> "AdaptivePolicy":
        """The policy planning with the forward-cost curve ``trimode bench --out DIR`` wrote
        (``path``: DIR, its ``forward_cost.json`` or its ``crossover.json``)."""
        from pathlib import Path

        path = Path(path)
        if path.name == "crossover.json":
            path = path.parent
        return cls(cost=ForwardCost.load(path), **kw)


def expected_tokens(mode: str, block_length: int, alpha: float, segments: int | None) -> float:
    """Expected tokens committed per forward in steady state, for a per-draft acceptance
    ``alpha`` (each adapter draft accepted with probability alpha once the ones before it
    were; a truncated geometric run).

    ar: 1. linear_spec: two forwards per cycle; its first draft is the base model's own
    prediction (the causal seed copy) and always accepted, so a cycle commits
    ``2 + alpha + .. + alpha^(L-2)``. quadratic_spec: one forward per cycle committing
    ``1 + alpha + .. + alpha^(L-1)`` when the outcome has a draft segment (``segments`` of
    the L outcomes are kept, centred on the last one: hit with probability ``sum p_k^2`` for
    i.i.d. outcomes when one is kept), else one token.
    """
    if mode == "ar" or block_length < 2:
        return 1.0
    if mode == "linear_spec":
        return (2.0 + sum(alpha ** k for k in range(1, block_length - 1))) / 2.0
    full = sum(alpha ** k for k in range(block_length))
    if segments is None or segments >= block_length:
        return full
    outcome = [alpha ** k * (1 - alpha) for k in range(block_length - 1)] + \
        [alpha ** (block_length - 1)]
    hit = min(1.0, segments * sum(p * p for p in outcome))
    return hit * full + (1 - hit)


def step_width(mode: str, block_length: int, segments: int | None) -> int:
    """Query tokens of the widest forward of ``mode``'s cycle (what the batch pads to)."""
    if mode == "ar" or block_length < 2:
        return 1
    if mode == "linear_spec":
        return block_length + 1  # the draft and its causal seed copy
    return block_length * (1 + (block_length if segments is None else min(segments, block_length)))
