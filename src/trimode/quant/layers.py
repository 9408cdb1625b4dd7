"""Weight-only int8 / int4 linear layers on PyTorch's own CPU kernels.

``int8``: ``torch.ops.aten._weight_int8pack_mm`` (per-output-channel symmetric scales).
``int4``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (tinygemm layout: per group of
``group_size`` inputs, ``w = (q - 8) * scale + zero`` with ``q`` in 0..15).

Both kernels are only fast with bf16 activations (fp32 activations take a scalar path that
was measured 10-100x slower than a dense fp32 GEMV on this project's CPUs), so the matmul runs
in bf16 and the result is cast back to the caller's dtype; the rest of the model keeps its
dtype.

``w8a8``: the same int8 weights (fp32 scales), and each token's activations rounded to int8
at run time (per token, symmetric: ``round(x / max|x| * 127)``; 63 on CPUs without VNNI),
multiplied in integers by fbgemm (``torch.ops.quantized.linear_dynamic``, PyTorch's x86 int8
GEMM, VNNI where the CPU has it), as llama.cpp multiplies Q8_0 weights with activations it
rounds to 8 bits. fbgemm picks one activation scale per call from the tensor's min and max;
sentinel input columns (the first row holds +-127.5 in two of four extra columns, every
other entry is 0; the packed weight has zero columns there, so they add exactly nothing; four
keep K a multiple of VNNI's 4-byte groups, two measured slower) fix that range to steps of
exactly 1, so every token is quantized on its own and its result does not depend on the
tokens sharing the call. (A sentinel row instead would cost a ninth row in an 8-token call:
fbgemm's time grows with rows once they are ~4, benchmarks/sections/quant.md.) The
integer products are exact, so the exact modes stay exact within a w8a8 model. Accuracy
against fp32 is measured in benchmarks/sections/quant.md.

Both kernels compute each row of ``x`` independently (the result for a token does not
depend on how many tokens share the call; checked in tests), which keeps the exact modes exact.
The draft adapter (LoRA) works unchanged: :class:`QuantLinear` only replaces the base matmul.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..model.model import Linear

COMPUTE_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (32, 64, 128, 256)
SENTINEL_COLUMNS = 4  # w8a8's extra input columns (2 sentinels, 2 zeros): see the module doc


def w8a8_unavailable() -> str | None:
    """Why ``w8a8`` cannot run here (None when it can)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this PyTorch build has no fbgemm engine (x86 CPUs only)"
    try:
        torch.ops.quantized.linear_dynamic, torch.ops.quantized.linear_prepack  # noqa: B018
    except (AttributeError, RuntimeError):
        return "this PyTorch build has no quantized::linear_dynamic"
    return None


def _reduce_range() -> bool:
    """fbgemm's activation range: 7 bits where the CPU lacks VNNI, whose AVX2 kernels add
    u8 x s8 pairs in saturating int16 (``reduce_range``); 8 bits with VNNI's int32 sums."""
    from .cpu import cpu_info

    return not ({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_info()["flags"])


@dataclass
class Int8Weight:
    """``w[n, k] ~= q[n, k] * scale[n]`` (q int8 ``[N, K]``, scale fp32 ``[N]``)."""

    q: torch.Tensor
    scale: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None].float()


