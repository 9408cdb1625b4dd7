"""Bad checkpoints and bad API arguments: a clear error naming the file or field, never a raw
traceback from deep inside (B25, B30)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from trimode import LLM, SamplingParams
from trimode.model.config import CheckpointError


@pytest.fixture
def broken(tiny, tmp_path):
    """A writable copy of the tiny checkpoint whose config.json the test edits."""
    target = tmp_path / "ckpt"
    shutil.copytree(tiny[0], target)

    def edit(**changes):
        path = target / "config.json"
        raw = json.loads(path.read_text())
        raw.update(changes)
        path.write_text(json.dumps(raw))
        return str(target)
    return edit


@pytest.mark.parametrize("changes,message", [
    (dict(hidden_size="big"), "hidden_size must be an integer"),
    (dict(num_hidden_layers=[2]), "num_hidden_layers must be an integer"),
    (dict(block_size=0), "block_size must be an integer >= 1"),
    (dict(block_size=-4), "block_size must be an integer >= 1"),
    (dict(mask_token_id=2), "mask_token_id 2 must differ from the EOS"),
    (dict(eos_token_id="two"), "eos_token_id must be an integer"),
    (dict(rms_norm_eps=0), "rms_norm_eps must be in"),
    (dict(vocab_size=0), "vocab_size must be an integer >= 1"),
])
def test_bad_config_values_name_file_and_field(broken, changes, message):
    path = broken(**changes)
    with pytest.raises(CheckpointError, match=message) as info:
        LLM(path)
    assert "config.json" in str(info.value)


def test_bad_generation_config_names_the_file(broken, tiny):
    path = broken()
    (__import__("pathlib").Path(path) / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(CheckpointError, match="generation_config.json"):
        LLM(path)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_batch_size="2"), "max_batch_size must be an integer >= 1"),
    (dict(max_batch_size=0), "max_batch_size must be an integer >= 1"),
    (dict(dtype=torch.int8), "dtype must be float32, bfloat16 or float16"),
    (dict(dtype="int8"), "dtype must be one of"),
    (dict(device="tpu:zero"), "device must be"),
    (dict(max_model_len=0), "max_model_len must be an integer >= 1"),
    (dict(kv_cache_memory=-1), "kv_cache_memory must be an integer >= 1"),
])
def test_bad_llm_arguments(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(tiny[0]), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="CUDA is not available"):
        LLM(str(tiny[0]), device="cuda")


def test_token_ids_as_tuple_numpy_and_torch(tiny_llm):
    params = SamplingParams(max_tokens=4)
    want = tiny_llm.generate([5, 6, 7], params)[0].token_ids
    for prompt in ((5, 6, 7), np.array([5, 6, 7]), torch.tensor([5, 6, 7])):
        assert tiny_llm.generate(prompt, params)[0].token_ids == want
    both = tiny_llm.generate(np.array([[5, 6, 7], [5, 6, 7]]), params)
    assert [o.token_ids for o in both] == [want, want]
    with pytest.raises(ValueError, match="integers"):
        tiny_llm.generate(np.array([5.0, 6.0]), params)


@pytest.mark.parametrize("messages,message", [
    ([{"role": "user", "content": 5}], r"messages\[0\].content must be a string"),
    ([{"role": "user", "content": ["a"]}],  # lists hold content parts (text, image_url, image)
     r"messages\[0\].content\[0\] must be a text, image_url or image part"),
    ([{"role": None, "content": "hi"}], r"messages\[0\].role must be a non-empty string"),
    ([{"role": "user"}], "needs 'role' and 'content'"),
])
def test_bad_chat_messages(tiny_llm, messages, message):
    with pytest.raises(ValueError, match=message):
        tiny_llm.chat(messages, SamplingParams(max_tokens=2))
