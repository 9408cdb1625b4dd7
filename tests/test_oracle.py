"""The fast path equals the slow reference decoders token for token (fp32, temperature 0)."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import EOS, MASK, assert_cache_equals_causal, make_oracle, write_checkpoint
from reference import ref_ar, ref_diffusion, ref_linear_spec
from trimode import LLM, SamplingParams


def prompts_for(seed: int, lengths=(3, 11, 6)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 96) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=[0, 1, 2])
def seeded(request, tmp_path_factory):
    oracle = make_oracle(seed=100 + request.param)
    path = write_checkpoint(tmp_path_factory.mktemp(f"oracle{request.param}"), oracle)
    return request.param, LLM(str(path)), oracle


def test_ar_equals_reference(seeded):
    seed, llm, oracle = seeded
    prompts = prompts_for(seed)
    outs = llm.generate(prompts, SamplingParams(mode="ar", max_tokens=13))
    for prompt, out in zip(prompts, outs):
        ids, nfe = ref_ar(oracle, prompt, 13, {EOS}, MASK)
        assert out.token_ids == ids
        assert out.metrics.nfe == nfe


@pytest.mark.parametrize("block_length", [1, 4, 7, 32])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 1.0, None])
def test_diffusion_equals_reference(seeded, block_length, threshold):
    seed, llm, oracle = seeded
    prompts = prompts_for(seed)
    max_tokens = 10 if block_length != 32 else 37  # never a multiple of block_length > 1
    params = SamplingParams(mode="diffusion", max_tokens=max_tokens, block_length=block_length,
                            threshold=threshold)
    outs = llm.generate(prompts, params)  # one batch, prompts of different lengths
    for prompt, out in zip(prompts, outs):
        ids, nfe = ref_diffusion(oracle, prompt, max_tokens, block_length, threshold, {EOS}, MASK)
        assert out.token_ids == ids, (prompt, block_length, threshold)
        assert out.metrics.nfe == nfe
        assert MASK not in out.token_ids


@pytest.mark.parametrize("block_length", [1, 4, 7, 32])
def test_linear_spec_equals_reference_and_ar(seeded, block_length):
    seed, llm, oracle = seeded
    prompts = prompts_for(seed)
    outs = llm.generate(prompts, SamplingParams(mode="linear_spec", max_tokens=19,
                                                block_length=block_length))
    for prompt, out in zip(prompts, outs):
        spec_ids, spec_nfe = ref_linear_spec(oracle, prompt, 19, block_length, {EOS}, MASK)
        ar_ids, _ = ref_ar(oracle, prompt, 19, {EOS}, MASK)
        assert out.token_ids == spec_ids == ar_ids
        assert out.metrics.nfe == spec_nfe  # the same drafts, so the same cycles


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear_spec"])
def test_batched_equals_single(seeded, mode):
    seed, llm, _ = seeded
    prompts = prompts_for(seed, lengths=(2, 17, 5, 9))
    params = SamplingParams(mode=mode, max_tokens=12, block_length=4, threshold=0.9)
    batched = llm.generate(prompts, params)
    for prompt, out in zip(prompts, batched):
        single = llm.generate([prompt], params)[0]
        assert out.token_ids == single.token_ids
        assert out.metrics.nfe == single.metrics.nfe
        assert out.finish_reason == single.finish_reason


def test_cached_equals_recompute_at_block_boundaries(tiny):
    """B08: after each commit the cached K/V equal a clean causal forward over the text."""
    from trimode.decoding.sequence import Sequence
    from trimode.decoding.registry import STRATEGIES

    llm = LLM(str(tiny[0]))
    model = llm.model
    prompt = prompts_for(1, lengths=(9,))[0]  # a prompt whose 24 tokens hold no EOS
    seq = Sequence(prompt, SamplingParams(mode="diffusion", max_tokens=24, block_length=8,
                                          threshold=0.9), {EOS}, MASK, 8)
    cache = model.new_cache(1, 64)
    hidden = model(torch.tensor([prompt]), cache)
    seq.strategy = STRATEGIES["diffusion"]()
    seq.strategy.start(seq, model.logits(hidden)[0, -1:])
    commits = 0
    while not seq.finished:
        step = seq.strategy.next_step(seq)
        hidden = model(torch.tensor([step.tokens]), cache, bidirectional=step.bidirectional,
                       write=step.write)
        seq.strategy.update(seq, model.logits(hidden)[0])
        if step.kind == "commit":
            commits += 1
            assert_cache_equals_causal(model, cache, prompt + seq.generated)
    assert commits >= 2
