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
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (rows, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
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
    ``adapter_rows`` ``[B, T, 1]`` float or None: 1.0 where the draft adapter is on.
    """

    cache: KVCache
    positions: torch.Tensor
    mask: torch.Tensor
    adapter_rows: torch.Tensor | None
    write_index: tuple[torch.Tensor, torch.Tensor]


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
    Raises ValueError when a row would outgrow the cache capacity.
    """
    lengths = cache.lengths
    if int((lengths + tokens).max()) > cache.capacity:
        raise ValueError(f"KV cache capacity {cache.capacity} exceeded")
    device = lengths.device
    slots = torch.arange(tokens, device=device)
    real = slots[None, :] < n_valid[:, None]  # [B, T]
    if attention is None:
        causal = slots[None, :, None] >= slots[None, None, :]  # [1, T(query), T(key)]
        attention = bidirectional[:, None, None] | causal
    visible_new = attention & real[:, None, :]
    visible_new = visible_new | torch.eye(tokens, dtype=torch.bool, device=device)[None]
    span = int((lengths + tokens).max())
    j = torch.arange(span, device=device)
    prefix = (j[None, :] < lengths[:, None])[:, None, :].expand(-1, tokens, -1)
    rel = (j[None, :] - lengths[:, None]).clamp(0, tokens - 1)  # [B, S]
    in_call = (j[None, :] >= lengths[:, None]) & (j[None, :] < lengths[:, None] + tokens)
    new = torch.gather(visible_new, 2, rel[:, None, :].expand(-1, tokens, -1)) & in_call[:, None, :]
    mask = prefix | new
    write_slots = lengths[:, None] + slots[None, :]
    positions = lengths[:, None] + (slots[None, :] if offsets is None else offsets)
    rows = torch.arange(lengths.shape[0], device=device)[:, None].expand(-1, tokens)
    return ForwardBatch(cache, positions, mask[:, None], adapter_rows, (rows, write_slots))
