"""GGUF quantized blocks -> trimode's int8 / int4 weights, without a float round trip where
the formats match.

Exact mappings (integers and scales carried over; the only rounding is the kernel's bf16
scales, as for every weight the int4 kernel multiplies):

- ``Q4_0`` (``w = d (q - 8)``, 32-groups) -> int4 group 32, ``scale = d``, ``zero = 0``.
- ``Q4_1`` (``w = d q + m``) -> int4 group 32, ``scale = d``, ``zero = m + 8 d``.
- ``Q4_K`` (256-superblocks of eight 32-groups, ``w = d sc q - dmin m``) -> int4 group 32,
  ``scale = d sc``, ``zero = 8 d sc - dmin m``.

Requantized (not exact): ``Q8_0`` has one fp16 scale per 32 inputs, while the int8 kernel has
one scale per output row, so Q8_0 -> int8 re-rounds ``d q`` to the row's scale (measured cost
in README "Quantization"). Every other readable type (F32/F16/BF16, Q5_*, Q2_K..Q6_K) is
dequantized with ``gguf.quants`` and quantized like a float checkpoint.
"""

from __future__ import annotations

import numpy as np
import torch

from .layers import Int4Weight, Int8Weight, int4_from_float, int8_from_float

EXACT_INT4 = ("Q4_0", "Q4_1", "Q4_K")


def _u4(qs: np.ndarray) -> np.ndarray:
    """``[..., 16]`` bytes -> ``[..., 32]`` nibbles, GGUF order (low nibbles first)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def int4_from_blocks(kind: str, data: np.ndarray, rows: int, cols: int) -> Int4Weight:
    """Q4_0 / Q4_1 / Q4_K bytes ``[rows, bytes_per_row]`` -> :class:`Int4Weight` (group 32)."""
    from gguf import quants

    groups = cols // 32
    raw = np.ascontiguousarray(data).reshape(rows, -1)
    if kind in ("Q4_0", "Q4_1"):
        width = 18 if kind == "Q4_0" else 20
        blocks = raw.reshape(rows, groups, width)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        if kind == "Q4_0":
            zero = np.zeros_like(d)
        else:
            zero = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * d
        q = _u4(blocks[..., width - 16:])
        scale = d
    elif kind == "Q4_K":
        blocks = raw.reshape(rows * (cols // 256), 144)
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [nb, 1]
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = quants.Q4_K.get_scale_min(blocks[:, 4:16])
        scale = d * sc.astype(np.float32)  # [nb, 8]
        zero = 8 * scale - dmin * m.astype(np.float32)
        qs = blocks[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 32 bytes -> 2 groups each
        q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
        scale, zero = scale.reshape(rows, groups), zero.reshape(rows, groups)
    else:
        raise ValueError(f"no exact int4 mapping for GGUF {kind}")
    q = torch.from_numpy(np.ascontiguousarray(q.reshape(rows, cols)).astype(np.int32))
    return Int4Weight(q, torch.from_numpy(np.ascontiguousarray(scale)),
                      torch.from_numpy(np.ascontiguousarray(zero)), 32)


def gguf_weight(kind: str, data: np.ndarray, dense: torch.Tensor, bits: int
                ) -> tuple[Int8Weight | Int4Weight, str]:
    """The int weight for one GGUF tensor (``dense`` is its dequantized fp32 ``[N, K]``, in
    trimode's row order) and a description of how it was made."""
    rows, cols = dense.shape
    if bits == 4 and kind in EXACT_INT4:
        return int4_from_blocks(kind, data, rows, cols), f"gguf {kind} (exact blocks)"
    if bits == 4:
        return int4_from_float(dense), f"int4 from gguf {kind}"
    return int8_from_float(dense), f"int8 from gguf {kind}" + (" (requantized)" if kind != "F32" else "")
