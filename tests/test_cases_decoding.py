"""Field cases common to the three modes: B05 (max_tokens), B09 (mixed-length batches),
B25 (parameter validation, API part) and seed reproducibility.

Stub models (``tests/stubs.py``) give exact right values; the tiny random checkpoint
(``tests/conftest.py``) checks the same properties through the real model and ``LLM``.
"""

from __future__ import annotations

import pytest

from stubs import (MASK, PARTIAL3, HashDenoiser, HashLM, RowDrafter, ADVERSARIAL, PERFECT,
                   StubModel, ar_greedy, run, run_one, single_thread)
from trimode import SamplingParams

assert single_thread  # autouse fixture, imported for its effect

MODES = ["ar", "diffusion", "linear_spec"]
PROMPT = [9, 8, 7]


def stub_for(mode: str, lm=None) -> StubModel:
    lm = lm or HashLM()
    return StubModel(lm, HashDenoiser() if mode == "diffusion" else PARTIAL3)


# --------------------------------------------------------------------------------- B05


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("max_tokens", [5, 1])
def test_b05_small_max_tokens_on_stub(mode, max_tokens):
    model = stub_for(mode)
    seq = run_one(model, PROMPT, SamplingParams(mode=mode, max_tokens=max_tokens,
                                                block_length=32, threshold=0.9, trace=True))
    assert len(seq.generated) == max_tokens
    assert seq.finish_reason == "length"
    assert seq.metrics.generated_tokens == max_tokens  # usage counts exactly what is returned
    if mode != "diffusion":  # ar and linear_spec are lossless: the AR greedy prefix
        assert seq.generated == ar_greedy(model.lm, PROMPT, max_tokens)[0]
    else:  # a prefix of the full-block run (DiffusionStrategy's documented policy)
        full = run_one(stub_for(mode), PROMPT, SamplingParams(mode=mode, max_tokens=32,
                                                               block_length=32, threshold=0.9))
        assert seq.generated == full.generated[:max_tokens]
    if max_tokens == 1:  # the prefill's token is all there is: no further forward
        assert seq.metrics.nfe == 1
    # No emitting forward (prefill, ar step, verify) ever produced a position past the
    # limit (diffusion denoises its last block at full length by design, and emits a prefix).
    emitted = [p for t in seq.metrics.trace if t.kind in ("prefill", "ar", "verify")
               for p in t.positions]
    assert emitted and max(emitted) < max_tokens


@pytest.mark.parametrize("bad", [0, -5])
def test_b05_max_tokens_below_one_is_rejected(bad):
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=bad)


@pytest.mark.parametrize("mode", MODES)
def test_b05_small_max_tokens_on_tiny_checkpoint_then_a_normal_request(tiny_llm, mode):
    prompt = [12, 30, 44]
    normal = SamplingParams(mode=mode, max_tokens=24, block_length=8, threshold=0.9)
    before = tiny_llm.generate(prompt, normal)[0]
    for n in (5, 1):
        out = tiny_llm.generate(prompt, SamplingParams(mode=mode, max_tokens=n, block_length=32,
                                                       threshold=0.9))[0]
        assert len(out.token_ids) == n and out.finish_reason == "length"
        assert out.metrics.generated_tokens == n
        assert MASK not in out.token_ids
    with pytest.raises(ValueError, match="max_tokens"):
        tiny_llm.generate(prompt, SamplingParams(mode=mode, max_tokens=0))
    after = tiny_llm.generate(prompt, normal)[0]
    assert after.token_ids == before.token_ids and after.metrics.nfe == before.metrics.nfe


# --------------------------------------------------------------------------------- B09