@dataclass
class Int4Weight:
    """``w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]``, ``g = k // group_size``
    (q int 0..15 ``[N, K]``, scale and zero fp32 ``[N, K / group_size]``)."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        g = self.group_size
        w = (self.q.float().view(n, k // g, g) - 8) * self.scale[..., None] + self.zero[..., None]
        return w.view(n, k)


def int8_from_float(w: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel int8 (round to nearest)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)


def int4_from_float(w: torch.Tensor, group_size: int = 32) -> Int4Weight:
    """Asymmetric min/max int4 per group of ``group_size`` inputs (like GGUF Q4_1)."""
    n, k = w.shape
    if group_size not in INT4_GROUP_SIZES or k % group_size:
        raise ValueError(f"int4 needs group_size in {INT4_GROUP_SIZES} dividing in_features={k}; "
                         f"got group_size={group_size}")
    wg = w.float().view(n, k // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return Int4Weight(q.view(n, k), scale, lo + 8 * scale, group_size)


class QuantLinear(Linear):
    """A bias-free :class:`~trimode.model.Linear` whose base weight is int8 or int4.

    ``source`` says where the integers came from (e.g. ``"gguf Q4_1 (exact blocks)"`` or
    ``"int8 from float32"``), for ``describe``. ``dtype`` is the activation dtype of the
    surrounding model (LoRA tensors are kept in it).
    """

    def __init__(self, weight: Int8Weight | Int4Weight, dtype: torch.dtype, source: str = "",
                 activations: str = "bf16"):
        torch.nn.Module.__init__(self)
        if activations == "int8" and not isinstance(weight, Int8Weight):
            raise ValueError("int8 activations (w8a8) need int8 weights")
        self.activations = activations
        self._packed = None
        self.out_features, self.in_features = weight.q.shape
        self.lora_A = self.lora_B = None
        self.lora_scale = 0.0
        self.activation_dtype = dtype
        self.source = source
        if isinstance(weight, Int8Weight):
            self.bits, self.group_size = 8, self.in_features
            self.register_buffer("qweight", weight.q.contiguous())
            self.register_buffer("scales", weight.scale.to(
                torch.float32 if activations == "int8" else COMPUTE_DTYPE))
            self.unpacked = None
        else:
            self.bits, self.group_size = 4, weight.group_size
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                weight.q.to(torch.int32).contiguous(), 1)
            self.register_buffer("qweight", packed)
            # the CPU pack interleaves rows in blocks that depend on N, so a row stack
            # (``stack``) repacks from these integers (dropped once stacked)
            self.unpacked: torch.Tensor | None = weight.q.to(torch.uint8)
            sz = torch.stack([weight.scale, weight.zero], -1).transpose(0, 1).contiguous()
            self.register_buffer("scales", sz.to(COMPUTE_DTYPE))  # [K / g, N, 2]

    def stack_key(self) -> tuple:
        return (type(self), self.in_features, self.bits, self.group_size, self.activation_dtype,
                self.activations, self.bits == 8 or self.unpacked is not None)

    @classmethod
    def stack(cls, layers: tuple[QuantLinear, ...]) -> QuantLinear:
        """Row-wise stack (model.fused): int8 rows and scales concatenate and the parts keep
        views of them; int4 is repacked from the parts' integers (the CPU pack's row blocks
        depend on N) and its ``[K / g, N, 2]`` scales join along N."""
        first = layers[0]
        fused = cls.__new__(cls)
        torch.nn.Module.__init__(fused)
        fused.in_features, fused.out_features = first.in_features, sum(x.out_features for x in layers)
        fused.lora_A = fused.lora_B = None
        fused.lora_scale = 0.0
        fused.activation_dtype, fused.bits, fused.group_size = first.activation_dtype, first.bits, first.group_size
        fused.source = first.source
        fused.activations, fused._packed = first.activations, None
        axis = 0 if first.bits == 8 else 1
        fused.register_buffer("scales", torch.cat([x.scales for x in layers], axis).contiguous())
        if first.bits == 4:
            q = torch.cat([x.unpacked for x in layers]).to(torch.int32)
            fused.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            fused.unpacked = None
            for x in layers:
                x.unpacked = None
            return fused
        fused.register_buffer("qweight", torch.cat([x.qweight for x in layers]))
        start = 0
        for x in layers:
            x.qweight = fused.qweight[start:start + x.out_features]
            x.scales = fused.scales[start:start + x.out_features]
            start += x.out_features
        return fused

    def packed(self):
        """fbgemm's packed weight (made on first use: after any row stacking), with
        ``SENTINEL_COLUMNS`` zero input columns for the sentinels."""
        if self._packed is None:
            with warnings.catch_warnings():  # quantized tensors are deprecated (not yet gone)
                warnings.simplefilter("ignore", UserWarning)
                zeros = self.qweight.new_zeros(self.out_features, SENTINEL_COLUMNS)
                q = torch._make_per_channel_quantized_tensor(
                    torch.cat([self.qweight, zeros], 1), self.scales.double(),
                    torch.zeros(self.out_features, dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(q, None)
            # each token is scaled to [-level, level]; sentinels at +-(level + 1/2) make
            # fbgemm's range [-(level + 1/2), level + 1/2] in 2 level + 1 steps of exactly 1,
            # so it rounds every value to the nearest integer (the int8 the token gets)
            self._reduce_range = _reduce_range()
            self._level = 63.0 if self._reduce_range else 127.0
            self._sentinels = torch.zeros(0, SENTINEL_COLUMNS)
        return self._packed

    def _sentinel_columns(self, rows: int) -> torch.Tensor:
        """``[rows, SENTINEL_COLUMNS]``: the first row starts +-(level + 1/2), the rest is 0
        (grown on demand)."""
        if self._sentinels.shape[0] < rows:
            grown = torch.zeros(max(rows, 2 * self._sentinels.shape[0], 16), SENTINEL_COLUMNS)
            grown[0, 0], grown[0, 1] = self._level + 0.5, -self._level - 0.5
            self._sentinels = grown
        return self._sentinels[:rows]

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step calls this 4 times per layer: every tensor op costs microseconds of
        # dispatch next to fbgemm's tens, so no-op reshapes and casts are skipped
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        packed = self.packed()
        step = torch.linalg.vector_norm(x2, float("inf"), 1, True)
        step = step.clamp_(min=1e-30).div_(self._level)
        # |x / step| <= level (+ rounding); the sentinel columns meet zero weights
        rows = torch.cat([x2 / step, self._sentinel_columns(x2.shape[0])], 1)
        out = torch.ops.quantized.linear_dynamic(rows, packed, self._reduce_range) * step
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations == "int8":
            return self._w8a8(x)
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if x2.dtype != COMPUTE_DTYPE:
            x2 = x2.to(COMPUTE_DTYPE)
        if self.bits == 8:
            out = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size,
                                                             self.scales)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, "
                f"activations={self.activations}, source={self.source!r}")
