"""Fused projections for inference: q/k/v and gate/up each become one matmul per layer.

A decode step of a small model is dominated by per-layer overhead, not arithmetic (spec of
issue 14: 7 matmul calls per layer, each with its own casts and views), so the three
attention input projections and the two MLP input projections are stacked row-wise into one
layer (``Attention.qkv``, ``MLP.gate_up``). The original layers keep their names, their
adapter (LoRA) tensors and views of the stacked weight, so adapters, state-dict names and
describe() are unchanged; each adapter delta is still added per projection. Works for dense
bf16/fp16 and quantized (int8/int4, ``trimode.quant``) layers, via ``Linear.stack``; dense
fp32 is left unfused (measured no faster). Not for tensor-parallel shards (their layers are split differently).
"""

from __future__ import annotations

import torch
from torch import nn

from .model import Linear


def fuse_projections(net: nn.Module) -> int:
    """Stack q/k/v and gate/up of every decoder layer of ``net`` in place; returns how many
    layers were fused (0 when the layers are not plain or quantized ``Linear``s of one kind)."""
    fused = 0
    for layer in net.encoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up = (mlp.gate_proj, mlp.up_proj)
        if not (_stackable(qkv) and _stackable(gate_up)):
            return fused
        # plain attributes, outside the module tree: state_dict() and parameters() keep the
        # checkpoint's names and shapes (the parts hold views of the stacked rows)
        object.__setattr__(attn, "qkv", type(qkv[0]).stack(qkv))
        object.__setattr__(mlp, "gate_up", type(gate_up[0]).stack(gate_up))
        fused += 1
    return fused


def _stackable(layers: tuple) -> bool:
    # a class must define ``stack`` itself: subclasses such as the tensor-parallel shards
    # inherit Linear's but are split in ways a row stack would break
    first = layers[0]
    if type(first) is Linear and first.weight.dtype == torch.float32:
        # MKL's fp32 GEMM was measured slower on the stacked gate/up (0.25 -> 0.29 ms at 1
        # token, 0.83 -> 0.98 ms at 8, 576 x 1536 x 2) and no faster on q/k/v: fp32 stays as is
        return False
    return "stack" in vars(type(first)) and len({x.stack_key() for x in layers}) == 1
