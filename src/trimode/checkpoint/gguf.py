"""GGUF checkpoints through the ``gguf`` package: config from metadata, tensors dequantized.

Reads llama.cpp's ``llama`` architecture (Llama, Mistral and converted Ministral-style models).
llama.cpp's converter permutes the rows of ``attn_q`` / ``attn_k`` for its RoPE kernel; the
permutation is undone here so the weights match the Hugging Face layout. Quantized tensors
(Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized to fp32 with ``gguf.quants``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..model.config import CheckpointError, ModelConfig, RopeConfig

SUPPORTED_ARCHITECTURES = ("llama", "dream")  # dream: NLD as written by `trimode convert`
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "encoder.embed_tokens", "output_norm": "encoder.norm",
             "output": "diffusion_head"}


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader, source: str) -> ModelConfig:
    """Build a ModelConfig from GGUF metadata; unknown architectures raise CheckpointError."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{source}: unknown GGUF architecture {arch!r}; "
                              f"supported: {SUPPORTED_ARCHITECTURES}")
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab = (_field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens") or ())
             or (int(embd.shape[-1]) if embd is not None else None))
    if not vocab:
        raise CheckpointError(f"{source}: no vocab size (no {arch}.vocab_size, tokenizer.ggml.tokens "
                              "or token_embd.weight)")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    mask = _field(reader, "tokenizer.ggml.mask_token_id") if arch == "dream" else None
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(_field(reader, "trimode.rms_norm_eps")
                           or _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        rope=_trimode_rope(reader, _gguf_rope(reader, arch, source)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        mask_token_id=None if mask is None else int(mask),
        block_size=int(_field(reader, "trimode.block_size", 32)),
        layout="nld",
        model_type="nemotron_labs_diffusion",
    )


def _gguf_rope(reader, arch: str, source: str) -> RopeConfig:
    """RoPE from ``{arch}.rope.*``: none, linear or plain YaRN, whose llama.cpp kernel multiplies
    cos/sin by ``1 + 0.1 ln factor`` (transformers' default YaRN attention factor). YaRN variants
    with extra attention-factor keys are refused rather than guessed."""
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if kind == "none" or factor == 1.0 and kind in ("linear", "yarn"):
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    extras = ("attn_factor", "yarn_attn_factor", "yarn_log_multiplier", "yarn_ext_factor")
    if kind == "yarn" and all(_field(reader, f"{arch}.rope.scaling.{k}") is None for k in extras):
        orig = _field(reader, f"{arch}.rope.scaling.original_context_length",
                      _field(reader, f"{arch}.context_length"))
        return RopeConfig(
            theta=theta, rope_type="yarn", factor=factor,
            original_max_position_embeddings=None if orig is None else int(orig),
            beta_fast=float(_field(reader, f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
            beta_slow=float(_field(reader, f"{arch}.rope.scaling.yarn_beta_slow", 1.0)))
    raise CheckpointError(f"{source}: unsupported GGUF rope scaling {kind!r} for {arch!r} "
                          "(only none, linear and plain yarn are read)")


def _trimode_rope(reader, rope: RopeConfig) -> RopeConfig:
    """``trimode.rope`` (JSON, written by ``trimode convert``) wins over the llama.cpp keys,
    which cannot express YaRN mscale or the Llama-4 query scale."""
    raw = _field(reader, "trimode.rope")
    return rope if raw is None else RopeConfig(**json.loads(raw))


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Invert llama.cpp's ``permute`` of q/k rows (``[out, in]`` -> HF rotate-half order)."""
    out = w.shape[0]
    return w.reshape(heads, out // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def trimode_name(gguf_name: str, source: str) -> str:
    stem, _, kind = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
        return f"encoder.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{kind}"
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{kind}"
    raise CheckpointError(f"{source}: unexpected tensor {gguf_name!r}")


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and fp32 tensors (trimode names) of a GGUF file."""
    import gguf
    from gguf import quants

    source = str(path)
    try:
        reader = gguf.GGUFReader(source)
    except Exception as exc:
        raise CheckpointError(f"{source}: not a readable GGUF file ({exc})") from None
    config = gguf_config(reader, source)
    config_arch = _field(reader, "general.architecture")
    tensors = {}
    for t in reader.tensors:
        name = trimode_name(t.name, source)
        try:
            array = quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError:
            raise CheckpointError(f"{source}: tensor {t.name!r} has GGUF type {t.tensor_type.name}, "
                                  "which trimode cannot read (float, Q4-Q8, K- and IQ-quants are "
                                  "readable)") from None
        array = array.reshape(tuple(int(d) for d in reversed(t.shape)))
        if config_arch == "dream":  # no q/k permutation (NEOX rotary, spec vlm-tp-quant 3.2)
            pass
        elif ".q_proj." in name:
            array = _unpermute(array, config.num_attention_heads)
        elif ".k_proj." in name:
            array = _unpermute(array, config.num_key_value_heads)
        tensors[name] = torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))
    return config, tensors
