"""Per-row KV cache with per-row lengths (``KVCache``).

Each row of the batch owns a slice of preallocated key/value buffers and a length. A forward
writes its keys/values at ``length .. length + T - 1`` of each row; the row's length advances
only when the caller asks to *write* (commit). A read-only forward (diffusion denoising, draft)
therefore leaves the cache exactly as it was, and cropping (self-speculation rollback) is a
length update. docs/spec.md sections 2.1, 2.2 and 9.3. The engine keeps its KV in pages
(``paged_cache.py``, same interface); the per-forward positions and mask are ``attention.py``.
The model reads and writes a cache only through ``write_index``, ``store`` and ``window``.
"""

from __future__ import annotations

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
        self.set_host_lengths([0] * rows)

    def host_lengths(self) -> list[int]:
        """``lengths`` as host ints, from the mirror the engine keeps (no device sync); read
        back once if ``lengths`` was replaced behind its back (tests, training)."""
        if getattr(self, "_host_of", None) is not self.lengths:
            self.set_host_lengths(self.lengths.tolist())
        return list(self._host)

    def set_host_lengths(self, host: list[int]) -> None:
        """Record that ``lengths`` holds ``host`` (the caller knows it without a sync)."""
        self._host, self._host_of = list(host), self.lengths

    def set_row_length(self, row: int, n: int) -> None:
        """Set one row's length, on the device and in the host mirror."""
        host = self.host_lengths()
        self.lengths[row] = n
        host[row] = n
        self.set_host_lengths(host)

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    def write_index(self, rows: torch.Tensor, slots: torch.Tensor, real: torch.Tensor) -> tuple:
        """Where a forward's keys go: ``rows``, ``slots`` ``[B, T]`` logical slots, ``real``
        ``[B, T]`` bool. Right padding of a short row may run past its capacity: those
        (ignored) writes go to the last slot, which nothing reads."""
        return rows, torch.where(real, slots, slots.clamp(max=self.capacity - 1))

    def store(self, layer: int, index: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` ``[B, kv_heads, T, head_dim]`` at ``index`` (``write_index``)."""
        rows, slots = index
        self.keys[layer][rows, :, slots] = k.transpose(1, 2)
        self.values[layer][rows, :, slots] = v.transpose(1, 2)

    def store_kv(self, layer: int, index: tuple, kv: torch.Tensor) -> None:
        """``store`` of keys and values side by side ``[B, T, 2 * kv_heads, head_dim]``."""
        heads = kv.shape[2] // 2
        self.store(layer, index, kv[:, :, :heads].transpose(1, 2), kv[:, :, heads:].transpose(1, 2))

    def window_index(self, span: int) -> None:
        """What ``window`` needs per forward beyond ``span`` (nothing: rows are dense)."""
        return None

    def window(self, layer: int, span: int, index=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every row's first ``span`` slots: ``[B, kv_heads, span, head_dim]``
        (``index``: ``window_index(span)``, ignored here)."""
        return self.keys[layer][:, :, :span], self.values[layer][:, :, :span]

    def read_row(self, layer: int, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``row``'s first ``n`` slots ``[kv_heads, n, head_dim]``."""
        return self.keys[layer][row, :, :n], self.values[layer][row, :, :n]

    def write_row(self, layer: int, row: int, start: int, keys: torch.Tensor) -> None:
        """Write keys ``[kv_heads, n, head_dim]`` at ``row``'s slots ``start ..`` (stubs)."""
        self.keys[layer][row, :, start : start + keys.shape[1]] = keys

    def crop(self, lengths: torch.Tensor) -> None:
        """Roll rows back to ``lengths`` ``[rows]``; raises ValueError if any would grow."""
        if bool((lengths > self.lengths).any()) or bool((lengths < 0).any()):
            raise ValueError(f"crop lengths {lengths.tolist()} must lie in [0, {self.lengths.tolist()}]")
        self.lengths = lengths.to(self.lengths).clone()

    def copy_positions(self, src: int, dst: int, n: int) -> None:
        """Copy the keys/values of row ``src``'s first ``n`` positions into row ``dst``
        (lengths unchanged). The one way the engine moves KV between rows, so a
        tensor-parallel cache can replay it on every rank."""
        for buf in (*self.keys, *self.values):
            buf[dst, :, :n] = buf[src, :, :n]

    def crop_host(self, lengths: list[int]) -> None:
        """``crop`` to host ints, checked on the host (no device sync)."""
        now = self.host_lengths()
        if len(lengths) != len(now) or any(not 0 <= n <= m for n, m in zip(lengths, now)):
            raise ValueError(f"crop lengths {lengths} must lie in [0, {now}]")
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=self.lengths.device)
        self.set_host_lengths(lengths)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (int64 indices), in that order (drops finished requests)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.lengths = self.lengths.index_select(0, rows)
