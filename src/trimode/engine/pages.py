"""Which KV page is whose: reference counts, the free pages and the prefix cache (no tensors).

A page is *used* (reference count > 0: some running request's table points at it), *cached*
(count 0 but it holds the KV of a known token run, kept for later requests, evicted least
recently used first) or *free*. Cached pages are found by content: the key of a page is
``(key of the page before it, its tokens)``, so a key names the whole prefix up to the page's
end without hashing (no collisions), as vLLM's block hashes and SGLang's radix tree do. Free
pages are handed out lowest id first, so the memory a server touches follows its peak use.
Page 0 is the null page (``model/paged_cache.py``) and never handed out. Knows nothing about
requests or models: ``kv_pool.py`` and ``prefix.py`` use it.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict

ROOT = 0  # the chain id "before the first page"


class PageAllocator:
    """``pages`` physical pages (page 0 reserved); counters for ``stats``."""

    def __init__(self, pages: int):
        if pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is the null page); got {pages}")
        self.pages = pages
        self.refs = [0] * pages
        self.free: list[int] = list(range(1, pages))  # a heap: lowest id first
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached pages, oldest first
        self.by_key: dict[tuple, tuple[int, int]] = {}  # key -> (chain id, page)
        self.key_of: dict[int, tuple] = {}  # page -> its key while it is in by_key
        self.touched = 1  # pages below this have been handed out before (zeroed once)
        self._ids = itertools.count(ROOT + 1)
        self.evictions = 0

    @property
    def usable(self) -> int:
        return self.pages - 1

    def available(self) -> int:
        """Pages that ``allocate`` can hand out now (free + cached)."""
        return len(self.free) + len(self.lru)

    def used(self) -> int:
        return self.usable - self.available()

    def allocate(self, n: int) -> tuple[list[int], list[int]] | None:
        """``n`` pages (count 1 each), or None (nothing taken) when fewer are available;
        also returns the pages never handed out before (the caller zeroes them)."""
        if n > self.available():
            return None
        out = []
        for _ in range(n):
            if self.free:
                page = heapq.heappop(self.free)
            else:  # evict the least recently used cached page
                page, _ = self.lru.popitem(last=False)
                del self.by_key[self.key_of.pop(page)]
                self.evictions += 1
            self.refs[page] = 1
            out.append(page)
        fresh = [p for p in out if p >= self.touched]
        self.touched = max(self.touched, max(out, default=0) + 1)
        return out, fresh

    def share(self, pages: list[int]) -> None:
        """One more reference to each of ``pages`` (cached ones leave the LRU list)."""
        for page in pages:
            if self.refs[page] == 0:
                del self.lru[page]
            self.refs[page] += 1

    def release(self, pages: list[int]) -> None:
        """One reference less; a page nobody uses is cached if it has a key, else freed."""
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] < 0:
                raise RuntimeError(f"internal error: page {page} released twice")
            if self.refs[page] == 0:
                if page in self.key_of:
                    self.lru[page] = None
                else:
                    heapq.heappush(self.free, page)

    def lookup(self, parent: int, tokens: tuple) -> tuple[int, int] | None:
        """(chain id, page) of the cached page holding ``tokens`` after chain ``parent``."""
        return self.by_key.get((parent, tokens))

    def register(self, parent: int, tokens: tuple, page: int) -> int:
        """Record that ``page`` (in use) holds ``tokens`` after chain ``parent``; returns
        the chain id of the result (an existing page with the same content keeps the key)."""
        key = (parent, tokens)
        hit = self.by_key.get(key)
        if hit is not None:
            return hit[0]
        chain = next(self._ids)
        self.by_key[key] = (chain, page)
        if page not in self.key_of:
            self.key_of[page] = key
        else:  # a page re-registered under a new chain (cannot happen: one key per page)
            raise RuntimeError(f"internal error: page {page} registered twice")
        return chain

    def cached(self) -> int:
        return len(self.lru)

    def clear_cache(self) -> None:
        """Forget every cached page (they become free)."""
        while self.lru:
            page, _ = self.lru.popitem(last=False)
            del self.by_key[self.key_of.pop(page)]
            heapq.heappush(self.free, page)
