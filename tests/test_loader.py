"""Loader and config: every supported layout loads to the oracle's logits; every broken checkpoint
raises CheckpointError naming the file and the tensor (B30); dtype handling (B31)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import init_random, make_oracle, nld_state_dict, tiny_geometry, write_checkpoint
from reference import logits_of
from trimode import CheckpointError
from trimode.model.config import ModelConfig
from trimode.checkpoint.loader import load_model

TOL = 1e-4
IDS = [5, 17, 42, 9, 88, 23, 61, 4, 70, 33, 12]


def trimode_logits(net, ids=IDS) -> torch.Tensor:
    x = torch.tensor([ids])
    return net.logits(net(x, net.new_cache(1, len(ids))))[0]


def load(path, dtype=torch.float32):
    net, _ = load_model(path, dtype=dtype, device="cpu")
    return net


def assert_matches(net, oracle, ids=IDS):
    ref = logits_of(oracle, ids)
    assert (trimode_logits(net, ids) - ref).abs().max().item() <= TOL


def hf_causal_lm(kind: str, tied: bool, seed: int = 0):
    """A random transformers Llama or Mistral causal LM (default RoPE, eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    geometry = tiny_geometry(tie_word_embeddings=tied, max_position_embeddings=4096)
    config = config_cls(**geometry, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                        attn_implementation="eager")
    return init_random(model_cls(config), seed)


@pytest.fixture(scope="module")
def oracle():
    return make_oracle(seed=7)


@pytest.fixture
def single(tmp_path, oracle):
    return write_checkpoint(tmp_path / "single", oracle)


SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def write_sharded(directory, oracle):
    """Two shards + an index: layer 0 and the embedding in shard 1, the rest in shard 2."""
    write_checkpoint(directory, oracle)
    (directory / "model.safetensors").unlink()
    state = nld_state_dict(oracle)
    first = {k: v for k, v in state.items() if k.startswith(("encoder.embed", "encoder.layers.0."))}
    second = {k: v for k, v in state.items() if k not in first}
    save_file(first, str(directory / SHARDS[0]))
    save_file(second, str(directory / SHARDS[1]))
    weight_map = {k: SHARDS[0] for k in first} | {k: SHARDS[1] for k in second}
    write_index(directory, weight_map)
    return directory


def write_index(directory, weight_map):
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def read_index(directory) -> dict:
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.fixture
def sharded(tmp_path, oracle):
    return write_sharded(tmp_path / "sharded", oracle)


def fails(path, *needles, **kw) -> str:
    """load_model(path) raises CheckpointError whose message contains every needle."""
    with pytest.raises(CheckpointError) as info:
        load_model(path, device="cpu", **kw)
    message = str(info.value)
    for needle in needles:
        assert str(needle) in message, (needle, message)
    return message


# ------------------------------------------------------------------------------- layouts


def test_single_file_nld_layout(single, oracle):
    net = load(single)
    assert_matches(net, oracle)
    # every parameter is exactly the checkpoint's tensor (nothing left random)
    state = load_file(str(single / "model.safetensors"))
    params = dict(net.named_parameters())
    assert set(params) == set(state)
    for name, tensor in state.items():
        assert torch.equal(params[name].detach(), tensor), name


def test_sharded_with_index(sharded, oracle):
    assert not (sharded / "model.safetensors").exists()
    assert_matches(load(sharded), oracle)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_layout(tmp_path, kind, tied):
    oracle = hf_causal_lm(kind, tied, seed=3)
    oracle.save_pretrained(tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert ("lm_head.weight" in names) == (not tied)
    assert all(n.startswith(("model.", "lm_head.")) for n in names)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == kind
    net = load(tmp_path)
    assert net.config.layout == "causal_lm" and net.config.tie_word_embeddings == tied
    assert_matches(net, oracle)
    if tied:
        assert net.diffusion_head.weight.data_ptr() == net.encoder.embed_tokens.weight.data_ptr()


def test_causal_lm_legacy_config(tmp_path):
    """A transformers-4.x config.json: rope_theta at top level, rope_scaling null."""
    oracle = hf_causal_lm("mistral", tied=False, seed=4)
    oracle.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("rope_parameters")
    raw.update(rope_theta=500000.0, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    net = load(tmp_path)
    assert net.config.rope.theta == 500000.0
    assert_matches(net, oracle)


def test_tied_checkpoint_that_also_stores_the_head(tmp_path):
    """Some exporters write lm_head.weight although tied: the embedding wins, nothing fails."""
    oracle = hf_causal_lm("llama", tied=True, seed=5)
    oracle.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["lm_head.weight"] = torch.zeros_like(state["model.embed_tokens.weight"])
    save_file(state, str(tmp_path / "model.safetensors"))
    assert_matches(load(tmp_path), oracle)


# ---------------------------------------------------------------------------------- GGUF


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute of q/k rows."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def write_gguf(path, oracle, arch="llama", quantize=("attn_q", "attn_k", "ffn_down"),
               rope_scaling: dict | None = None, skip=(), extra_kv=None):
    """A llama.cpp-style GGUF of a Llama oracle; sets the oracle's weights to what the file
    holds after dequantization, so oracle and trimode must then agree to fp32 rounding."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    c = oracle.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(c.head_dim)
    writer.add_value_length(c.head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    for key, value in (rope_scaling or {}).items():
        if key == "type":
            value = gguf.RopeScalingType(value)
        getattr(writer, f"add_rope_scaling_{key}")(value)
    for key, value in (extra_kv or {}).items():
        writer.add_float32(key.format(arch=arch), value)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf, gg in layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    quantized = []
    params = dict(oracle.named_parameters())
    with torch.no_grad():
        for hf_name, gg_name in names.items():
            if hf_name not in params or gg_name in skip:
                continue
            w = params[hf_name].detach().numpy().astype(np.float32)
            kind = gg_name.split(".")[-2]
            if gg_name == "token_embd.weight":  # F16 storage
                stored, exact = w.astype(np.float16), w.astype(np.float16).astype(np.float32)
                qtype = None
            elif kind in quantize:  # Q8_0 storage (rows of 32-element blocks)
                stored = gguf.quants.quantize(w, Q.Q8_0)
                exact = gguf.quants.dequantize(stored, Q.Q8_0).reshape(w.shape)
                qtype = Q.Q8_0
                quantized.append(gg_name)
            else:
                stored, exact, qtype = w, w, None
            if kind in ("attn_q", "attn_k"):
                heads = c.num_attention_heads if kind == "attn_q" else c.num_key_value_heads
                # Q8_0 blocks lie inside rows, so permuting rows commutes with quantizing
                stored = (gguf.quants.quantize(permute(w, heads), Q.Q8_0) if qtype is not None
                          else permute(w, heads))
            if qtype is None:
                writer.add_tensor(gg_name, stored)
            else:
                writer.add_tensor(gg_name, stored, raw_dtype=qtype)
            params[hf_name].copy_(torch.from_numpy(np.ascontiguousarray(exact)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_llama_with_q8_0(tmp_path, tied):
    oracle = hf_causal_lm("llama", tied=tied, seed=8)
    original = {k: v.clone() for k, v in oracle.state_dict().items()}
    path = tmp_path / "tiny.gguf"
    quantized = write_gguf(path, oracle)
    assert quantized  # at least one tensor really is Q8_0 ...
    q = oracle.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q, original["model.layers.0.self_attn.q_proj.weight"])  # ... and rounded
    net = load(path)
    assert net.config.num_attention_heads == 4 and net.config.num_key_value_heads == 2
    assert net.config.head_dim == 16 and net.config.tie_word_embeddings == tied
    assert_matches(net, oracle)
    # the directory holding just that GGUF also resolves to it
    assert_matches(load(tmp_path), oracle)


def test_gguf_yarn_rope_scaling(tmp_path):
    """rope.scaling.type yarn is honoured (llama.cpp semantics = transformers' default YaRN)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    geometry = tiny_geometry(max_position_embeddings=64)
    config = LlamaConfig(**geometry, attn_implementation="eager", rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 16})
    oracle = init_random(LlamaForCausalLM(config), seed=9)
    path = tmp_path / "yarn.gguf"
    write_gguf(path, oracle, rope_scaling={"type": "yarn", "factor": 4.0, "orig_ctx_len": 16})
    net = load(path)
    assert net.config.rope.rope_type == "yarn" and net.config.rope.factor == 4.0
    assert net.rotary.attention_factor == pytest.approx(1 + 0.1 * np.log(4.0))
    ids = [(7 * i) % 90 + 4 for i in range(40)]
    assert_matches(net, oracle, ids)


def test_gguf_unknown_architecture(tmp_path):
    oracle = hf_causal_lm("llama", tied=False, seed=10)
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, oracle, arch="qwen2")
    fails(path, str(path), "qwen2", "architecture")


def test_gguf_missing_tensor(tmp_path):
    oracle = hf_causal_lm("llama", tied=False, seed=11)
    path = tmp_path / "holes.gguf"
    write_gguf(path, oracle, skip=("blk.1.ffn_up.weight",))
    fails(path, str(path), "encoder.layers.1.mlp.up_proj.weight", "missing")


def test_gguf_unsupported_rope_scaling_is_refused(tmp_path):
    oracle = hf_causal_lm("llama", tied=False, seed=12)
    path = tmp_path / "deepseek_style.gguf"
    write_gguf(path, oracle, rope_scaling={"type": "yarn", "factor": 4.0},
               extra_kv={"{arch}.rope.scaling.yarn_log_multiplier": 0.1})
    fails(path, str(path), "rope scaling")


# ------------------------------------------------------------------------- failures (B30)


def rewrite(path, edit):
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def test_missing_tensor(single):
    name = "encoder.layers.1.mlp.up_proj.weight"
    rewrite(single / "model.safetensors", lambda s: s.pop(name))
    fails(single, single / "model.safetensors", name, "missing")


def test_unexpected_tensor(single):
    name = "encoder.layers.0.self_attn.q_norm.weight"
    rewrite(single / "model.safetensors", lambda s: s.update({name: torch.ones(16)}))
    fails(single, single / "model.safetensors", name, "unexpected")


def test_wrongly_shaped_tensor(single):
    name = "encoder.layers.0.self_attn.q_proj.weight"  # [heads * head_dim, hidden] = [64, 32]
    rewrite(single / "model.safetensors", lambda s: s.update({name: s[name].t().contiguous()}))
    msg = fails(single, single / "model.safetensors", name, "(32, 64)", "(64, 32)")
    assert "shape" in msg


def test_wrongly_shaped_head(single):
    name = "diffusion_head.weight"
    rewrite(single / "model.safetensors", lambda s: s.update({name: s[name][:50].contiguous()}))
    fails(single, single / "model.safetensors", name, "(50, 32)", "(96, 32)")


def test_no_weights_at_all(single):
    (single / "model.safetensors").unlink()
    fails(single, single, "model.safetensors")


def test_missing_shard_file(sharded):
    (sharded / SHARDS[1]).unlink()
    fails(sharded, SHARDS[1], "missing")


def test_renamed_shard_makes_index_stale(sharded):
    (sharded / SHARDS[1]).rename(sharded / "model-2.safetensors")
    fails(sharded, SHARDS[1], "model.safetensors.index.json")


def test_index_names_wrong_shard_for_tensor(sharded):
    name = "encoder.norm.weight"
    weight_map = read_index(sharded)
    assert weight_map[name] == SHARDS[1]
    weight_map[name] = SHARDS[0]
    write_index(sharded, weight_map)
    fails(sharded, name, SHARDS[0], "stale")


def test_tensor_listed_in_index_but_absent_from_its_shard(sharded):
    name = "encoder.layers.1.self_attn.v_proj.weight"
    rewrite(sharded / SHARDS[1], lambda s: s.pop(name))
    fails(sharded, name, SHARDS[1])


def test_tensor_absent_from_index_and_shards(sharded):
    name = "encoder.layers.0.mlp.gate_proj.weight"
    rewrite(sharded / SHARDS[0], lambda s: s.pop(name))
    weight_map = read_index(sharded)
    weight_map.pop(name)
    write_index(sharded, weight_map)
    fails(sharded, name, "missing", SHARDS[0])


def test_truncated_shard(sharded):
    """An interrupted download: the shard exists but is cut short."""
    data = (sharded / SHARDS[1]).read_bytes()
    (sharded / SHARDS[1]).write_bytes(data[: len(data) // 2])
    fails(sharded, SHARDS[1])


def test_corrupt_index(sharded):
    (sharded / "model.safetensors.index.json").write_text('{"metadata": {}}')
    fails(sharded, "model.safetensors.index.json")


def test_stray_file_not_in_index_is_ignored(sharded, oracle):
    save_file({"encoder.norm.weight": torch.full((32,), 1000.0), "bogus.weight": torch.zeros(3)},
              str(sharded / "extra.safetensors"))
    assert_matches(load(sharded), oracle)


def test_unknown_model_type_names_architecture(single):
    raw = json.loads((single / "config.json").read_text())
    raw["model_type"] = "gpt_neox"
    (single / "config.json").write_text(json.dumps(raw))
    fails(single, "gpt_neox", "config.json", "architecture")


def test_missing_config_field(single):
    raw = json.loads((single / "config.json").read_text())
    raw.pop("intermediate_size")
    (single / "config.json").write_text(json.dumps(raw))
    fails(single, "intermediate_size", "config.json")


def test_uncached_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.chdir(tmp_path)
    msg = fails("nvidia/does-not-exist", "nvidia/does-not-exist", "not in the local")
    assert "cache" in msg


def test_missing_tensor_never_loads(tmp_path, oracle):
    """Whichever single tensor is missing, loading fails: no weight can stay random."""
    base = write_checkpoint(tmp_path / "base", oracle)
    state = load_file(str(base / "model.safetensors"))
    for i, name in enumerate(sorted(state)):
        directory = tmp_path / f"c{i}"
        shutil.copytree(base, directory)
        save_file({k: v for k, v in state.items() if k != name}, str(directory / "model.safetensors"))
        fails(directory, name)
        shutil.rmtree(directory)


# ----------------------------------------------------------------------------- dtype (B31)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A tiny model stored as bf16 safetensors; the oracle holds the same bf16-rounded weights."""
    oracle = make_oracle(seed=13)
    with torch.no_grad():
        for p in oracle.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    directory = write_checkpoint(tmp_path_factory.mktemp("bf16"), oracle)
    save_file({k: v.to(torch.bfloat16) for k, v in nld_state_dict(oracle).items()},
              str(directory / "model.safetensors"))
    return directory, oracle


PROMPT16 = [1, 7, 19, 33, 45, 52, 8, 91, 60, 27, 14, 77, 38, 5, 66, 80]


def test_bf16_checkpoint_in_fp32_bf16_fp16(bf16_checkpoint):
    directory, oracle = bf16_checkpoint
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(directory / "model.safetensors")).values())
    logits, seconds = {}, {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        net = load(directory, dtype=dtype)
        assert net.dtype == dtype and all(p.dtype == dtype for p in net.parameters())
        t0 = time.perf_counter()
        z = trimode_logits(net, PROMPT16)
        seconds[dtype] = time.perf_counter() - t0
        assert z.dtype == torch.float32  # model.logits() is always fp32
        assert z.shape == (16, 96) and torch.isfinite(z).all(), dtype
        logits[dtype] = z
    # bf16 bytes were read as bf16: the fp32 load equals the (bf16-rounded) oracle
    assert (logits[torch.float32] - logits_of(oracle, PROMPT16)).abs().max().item() <= TOL
    top = {d: z.argmax(-1) for d, z in logits.items()}
    assert int((top[torch.bfloat16] == top[torch.float32]).sum()) >= 15
    assert int((top[torch.float16] == top[torch.float32]).sum()) >= 15
    assert max(seconds.values()) < 10.0, seconds  # bf16/fp16 on CPU do not hang


# -------------------------------------------------------------------------------- config


def base_raw(**changes) -> dict:
    raw = {"model_type": "nemotron_labs_diffusion", "vocab_size": 131072, "hidden_size": 5120,
           "intermediate_size": 16384, "num_hidden_layers": 40, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
           "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e9, "factor": 16.0,
                               "original_max_position_embeddings": 16384, "beta_fast": 32.0,
                               "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                               "llama_4_scaling_beta": 0.1},
           "mask_token_id": 100, "bos_token_id": 1, "eos_token_id": 11, "block_size": 32}
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


def test_config_head_dim_from_config():
    assert ModelConfig.from_dict(base_raw()).head_dim == 128  # not 5120 / 32 = 160
    assert ModelConfig.from_dict(base_raw(head_dim=None)).head_dim == 160


def test_config_special_ids():
    config = ModelConfig.from_dict(base_raw())
    assert config.mask_token_id == 100 and config.bos_token_id == 1 and config.eos_token_ids == (11,)
    assert config.layout == "nld" and config.block_size == 32
    assert ModelConfig.from_dict(base_raw(mask_token_id=-1)).mask_token_id is None
    assert ModelConfig.from_dict(base_raw(mask_token_id=None)).mask_token_id is None
    assert ModelConfig.from_dict(base_raw(eos_token_id=[11, 2])).eos_token_ids == (11, 2)
    with pytest.raises(CheckpointError, match="mask_token_id"):
        ModelConfig.from_dict(base_raw(mask_token_id=131072))


def test_config_eos_from_generation_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(base_raw()))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 11, 13]}))
    assert ModelConfig.from_file(tmp_path / "config.json").eos_token_ids == (11, 2, 13)
    (tmp_path / "generation_config.json").unlink()
    assert ModelConfig.from_file(tmp_path / "config.json").eos_token_ids == (11,)


