"""Per-row KV cache with per-row lengths, and the attention mask of one forward.

Each row of the batch owns a slice of preallocated key/value buffers and a length. A forward
writes its keys/values at ``length .. length + T - 1`` of each row; the row's length advances
only when the caller asks to *write* (commit). A read-only forward (diffusion denoising, draft)
therefore leaves the cache exactly as it was, and cropping (self-speculation rollback) is a
length update. Spec sections 2.1, 2.2 and 9.3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """Keys/values ``[layers][rows, kv_heads, capacity, head_dim]`` and ``lengths`` ``[rows]``."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", zeroed: bool = True):
        shape = (rows, kv_heads, capacity, head_dim)
        make = torch.zeros if zeroed else torch.empty  # empty: pages untouched until used
        self.keys = [make(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [make(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.zeroed = zeroed
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.capacity = capacity

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    def crop(self, lengths: torch.Tensor) -> None:
        """Roll rows back to ``lengths`` ``[rows]``; raises ValueError if any would grow."""
        if bool((lengths > self.lengths).any()) or bool((lengths < 0).any()):
            raise ValueError(f"crop lengths {lengths.tolist()} must lie in [0, {self.lengths.tolist()}]")
        self.lengths = lengths.to(self.lengths).clone()

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (int64 indices), in that order (drops finished requests)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.lengths = self.lengths.index_select(0, rows)


@dataclass
class ForwardBatch:
    """What one forward needs besides token ids; built once and shared by all layers.

    ``positions`` ``[B, T]``: absolute position of each query (row length + offset).
    ``write_index``: (row, slot) pairs where this call's keys/values are stored.
    ``mask`` ``[B, 1, T, S]`` bool: which of the first ``S`` cache slots each query may see.
    ``adapter_rows`` ``[B, T, 1]`` float or None: 1.0 where the draft adapter is on
    (``[N, 1]`` over the real tokens when ``real`` is set).
    """

    cache: KVCache
    positions: torch.Tensor
    mask: torch.Tensor
    adapter_rows: torch.Tensor | None
    write_index: tuple[torch.Tensor, torch.Tensor]
    real: torch.Tensor | None = None  # [B, T] bool when rows are ragged (see model.py)


def build_forward_batch(cache: KVCache, n_valid: torch.Tensor, bidirectional: torch.Tensor,
                        tokens: int, adapter_rows: torch.Tensor | None = None,
                        attention: torch.Tensor | None = None,
                        offsets: torch.Tensor | None = None) -> ForwardBatch:
    """Positions, write slots and attention mask for a call of ``tokens`` query slots per row.

    Row b has ``n_valid[b]`` real queries (right-padded to ``tokens``), written to cache slots
    ``length .. length + tokens - 1``. Query t may see: the row's cached prefix; its own slot;
    and the row's real new keys u: all of them when ``bidirectional[b]`` (denoise/draft:
    spec 2.2), those with u <= t when causal, or exactly ``attention[b, t, u]`` when an
    explicit ``[B, T, T]`` bool pattern is given (fused layouts). ``offsets`` ``[B, T]``
    sets each query's position relative to the row length (default ``0 .. T-1``).
    Raises ValueError when a row's real tokens would outgrow the cache capacity (padding
    may run past it: its writes land in the last slot and nothing reads them).
    """
    lengths = cache.lengths
    if int((lengths + n_valid).max()) > cache.capacity:
        raise ValueError(f"KV cache capacity {cache.capacity} exceeded")
    device = lengths.device
    slots = torch.arange(tokens, device=device)
    real = slots[None, :] < n_valid[:, None]  # [B, T]
    if attention is None:
        causal = slots[None, :, None] >= slots[None, None, :]  # [1, T(query), T(key)]
        attention = bidirectional[:, None, None] | causal
    visible_new = attention & real[:, None, :]
    visible_new = visible_new | torch.eye(tokens, dtype=torch.bool, device=device)[None]
    span = min(int((lengths + tokens).max()), cache.capacity)
    j = torch.arange(span, device=device)
    prefix = (j[None, :] < lengths[:, None])[:, None, :].expand(-1, tokens, -1)
    rel = (j[None, :] - lengths[:, None]).clamp(0, tokens - 1)  # [B, S]
    in_call = (j[None, :] >= lengths[:, None]) & (j[None, :] < lengths[:, None] + tokens)
    new = torch.gather(visible_new, 2, rel[:, None, :].expand(-1, tokens, -1)) & in_call[:, None, :]
    mask = prefix | new
    write_slots = lengths[:, None] + slots[None, :]
    # Right padding of a short row may run past its capacity: those (ignored) writes go to
    # the last slot, which a pool row never fills with real keys (KVPool keeps it spare).
    write_slots = torch.where(real, write_slots, write_slots.clamp(max=cache.capacity - 1))
    positions = lengths[:, None] + (slots[None, :] if offsets is None else offsets)
    rows = torch.arange(lengths.shape[0], device=device)[:, None].expand(-1, tokens)
    return ForwardBatch(cache, positions, mask[:, None], adapter_rows, (rows, write_slots))


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
        self.touched = cache.rows if getattr(cache, "zeroed", True) else 0

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
        self.cache.lengths[row] = 0
        self.live += 1
        return row

    def free(self, row: int) -> int | None:
        """Release ``row``; returns the former index of the row moved into it (or None)."""
        if not 0 <= row < self.live:
            raise ValueError(f"row {row} is not live (live rows: 0 .. {self.live - 1})")
        last = self.live - 1
        moved = None
        if row != last:
            n = int(self.cache.lengths[last])
            for buf in (*self.cache.keys, *self.cache.values):
                buf[row, :, :n] = buf[last, :, :n]
            self.cache.lengths[row] = n
            moved = last
        self.cache.lengths[last] = 0
        self.live -= 1
        return moved

    def view(self, start: int, stop: int) -> KVCache:
        """Rows ``start .. stop - 1`` as a KVCache sharing this pool's storage. Its
        ``lengths`` is a copy: call :meth:`sync` after the forward or crop."""
        view = KVCache.__new__(KVCache)
        view.keys = [k[start:stop] for k in self.cache.keys]
        view.values = [v[start:stop] for v in self.cache.values]
        view.lengths = self.cache.lengths[start:stop].clone()
        view.capacity = self.cache.capacity
        return view

    def sync(self, view: KVCache, start: int) -> None:
        """Copy a view's lengths back into the pool."""
        self.cache.lengths[start : start + view.rows] = view.lengths

    def used_positions(self) -> int:
        """Committed positions held by live rows."""
        return int(self.cache.lengths[: self.live].sum())
