"""Who runs: the waiting queue, the running requests and admission (no tensors).

Live requests occupy KV pool rows ``0 .. live - 1`` in the order of ``running`` (index =
row). A waiting request is admitted when a row is free and its prompt plus its widest step
fits the step's token budget (``max_num_batched_tokens`` minus every running request's
widest step); the first request of an idle engine is always admitted. ``mode="auto"`` is
resolved here, from the load the request joins.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from ..decoding.registry import strategy_class
from ..decoding.sequence import Sequence
from ..defaults import AUTO
from .config import EngineConfig
from .kv_pool import KVPool


def step_width(seq: Sequence) -> int:
    """The widest step a request can ask for (its share of the token budget)."""
    if seq.auto is not None:  # auto may switch to its widest option
        return seq.auto.widest
    p = seq.params
    return strategy_class(p.mode).step_width(seq.block_length, p.max_tokens, p.draft_segments)


class Scheduler:
    """The waiting queue and the running list over one KV pool."""

    def __init__(self, config: EngineConfig, pool: KVPool):
        self.config = config
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index = pool row

    def admit(self, resolve: Callable[[Sequence, str], Sequence]) -> list[Sequence]:
        """Admit what fits, in arrival order; returns the admitted requests (rows allocated).
        ``resolve(seq, mode)`` builds the Sequence of an ``auto`` request in ``mode``."""
        admitted: list[Sequence] = []
        budget = self.config.max_num_batched_tokens - sum(step_width(s) for s in self.running)
        while self.waiting and self.pool.live < self.pool.rows:
            seq = self.waiting[0]
            if seq.params.mode == AUTO:
                # the load it joins: everyone running plus the queue (itself included), so
                # a burst of arrivals is seen as the batch it is about to become
                load = min(len(self.running) + len(self.waiting), self.pool.rows)
                seq = resolve(seq, self.config.auto.choose(load))  # adaptive: starts in ar
            need = len(seq.prompt_ids) + step_width(seq)
            if need > budget and (self.running or admitted):
                break
            self.waiting.popleft()
            seq.row = self.pool.allocate()
            self.running.append(seq)
            admitted.append(seq)
            budget -= need
        return admitted

    def release(self, done: list[Sequence]) -> list[Sequence]:
        """Free the rows of ``done`` (live rows stay contiguous: the last row moves into the
        hole); returns the requests that held a row, in the order they were freed."""
        freed = []
        for seq in sorted(done, key=lambda s: s.row, reverse=True):
            if seq.row < 0:
                continue
            moved = self.pool.free(seq.row)
            last = self.running.pop()
            if moved is not None:
                self.running[seq.row] = last
                last.row = seq.row
            seq.row = -1
            freed.append(seq)
        return freed
