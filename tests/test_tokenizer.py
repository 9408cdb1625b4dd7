"""Tokenizer guarantees on the tiny checkpoint: one BOS, no mask id from text, id checks."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import BOS, MASK
from trimode import LLM


@pytest.fixture(scope="module")
def bos_adding_llm(tiny, tmp_path_factory):
    """The tiny checkpoint with a tokenizer that adds BOS itself, and a template that also
    writes '<s>': the case where naive code produces two BOS tokens."""
    directory = tmp_path_factory.mktemp("bos")
    shutil.copytree(tiny[0], directory, dirs_exist_ok=True)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return LLM(str(directory))


@pytest.mark.parametrize("fixture", ["tiny_llm", "bos_adding_llm"])
def test_chat_has_exactly_one_bos(request, fixture):
    llm = request.getfixturevalue(fixture)
    ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": "w5 w6"},
                                             {"role": "assistant", "content": "w7"},
                                             {"role": "user", "content": "w8"}])
    assert ids[0] == BOS and ids.count(BOS) == 1


def test_mask_string_in_text_is_plain_text(tiny_llm):
    tok = tiny_llm.tokenizer
    assert MASK not in tok.encode("w5 <mask> w6")
    assert MASK not in tok.apply_chat_template([{"role": "user", "content": "<mask>"}])


def test_raw_ids_with_mask_or_out_of_range_are_rejected(tiny_llm):
    with pytest.raises(ValueError, match="mask token id 3"):
        tiny_llm.generate([[5, MASK, 6]])
    with pytest.raises(ValueError, match=r"\[0, 96\)"):
        tiny_llm.generate([[5, 96]])
    with pytest.raises(ValueError, match="must not be empty"):
        tiny_llm.generate([""])
    with pytest.raises(ValueError, match="must not be empty"):
        tiny_llm.generate([[]])


def test_prompt_over_context_limit_names_both_numbers(tiny, tmp_path):
    """B27: the message states the real limit and the requested total, with block rounding."""
    shutil.copytree(tiny[0], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(tmp_path))
    from trimode import SamplingParams

    prompt = [5] * 50
    with pytest.raises(ValueError, match=r"= 66 exceeds the context limit 64"):
        llm.generate([prompt], SamplingParams(mode="diffusion", max_tokens=10, block_length=8))
    with pytest.raises(ValueError, match=r"= 65 exceeds the context limit 64"):
        llm.generate([[5] * 55], SamplingParams(mode="ar", max_tokens=10))
    ok = llm.generate([[5] * 54], SamplingParams(mode="ar", max_tokens=10))[0]
    assert len(ok.token_ids) <= 10


def test_prompt_and_params_types_are_checked(tiny_llm):
    from trimode import SamplingParams

    for bad in (123, None, [1.5, 2], [[5, 6], 7]):
        with pytest.raises(ValueError, match="prompt"):
            tiny_llm.generate(bad)
    with pytest.raises(ValueError, match="params entries must be SamplingParams"):
        tiny_llm.generate([[5, 6]], [{"mode": "ar"}])
    with pytest.raises(ValueError, match="params has 2 entries for 1 prompts"):
        tiny_llm.generate([[5, 6]], [SamplingParams(), SamplingParams()])