def test_generation_config_eos_reaches_loaded_model(single):
    (single / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    assert load(single).config.eos_token_ids == (2, 5)


def test_config_rope_parameters_vs_legacy():
    modern = ModelConfig.from_dict(base_raw()).rope
    params = dict(base_raw()["rope_parameters"])
    theta = params.pop("rope_theta")
    legacy = ModelConfig.from_dict(base_raw(rope_parameters=None, rope_theta=theta, rope_scaling=params)).rope
    assert legacy == modern
    params["type"] = params.pop("rope_type")  # the older "type" key
    older = ModelConfig.from_dict(base_raw(rope_parameters=None, rope_theta=theta, rope_scaling=params)).rope
    assert older == modern
    assert modern.theta == 1e9 and modern.rope_type == "yarn" and modern.factor == 16.0
    assert modern.original_max_position_embeddings == 16384 and modern.llama_4_scaling_beta == 0.1
    assert modern.mscale == 1.0 and modern.mscale_all_dim == 1.0
    plain = ModelConfig.from_dict(base_raw(rope_parameters=None, rope_theta=5e5)).rope
    assert plain.rope_type == "default" and plain.theta == 5e5


def test_config_unknown_rope_type():
    raw = base_raw()
    raw["rope_parameters"]["rope_type"] = "dynamic"
    with pytest.raises(CheckpointError, match="dynamic"):
        ModelConfig.from_dict(raw)


def test_sliding_window_caps_the_context_limit():
    """Full attention equals sliding-window attention only inside the window."""
    from trimode.model.config import ModelConfig

    raw = dict(model_type="mistral", vocab_size=10, hidden_size=8, intermediate_size=8,
               num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32768,
               sliding_window=4096)
    with pytest.warns(UserWarning, match="sliding_window=4096"):
        assert ModelConfig.from_dict(raw).max_position_embeddings == 4096
    assert ModelConfig.from_dict({**raw, "sliding_window": None}).max_position_embeddings == 32768
