"""Rotary position embeddings: default, linear and YaRN, plus the Llama-4 query scale.

Follows docs/spec.md section 1.4 (the transformers ``_compute_yarn_parameters`` formulas). The YaRN
attention factor is computed from the config: for NLD ``mscale == mscale_all_dim`` so it is
exactly 1.0, not the 1.277 a generic YaRN gives for factor 16.
"""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def inv_freq_and_attention_factor(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim // 2]`` (fp32) and the cos/sin multiplier."""
    base = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    pos_freqs = rope.theta ** base
    inv_freq = 1.0 / pos_freqs
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _mscale(factor, rope.mscale) / _mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _mscale(factor)
    original = rope.original_max_position_embeddings or 4096

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp, as transformers does
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, attention_factor


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for absolute positions, and the Llama-4 query scale (spec 1.3)."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        inv_freq, self.attention_factor = inv_freq_and_attention_factor(rope, head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.beta = rope.llama_4_scaling_beta
        self.scale_period = rope.original_max_position_embeddings

    def forward(self, positions: torch.Tensor, dtype: torch.dtype, rotated: int = 1,
                unrotated: int = 0) -> tuple[torch.Tensor, ...]:
        """positions ``[B, T]`` (int64) -> cos, signed sin ``[B, T, heads, head_dim]`` (for
        ``apply_rotary``) and the query scale ``[B, T, 1, 1]`` (None without Llama-4 scaling).
        The tables cover ``rotated`` heads and then ``unrotated`` ones (cos 1, sin 0: values,
        so one ``apply_rotary`` passes over queries, keys and values alike; ``x * 1 + y * 0``
        is ``x`` exactly for finite values)."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_factor).to(dtype)[:, :, None]
        sin = (emb.sin() * self.attention_factor).to(dtype)[:, :, None]
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        if rotated != 1 or unrotated:
            shape = (*cos.shape[:2], unrotated, cos.shape[-1])
            cos = torch.cat([cos.expand(-1, -1, rotated, -1), cos.new_ones(shape)], 2)
            sin = torch.cat([sin.expand(-1, -1, rotated, -1), sin.new_zeros(shape)], 2)
        if self.beta is None or not self.scale_period:
            return cos, sin, None
        scale = 1 + self.beta * torch.log(1 + torch.floor(positions.float() / self.scale_period))
        return cos, sin, scale.to(dtype)[:, :, None, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE on ``x`` ``[B, T, H, D]`` with ``RotaryEmbedding``'s tables:
    ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x) = (-x2, x1)``; ``sin`` comes
    with its first half negated so the rotation is one ``roll`` (``(-a) * b == a * (-b)``
    exactly, so the result is bitwise the textbook formula's)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin
