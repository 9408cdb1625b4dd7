"""The NLD decoder (a Ministral-3 / Llama-style transformer) in plain PyTorch.

The model obeys, decoding strategies decide: every forward is told, per row, how many tokens
are real, whether attention over the current tokens is causal or bidirectional (over cached
prefix + current block), whether the tokens' keys/values are committed to the cache, and
whether the draft adapter is on. One code path serves batch 1 and batch N.
Follows docs/spec.md sections 1.3, 1.4, 2.1, 2.2 and 9.2. Knows nothing about tokens' meaning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import ForwardBatch, ForwardPlan, build_forward_batch
from .config import ModelConfig
from .invariant import attend
from .kv_cache import KVCache
from .paged_cache import PagedKVCache
from .rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as the reference does, then cast back (matters in bf16).
        # F.rms_norm is one kernel with the reference's rounding (bitwise, checked in tests).
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class Linear(nn.Linear):
    """Bias-free linear layer with an optional low-rank delta applied to selected rows.

    The delta ``scale * (x A^T) B^T`` (a PEFT LoRA) is added only where
    ``batch.adapter_rows`` (``[B, T, 1]``) is 1, so draft and verify tokens can share a forward.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.lora_A: torch.Tensor | None = None
        self.lora_B: torch.Tensor | None = None
        self.lora_scale = 0.0

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen weight's product (quant.QuantLinear replaces it with an int8/int4 kernel)."""
        return F.linear(x, self.weight)

    def stack_key(self) -> tuple:
        """Layers with equal keys can be stacked row-wise by ``stack``."""
        return type(self), self.in_features, self.weight.dtype, self.weight.device

    @classmethod
    def stack(cls, layers: tuple[Linear, ...]) -> Linear:
        """One layer computing ``layers``' base products side by side (rows concatenated);
        each of ``layers`` keeps a view of its rows, so no weight is held twice."""
        fused = cls(layers[0].in_features, sum(x.out_features for x in layers))
        fused.weight = nn.Parameter(torch.cat([x.weight.detach() for x in layers]), requires_grad=False)
        start = 0
        for x in layers:
            x.weight = nn.Parameter(fused.weight[start:start + x.out_features], requires_grad=False)
            start += x.out_features
        return fused

    def forward(self, x: torch.Tensor, adapter_rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.add_delta(self.base(x), x, adapter_rows)

    def add_delta(self, out: torch.Tensor, x: torch.Tensor,
                  adapter_rows: torch.Tensor | None) -> torch.Tensor:
        """``out`` (this layer's base product of ``x``) plus the adapter delta where it is on."""
        if self.lora_A is None or adapter_rows is None:
            return out
        delta = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scale
        return out + delta * adapter_rows


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        d = config.hidden_size
        self.q_proj = Linear(d, self.heads * self.head_dim)
        self.k_proj = Linear(d, self.kv_heads * self.head_dim)
        self.v_proj = Linear(d, self.kv_heads * self.head_dim)
        self.o_proj = Linear(self.heads * self.head_dim, d)
        self.batch_invariant = False  # see ``attend``; set by ``set_batch_invariant``
        self.qkv: Linear | None = None  # q, k, v rows in one layer (``fused.fuse_projections``)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rope: tuple) -> torch.Tensor:
        """``x`` ``[B * T, d]`` (row-major), or ``[N, d]`` real tokens only when ``batch.real``
        is set (ragged rows: projections skip the padding; attention runs on the padded
        layout). Tokens stay flat outside attention, so every linear layer gets 2-D input."""
        real = batch.real
        b, t = batch.positions.shape
        h, kv = self.heads, self.kv_heads
        y = self.project(x, batch.adapter_rows)  # [B, T, (h + 2 kv) * head_dim] or [N, ...]
        if real is not None:
            y = _scatter_rows(y, real, b, t)
        y = y.view(b, t, h + 2 * kv, self.head_dim)
        cos, sin, q_scale = rope  # tables for all h + 2 kv heads: values pass unrotated
        y = apply_rotary(y, cos, sin)
        q = y[:, :, :h]
        if q_scale is not None:
            q = q * q_scale  # Llama-4 query scale, after RoPE, keys unscaled (spec 1.3)
        cache = batch.cache
        cache.store_kv(self.layer, batch.write_index, y[:, :, h:])
        keys, values = cache.window(self.layer, batch.mask.shape[-1], batch.window_index)
        q = q.transpose(1, 2)  # [B, heads, T, D]
        o = attend(q, keys, values, batch.mask, self.batch_invariant,
                   batch.bias if self.batch_invariant else None)
        o = o.transpose(1, 2).reshape(b * t, -1)
        return self.o_proj(o if real is None else o[real], batch.adapter_rows)

    def project(self, x: torch.Tensor, ad: torch.Tensor | None) -> torch.Tensor:
        """q, k and v of ``x`` side by side on the last axis (one matmul when fused,
        ``model.fused``; adapter deltas per projection)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if self.qkv is None:
            return torch.cat([proj(x, ad) for proj in projs], -1)
        y = self.qkv.base(x)
        if ad is None or all(p.lora_A is None for p in projs):
            return y
        parts = y.split([p.out_features for p in projs], -1)
        return torch.cat([p.add_delta(z, x, ad) for p, z in zip(projs, parts)], -1)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)
        self.gate_up: Linear | None = None  # gate and up rows in one layer (``fused``)

    def forward(self, x: torch.Tensor, adapter_rows: torch.Tensor | None) -> torch.Tensor:
        if self.gate_up is None:
            gate, up = self.gate_proj(x, adapter_rows), self.up_proj(x, adapter_rows)
        else:
            gate, up = self.gate_up.base(x).chunk(2, -1)
            gate = self.gate_proj.add_delta(gate, x, adapter_rows)
            up = self.up_proj.add_delta(up, x, adapter_rows)
        return self.down_proj(F.silu(gate) * up, adapter_rows)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, batch: ForwardBatch, rope: tuple) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), batch, rope)
        return h + self.mlp(self.post_attention_layernorm(h), batch.adapter_rows)


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class TriModeModel(nn.Module):
    """NLD backbone + ``diffusion_head``; parameter names match the NLD checkpoint layout."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.diffusion_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.diffusion_head.weight = self.encoder.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.rope, config.head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.embed_tokens.weight.device

    def new_cache(self, rows: int, capacity: int, zeroed: bool = True) -> KVCache:
        """A KV cache of ``rows`` x ``capacity`` positions (``zeroed=False``: uninitialised,
        for a KVPool that zeroes rows on first use)."""
        c = self.config
        return KVCache(c.num_hidden_layers, rows, c.num_key_value_heads, c.head_dim, capacity,
                       self.dtype, self.device, zeroed)

    def new_paged_cache(self, pages: int, page_size: int, rows: int, max_pages: int,
                        zeroed: bool = True) -> PagedKVCache:
        """A paged KV cache (``model/paged_cache.py``) for the engine's pool."""
        c = self.config
        return PagedKVCache(c.num_hidden_layers, pages, page_size, c.num_key_value_heads,
                            c.head_dim, rows, max_pages, self.dtype, self.device, zeroed)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, n_valid: torch.Tensor | None = None,
                bidirectional: torch.Tensor | bool = False, write: torch.Tensor | bool = True,
                adapter: torch.Tensor | bool = False, attention: torch.Tensor | None = None,
                offsets: torch.Tensor | None = None,
                embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                plan: ForwardPlan | None = None) -> torch.Tensor:
        """Inference forward (no autograd); see ``run`` for the arguments."""
        return self.run(tokens, cache, n_valid, bidirectional, write, adapter, attention, offsets,
                        embeds=embeds, plan=plan)

    def run(self, tokens: torch.Tensor, cache: KVCache, n_valid: torch.Tensor | None = None,
            bidirectional: torch.Tensor | bool = False, write: torch.Tensor | bool = True,
            adapter: torch.Tensor | bool = False, attention: torch.Tensor | None = None,
            offsets: torch.Tensor | None = None, mask: torch.Tensor | None = None,
            embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
            plan: ForwardPlan | None = None) -> torch.Tensor:
        """Run ``tokens`` ``[B, T]`` after each row's cached prefix; return hidden ``[B, T, d]``.

        ``n_valid`` ``[B]``: real tokens per row (the rest is right padding; default all T).
        ``bidirectional`` ``[B]`` or bool: block-bidirectional attention (denoise, draft) instead
        of causal (prefill, AR step, commit, verify). ``write`` ``[B]`` or bool: advance the
        row's cache length by its real tokens; otherwise the cache keeps its length and the
        written slots are ignored by later calls. ``adapter`` ``[B]``, ``[B, T]`` or bool:
        draft adapter on (per row or per token).
        Positions continue from each row's cache length (spec 2.1). ``attention`` ``[B, T, T]``
        bool and ``offsets`` ``[B, T]`` override the pattern among this call's tokens and their
        positions (fused layouts; see ``cache.build_forward_batch``). ``mask`` ``[B, 1, T, S]``
        bool (S = max cache length + T) replaces the whole pattern, cached keys included
        (training's dual-stream layout, spec 2.3 (a)). ``embeds`` (``where`` ``[B, T]`` bool,
        ``values`` ``[N, d]``) replaces the token embeddings at the N ``where`` positions, in
        row-major order (image features at ``<|image_pad|>`` slots in a VLM prefill).
        ``plan``: what the host already knows (cache lengths, real tokens, adapter use), so
        the forward reads nothing back from the device. Autograd-enabled (training);
        ``forward`` is the inference entry point.
        """
        b, t = tokens.shape
        device = tokens.device
        n_valid = torch.full((b,), t, device=device) if n_valid is None else n_valid.to(device)
        bidirectional = _per_row(bidirectional, b, device)
        write = _per_row(write, b, device)
        adapter = _per_row(adapter, b, device)
        if adapter.dim() == 1:
            adapter = adapter[:, None].expand(b, t)
        any_adapter = plan.adapter if plan is not None else bool(adapter.any())
        adapter_rows = adapter.to(self.dtype)[:, :, None] if any_adapter else None
        batch = build_forward_batch(cache, n_valid, bidirectional, t, adapter_rows,
                                    None if attention is None else attention.to(device),
                                    None if offsets is None else offsets.to(device), plan)
        if mask is not None:
            batch.mask = mask.to(device)
            batch.window_index = cache.window_index(mask.shape[-1])
        attn = self.encoder.layers[0].self_attn
        rope = self.rotary(batch.positions, self.dtype, attn.heads + attn.kv_heads, attn.kv_heads)
        real = None
        ragged = sum(plan.n_valid) < b * t if plan is not None else int(n_valid.sum()) < b * t
        if ragged:  # ragged rows: every linear layer skips the padding
            if plan is not None:
                real = torch.tensor(plan.real_index, device=device)
            else:
                real = (torch.arange(t, device=device)[None, :] < n_valid[:, None]).flatten().nonzero()[:, 0]
            batch.real = real
        if adapter_rows is not None:  # [B * T, 1] or [N, 1], like the hidden states
            batch.adapter_rows = adapter_rows.reshape(b * t, 1)
            if real is not None:
                batch.adapter_rows = batch.adapter_rows[real]
        flat = tokens.reshape(-1)
        h = self.encoder.embed_tokens(flat if real is None else flat[real])  # [B * T or N, d]
        if embeds is not None:
            where = embeds[0].to(device).reshape(-1)
            where = where if real is None else where[real]
            h = h.masked_scatter(where[..., None], embeds[1].to(device=device, dtype=h.dtype))
        for layer in self.encoder.layers:
            h = layer(h, batch, rope)
        cache.lengths = cache.lengths + torch.where(write, n_valid, torch.zeros_like(n_valid))
        return self.encoder.norm(h.view(b, t, -1) if real is None else _scatter_rows(h, real, b, t))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` -> fp32 logits ``[..., vocab]`` (confidence math is always fp32, docs/cases.md B31)."""
        return self.diffusion_head(hidden).float()


def _scatter_rows(y: torch.Tensor, real: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """``[N, d]`` real-token rows -> ``[b, t, d]`` with zeros at the padding (``real``: flat
    indices)."""
    dense = y.new_zeros(b * t, y.shape[-1])
    dense[real] = y
    return dense.view(b, t, -1)


def _per_row(value: torch.Tensor | bool, rows: int, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.bool)
    return torch.full((rows,), bool(value), dtype=torch.bool, device=device)
