"""ar (docs/spec.md section 4): one causal token per forward; ``ar_token`` is also the
causal pick the other modes use for seeds and bonus tokens."""

from __future__ import annotations

import torch

from .sampling import pick
from .sequence import Sequence, Step
from .strategy import Strategy


def ar_token(seq: Sequence, logits: torch.Tensor) -> int:
    """The token the causal logits of the last position choose (greedy or sampled)."""
    token = int(pick(logits[-1:], seq.params, seq.mask_token_id, seq.generator)[0])
    seq.note(len(seq.generated), logits[-1], token)
    return token


class ARStrategy(Strategy):
    mode = "ar"
    parallel = False
    needs_mask = False
    blocks = False

    def start(self, seq: Sequence, logits: torch.Tensor) -> None:
        self._emit(seq, logits, "prefill")

    def next_step(self, seq: Sequence) -> Step:
        return Step([self.pending_token], "ar")

    def update(self, seq: Sequence, logits: torch.Tensor) -> None:
        self._emit(seq, logits[-1:], "ar")

    def _emit(self, seq: Sequence, logits: torch.Tensor, kind: str) -> None:
        self.pending_token = ar_token(seq, logits)
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
