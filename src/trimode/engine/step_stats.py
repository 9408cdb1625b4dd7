"""What one engine step did (``StepRecord``) and the engine-wide running draft acceptance per
mode, for the Prometheus step metrics (``entrypoints/server/metrics.py``) and tools.

The engine builds one record per ``step()`` and hands it to every function in
``Engine.step_observers`` (called on the engine's thread). No tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACCEPTANCE_DECAY = 0.98  # per verify: the running rate remembers about the last 50 verifies


@dataclass
class StepRecord:
    """duration_s: wall-clock seconds of the step (admission, prefill, decode, selection).
    rows: requests in its forwards (prefill and decode). query_tokens: query tokens those
    forwards ran, before padding. drafts: per mode, per draft slot i (index i - 1),
    [proposed, accepted] counts of this step's verifies. switches: (from, to) mode changes
    the ``auto`` controller made before the decode forward."""

    duration_s: float = 0.0
    rows: int = 0
    query_tokens: int = 0
    drafts: dict[str, list[list[int]]] = field(default_factory=dict)
    switches: list[tuple[str, str]] = field(default_factory=list)

    def add_verify(self, mode: str, drafts: int, accepted: int) -> None:
        slots = self.drafts.setdefault(mode, [])
        while len(slots) < drafts:
            slots.append([0, 0])
        for i in range(drafts):
            slots[i][0] += 1
            slots[i][1] += i < accepted


class RunningAcceptance:
    """Per mode, accepted / proposed drafts over recent verifies (exponentially weighted)."""

    def __init__(self, decay: float = ACCEPTANCE_DECAY):
        self.decay = decay
        self.counts: dict[str, list[float]] = {}  # mode -> [proposed, accepted], decayed

    def add(self, mode: str, drafts: int, accepted: int) -> None:
        c = self.counts.setdefault(mode, [0.0, 0.0])
        c[0] = self.decay * c[0] + drafts
        c[1] = self.decay * c[1] + accepted

    def rates(self) -> dict[str, float]:
        return {m: a / p for m, (p, a) in self.counts.items() if p > 0}
