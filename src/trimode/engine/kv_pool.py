"""The engine's KV memory: one preallocated :class:`~trimode.model.kv_cache.KVCache` handed
out row by row to running requests (``KVPool``), and its size per token."""

from __future__ import annotations

import torch

from ..model.kv_cache import KVCache


class KVPool:
    """Preallocated KV memory for up to ``rows`` concurrent requests (slot allocation).

    Wraps one :class:`KVCache` of ``rows x capacity`` positions allocated once. Live requests
    occupy rows ``0 .. live - 1``, so every forward runs on a contiguous view (no gather).
    ``allocate`` hands out row ``live``; ``free(row)`` moves the last live row into the hole
    (copying only its ``length`` committed positions) so the live rows stay contiguous.
    The last slot of every row is spare: requests are admitted only when their prompt,
    generation and scratch fit in ``capacity - 1`` positions (see ``engine.py``), so right
    padding of a short row never overwrites real keys. Like llama.cpp's server slots
    (``-np``): each row reserves the whole ``capacity``.
    """

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.live = 0
        # rows below this have been written before (finite values); a row is zeroed the
        # first time it is handed out, so memory is touched only as concurrency grows
        # (padding and masked slots are multiplied by zero weights: NaN garbage would leak)
        self.touched = cache.rows if cache.zeroed else 0

    @property
    def rows(self) -> int:
        return self.cache.rows

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def allocate(self) -> int:
        """A free row, zero-length. Raises RuntimeError when every row is in use."""
        if self.live >= self.rows:
            raise RuntimeError(f"KV pool has no free row ({self.rows} in use)")
        row = self.live
        if row >= self.touched:
            for buf in (*self.cache.keys, *self.cache.values):
                buf[row].zero_()
            self.touched = row + 1
        self.cache.set_row_length(row, 0)
        self.live += 1
        return row

    def free(self, row: int) -> int | None:
        """Release ``row``; returns the former index of the row moved into it (or None)."""
        if not 0 <= row < self.live:
            raise ValueError(f"row {row} is not live (live rows: 0 .. {self.live - 1})")
        last = self.live - 1
        moved = None
        host = self.cache.host_lengths()
        if row != last:
            n = host[last]
            for buf in (*self.cache.keys, *self.cache.values):
                buf[row, :, :n] = buf[last, :, :n]
            self.cache.lengths[row] = n
            host[row] = n
            moved = last
        self.cache.lengths[last] = 0
        host[last] = 0
        self.cache.set_host_lengths(host)
        self.live -= 1
        return moved

    def view(self, start: int, stop: int) -> KVCache:
        """Rows ``start .. stop - 1`` as a KVCache sharing this pool's storage. Its
        ``lengths`` is a copy: call :meth:`sync` after the forward or crop."""
        view = KVCache.__new__(KVCache)
        view.keys = [k[start:stop] for k in self.cache.keys]
        view.values = [v[start:stop] for v in self.cache.values]
        view.lengths = self.cache.lengths[start:stop].clone()
        view.set_host_lengths(self.cache.host_lengths()[start:stop])
        view.capacity = self.cache.capacity
        view.zeroed = self.cache.zeroed
        return view

    def sync(self, view: KVCache, start: int) -> None:
        """Copy a view's lengths back into the pool."""
        host = self.cache.host_lengths()
        self.cache.lengths[start : start + view.rows] = view.lengths
        host[start : start + view.rows] = view.host_lengths()
        self.cache.set_host_lengths(host)

    def used_positions(self) -> int:
        """Committed positions held by live rows."""
        return sum(self.cache.host_lengths()[: self.live])


def kv_bytes_per_token(model) -> int:
    """Bytes of keys + values one position takes in every layer."""
    c = model.config
    element = torch.tensor([], dtype=model.dtype).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * element