B09_PROMPTS = [[5], [6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [17] * 17, [18, 19, 20, 21]]


def b09_model(mode: str) -> StubModel:
    # EOS now and then, so rows leave the batch at different steps (cache rows re-mapped).
    lm = HashLM(eos_every=25, min_context=6)
    if mode == "diffusion":
        return StubModel(lm, HashDenoiser(eos_every=40))
    drafters = RowDrafter({tuple(B09_PROMPTS[0]): ADVERSARIAL, tuple(B09_PROMPTS[2]): PERFECT},
                          default=PARTIAL3)
    return StubModel(lm, drafters)


@pytest.mark.parametrize("mode", MODES)
def test_b09_mixed_length_batch_equals_single_on_stub(mode):
    params = SamplingParams(mode=mode, max_tokens=64, block_length=8, threshold=0.9, trace=True)
    batched = run(b09_model(mode), B09_PROMPTS, params)
    assert {s.finish_reason for s in batched} == {"stop", "length"}
    for prompt, seq in zip(B09_PROMPTS, batched):
        alone = run_one(b09_model(mode), prompt, params)
        assert seq.generated == alone.generated
        assert seq.finish_reason == alone.finish_reason
        assert seq.metrics.trace == alone.metrics.trace
        assert seq.metrics.nfe == alone.metrics.nfe
        if mode != "diffusion":
            assert (seq.generated, seq.finish_reason) == ar_greedy(b09_model(mode).lm, prompt, 64)


@pytest.mark.parametrize("mode", MODES)
def test_b09_mixed_length_batch_equals_single_on_tiny_checkpoint(tiny_llm, mode):
    prompts = [[7, 8], [12] * 20, [4, 90, 33, 21, 8]]  # "Hi."-short, long, medium
    params = SamplingParams(mode=mode, max_tokens=64, block_length=8, threshold=0.9)
    batched = tiny_llm.generate(prompts, params)
    for prompt, out in zip(prompts, batched):
        alone = tiny_llm.generate([prompt], params)[0]
        assert out.token_ids == alone.token_ids
        assert out.finish_reason == alone.finish_reason
        assert out.metrics.nfe == alone.metrics.nfe


# --------------------------------------------------------------------------------- B25


@pytest.mark.parametrize("field,value", [
    ("temperature", -1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 1.5), ("top_p", 0), ("top_p", float("nan")), ("top_k", -2), ("max_tokens", -5),
    ("max_tokens", 0), ("max_tokens", 2.5), ("block_length", 0), ("block_length", -8),
    ("threshold", 2), ("threshold", float("nan")), ("mode", "foo"), ("seed", -1)])
def test_b25_invalid_params_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_b25_edge_values_are_accepted():
    SamplingParams(temperature=0, top_p=1)
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0, threshold=0, block_length=1, max_tokens=1)
    SamplingParams(mode="diffusion", threshold=1.0)


def test_b25_prompt_with_mask_id_or_empty_is_rejected(tiny_llm):
    with pytest.raises(ValueError, match="mask"):
        tiny_llm.generate([5, MASK, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate("", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate([[]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate([[5, 6], []], SamplingParams(max_tokens=2))
    assert tiny_llm.generate([5, 6], SamplingParams(max_tokens=2))[0].token_ids  # still fine


# --------------------------------------------------------------------------------- seeds


def soft_model(mode: str) -> StubModel:
    """Peak logit 1.5 over 39 others: at temperature 0.8 most tokens are a real draw."""
    model = stub_for(mode)
    model.peak = 1.5
    return model


@pytest.mark.parametrize("mode", MODES)
def test_same_seed_same_output_alone_and_batched(mode):
    params = SamplingParams(mode=mode, temperature=0.8, max_tokens=24, block_length=8,
                            threshold=0.9, seed=1234)
    first = run_one(soft_model(mode), PROMPT, params)
    second = run_one(soft_model(mode), PROMPT, params)
    assert first.generated == second.generated and first.generated
    others = [SamplingParams(mode=mode, temperature=0.8, max_tokens=30, block_length=8,
                             threshold=0.9, seed=s) for s in (1, None)]
    batched = run(soft_model(mode), [[30, 31], PROMPT, [5] * 11],
                  [others[0], params, others[1]])[1]
    assert batched.generated == first.generated
    # The seed matters: other seeds give other outputs (so the checks above can fail).
    outs = {tuple(run_one(soft_model(mode), PROMPT,
                          SamplingParams(mode=mode, temperature=0.8, max_tokens=24,
                                         block_length=8, threshold=0.9, seed=s)).generated)
            for s in range(5)}
    assert len(outs) >= 4


def test_b25_container_and_flag_types_are_checked():
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=5)
    with pytest.raises(ValueError, match="trace"):
        SamplingParams(trace="yes")
    assert SamplingParams(stop_token_ids=[2, 5]).stop_token_ids == (2, 5)


def test_b25_temperature_underflow_and_seed_overflow_are_rejected():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=1e-320)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64, temperature=1.0)
    assert SamplingParams(temperature=1e-4, seed=2**63 - 1).seed == 2**63 - 1


def test_pruned_quadratic_cache_is_sized_for_its_own_layout():
    from trimode.decoding.registry import scratch_slots

    assert scratch_slots("quadratic_spec", 64, 64, 1) == 64 + 64 + 1
    assert scratch_slots("quadratic_spec", 64, 64, None) == 64 + 64 * 64 + 1
