"""The attention metadata of one forward: positions, cache write slots and the mask.

``build_forward_batch`` turns per-row lengths, real-token counts and the attention kind
(causal, block-bidirectional, or an explicit fused pattern) into a :class:`ForwardBatch`
shared by every layer (docs/spec.md section 2.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .invariant import additive_bias
from .kv_cache import KVCache


@dataclass(frozen=True)
class ForwardPlan:
    """What the host knows about a forward, so building its metadata needs no device sync:
    each row's cache length before it, its real tokens, and whether any token uses the
    draft adapter."""

    lengths: list[int]
    n_valid: list[int]
    adapter: bool

    @property
    def real_index(self) -> list[int]:
        """Flat ``row * T + t`` indices of the real tokens (T = the widest row)."""
        width = max(self.n_valid)
        return [b * width + t for b, n in enumerate(self.n_valid) for t in range(n)]


@dataclass
class ForwardBatch:
    """What one forward needs besides token ids; built once and shared by all layers.

    ``positions`` ``[B, T]``: absolute position of each query (row length + offset).
    ``write_index``: where this call's keys/values are stored (``cache.write_index``).
    ``mask`` ``[B, 1, T, S]`` bool: which of the first ``S`` cache slots each query may see.
    ``adapter_rows`` ``[B, T, 1]`` float or None: 1.0 where the draft adapter is on
    (``[N, 1]`` over the real tokens when ``real`` is set).
    """

    cache: KVCache
    positions: torch.Tensor
    mask: torch.Tensor
    adapter_rows: torch.Tensor | None
    write_index: tuple[torch.Tensor, torch.Tensor]
    real: torch.Tensor | None = None  # [N] flat indices of real tokens when rows are ragged
    window_index: torch.Tensor | None = None  # ``cache.window_index(S)``, shared by all layers

    @cached_property
    def bias(self) -> torch.Tensor:
        """``mask`` as an fp64 additive bias for the batch-invariant attention (built on
        first use, once for all layers; ``mask`` must not change after that)."""
        return additive_bias(self.mask)


def build_forward_batch(cache: KVCache, n_valid: torch.Tensor, bidirectional: torch.Tensor,
                        tokens: int, adapter_rows: torch.Tensor | None = None,
                        attention: torch.Tensor | None = None,
                        offsets: torch.Tensor | None = None,
                        plan: ForwardPlan | None = None) -> ForwardBatch:
    """Positions, write slots and attention mask for a call of ``tokens`` query slots per row.

    Row b has ``n_valid[b]`` real queries (right-padded to ``tokens``), written to cache slots
    ``length .. length + tokens - 1``. Query t may see: the row's cached prefix; its own slot;
    and the row's real new keys u: all of them when ``bidirectional[b]`` (denoise/draft:
    spec 2.2), those with u <= t when causal, or exactly ``attention[b, t, u]`` when an
    explicit ``[B, T, T]`` bool pattern is given (fused layouts). ``offsets`` ``[B, T]``
    sets each query's position relative to the row length (default ``0 .. T-1``).
    Raises ValueError when a row's real tokens would outgrow the cache capacity (padding
    may run past it: its writes land in the last slot and nothing reads them). With a
    ``plan`` every tensor is built on the device without reading anything back.
    """
    lengths = cache.lengths
    if plan is not None:
        top = max(n0 + n for n0, n in zip(plan.lengths, plan.n_valid))
        longest = max(plan.lengths)
    else:
        top, longest = int((lengths + n_valid).max()), int(lengths.max())
    if top > cache.capacity:
        raise ValueError(f"KV cache capacity {cache.capacity} exceeded")
    device = lengths.device
    slots = torch.arange(tokens, device=device)
    real = slots[None, :] < n_valid[:, None]  # [B, T]
    if attention is None:
        causal = slots[None, :, None] >= slots[None, None, :]  # [1, T(query), T(key)]
        attention = bidirectional[:, None, None] | causal
    visible_new = attention & real[:, None, :]
    visible_new = visible_new | torch.eye(tokens, dtype=torch.bool, device=device)[None]
    span = min(longest + tokens, cache.capacity)
    j = torch.arange(span, device=device)
    prefix = (j[None, :] < lengths[:, None])[:, None, :].expand(-1, tokens, -1)
    rel = (j[None, :] - lengths[:, None]).clamp(0, tokens - 1)  # [B, S]
    in_call = (j[None, :] >= lengths[:, None]) & (j[None, :] < lengths[:, None] + tokens)
    new = torch.gather(visible_new, 2, rel[:, None, :].expand(-1, tokens, -1)) & in_call[:, None, :]
    mask = prefix | new
    positions = lengths[:, None] + (slots[None, :] if offsets is None else offsets)
    rows = torch.arange(lengths.shape[0], device=device)[:, None].expand(-1, tokens)
    write_index = cache.write_index(rows, lengths[:, None] + slots[None, :], real)
    return ForwardBatch(cache, positions, mask[:, None], adapter_rows, write_index,
                        window_index=cache.window_index(span))
