"""Draft adapters (PEFT LoRA): exact draft-pass parity with PEFT, scoping, and B18 errors."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import MASK
from trimode import LLM, CheckpointError, SamplingParams


def save_peft_adapter(oracle, directory, r=8, alpha=32, targets=("o_proj",), seed=5):
    """A PEFT adapter for ``oracle`` with non-zero B (PEFT initialises B to 0: a no-op)."""
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(oracle), LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(str(directory))
    return peft_model.eval()


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    directory = tmp_path_factory.mktemp("lora")
    peft_model = save_peft_adapter(tiny[1], directory, targets=("o_proj", "gate_proj", "q_proj"))
    return directory, peft_model


def test_draft_pass_equals_peft_model_under_bidirectional_mask(tiny, adapter):
    """With the adapter on, a bidirectional block pass over a prefix cached by the base model
    (adapter off, spec 5.1) equals PEFT's forward with an explicit all-visible 4D mask."""
    llm = LLM(str(tiny[0]), draft_adapter=str(adapter[0]))
    prefix, block = [5, 9, 13, 40, 7], [22] + [MASK] * 5
    model = llm.model
    cache = model.new_cache(1, 32)
    model(torch.tensor([prefix]), cache)
    drafted = model.logits(model(torch.tensor([block]), cache, bidirectional=True, write=False,
                                 adapter=True))[0]
    peft_model = adapter[1]
    n = len(prefix) + len(block)
    with torch.no_grad():
        with peft_model.disable_adapter():
            past = peft_model(input_ids=torch.tensor([prefix]), use_cache=True).cache
        expected = peft_model(input_ids=torch.tensor([block]), cache=past,
                              attention_mask=torch.zeros(1, 1, len(block), n),
                              position_ids=torch.arange(len(prefix), n)[None]).logits[0]
    torch.testing.assert_close(drafted, expected, atol=1e-4, rtol=0)
    plain = model.logits(model(torch.tensor([block]), cache, bidirectional=True, write=False))[0]
    assert (plain - drafted).abs().max() > 1e-2  # the adapter really changes the draft


def test_adapter_is_off_outside_drafts(tiny, adapter):
    """B18 (c)(d): ar output is unchanged; linear_spec still equals ar greedy."""
    rng = random.Random(3)
    prompts = [[rng.randrange(4, 96) for _ in range(n)] for n in (4, 9, 13)]
    base = LLM(str(tiny[0]))
    with_adapter = LLM(str(tiny[0]), draft_adapter=str(adapter[0]))
    ar = SamplingParams(mode="ar", max_tokens=24)
    ar_plain = [o.token_ids for o in base.generate(prompts, ar)]
    assert [o.token_ids for o in with_adapter.generate(prompts, ar)] == ar_plain
    for block_length in (4, 8):
        spec = SamplingParams(mode="linear_spec", max_tokens=24, block_length=block_length,
                              trace=True)
        outs = with_adapter.generate(prompts, spec)
        assert [o.token_ids for o in outs] == ar_plain
        plain_drafts = [o.metrics.trace for o in base.generate(prompts, spec)]
        assert [o.metrics.trace for o in outs] != plain_drafts  # drafts did change


def _write_adapter(directory, config: dict, tensors: dict) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "adapter_model.safetensors"))


def _o_proj_tensors(layers=2, r=8, hidden=32, inner=64, prefix="base_model.model.model.layers"):
    return {f"{prefix}.{i}.self_attn.o_proj.lora_{p}.weight":
            torch.randn(shape) for i in range(layers)
            for p, shape in (("A", (r, inner)), ("B", (hidden, r)))}


def test_rank_mismatch_names_tensor_and_shapes(tiny, tmp_path):
    """B18 (a): config r=16, tensors rank 8."""
    _write_adapter(tmp_path, {"peft_type": "LORA", "r": 16, "lora_alpha": 32,
                              "target_modules": ["o_proj"]}, _o_proj_tensors(r=8))
    with pytest.raises(CheckpointError, match=r"lora_A.*shape \(8, 64\).*expected \(16, 64\)"):
        LLM(str(tiny[0]), draft_adapter=str(tmp_path))


def test_prefix_matching_no_module_is_an_error(tiny, tmp_path):
    """B18 (b): keys naming no module of the base model."""
    _write_adapter(tmp_path, {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                              "target_modules": ["o_proj"]},
                   _o_proj_tensors(prefix="base_model.model.transformer.h"))
    with pytest.raises(CheckpointError, match="names no adapter-capable module"):
        LLM(str(tiny[0]), draft_adapter=str(tmp_path))


def test_empty_adapter_and_missing_target_modules(tiny, tmp_path):
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["o_proj"]}
    _write_adapter(tmp_path / "empty", config, {})
    with pytest.raises(CheckpointError, match="0 modules matched"):
        LLM(str(tiny[0]), draft_adapter=str(tmp_path / "empty"))
    one_layer = {k: v for k, v in _o_proj_tensors().items() if ".layers.0." in k}
    _write_adapter(tmp_path / "partial", config, one_layer)
    with pytest.raises(CheckpointError, match=r"without LoRA tensors: encoder\.layers\.1\.self_attn\.o_proj"):
        LLM(str(tiny[0]), draft_adapter=str(tmp_path / "partial"))


def test_base_model_geometry_mismatch(tiny, tmp_path):
    """An adapter trained for a wider model fails on the in_features check."""
    _write_adapter(tmp_path, {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                              "target_modules": ["o_proj"]}, _o_proj_tensors(inner=128, hidden=64))
    with pytest.raises(CheckpointError, match="in_features 64 from the base model"):
        LLM(str(tiny[0]), draft_adapter=str(tmp_path))
