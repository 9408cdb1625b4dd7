"""Quantization: ``quantize_model(net, "int8" | "int4" | "w8a8", gguf_file)``.

Replaces the decoder's linear layers and the head with :class:`~.layers.QuantLinear`
(PyTorch's CPU int8/int4 kernels); embeddings and norms keep the model dtype. From a GGUF
file, Q4_0 / Q4_1 / Q4_K blocks become int4 layers exactly (``gguf_blocks``); other types are
quantized from their dequantized values. ``"auto"`` picks per file: int4 when the decoder's
linears are 4-bit in the GGUF, int8 for other quantized GGUFs, none for float checkpoints.
``"w8a8"``: int8 weights (the head included) and per-token int8 activations on fbgemm
(``layers``): the fastest on x86 CPUs, at an accuracy cost measured in benchmarks/RESULTS.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model.config import CheckpointError
from ..model.invariant import set_batch_invariant
from ..model.model import Linear, TriModeModel
from .gguf_blocks import EXACT_INT4, gguf_weight
from .layers import (
    COMPUTE_DTYPE,
    Int4Weight,
    Int8Weight,
    QuantLinear,
    int4_from_float,
    int8_from_float,
    w8a8_unavailable,
)

SCHEMES = ("none", "int8", "int4", "w8a8", "auto")
__all__ = ["SCHEMES", "QuantLinear", "quantize_model", "check_scheme", "Int8Weight", "Int4Weight",
           "int8_from_float", "int4_from_float", "COMPUTE_DTYPE"]


def check_scheme(scheme: str | None) -> str:
    """Normalise ``quantization``; ValueError naming the allowed values."""
    scheme = "none" if scheme is None else scheme
    if scheme not in SCHEMES:
        raise ValueError(f"quantization must be one of {', '.join(SCHEMES)} (or None); got {scheme!r}")
    return scheme


def _gguf_raw(path: Path) -> tuple[dict[str, tuple[str, np.ndarray, np.ndarray | None]], str]:
    """trimode name -> (GGUF type name, raw data, row permutation or None) and the arch."""
    import gguf

    from ..checkpoint.gguf import _unpermute, trimode_name

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    heads = {"q_proj": reader.fields[f"{arch}.attention.head_count"].contents()}
    kv = reader.fields.get(f"{arch}.attention.head_count_kv")
    heads["k_proj"] = heads["q_proj"] if kv is None else kv.contents()
    out = {}
    for t in reader.tensors:
        name = trimode_name(t.name, str(path))
        perm = None
        proj = name.split(".")[-2]
        if arch == "llama" and proj in heads:
            rows = int(t.shape[-1])
            perm = _unpermute(np.arange(rows)[:, None], int(heads[proj]))[:, 0]
        out[name] = (t.tensor_type.name, t.data, perm)
    return out, arch


def _permute(w: Int8Weight | Int4Weight, perm: np.ndarray | None) -> Int8Weight | Int4Weight:
    if perm is None:
        return w
    idx = torch.from_numpy(perm.astype(np.int64))
    if isinstance(w, Int8Weight):
        return Int8Weight(w.q[idx], w.scale[idx])
    return Int4Weight(w.q[idx], w.scale[idx], w.zero[idx], w.group_size)


def resolve_auto(gguf_file: Path | None) -> str:
    """``"auto"``: int4 for 4-bit GGUF linears, int8 for other quantized GGUFs, else none."""
    if gguf_file is None:
        return "none"
    raw, _ = _gguf_raw(gguf_file)
    kind = next((k for n, (k, _, _) in raw.items() if n.endswith("mlp.down_proj.weight")), "F32")
    if kind in EXACT_INT4:
        return "int4"
    return "none" if kind in ("F32", "F16", "BF16") else "int8"


def quantize_model(net: TriModeModel, scheme: str, gguf_file: Path | None = None) -> str:
    """Swap ``net``'s linear layers for QuantLinear in place; returns the scheme applied.

    The head is int8 under both schemes (it is the largest matrix of small models and its
    logits decide every token; spec 3.1 keeps it at the higher precision). Raises ValueError
    on CUDA (these are CPU kernels).
    """
    scheme = check_scheme(scheme)
    if scheme == "auto":
        scheme = resolve_auto(gguf_file)
    if scheme == "none":
        return scheme
    if net.device.type != "cpu":
        raise ValueError(f"quantization={scheme!r} uses PyTorch's CPU int8/int4 kernels; "
                         f"the model is on {net.device}")
    if scheme == "w8a8" and (why := w8a8_unavailable()):
        raise ValueError(f"quantization='w8a8': {why}; use 'int8'")
    raw = _gguf_raw(gguf_file)[0] if gguf_file is not None else {}
    bits = 4 if scheme == "int4" else 8
    activations = "int8" if scheme == "w8a8" else "bf16"
    dtype = net.dtype
    for name, module in list(net.named_modules()):
        if not isinstance(module, Linear) or isinstance(module, QuantLinear):
            continue
        key = f"{name}.weight"
        if name == "diffusion_head" and net.config.tie_word_embeddings:
            key = "encoder.embed_tokens.weight"
        want = 8 if name == "diffusion_head" or module.in_features % 32 else bits
        dense = module.weight.detach().float()
        if key in raw:
            kind, data, perm = raw[key]
            try:
                w, source = gguf_weight(kind, data, dense, want)
            except (ValueError, NotImplementedError) as exc:
                raise CheckpointError(f"{gguf_file}: tensor {key!r} ({kind}): {exc}") from None
            w = _permute(w, perm) if source.endswith("(exact blocks)") else w
        else:
            w = int8_from_float(dense) if want == 8 else int4_from_float(dense)
            source = f"int{want} from {str(module.weight.dtype).removeprefix('torch.')}"
        quant = QuantLinear(w, dtype, source, activations if want == 8 else "bf16")
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, quant)
    # the int kernels round activations to bf16, which turns attention's last-bit differences
    # between a 1-token and an 8-token forward into different tokens: keep attention invariant
    set_batch_invariant(net, True)
    return scheme
