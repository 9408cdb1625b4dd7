"""``trimode convert MODEL --to gguf``: write a checkpoint as GGUF through the ``gguf`` package.

``arch="dream"`` writes NLD the way the community converter for llama.cpp forks does
(spec vlm-tp-quant.md 3.2): ``dream.attention.causal=false``, ``diffusion.shift_logits=false``,
``tokenizer.ggml.mask_token_id``, ``diffusion_head`` as ``output``, no q/k permutation, plus
trimode's own keys ``trimode.block_size``, ``trimode.rope`` (the whole RoPE setting as JSON:
YaRN mscale and the Llama-4 query scale have no llama.cpp keys) and ``trimode.rms_norm_eps``
(f64; the standard key is f32), so trimode reads its own export back exactly.
``arch="llama"`` writes the AR view for llama.cpp's ordinary tools (q/k rows permuted the way
llama.cpp's converter does). The BPE tokenizer (tokens, types, merges, special ids) and the chat
template go inside. 1-D tensors stay f32; ``outtype`` applies to the matrices.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..model.config import CheckpointError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ARCHES = ("dream", "llama")
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TOP_NAMES = {"encoder.embed_tokens": "token_embd", "encoder.norm": "output_norm",
             "diffusion_head": "output"}


def gguf_name(name: str) -> str:
    """trimode tensor name -> GGUF name (the inverse of ``gguf_reader.trimode_name``)."""
    stem, _, kind = name.rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if parts[:2] == ["encoder", "layers"] and ".".join(parts[3:]) in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:])]}.{kind}"
    raise CheckpointError(f"tensor {name!r} has no GGUF name")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter ``permute`` of q/k rows (HF rotate-half -> interleaved pairs)."""
    out = w.shape[0]
    return w.reshape(heads, 2, out // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tensor(writer, name: str, array: np.ndarray, outtype: str) -> None:
    import gguf
    from gguf import quants

    Q = gguf.GGMLQuantizationType
    if array.ndim == 1 or outtype == "f32":
        writer.add_tensor(name, array.astype(np.float32))
    elif outtype == "f16":
        writer.add_tensor(name, array.astype(np.float16))
    else:
        kind = Q.BF16 if outtype == "bf16" else Q.Q8_0
        if kind == Q.Q8_0 and array.shape[-1] % 32:
            writer.add_tensor(name, array.astype(np.float16))  # rows not a multiple of 32
            return
        packed = quants.quantize(array.astype(np.float32), kind)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)


def gguf_key(name: str) -> str:
    import gguf

    return getattr(gguf.Keys.Tokenizer, name)


def _has(writer, key: str) -> bool:
    return any(key in shard for shard in writer.kv_data)


def _add_tokenizer(writer, directory: Path, vocab_size: int, pre: str) -> None:
    from gguf.vocab import BpeVocab, SpecialVocab

    try:
        vocab = BpeVocab(directory)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: GGUF export needs a byte-level BPE tokenizer.json "
                              "(GPT-2 style)") from None
    tokens, types = [], []
    for text, _score, kind in vocab.all_tokens():
        tokens.append(text)
        types.append(int(kind))
    if len(tokens) < vocab_size:  # padded embedding rows
        tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
        types += [5] * (vocab_size - len(types))  # UNUSED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(directory, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)
    jinja = directory / "chat_template.jinja"
    if jinja.exists() and not _has(writer, gguf_key("CHAT_TEMPLATE")):
        writer.add_chat_template(jinja.read_text())


def export_gguf(model: str | os.PathLike | None, out: str | os.PathLike, outtype: str = "f32",
                arch: str = "dream", tokenizer_pre: str | None = None) -> Path:
    """Write ``model`` (a checkpoint, or None for the embedded model) to ``out``; returns it."""
    import gguf

    from .loader import load_model

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}; got {outtype!r}")
    if arch not in ARCHES:
        raise ValueError(f"arch must be one of {', '.join(ARCHES)}; got {arch!r}")
    if model is None:
        from .embedded import default_model_dir, gguf_path

        model = default_model_dir(progress=False)
        if tokenizer_pre is None:
            tokenizer_pre = str(gguf.GGUFReader(str(gguf_path())).fields["tokenizer.ggml.pre"].contents())
    net, ckpt = load_model(model, dtype=torch.float32, device="cpu")
    c = net.config
    if arch == "dream" and c.mask_token_id is None:
        raise CheckpointError(f"{ckpt.directory}: no mask_token_id; --arch dream needs one")
    out = Path(out)
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(Path(ckpt.directory).name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope.theta)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type({"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[outtype])
    if c.rope.rope_type in ("linear", "yarn"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if c.rope.rope_type == "linear"
                                else gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(c.rope.factor)
        if c.rope.original_max_position_embeddings:
            w.add_rope_scaling_orig_ctx_len(c.rope.original_max_position_embeddings)
    if arch == "dream":
        w.add_causal_attention(False)
        w.add_diffusion_shift_logits(False)
        w.add_uint32("trimode.block_size", c.block_size)
        # exact values llama.cpp has no keys for (YaRN mscale, Llama-4 query scale; f64 eps)
        w.add_string("trimode.rope", json.dumps(dataclasses.asdict(c.rope)))
        w.add_float64("trimode.rms_norm_eps", c.rms_norm_eps)
    _add_tokenizer(w, Path(ckpt.directory), c.vocab_size, tokenizer_pre or "default")
    if c.mask_token_id is not None and not _has(w, gguf_key("MASK_ID")):
        w.add_mask_token_id(c.mask_token_id)
    if c.bos_token_id is not None and not _has(w, gguf_key("BOS_ID")):
        w.add_bos_token_id(c.bos_token_id)
    if c.eos_token_ids and not _has(w, gguf_key("EOS_ID")):
        w.add_eos_token_id(c.eos_token_ids[0])
    state = net.state_dict()
    if c.tie_word_embeddings:
        state.pop("diffusion_head.weight", None)
    for name, tensor in state.items():
        array = tensor.detach().float().numpy()
        if arch == "llama" and ".q_proj." in name:
            array = _permute(array, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            array = _permute(array, c.num_key_value_heads)
        _add_tensor(w, gguf_name(name), np.ascontiguousarray(array), outtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
