"""The strategy interface every decoding mode implements (one file per mode, see registry.py).

A strategy sees one request: after the causal prefill it gets the prefill's choice
(``begin``); then it names the next forward it needs (``next_step``) and what it needs from
that forward's logits (``need``: which query slots, which selection rule), and consumes the
selection (``apply``), which the model runner computes on the device for all rows of all
modes at once (``batch.select_rows``). It never touches tensors: only token ids and a few
integers reach it (draft log-probs stay on the device as an opaque handle). Cropping after a
rejected draft is requested through ``Sequence.rollback``. ``start`` / ``update`` do the
same from one request's logits (tests and tools that run a forward by hand).

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

from .batch import Need, Result, select_rows
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
    def begin(self, seq: Sequence, result: Result) -> None:
        """Consume the prefill's choice (``seq.need([last slot])``'s result)."""

    @abstractmethod
    def next_step(self, seq: Sequence) -> Step:
        """The forward this request needs next."""

    @abstractmethod
    def need(self, seq: Sequence, step: Step) -> Need:
        """What to select from that forward's logits (built with ``seq.need``)."""

    @abstractmethod
    def apply(self, seq: Sequence, result: Result) -> None:
        """Consume the selection of ``need``."""

    # ---------------------------------------------------------------- switching (auto)

    def boundary(self, seq: Sequence) -> int | None:
        """The pending token (the last one committed, whose KV no forward has written yet)
        when the request is between two cycles and may change mode; None mid-cycle or for
        a mode that cannot hand over (diffusion). Drafts not yet verified are dropped on a
        switch (they never reach the output)."""
        return None

    def resume(self, seq: Sequence, token: int) -> None:
        """Start this mode's first cycle after ``token`` (``boundary``'s, of the mode it
        replaces), as ``begin`` does after the prefill's choice."""
        raise NotImplementedError(f"{self.mode} cannot take over a running request")

    def start(self, seq: Sequence, logits: torch.Tensor) -> None:
        """``begin`` from the prefill's last logits ``[1, V]``."""
        self.begin(seq, select_rows(logits[-1:], [seq.need_next(0)], seq.mask_token_id)[0])

    def update(self, seq: Sequence, logits: torch.Tensor) -> None:
        """``apply`` from the logits ``[len(step.tokens), V]`` of the Step ``next_step`` names."""
        need = self.need(seq, self.next_step(seq))
        rows = logits[torch.tensor(need.slots, device=logits.device)]
        self.apply(seq, select_rows(rows, [need], seq.mask_token_id)[0])

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
