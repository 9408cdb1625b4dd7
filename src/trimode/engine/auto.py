"""``mode="auto"``: the policy that picks ``ar`` or a parallel mode when a request is admitted,
and reading that policy from a ``crossover.json`` measured by ``trimode bench``."""

from __future__ import annotations

from dataclasses import dataclass

from ..defaults import PARALLEL_MODES


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
