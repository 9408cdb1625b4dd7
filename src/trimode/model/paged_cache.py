"""A KV cache in fixed-size pages (``PagedKVCache``), read and written through page tables.

Keys and values live side by side in one ``[pages, page_size, 2 * kv_heads, head_dim]``
buffer per layer (``kv``; ``keys`` and ``values`` are its two halves), so a forward stores
and gathers both with one indexing op each (a decode step is dispatch-bound: 30 layers x
every op). Row b's
logical slot s is physical slot ``table[b, s // page_size] * page_size + s % page_size``.
Which pages a row owns is the engine's business (``engine/kv_pool.py``, ``engine/pages.py``):
this class only maps slots, so the model code is the same as for the dense ``KVCache``
(``write_index``, ``store``, ``window``) and lengths, crops and read-only passes keep their
meaning exactly (spec 2.1, 2.2, 9.3). Page 0 is the *null page*: unused table entries point
to it and right-padding writes land in it; nothing reads it unmasked. Attention gathers the
rows' pages into the dense ``[B, kv_heads, span, head_dim]`` layout per layer (vLLM's block
tables, nano-vllm's ``block_table``; on a CPU the gather is cheap next to the matmuls,
benchmarks/RESULTS.md "Paged KV").
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache


class PagedKVCache(KVCache):
    """``pages`` pages of ``page_size`` positions; ``table`` ``[rows, max_pages]`` (long, on
    the device) maps each row's logical pages to physical ones; ``capacity`` =
    ``max_pages * page_size`` logical slots per row. ``zeroed=False`` leaves pages
    uninitialised (the caller zeroes a page before its first use: NaN garbage in a masked
    slot still poisons attention, 0 * NaN)."""

    def __init__(self, layers: int, pages: int, page_size: int, kv_heads: int, head_dim: int,
                 rows: int, max_pages: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", zeroed: bool = True):
        shape = (pages, page_size, 2 * kv_heads, head_dim)
        make = torch.zeros if zeroed else torch.empty  # empty: memory untouched until used
        self.kv = [make(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.keys = [buf[:, :, :kv_heads] for buf in self.kv]
        self.values = [buf[:, :, kv_heads:] for buf in self.kv]
        self.zeroed = zeroed
        self.page_size = page_size
        self.table = torch.zeros(rows, max_pages, dtype=torch.long, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.capacity = max_pages * page_size
        self.set_host_lengths([0] * rows)
        self.zero_pages([0])

    @property
    def pages(self) -> int:
        return self.keys[0].shape[0]

    def zero_pages(self, pages: list[int]) -> None:
        """Zero these physical pages (first use of uninitialised memory)."""
        index = torch.tensor(pages, dtype=torch.long, device=self.table.device)
        for buf in self.kv:
            buf.index_fill_(0, index, 0)

    def set_pages(self, row: int, start: int, pages: list[int]) -> None:
        """Table entries ``start ..`` of ``row`` := ``pages`` (a host-to-device copy)."""
        if pages:
            self.table[row, start : start + len(pages)] = torch.tensor(pages, dtype=torch.long)

    def clear_row(self, row: int) -> None:
        """Point every entry of ``row`` at the null page."""
        self.table[row] = 0

    def view(self, start: int, stop: int) -> "PagedKVCache":
        """Rows ``start .. stop - 1``: the same pages, a slice of the table (shared), a
        copy of the lengths (the pool syncs them back)."""
        out = PagedKVCache.__new__(PagedKVCache)
        out.kv, out.keys, out.values, out.zeroed = self.kv, self.keys, self.values, self.zeroed
        out.page_size, out.capacity = self.page_size, self.capacity
        out.table = self.table[start:stop]
        out.lengths = self.lengths[start:stop].clone()
        out.set_host_lengths(self.host_lengths()[start:stop])
        return out

    def _physical(self, rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        p = self.page_size
        return self.table[rows, slots // p] * p + slots % p

    def write_index(self, rows: torch.Tensor, slots: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Physical slots ``[B, T]`` of a forward's keys; padding goes to the null page."""
        slots = slots.clamp(max=self.capacity - 1)
        return torch.where(real, self._physical(rows, slots), slots % self.page_size)

    def store(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.store_kv(layer, index, torch.cat([k, v], 1).transpose(1, 2))

    def store_kv(self, layer: int, index: torch.Tensor, kv: torch.Tensor) -> None:
        """Keys and values ``[B, T, 2 * kv_heads, head_dim]`` (keys first) at ``index``."""
        buf = self.kv[layer]
        buf.view(-1, *buf.shape[2:])[index.reshape(-1)] = kv.reshape(-1, *buf.shape[2:])

    def window_index(self, span: int) -> torch.Tensor:
        """The pages ``window`` gathers for ``span`` slots, flattened (one per forward)."""
        return self.table[:, :-(-span // self.page_size)].reshape(-1)

    def window(self, layer: int, span: int,
               index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.window_index(span) if index is None else index
        buf = self.kv[layer]
        heads = buf.shape[2] // 2
        out = buf.index_select(0, index)  # [B * n, page, 2 * heads, dim]
        rows = self.table.shape[0]
        out = out.view(rows, -1, *buf.shape[2:])[:, :span].transpose(1, 2)
        return out[:, :heads], out[:, heads:]

    def read_row(self, layer: int, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        slots = torch.arange(n, device=self.table.device)
        flat = self._physical(torch.full_like(slots, row), slots)
        return tuple(buf[layer].flatten(0, 1)[flat].transpose(0, 1)
                     for buf in (self.keys, self.values))

    def write_row(self, layer: int, row: int, start: int, keys: torch.Tensor) -> None:
        slots = torch.arange(start, start + keys.shape[1], device=self.table.device)
        flat = self._physical(torch.full_like(slots, row), slots)
        self.keys[layer].flatten(0, 1)[flat] = keys.transpose(0, 1).to(self.keys[layer].dtype)

    def copy_positions(self, src: int, dst: int, n: int) -> None:
        raise NotImplementedError("paged rows share pages; they never copy KV")

    def select_rows(self, rows: torch.Tensor) -> None:
        self.table = self.table.index_select(0, rows)
        self.lengths = self.lengths.index_select(0, rows)
