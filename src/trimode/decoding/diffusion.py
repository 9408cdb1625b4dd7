"""diffusion (docs/spec.md section 3): blocks ``[seed, MASK x (block_length - 1)]``;
bidirectional, read-only denoising passes (the draft adapter on when it is a denoising adapter
too); a causal commit pass (adapter off) writes clean KV and gives the next seed.
"""

from __future__ import annotations

from .batch import Need, Result
from .sequence import Sequence, Step
from .strategy import Strategy


def even_schedule(masks: int, steps: int) -> list[int]:
    """Tokens to unmask at each step of a block (spec 3.3 quota; llama.cpp's
    ``get_num_transfer_tokens``): ``masks`` split evenly over ``steps``, the first
    ``masks % steps`` steps one more."""
    base, extra = divmod(masks, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


class DiffusionStrategy(Strategy):
    """Block diffusion with the reference's selection rule (spec 3.2, 3.3, 3.5), in the order
    of the request's unmasking policy (``unmask.py``) and with its ``steps`` per block.

    The last block keeps its full ``block_length`` (so a shorter ``max_tokens`` returns a
    prefix of a longer run); denoising stops once every slot within the limit is unmasked
    or a stop token has no mask to its left, and the finished row skips the commit pass.
    A denoising pass needs logits at the masked slots only: their candidates, confidences and
    the choice among them are computed on the device (``batch.py``).
    """

    mode = "diffusion"
    tunes_threshold = True
    equals_ar = False

    def begin(self, seq: Sequence, result: Result) -> None:
        seed = seq.take(result)
        seq.record("prefill", [0], [seed])
        self._new_block(seq, seed)

    def _new_block(self, seq: Sequence, seed: int) -> None:
        length = seq.block_length
        self.offset = len(seq.generated)
        self.block = [seed] + [seq.mask_token_id] * (length - 1)
        self.limit = min(length, seq.remaining)
        # more steps than masks behaves as one step per mask (never a list of `steps` items)
        self.schedule = even_schedule(length - 1, min(seq.params.steps or length, max(length - 1, 1)))
        self.passes = 0
        self._finish_block_if_done(seq)

    def _finish_block_if_done(self, seq: Sequence) -> None:
        mask_id = seq.mask_token_id
        first_mask = next((i for i, t in enumerate(self.block) if t == mask_id), len(self.block))
        if seq.thinking is not None and seq.thinking.budget is not None:
            # no thinking past the budget, even where a slot was unmasked before the
            # budget's position was known (an open tag unmasked after it)
            self.block[:first_mask] = seq.thinking.enforce(self.block[:first_mask])
        stop = next((i for i in range(first_mask) if self.block[i] in seq.stop_ids), None)
        if stop is not None and stop < self.limit:
            end = stop + 1
        elif first_mask >= self.limit:
            end = self.limit
        else:
            self.phase = "denoise"
            return
        seq.commit(self.block[:end])
        self.phase = "commit"

    def next_step(self, seq: Sequence) -> Step:
        if self.phase == "denoise":
            return Step(list(self.block), "denoise", bidirectional=True, write=False,
                        adapter=seq.denoise_adapter)
        return Step(list(self.block), "commit")

    def need(self, seq: Sequence, step: Step) -> Need:
        if self.phase == "commit":
            return seq.need_next(len(self.block) - 1)
        masked = [i for i, t in enumerate(self.block) if t == seq.mask_token_id]
        p = seq.params
        quota = self.schedule[min(self.passes, len(self.schedule) - 1)]
        if p.threshold is not None and p.steps is None:
            quota = 1  # the threshold rule alone: one slot plus every confident one
        forced = seq.forced_ids(self.block, len(self.block))
        return seq.need(masked, choose=True, threshold=p.threshold, quota=quota,
                        offset=self.offset, forced=forced and [forced[i] for i in masked])

    def apply(self, seq: Sequence, result: Result) -> None:
        if self.phase == "commit":
            seed = seq.take(result)
            seq.record("commit", [self.offset + len(self.block)], [seed])
            self._new_block(seq, seed)
            return
        masked = [i for i, t in enumerate(self.block) if t == seq.mask_token_id]
        self.passes += 1
        chosen = [masked[k] for k in result.chosen]  # indices into the masked slots, ascending
        for k, i in zip(result.chosen, chosen):
            self.block[i] = result.tokens[k]
            seq.note(self.offset + i, result.logprob(k, self.block[i]))
        seq.record("denoise", [self.offset + i for i in chosen], [self.block[i] for i in chosen])
        self._finish_block_if_done(seq)

    @classmethod
    def scratch_slots(cls, block_length: int, max_tokens: int,
                      draft_segments: int | None) -> int:
        return 2 * block_length + 1

    @classmethod
    def step_width(cls, block_length: int, max_tokens: int, draft_segments: int | None) -> int:
        return block_length

    @classmethod
    def generated_positions(cls, block_length: int, max_tokens: int) -> int:
        """The last block is denoised at full length (docs/cases.md B04, B27)."""
        return -(-max_tokens // block_length) * block_length

    def pending(self, seq: Sequence) -> list[int]:
        """block[0] is the uncommitted seed; nothing is pending while committing."""
        return [] if self.phase == "commit" else self.block[: getattr(self, "limit", None)]

    def block_window(self, seq: Sequence) -> tuple[int, int] | None:
        """The block being denoised up to its limit (its seed is not committed yet)."""
        return self.offset, self.offset + self.limit
