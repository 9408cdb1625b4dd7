"""Batch invariance of the quantized / bf16 CPU path: a token's hidden state must not depend on
how many tokens share its forward (1-token AR step vs an 8-token verify, batch 1 vs batched
rows), or the exact modes stop equalling ar once activations are rounded to bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_oracle, write_checkpoint

from trimode import LLM, SamplingParams
from trimode.model.invariant import attend


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariant_attention_is_per_query_and_matches_sdpa(dtype):
    """Each query's output is bitwise the same whether it is alone over exactly its visible
    keys or one of 8 queries over a longer, masked span; and it is SDPA's result up to
    rounding."""
    torch.manual_seed(0)
    h, kv, d, length, t = 6, 2, 32, 37, 8
    q = torch.randn(1, h, t, d, dtype=dtype)
    keys, values = (torch.randn(1, kv, length + t + 5, d, dtype=dtype) for _ in range(2))
    j = torch.arange(length + t + 5)
    mask = (j[None, :] <= length + torch.arange(t)[:, None])[None, None]
    full = attend(q, keys, values, mask, invariant=True)
    for i in range(t):
        span = length + i + 1
        one = attend(q[:, :, i:i + 1], keys[:, :, :span], values[:, :, :span],
                     torch.ones(1, 1, 1, span, dtype=torch.bool), invariant=True)
        assert torch.equal(one[:, :, 0], full[:, :, i]), i
    ref = F.scaled_dot_product_attention(q.float(), keys.float(), values.float(), attn_mask=mask,
                                         enable_gqa=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(full.float(), ref, atol=tol, rtol=tol)


def _hidden_one_by_one(model, prompt, tokens):
    cache = model.new_cache(1, 64)
    model.forward(prompt, cache)
    return torch.cat([model.forward(tokens[:, i:i + 1], cache) for i in range(tokens.shape[1])], 1)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny model with SmolLM2's head size (64) and 3 query heads per KV head: at these
    sizes SDPA's rounding depends on the number of queries and keys."""
    return write_checkpoint(tmp_path_factory.mktemp("wide"), make_oracle(
        seed=4, hidden_size=192, intermediate_size=256, num_attention_heads=3,
        num_key_value_heads=1, head_dim=64))


@pytest.mark.parametrize("quantization,dtype", [("int8", None), ("int4", None), ("int8", "bfloat16")])
def test_quantized_forward_is_batch_invariant(wide, quantization, dtype):
    """8 tokens in one causal forward give bitwise the hidden states of 8 one-token steps, and
    a row's result does not change when another, longer row shares the forward."""
    llm = LLM(str(wide), quantization=quantization, dtype=dtype, draft_adapter=False)
    model = llm.model
    prompt = torch.arange(40)[None] % 90 + 5
    tokens = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18]])
    one_by_one = _hidden_one_by_one(model, prompt, tokens)
    cache = model.new_cache(1, 64)
    model.forward(prompt, cache)
    assert torch.equal(model.forward(tokens, cache), one_by_one)
    # batched with a second row of another cache length and fewer new tokens (ragged)
    cache = model.new_cache(2, 64)
    model.forward(torch.cat([prompt, prompt + 1]), cache, n_valid=torch.tensor([40, 33]))
    both = model.forward(torch.cat([tokens, tokens.flip(1)]), cache, n_valid=torch.tensor([8, 5]))
    assert torch.equal(both[:1], one_by_one)


def test_bf16_model_exact_modes_equal_ar(tiny):
    """A bf16 model (the dtype "auto" picks on CPUs with AVX512-BF16 or AMX) keeps
    linear_spec and quadratic_spec equal to ar."""
    llm = LLM(str(tiny[0]), dtype="bfloat16", draft_adapter=False)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [40], [4] * 9]
    ar = [o.token_ids for o in llm.generate(prompts, SamplingParams(mode="ar", max_tokens=16))]
    for mode, block in (("linear_spec", 8), ("quadratic_spec", 4)):
        outs = llm.generate(prompts, SamplingParams(mode=mode, block_length=block, max_tokens=16))
        assert [o.token_ids for o in outs] == ar, mode
