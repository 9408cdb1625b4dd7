"""ar (docs/spec.md section 4): one causal token per forward (the pick itself is
``Sequence.take`` of a one-slot selection, as for every mode's seeds)."""

from __future__ import annotations

from .batch import Need, Result
from .sequence import Sequence, Step
from .strategy import Strategy


class ARStrategy(Strategy):
    mode = "ar"
    parallel = False
    needs_mask = False
    blocks = False

    def begin(self, seq: Sequence, result: Result) -> None:
        self._emit(seq, result, "prefill")

    def next_step(self, seq: Sequence) -> Step:
        return Step([self.pending_token], "ar")

    def need(self, seq: Sequence, step: Step) -> Need:
        return seq.need_next(len(step.tokens) - 1)

    def apply(self, seq: Sequence, result: Result) -> None:
        self._emit(seq, result, "ar")

    def boundary(self, seq: Sequence) -> int | None:
        return self.pending_token

    def resume(self, seq: Sequence, token: int) -> None:
        self.pending_token = token

    def _emit(self, seq: Sequence, result: Result, kind: str) -> None:
        self.pending_token = seq.take(result)
        seq.record(kind, [len(seq.generated)], [self.pending_token])
        seq.commit([self.pending_token])

    @classmethod
    def scratch_slots(cls, block_length: int, max_tokens: int,
                      draft_segments: int | None) -> int:
        return 2

    @classmethod
    def step_width(cls, block_length: int, max_tokens: int, draft_segments: int | None) -> int:
        return 1

    def pending(self, seq: Sequence) -> list[int]:
        return []
