"""The engine's KV memory: a :class:`~trimode.model.paged_cache.PagedKVCache` whose pages
are handed out to request rows as they grow (``KVPool``), and its size per token.

A request holds a row of the page table (live rows ``0 .. live - 1``, contiguous, so every
forward runs on a slice of the table) and the pages its tokens need. Pages are reference
counted (``pages.py``): a row may point at pages of the prefix cache that other rows share.
Memory follows the tokens in use, not ``max_model_len`` (vLLM's PagedAttention).
"""

from __future__ import annotations

import torch

from ..model.paged_cache import PagedKVCache
from .pages import PageAllocator


class KVPool:
    """Page-table rows for up to ``cache.rows`` concurrent requests over ``cache.pages`` pages."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.allocator = PageAllocator(cache.pages)
        self.page_size = cache.page_size
        self.live = 0
        self.row_pages: list[list[int]] = [[] for _ in range(cache.rows)]

    @property
    def rows(self) -> int:
        return self.cache.rows

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def pages_for(self, positions: int) -> int:
        """Pages that hold ``positions`` slots (capped at a row's table)."""
        return -(-min(positions, self.capacity) // self.page_size)

    def allocate(self, shared: list[int] = ()) -> int:
        """A free row starting with the (cached, already referenced) pages ``shared``;
        its length is ``len(shared) * page_size``. Raises RuntimeError when no row is free."""
        if self.live >= self.rows:
            raise RuntimeError(f"KV pool has no free row ({self.rows} in use)")
        row = self.live
        self.live += 1
        self.row_pages[row] = list(shared)
        self.cache.clear_row(row)
        self.cache.set_pages(row, 0, list(shared))
        self.cache.set_row_length(row, len(shared) * self.page_size)
        return row

    def grow(self, row: int, positions: int) -> bool:
        """Give ``row`` pages for its first ``positions`` slots; False (nothing taken) when
        the pool has too few pages left."""
        have = self.row_pages[row]
        missing = self.pages_for(positions) - len(have)
        if missing <= 0:
            return True
        got = self.allocator.allocate(missing)
        if got is None:
            return False
        pages, fresh = got
        if fresh and not self.cache.zeroed:
            self.cache.zero_pages(fresh)
        self.cache.set_pages(row, len(have), pages)
        have.extend(pages)
        return True

    def free(self, row: int) -> int | None:
        """Release ``row`` and its pages; the last live row moves into the hole (a table
        copy, no KV moves). Returns the former index of the moved row (or None)."""
        if not 0 <= row < self.live:
            raise ValueError(f"row {row} is not live (live rows: 0 .. {self.live - 1})")
        self.allocator.release(self.row_pages[row])
        last = self.live - 1
        moved = None
        host = self.cache.host_lengths()
        if row != last:
            self.row_pages[row] = self.row_pages[last]
            self.cache.table[row] = self.cache.table[last]
            self.cache.lengths[row] = host[last]
            host[row] = host[last]
            moved = last
        self.row_pages[last] = []
        self.cache.clear_row(last)
        self.cache.lengths[last] = 0
        host[last] = 0
        self.cache.set_host_lengths(host)
        self.live -= 1
        return moved

    def view(self, start: int, stop: int) -> PagedKVCache:
        """Rows ``start .. stop - 1`` sharing this pool's pages and table. Its ``lengths``
        is a copy: call :meth:`sync` after the forward or crop."""
        return self.cache.view(start, stop)

    def sync(self, view: PagedKVCache, start: int) -> None:
        """Copy a view's lengths back into the pool."""
        host = self.cache.host_lengths()
        self.cache.lengths[start : start + view.rows] = view.lengths
        host[start : start + view.rows] = view.host_lengths()
        self.cache.set_host_lengths(host)

    def length(self, row: int) -> int:
        return self.cache.host_lengths()[row]

    def used_positions(self) -> int:
        """Committed positions held by live rows."""
        return sum(self.cache.host_lengths()[: self.live])


def kv_bytes_per_token(model) -> int:
    """Bytes of keys + values one position takes in every layer."""
    c = model.config
    element = torch.tensor([], dtype=model.dtype).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * element
