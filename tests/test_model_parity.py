"""Parity of ``TriModeModel`` (loaded by ``load_model``) with transformers' ``Ministral3ForCausalLM``.

Tiny random weights, NLD's exact rope_parameters (YaRN factor 16 over 16384 positions, mscale =
mscale_all_dim = 1, Llama-4 query scale beta 0.1), fp32. The oracle runs with explicit 4D
additive masks (0 / -inf) and explicit position ids (spec 1.3, 1.4, 2.1, 2.2).
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from conftest import (BOS, EOS, NLD_ROPE, init_random, make_oracle, nld_config_dict, tiny_geometry,
                      write_checkpoint)
from reference import logits_of
from trimode.model.config import ModelConfig, RopeConfig
from trimode.checkpoint.loader import load_model
from trimode.model.rope import RotaryEmbedding, inv_freq_and_attention_factor

TOL = 1e-4
NEG = float("-inf")


def oracle_with_rope(rope: dict, seed: int = 0, **overrides):
    """Like conftest.make_oracle, but with any rope_parameters (e.g. the 14B's theta 1e9)."""
    from transformers import Ministral3Config, Ministral3ForCausalLM

    config = Ministral3Config(**tiny_geometry(**overrides), rope_parameters=dict(rope),
                              bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0,
                              attn_implementation="eager")
    torch.manual_seed(seed)
    return init_random(Ministral3ForCausalLM(config), None)


def load(directory):
    net, _ = load_model(directory, dtype=torch.float32, device="cpu")
    return net


def run(net, ids, cache=None, **kw) -> torch.Tensor:
    """fp32 logits ``[B, T, V]`` of one trimode forward (a fresh cache when none is given)."""
    x = torch.as_tensor(ids)
    x = x[None] if x.dim() == 1 else x
    if cache is None:
        cache = net.new_cache(x.shape[0], x.shape[1] + 8)
    return net.logits(net(x, cache, **kw))


def additive(allowed: torch.Tensor) -> torch.Tensor:
    return torch.zeros(allowed.shape).masked_fill(~allowed, NEG)[None, None]


@pytest.fixture(scope="module")
def nld(tmp_path_factory):
    oracle = make_oracle(seed=11)
    return load(write_checkpoint(tmp_path_factory.mktemp("parity"), oracle)), oracle


def ids_for(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 96, (n,), generator=g).tolist()


# ---------------------------------------------------------------------------------- causal


def test_causal_logits_match_oracle(nld):
    net, oracle = nld
    ids = ids_for(1, 13)
    ref = logits_of(oracle, ids)
    mine = run(net, ids)[0]
    assert (mine - ref).abs().max().item() <= TOL
    assert ref.abs().max().item() > 1.0  # logits are not trivially tiny


def test_causal_in_chunks_with_cache_matches_oracle(nld):
    net, oracle = nld
    ids = ids_for(2, 17)
    ref = logits_of(oracle, ids)
    cache = net.new_cache(1, 32)
    parts = [run(net, ids[a:b], cache) for a, b in ((0, 5), (5, 6), (6, 17))]
    assert cache.lengths.tolist() == [17]
    assert (torch.cat(parts, 1)[0] - ref).abs().max().item() <= TOL


# --------------------------------------------------------------------------- bidirectional


def test_bidirectional_block_over_cached_prefix(nld):
    net, oracle = nld
    prefix, block, after = ids_for(3, 9), ids_for(4, 6), ids_for(5, 4)
    cache = net.new_cache(1, 32)
    run(net, prefix, cache)
    mine = run(net, block, cache, bidirectional=True, write=False)[0]
    ref = logits_of(oracle, prefix + block, block=len(block), bidirectional=True)[-len(block):]
    assert (mine - ref).abs().max().item() <= TOL
    # the block rows really see later block rows: a causal pass gives different logits
    causal_ref = logits_of(oracle, prefix + block)[-len(block):]
    assert (causal_ref - ref).abs().max().item() > 1e-2
    assert cache.lengths.tolist() == [len(prefix)]  # write=False left the cache alone

    # A following causal call equals the same call on a cache that never saw the
    # bidirectional pass, and the oracle.
    follow = run(net, after, cache)[0]
    fresh = net.new_cache(1, 32)
    run(net, prefix, fresh)
    without = run(net, after, fresh)[0]
    assert torch.equal(follow, without)
    assert (follow - logits_of(oracle, prefix + after)[-len(after):]).abs().max().item() <= TOL
    assert cache.lengths.tolist() == [len(prefix) + len(after)]


def test_bidirectional_without_prefix(nld):
    net, oracle = nld
    block = ids_for(6, 7)
    mine = run(net, block, bidirectional=True, write=False)[0]
    ref = logits_of(oracle, block, block=len(block), bidirectional=True)
    assert (mine - ref).abs().max().item() <= TOL


# ------------------------------------------------------------------- beyond 16384 positions

LONG_PREFIX, LONG_END, CHUNK = 16300, 16450, 2048


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """Both models after a real causal prefix of 16,300 tokens fed in chunks.

    To keep it fast: 2 query heads / 1 KV head (GQA 2:1, hidden 32, 2 layers) and the oracle on
    transformers' SDPA attention (still with our explicit 4D float masks and position ids).
    """
    from transformers import DynamicCache

    oracle = make_oracle(seed=21, num_attention_heads=2, num_key_value_heads=1)
    oracle.set_attn_implementation("sdpa")
    net = load(write_checkpoint(tmp_path_factory.mktemp("long"), oracle))
    ids = torch.tensor([ids_for(7, LONG_END)])
    t0 = time.perf_counter()
    cache = net.new_cache(1, LONG_END)
    for a in range(0, LONG_PREFIX, CHUNK):
        net(ids[:, a:min(a + CHUNK, LONG_PREFIX)], cache)
    t1 = time.perf_counter()
    hf_cache = DynamicCache(config=oracle.config)
    with torch.no_grad():
        for a in range(0, LONG_PREFIX, CHUNK):
            b = min(a + CHUNK, LONG_PREFIX)
            oracle(input_ids=ids[:, a:b], cache=hf_cache, use_cache=True,
                   attention_mask=additive(torch.ones(b - a, b, dtype=torch.bool).tril(a)),
                   position_ids=torch.arange(a, b)[None], logits_to_keep=1)
    t2 = time.perf_counter()
    print(f"\n16,300-token prefix: trimode {t1 - t0:.1f}s, transformers {t2 - t1:.1f}s")
    assert cache.lengths.tolist() == [LONG_PREFIX] and hf_cache.get_seq_length() == LONG_PREFIX
    return net, oracle, ids, cache, hf_cache


def oracle_chunk(oracle, hf_cache, chunk: torch.Tensor, past: int, bidirectional: bool) -> torch.Tensor:
    n = chunk.shape[1]
    allowed = torch.ones(n, past + n, dtype=torch.bool)
    if not bidirectional:
        allowed = allowed.tril(past)
    with torch.no_grad():
        out = oracle(input_ids=chunk, cache=hf_cache, use_cache=True,
                     attention_mask=additive(allowed), position_ids=torch.arange(past, past + n)[None])
    return out.logits[0].float()


def test_beyond_16384_bidirectional_then_causal(long_context):
    net, oracle, ids, cache, hf_cache = long_context
    chunk = ids[:, LONG_PREFIX:LONG_END]  # positions 16,300 .. 16,449: crosses 16,384
    # bidirectional block over the long prefix, not committed
    mine = net.logits(net(chunk, cache, bidirectional=True, write=False))[0]
    ref = oracle_chunk(oracle, hf_cache, chunk, LONG_PREFIX, bidirectional=True)
    hf_cache.crop(-(LONG_END - LONG_PREFIX))
    assert hf_cache.get_seq_length() == LONG_PREFIX
    assert (mine - ref).abs().max().item() <= TOL
    assert cache.lengths.tolist() == [LONG_PREFIX]
    # then the causal chunk, committed
    mine = net.logits(net(chunk, cache))[0]
    ref = oracle_chunk(oracle, hf_cache, chunk, LONG_PREFIX, bidirectional=False)
    assert (mine - ref).abs().max().item() <= TOL
    assert cache.lengths.tolist() == [LONG_END]

    # Power check: without the Llama-4 query scale, positions < 16384 are unchanged and
    # positions >= 16384 (scale 1 + 0.1 ln 2) are visibly wrong, so the test above can fail.
    cache.crop(torch.tensor([LONG_PREFIX]))
    beta = net.rotary.beta
    try:
        net.rotary.beta = None
        unscaled = net.logits(net(chunk, cache, write=False))[0]
    finally:
        net.rotary.beta = beta
    split = 16384 - LONG_PREFIX
    assert (unscaled[:split] - mine[:split]).abs().max().item() <= 1e-5
    assert (unscaled[split:] - ref[split:]).abs().max().item() > 1e-2


# ---------------------------------------------------------------------- YaRN and Llama-4 scale


def nld_rope(**changes) -> dict:
    rope = dict(NLD_ROPE)
    rope.update(changes)
    return {k: v for k, v in rope.items() if v is not None}


def hf_yarn(rope: dict, head_dim: int):
    from transformers import Ministral3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = Ministral3Config(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                              head_dim=head_dim, max_position_embeddings=262144,
                              rope_parameters=dict(rope))
    return ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")


def trimode_rope(rope: dict) -> RopeConfig:
    raw = {"model_type": "nemotron_labs_diffusion", "vocab_size": 131072, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 1, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
           "rope_parameters": rope}
    return ModelConfig.from_dict(raw).rope


@pytest.mark.parametrize("theta", [1e6, 1e9])
@pytest.mark.parametrize("head_dim", [128, 16])
def test_yarn_inv_freq_and_attention_factor_equal_transformers(theta, head_dim):
    rope = nld_rope(rope_theta=theta)
    inv, factor = inv_freq_and_attention_factor(trimode_rope(rope), head_dim)
    hf_inv, hf_factor = hf_yarn(rope, head_dim)
    assert factor == 1.0 and hf_factor == 1.0  # mscale == mscale_all_dim: no YaRN mscale
    assert inv.shape == hf_inv.shape == (head_dim // 2,)
    torch.testing.assert_close(inv, hf_inv.float(), rtol=1e-6, atol=0)
    # it really is YaRN: the highest-frequency pair extrapolates, the lowest is interpolated /16
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    assert inv[0] == pytest.approx(plain[0].item(), rel=1e-6)
    assert inv[-1] == pytest.approx(plain[-1].item() / 16, rel=1e-5)


def test_yarn_attention_factor_without_mscale_is_generic():
    rope = nld_rope(mscale=None, mscale_all_dim=None)
    inv, factor = inv_freq_and_attention_factor(trimode_rope(rope), 128)
    hf_inv, hf_factor = hf_yarn(rope, 128)
    assert factor == pytest.approx(0.1 * math.log(16) + 1, abs=1e-12)
    assert factor == pytest.approx(1.2773, abs=1e-4)
    assert factor == pytest.approx(hf_factor, abs=1e-12)
    torch.testing.assert_close(inv, hf_inv.float(), rtol=1e-6, atol=0)


def test_yarn_without_original_max_uses_max_position_embeddings():
    """transformers fills a missing original_max_position_embeddings with max_position_embeddings."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 2048,
           "rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 4.0}}
    rope = ModelConfig.from_dict(raw).rope
    assert rope.original_max_position_embeddings == 2048
    inv, factor = inv_freq_and_attention_factor(rope, 16)
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](LlamaConfig(**raw), "cpu")
    torch.testing.assert_close(inv, hf_inv.float(), rtol=1e-6, atol=0)
    assert factor == pytest.approx(hf_factor, abs=1e-12)


def test_llama4_query_scale_values():
    rotary = RotaryEmbedding(trimode_rope(dict(NLD_ROPE)), 128)
    pos = torch.tensor([[0, 16383, 16384, 32767, 32768, 131072, 262143]])
    _, _, scale = rotary(pos, torch.float32)
    want = [1.0, 1.0, 1 + 0.1 * math.log(2), 1 + 0.1 * math.log(2), 1 + 0.1 * math.log(3),
            1 + 0.1 * math.log(9), 1 + 0.1 * math.log(16)]
    assert scale.shape == (1, 7, 1, 1)
    torch.testing.assert_close(scale.flatten(), torch.tensor(want), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------- 14B-like geometry


def test_head_dim_not_hidden_over_heads_and_theta_1e9(tmp_path):
    rope = nld_rope(rope_theta=1e9)
    oracle = oracle_with_rope(rope, seed=5, hidden_size=40, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16)
    write_checkpoint(tmp_path, oracle)
    config = nld_config_dict(oracle)
    config["rope_parameters"] = rope
    (tmp_path / "config.json").write_text(json.dumps(config))
    net = load(tmp_path)
    assert net.config.head_dim == 16 and net.config.hidden_size == 40
    assert net.config.rope.theta == 1e9
    ids = ids_for(8, 14)
    assert (run(net, ids)[0] - logits_of(oracle, ids)).abs().max().item() <= TOL
    prefix, block = ids[:8], ids[8:]
    cache = net.new_cache(1, 32)
    run(net, prefix, cache)
    mine = run(net, block, cache, bidirectional=True, write=False)[0]
    ref = logits_of(oracle, ids, block=len(block), bidirectional=True)[-len(block):]
    assert (mine - ref).abs().max().item() <= TOL
    # theta matters at these distances: the 1e6 oracle disagrees
    other = oracle_with_rope(nld_rope(), seed=5, hidden_size=40, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16)
    assert (logits_of(other, ids) - logits_of(oracle, ids)).abs().max().item() > 1e-2


# ------------------------------------------------------------------------ batched rows


@pytest.fixture(scope="module")
def nld64(tmp_path_factory):
    """The same checkpoint loaded in float64: batched-vs-single differences are then far below
    1e-5 unless something (padding, another row, a stale slot) really leaks into a row; in fp32
    different batch shapes alone already move logits of size ~10 by ~1e-5."""
    oracle = make_oracle(seed=11)
    net, _ = load_model(write_checkpoint(tmp_path_factory.mktemp("parity64"), oracle),
                        dtype=torch.float64, device="cpu")
    return net, oracle


def test_batched_rows_equal_single_rows(nld64):
    net, oracle = nld64
    assert net.dtype == torch.float64
    lengths = [7, 3, 5]
    rows = [ids_for(30 + i, n) for i, n in enumerate(lengths)]
    pad = 9  # padding slots hold a real token id, so leaking padding would show
    tokens = torch.tensor([r + [pad] * (7 - len(r)) for r in rows])
    cache = net.new_cache(3, 24)
    batched = run(net, tokens, cache, n_valid=torch.tensor(lengths))
    assert cache.lengths.tolist() == lengths
    singles = []
    for i, r in enumerate(rows):
        c = net.new_cache(1, 24)
        single = run(net, r, c)[0]
        assert (batched[i, :len(r)] - single).abs().max().item() <= 1e-5
        assert (single - logits_of(oracle, r)).abs().max().item() <= TOL
        singles.append(c)

    # Second call: per-row n_valid, bidirectional and write flags mixed in one batch.
    new = [ids_for(40 + i, 3) for i in range(3)]
    step_valid, bidir, write = [3, 1, 2], [True, False, True], [True, True, False]
    tokens = torch.tensor([n[:k] + [pad] * (3 - k) for n, k in zip(new, step_valid)])
    batched = run(net, tokens, cache, n_valid=torch.tensor(step_valid),
                  bidirectional=torch.tensor(bidir), write=torch.tensor(write))
    assert cache.lengths.tolist() == [7 + 3, 3 + 1, 5]
    for i in range(3):
        k = step_valid[i]
        single = run(net, new[i][:k], singles[i], bidirectional=bidir[i], write=write[i])[0]
        assert (batched[i, :k] - single).abs().max().item() <= 1e-5

    # Third call, causal for all rows: row 2's uncommitted block must have no effect.
    last = [ids_for(50 + i, 2) for i in range(3)]
    batched = run(net, torch.tensor(last), cache)
    for i in range(3):
        single = run(net, last[i], singles[i])[0]
        assert (batched[i] - single).abs().max().item() <= 1e-5
    ref2 = logits_of(oracle, rows[2] + last[2])[-2:]
    assert (batched[2] - ref2).abs().max().item() <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_rope_kernels_round_like_the_textbook_formulas(dtype):
    """RMSNorm (one ``F.rms_norm``) and RoPE (signed sin, one ``roll``) are the decode step's
    cheaper forms of the reference's formulas; they must round bitwise the same."""
    from trimode.model.model import RMSNorm
    from trimode.model.rope import apply_rotary

    torch.manual_seed(0)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96)
    norm = norm.to(dtype)
    for scale in (0.01, 1.0, 30.0):
        x = (torch.randn(3, 5, 96) * scale).to(dtype)
        h = x.float()
        want = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        assert torch.equal(norm(x), want)
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), 16)
    cos, sin, _ = rotary(torch.arange(40).view(2, 20) * 37, dtype)
    x = torch.randn(2, 20, 3, 16).to(dtype)
    half_cos, half_sin = (torch.cat((f, f), -1).to(dtype)[:, :, None] for f in
                          ((torch.arange(40).view(2, 20, 1) * 37 * rotary.inv_freq).cos(),
                           (torch.arange(40).view(2, 20, 1) * 37 * rotary.inv_freq).sin()))
    assert torch.equal(cos, half_cos)
    want = x * half_cos + torch.cat((-x[..., 8:], x[..., :8]), -1) * half_sin
    assert torch.equal(apply_rotary(x, cos, sin), want)
