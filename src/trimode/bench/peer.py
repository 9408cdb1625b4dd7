"""The peer: transformers' ``generate`` on trimode's very weights, same prompts, greedy.

``build_peer`` makes a transformers model of the checkpoint's geometry (``LlamaForCausalLM``
for default RoPE, ``Ministral3ForCausalLM`` for NLD's YaRN + Llama-4 query scaling, docs/spec.md 1.4)
and loads trimode's tensors into it without copying (``encoder.*`` -> ``model.*``,
``diffusion_head`` -> ``lm_head``), in trimode's dtype and device (fp32 on CPU, bf16 on GPU).
``peer_generate`` runs a left-padded batch with EOS and the checkpoint's stop ids, the mask id
suppressed (trimode never emits it), and returns each row's tokens up to its stop token.
"""

from __future__ import annotations

import time

import torch


def _rope_parameters(rope) -> dict:
    params = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type != "default":
        params.update(factor=rope.factor, beta_fast=rope.beta_fast, beta_slow=rope.beta_slow,
                      original_max_position_embeddings=rope.original_max_position_embeddings,
                      mscale=rope.mscale, mscale_all_dim=rope.mscale_all_dim,
                      attention_factor=rope.attention_factor, truncate=rope.truncate)
    if rope.llama_4_scaling_beta is not None:
        params["llama_4_scaling_beta"] = rope.llama_4_scaling_beta
    return {k: v for k, v in params.items() if v is not None}


def build_peer(llm):
    """A transformers causal LM sharing ``llm``'s tensors. Raises ValueError when the
    checkpoint's RoPE has no transformers equivalent here."""
    import transformers

    c = llm.model.config
    ministral = c.rope.rope_type != "default" or c.rope.llama_4_scaling_beta is not None
    if c.rope.rope_type not in ("default", "yarn"):
        raise ValueError(f"peer: rope_type {c.rope.rope_type!r} is not supported (default, yarn)")
    name = "Ministral3" if ministral else "Llama"
    config_cls = getattr(transformers, f"{name}Config")
    model_cls = getattr(transformers, f"{name}ForCausalLM")
    if ministral:
        # Ministral3 reads max_position_embeddings inside rope_parameters for the query scale
        rope = dict(_rope_parameters(c.rope), max_position_embeddings=c.max_position_embeddings)
    else:
        rope = _rope_parameters(c.rope)
    extra = {} if ministral else {"attention_bias": False, "mlp_bias": False}
    config = config_cls(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        rope_parameters=rope, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids) or None,
        pad_token_id=(c.eos_token_ids or (0,))[0], hidden_act="silu",
        attn_implementation="sdpa", dtype=llm.model.dtype, **extra)
    with torch.device("meta"):
        peer = model_cls(config)
    state = {}
    for key, tensor in llm.model.state_dict().items():
        if key.startswith("encoder."):
            state["model." + key[len("encoder."):]] = tensor
        elif key == "diffusion_head.weight" and not c.tie_word_embeddings:
            state["lm_head.weight"] = tensor
    if c.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = peer.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise ValueError(f"peer: state dict mismatch: missing {missing}, unexpected {unexpected}")
    with torch.device(llm.model.device):
        peer.model.rotary_emb = type(peer.model.rotary_emb)(config=config)  # off the meta device
    if c.tie_word_embeddings:
        peer.tie_weights()
    return peer.eval()


@torch.inference_mode()
def peer_generate(peer, llm, prompts: list[list[int]], max_tokens: int,
                  stop_ids: set[int]) -> tuple[float, list[list[int]], list[int]]:
    """Greedy ``generate`` of a batch -> (wall seconds, tokens per row without the stop
    token, generated-token count per row with the stop token, as ``RequestMetrics``)."""
    from transformers import GenerationConfig

    c = llm.model.config
    pad = (c.eos_token_ids or (0,))[0]
    gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_tokens,
                           eos_token_id=sorted(stop_ids) or None, pad_token_id=pad,
                           bos_token_id=c.bos_token_id, use_cache=True,
                           suppress_tokens=[c.mask_token_id] if c.mask_token_id is not None else None)
    ids, mask = left_pad(prompts, pad)
    device = llm.model.device
    _sync(device)
    start = time.perf_counter()
    out = peer.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                        generation_config=gen)
    _sync(device)
    wall = time.perf_counter() - start
    tokens, counts = [], []
    for row in out[:, ids.shape[1]:].tolist():
        stop = next((i for i, t in enumerate(row) if t in stop_ids), None)
        tokens.append(row if stop is None else row[:stop])
        counts.append(len(row) if stop is None else stop + 1)
    return wall, tokens, counts


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids ``[B, W]`` and attention mask ``[B, W]`` (1 on real tokens) for
    transformers' ``generate``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
