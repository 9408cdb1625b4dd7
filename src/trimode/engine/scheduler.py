"""Who runs: the waiting queue, the running requests, admission and preemption (no tensors).

Live requests occupy KV pool rows ``0 .. live - 1`` in the order of ``running`` (index =
row). Every step first gives each running request the pages its next forward may write
(``reserve``: its scratch slots past its committed text); when the pool runs short, the most recently admitted request is *preempted*:
its pages are returned and it goes back to the front of the queue, to recompute its KV
later (vLLM's recompute preemption; its committed pages usually stay in the prefix cache).
A waiting request is then admitted when a row is free, its prompt (less its cached prefix)
plus its widest step fits the step's token budget (``max_num_batched_tokens`` minus every
running request's widest step) and the pool has the pages for both; the first request of
an idle engine always passes the budget. ``mode="auto"`` is resolved here, from the load
the request joins.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from ..decoding.registry import scratch_slots, strategy_class
from ..decoding.sequence import Sequence
from ..defaults import AUTO
from .config import EngineConfig
from .kv_pool import KVPool
from .prefix import PrefixCache


def step_width(seq: Sequence) -> int:
    """The widest step a request can ask for (its share of the token budget)."""
    if seq.auto is not None:  # auto may switch to its widest option
        return seq.auto.widest
    p = seq.params
    return strategy_class(p.mode).step_width(seq.block_length, p.max_tokens, p.draft_segments)


def scratch(seq: Sequence) -> int:
    """The most cache slots one of its forwards may write beyond its committed text."""
    p = seq.params
    return scratch_slots(p.mode, seq.block_length, p.max_tokens, p.draft_segments)


class Scheduler:
    """The waiting queue and the running list over one KV pool."""

    def __init__(self, config: EngineConfig, pool: KVPool, prefix: PrefixCache):
        self.config = config
        self.pool = pool
        self.prefix = prefix
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index = pool row
        self.preemptions = 0

    def reserve(self) -> list[Sequence]:
        """Pages for every running request's next step, preempting from the back of
        ``running`` while the pool is short; returns the preempted requests."""
        preempted: list[Sequence] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            want = self.pool.length(seq.row) + scratch(seq)
            while not self.pool.grow(seq.row, want):
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            i += 1
        return preempted

    def preempt(self, seq: Sequence) -> None:
        """Return the pages of ``seq`` (the last running request) and queue it first."""
        if seq is not self.running[-1]:
            raise RuntimeError("internal error: only the last running request is preempted")
        self.prefix.register(seq)  # its committed pages stay findable while cached
        seq.resume = self.pool.length(seq.row)
        self.pool.free(seq.row)
        self.running.pop()
        seq.row, seq.chain = -1, []
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def admit(self, resolve: Callable[[Sequence, str], Sequence]) -> list[Sequence]:
        """Admit what fits, in queue order; returns the admitted requests (rows allocated,
        cached prefix pages in place: ``pool.length(seq.row)`` positions need no prefill).
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
            # at least one token is left to prefill (a new prompt's logits start decoding)
            target = seq.resume or len(seq.prompt_ids)
            pages, chain = self.prefix.match(seq, target - 1)
            hit = len(pages) * self.pool.page_size
            need = target - hit + step_width(seq)
            if need > budget and (self.running or admitted):
                break
            self.pool.allocator.share(pages)
            row = self.pool.allocate(pages)
            if not self.pool.grow(row, target + scratch(seq)):
                self.pool.free(row)
                break
            self.waiting.popleft()
            seq.row, seq.chain = row, chain
            if not seq.resume:
                self.prefix.queried += len(seq.prompt_ids)
                self.prefix.hits += hit
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
