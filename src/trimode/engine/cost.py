"""The forward-cost curve the ``auto`` controller plans with: seconds of one decode forward
against the rows in the batch and the query tokens per row (the widest row: the runner pads
every row to it).

``trimode bench --out DIR`` measures it on the loaded model and writes
``DIR/forward_cost.json`` next to ``crossover.json`` (``{"forward_cost": [{"batch_size",
"tokens", "seconds"}, ...]}``, the format ``trimode.bench.forward_cost`` also writes);
``ForwardCost.load`` reads either. Without a measurement, ``ForwardCost.builtin()`` is a
roofline-shaped guess: a forward costs one weight read plus a term that grows with the
query tokens, with the knee at 64 tokens (only ratios matter to the controller).
Knows nothing about modes or requests.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

BUILTIN_KNEE = 64  # query tokens per forward at which compute equals the weight read


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), clamped below the first point and extended with
    the last segment's slope (never decreasing) beyond the last."""
    if x <= xs[0]:
        return ys[0]
    if len(xs) == 1:  # one width measured: proportional to the tokens above it
        return ys[0] * x / xs[0]
    i = min(bisect.bisect_left(xs, x), len(xs) - 1)
    slope = max(0.0, (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1]))
    return ys[i - 1] + slope * (x - xs[i - 1])


@dataclass(frozen=True)
class ForwardCost:
    """``points``: measured (rows, tokens per row, seconds) triples, or empty for the
    built-in curve. ``source``: where they came from (shown in logs and the README)."""

    points: tuple[tuple[int, int, float], ...] = ()
    source: str = "built-in"

    def __post_init__(self) -> None:
        for rows, tokens, seconds in self.points:
            if rows < 1 or tokens < 1 or not seconds > 0:
                raise ValueError(f"forward cost point ({rows}, {tokens}, {seconds}): rows and "
                                 "tokens must be >= 1 and seconds > 0")

    @classmethod
    def builtin(cls) -> "ForwardCost":
        return cls()

    def seconds(self, rows: int, tokens: int) -> float:
        """Expected seconds of one forward of ``rows`` rows padded to ``tokens`` query
        tokens each. Between measured batch sizes: linear in rows; above the largest:
        proportional to rows; below the smallest: that batch size's time."""
        if not self.points:
            return 1.0 + rows * tokens / BUILTIN_KNEE
        sizes = sorted({r for r, _, _ in self.points})
        if rows >= sizes[-1]:
            return self._at(sizes[-1], tokens) * rows / sizes[-1]
        if rows <= sizes[0]:
            return self._at(sizes[0], tokens)
        i = bisect.bisect_left(sizes, rows)
        lo, hi = sizes[i - 1], sizes[i]
        a, b = self._at(lo, tokens), self._at(hi, tokens)
        return a + (b - a) * (rows - lo) / (hi - lo)

    def _at(self, rows: int, tokens: int) -> float:
        curve = sorted((t, s) for r, t, s in self.points if r == rows)
        return _interp([t for t, _ in curve], [s for _, s in curve], tokens)

    @classmethod
    def load(cls, path) -> "ForwardCost":
        """Read a ``forward_cost.json``; a directory means its ``forward_cost.json`` (so the
        ``--out`` directory of ``trimode bench`` works). Raises ValueError naming the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "forward_cost.json"
        try:
            rows = json.loads(path.read_text())["forward_cost"]
            points = tuple((int(r["batch_size"]), int(r["tokens"]), float(r["seconds"]))
                           for r in rows)
            if not points:
                raise ValueError("no points")
            return cls(points, str(path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a forward_cost.json written by trimode bench "
                             f"({exc})") from None

    def to_json(self) -> dict:
        return {"forward_cost": [{"batch_size": r, "tokens": t, "seconds": s}
                                 for r, t, s in self.points]}
