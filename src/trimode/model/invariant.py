"""Batch-invariant attention: a query's result independent of how many queries and keys share
the call, so a 1-token AR step, an 8-token verify block and a batched forward agree bitwise
where later layers round activations to bf16 (quantized or bf16 CPU models; RESULTS.md,
"Exactness, fused projections, kernels"). Knows nothing of caches or decoding modes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
           invariant: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``q`` ``[B, H, T, D]`` over ``keys``/``values`` ``[B, Hkv, S, D]`` where
    ``mask`` ``[B, 1, T, S]`` (bool) allows; returns ``[B, H, T, D]`` in ``q``'s dtype.

    ``invariant=False``: PyTorch's SDPA, whose blocking (and so its rounding) depends on T and
    S. ``invariant=True``: scores, softmax and the weighted sum in fp64 from the fp32/bf16
    inputs, rounded once at the end. Every product of two fp32 (or bf16) values is exact in
    fp64 and the sums' rounding error (~1e-16 relative) is far below the output's last bit,
    so a query's result no longer depends on how many queries or keys share the call
    (masked keys add exact zeros). That keeps a 1-token AR step and an 8-token verify bitwise
    equal where later layers round activations to bf16 (quantized or bf16 models), which
    would otherwise amplify SDPA's last-bit differences into different tokens. ``bias``:
    ``additive_bias(mask)``, when the caller built it once for all layers.
    """
    if not invariant:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                              enable_gqa=keys.shape[1] != q.shape[1])
    b, h, t, d = q.shape
    g = h // keys.shape[1]
    qd = q.double().reshape(b, h // g, g * t, d)  # query heads grouped by their KV head
    scores = torch.matmul(qd, keys.double().transpose(-1, -2)).view(b, h, t, -1)
    # bias + scores / sqrt(d) in one op: exactly masked_fill(scores / sqrt(d), ~mask, -inf),
    # as adding 0 is exact and -inf absorbs any finite score
    bias = additive_bias(mask) if bias is None else bias
    scores = torch.add(bias, scores, alpha=1.0 / d ** 0.5)
    probs = torch.softmax(scores, dim=-1).view(b, h // g, g * t, -1)
    return torch.matmul(probs, values.double()).view(b, h, t, d).to(q.dtype)


def additive_bias(mask: torch.Tensor) -> torch.Tensor:
    """A bool ``mask`` as an fp64 additive bias: 0 where allowed, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=torch.float64, device=mask.device).masked_fill_(
        ~mask, float("-inf"))


def set_batch_invariant(net: nn.Module, on: bool = True) -> None:
    """Switch every attention layer of ``net`` (those with a ``batch_invariant`` flag) to the
    batch-invariant path of ``attend``."""
    for module in net.modules():
        if hasattr(module, "batch_invariant"):
            module.batch_invariant = on
