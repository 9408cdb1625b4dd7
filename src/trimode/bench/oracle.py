"""Speed-of-light (SOL) oracle for block diffusion (docs/spec.md 7.3): the fewest denoising forwards
whose parallel commits reproduce exactly the serial one-token-per-forward output of a block.

Definitions (one block, slots ``0 .. L-1``; slot 0 holds the AR seed and is never masked):

- *predict(block)*: one bidirectional, read-only forward of the block after the cached
  prefix; per slot the greedy candidate (mask id excluded) and its confidence, the
  un-tempered softmax over the full vocabulary (spec 3.3, ``trimode.decoding.sampling``).
- *serial target* Y: start from ``[seed, MASK x (L-1)]`` and unmask, per forward, only the
  masked slot of highest confidence (``torch.topk``, as ``DiffusionStrategy`` with
  ``threshold=None``, whose quota is 1 per pass) until the block is *finished*: every slot
  below the limit (``min(L, max_tokens left)``) is unmasked, or a stop token has no mask to
  its left. Y is the final block; its output is ``Y[:end]``. This equals trimode's
  ``diffusion`` mode with ``threshold=None`` (tested).
- *valid parallel schedule*: states ``S_0 ⊂ S_1 ⊂ ... ⊂ S_n`` (sets of unmasked slots, every
  unmasked slot holding Y's token); forward t predicts on ``S_{t-1}`` and commits a nonempty
  set of masked slots j whose prediction there already equals ``Y[j]``; ``S_n`` is finished
  with the same ``end``. Its output is therefore exactly the serial output, by construction.
  The serial run itself is such a schedule, so the minimum exists and is <= the serial count.

Two searches, both counted in denoising forwards (the commit forward is the same for every
schedule and is counted separately by ``sol.py``):

- ``exact_forwards``: breadth-first search over states, trying every subset of the matching
  slots. This is the exact minimum under the definition above, when it finishes within
  ``budget`` predicted states and ``L - 1 <= EXACT_MAX_MASKS``; otherwise None.
- ``compaction_forwards``: the paper's *recursive dynamic compaction* (spec 7.3), a greedy
  search with a budget: at each state, among the matching slots in confidence order (the
  serial choice first), commit the largest prefix ``M[:k]`` from which the serial run still
  reproduces Y (verified by simulating it); ``k = 1`` is the serial step and always valid.
  Once ``budget`` predicted states are spent, it only takes serial steps. Greedy, so
  ``exact <= compaction <= serial``; the paper reports this one with a budget of 5000.

Every predicted state costs one forward of the real model and is memoized, so ``simulated``
counts the forwards the oracle spent. This module knows nothing about models: ``predict``
is any callable from blocks to (candidates, confidences).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Callable, Sequence

import torch

Block = tuple[int, ...]
Prediction = tuple[list[int], list[float]]  # per slot: candidate id, confidence in [0, 1]
Predict = Callable[[list[Block]], list[Prediction]]

EXACT_MAX_MASKS = 12  # 2^12 subsets per state: beyond that the exact search is not attempted


@dataclass(frozen=True)
class BlockSOL:
    """One block's result. ``target``: the serial final block (mask id where never unmasked);
    ``end``: output length of the block; forwards are denoising forwards only."""

    target: Block
    end: int
    serial_forwards: int
    compaction_forwards: int
    exact_forwards: int | None
    schedule: tuple[tuple[int, ...], ...]  # slots committed by each compaction forward
    simulated: int  # distinct states predicted (real forwards spent by the oracle)
    budget_exhausted: bool


class BlockOracle:
    """The search for one block. ``predict`` maps a list of blocks to one Prediction each.

    ``limit``: slots that count as output (``min(L, max_tokens left)``); ``stop_ids``: ids that
    end the request; ``budget``: predicted states allowed to each search (>= 1).
    Raises ValueError for an empty block, a masked seed or a budget < 1.
    """

    def __init__(self, predict: Predict, seed_block: Sequence[int], mask_token_id: int,
                 limit: int, stop_ids: set[int], budget: int = 5000):
        if not seed_block or seed_block[0] == mask_token_id:
            raise ValueError("seed_block must start with the (unmasked) seed token")
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be an integer >= 1; got {budget!r}")
        if not 1 <= limit <= len(seed_block):
            raise ValueError(f"limit must be in [1, {len(seed_block)}]; got {limit}")
        self._predict, self.mask, self.limit = predict, mask_token_id, limit
        self.stop_ids, self.budget = set(stop_ids), budget
        self.start: Block = tuple(seed_block)
        self.memo: dict[Block, Prediction] = {}

    # ------------------------------------------------------------------ basics

    def predict(self, blocks: list[Block]) -> list[Prediction]:
        todo = list(dict.fromkeys(b for b in blocks if b not in self.memo))
        if todo:
            self.memo.update(zip(todo, self._predict(todo)))
        return [self.memo[b] for b in blocks]

    def finished(self, block: Block) -> int | None:
        """The block's output length if decoding of it is over, else None (the stop rule of
        ``DiffusionStrategy._finish_block_if_done``)."""
        first_mask = next((i for i, t in enumerate(block) if t == self.mask), len(block))
        stop = next((i for i in range(first_mask) if block[i] in self.stop_ids), None)
        if stop is not None and stop < self.limit:
            return stop + 1
        return self.limit if first_mask >= self.limit else None

    def serial_step(self, block: Block) -> Block:
        cand, conf = self.predict([block])[0]
        masked = torch.tensor([t == self.mask for t in block])
        scores = torch.tensor(conf, dtype=torch.float32).masked_fill(~masked, float("-inf"))
        i = int(torch.topk(scores, 1).indices[0])
        return block[:i] + (cand[i],) + block[i + 1:]

    def serial(self, block: Block) -> tuple[Block, int]:
        """Run the serial decoder from ``block`` -> (final block, forwards)."""
        steps = 0
        while self.finished(block) is None:
            block, steps = self.serial_step(block), steps + 1
        return block, steps

    def matching(self, block: Block, target: Block) -> list[int]:
        """Masked slots whose prediction on ``block`` equals the target, serial choice first,
        then by confidence (descending; ties by slot)."""
        cand, conf = self.predict([block])[0]
        slots = [i for i, t in enumerate(block)
                 if t == self.mask and target[i] != self.mask and cand[i] == target[i]]
        slots.sort(key=lambda i: (-conf[i], i))
        serial_slot = next(i for i, (a, b) in enumerate(zip(block, self.serial_step(block)))
                           if a != b)
        if serial_slot in slots:
            slots.remove(serial_slot)
            slots.insert(0, serial_slot)
        return slots

    @staticmethod
    def commit(block: Block, target: Block, slots) -> Block:
        out = list(block)
        for i in slots:
            out[i] = target[i]
        return tuple(out)

    # ------------------------------------------------------------------ searches

    def run(self, exact: bool = True) -> BlockSOL:
        """Serial target, then the compaction search, then (if ``exact``) the exact one."""
        target, serial_forwards = self.serial(self.start)
        end = self.finished(target)
        used_before = len(self.memo)
        compaction, schedule, exhausted = self.compaction(target, end)
        spent = len(self.memo) - used_before
        best = None
        if exact and sum(t == self.mask for t in self.start) <= EXACT_MAX_MASKS:
            best = self.exact(target, end)
        return BlockSOL(target, end, serial_forwards, compaction, best, schedule,
                        len(self.memo), exhausted or spent > self.budget)

    def reproduces(self, block: Block, target: Block) -> bool:
        return self.serial(block)[0] == target

    def compaction(self, target: Block, end: int) -> tuple[int, tuple, bool]:
        """Recursive dynamic compaction (greedy, budgeted): (forwards, schedule, exhausted)."""
        block, schedule, base, exhausted = self.start, [], len(self.memo), False
        while self.finished(block) is None:
            slots = self.matching(block, target)
            take = slots[:1]
            for k in range(len(slots), 1, -1):
                if len(self.memo) - base >= self.budget:
                    exhausted = True
                    break
                trial = self.commit(block, target, slots[:k])
                if self.reproduces(trial, target):
                    take = slots[:k]
                    break
            block = self.commit(block, target, take)
            schedule.append(tuple(sorted(take)))
        assert self.finished(block) == end
        return len(schedule), tuple(schedule), exhausted

    def exact(self, target: Block, end: int) -> int | None:
        """Breadth-first search over states; the minimum forwards, or None past the budget."""
        if self.finished(self.start) is not None:
            return 0
        frontier, seen, level, base = [self.start], {self.start}, 0, len(self.memo)
        while frontier:
            level += 1
            fresh = [b for b in frontier if b not in self.memo]
            if len(self.memo) - base + len(fresh) > self.budget:
                return None
            self.predict(fresh)
            nxt = []
            for block in frontier:
                slots = self.matching(block, target)
                for size in range(len(slots), 0, -1):
                    for subset in combinations(slots, size):
                        state = self.commit(block, target, subset)
                        done = self.finished(state)
                        if done == end:
                            return level
                        if done is None and state not in seen:
                            seen.add(state)
                            nxt.append(state)
            frontier = nxt
        raise RuntimeError("internal error: the serial schedule is always valid")
