"""The strategy interface every decoding mode implements (one file per mode, see registry.py).

A strategy sees one request: after the causal prefill it gets the prefill's last logits
(``start``); then it names the next forward it needs (``next_step``) and consumes that
forward's logits (``update``). It never touches tensors of other requests or the cache;
cropping after a rejected draft is requested through ``Sequence.rollback``.

A strategy class also owns what the rest of trimode needs to know about its mode without
asking for the mode's name: its sizing (scratch cache slots, the widest step, how the
generation is rounded when checked against the context), whether it needs a mask token, and
what the live view shows (``phase``, ``pending``). Adding a mode = one file with a subclass
plus one line in ``registry.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from .sequence import Sequence, Step


class Strategy(ABC):
    """One request's decoding in one mode. Subclasses set ``mode`` and implement the three
    stepping methods; the sizing class methods have defaults for one-block modes."""

    mode: ClassVar[str]
    parallel: ClassVar[bool] = True  # a candidate for mode="auto" at low load
    needs_mask: ClassVar[bool] = True  # needs the checkpoint's mask_token_id
    shrink_hint: ClassVar[str] = "block_length"  # what to lower when scratch does not fit
    blocks: ClassVar[bool] = True  # block_length means something to this mode
    tunes_threshold: ClassVar[bool] = False  # benchmarks sweep its threshold (diffusion)
    equals_ar: ClassVar[bool] = True  # output = ar's at temperature 0 (lossless)
    phase: str = "decode"  # what the live view shows as the current pass

    # ---------------------------------------------------------------- stepping

    @abstractmethod
    def start(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Consume the prefill's last logits ``[1, V]``."""

    @abstractmethod
    def next_step(self, seq: Sequence) -> Step:
        """The forward this request needs next."""

    @abstractmethod
    def update(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Consume that forward's logits ``[len(step.tokens), V]``."""

    # ---------------------------------------------------------------- sizing

    @classmethod
    @abstractmethod
    def scratch_slots(cls, block_length: int, max_tokens: int,
                      draft_segments: int | None) -> int:
        """Cache slots a request may write beyond its committed text in one forward."""

    @classmethod
    def step_width(cls, block_length: int, max_tokens: int, draft_segments: int | None) -> int:
        """The widest step a request can ask for (its share of the token budget)."""
        return min(block_length, max_tokens)

    @classmethod
    def generated_positions(cls, block_length: int, max_tokens: int) -> int:
        """Positions the generation may occupy, checked against the context limit."""
        return max_tokens

    # ---------------------------------------------------------------- live view

    def pending(self, seq: Sequence) -> list[int]:
        """Block tokens shown after the committed text (masks included), not yet committed."""
        block = list(getattr(self, "block", None) or [])
        return block[1:]

    def block_window(self, seq: Sequence) -> tuple[int, int] | None:
        """Generated-text positions ``[start, end)`` of the current block (its committed
        seed first), or None for a mode without blocks; read by ``decoding/events.py``."""
        block = getattr(self, "block", None)
        if not block:
            return None
        start = len(seq.generated) - 1
        return start, start + len(block)
