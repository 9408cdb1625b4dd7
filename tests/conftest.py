"""Shared fixtures: tiny random NLD checkpoints written by the tests, with a tiny tokenizer.

``make_checkpoint`` builds transformers' ``Ministral3ForCausalLM`` (the oracle) with random
weights and NLD's exact ``rope_parameters``, and writes it in the NLD layout
(``encoder.*`` + ``diffusion_head.weight``) with a WordLevel tokenizer, so the fast path
loads it through the real loader. Special ids: 0 unk, 1 BOS, 2 EOS, 3 MASK.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

BOS, EOS, MASK = 1, 2, 3
NLD_ROPE = {"rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 16.0,
            "original_max_position_embeddings": 16384, "max_position_embeddings": 262144,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
            "llama_4_scaling_beta": 0.1}
CHAT_TEMPLATE = ("{{ '<s>' }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


@pytest.fixture(autouse=True, scope="session")
def small_pages():
    """Every engine in the tests uses 4-position KV pages unless it asks otherwise, so
    diffusion blocks and drafts straddle pages (the default is ``defaults.PAGE_SIZE``)."""
    from trimode import defaults

    default, defaults.PAGE_SIZE = defaults.PAGE_SIZE, 4
    yield
    defaults.PAGE_SIZE = default


def tiny_geometry(**overrides) -> dict:
    geometry = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=262144, rms_norm_eps=1e-5, tie_word_embeddings=False)
    geometry.update(overrides)
    return geometry


def make_oracle(seed: int = 0, head_std: float = 1.0, **overrides):
    """A random ``Ministral3ForCausalLM`` in fp32, eager attention, NLD rope parameters."""
    from transformers import Ministral3Config, Ministral3ForCausalLM

    geometry = tiny_geometry(**overrides)
    config = Ministral3Config(**geometry, rope_parameters=dict(NLD_ROPE), bos_token_id=BOS,
                              eos_token_id=EOS, pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(seed)
    return init_random(Ministral3ForCausalLM(config), None, head_std)


def init_random(model, seed: int | None, head_std: float = 1.0):
    """Peaked random weights: matrices N(0, 0.3) (head N(0, head_std)), norms near 1, so
    argmax margins dwarf fp32 rounding and thresholds are reached. ``seed`` None continues
    the current RNG stream (the tests' expected values depend on that stream)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, head_std if name == "lm_head.weight" else 0.3)
            else:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model.float().eval()


def assert_cache_equals_causal(model, cache, text: list[int], row: int = 0) -> None:
    """Row ``row`` of ``cache`` holds exactly the K/V of a clean causal forward over ``text``
    (atol 1e-4): nothing stale from read-only passes, nothing rejected kept (B08, B15)."""
    assert int(cache.lengths[row]) == len(text)
    clean = model.new_cache(1, len(text) + 1)
    model(torch.tensor([text]), clean)
    for layer in range(len(cache.keys)):
        for ours, ref in zip(cache.read_row(layer, row, len(text)),
                             clean.read_row(layer, 0, len(text))):
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def nld_state_dict(oracle) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in oracle.state_dict().items():
        if name.startswith("model."):
            out["encoder." + name[len("model."):]] = tensor.contiguous()
        elif name == "lm_head.weight" and not oracle.config.tie_word_embeddings:
            out["diffusion_head.weight"] = tensor.contiguous()
    return out


def nld_config_dict(oracle, block_size: int = 8) -> dict:
    c = oracle.config
    return {"architectures": ["NemotronLabsDiffusionModel"], "model_type": "nemotron_labs_diffusion",
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
            "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
            "tie_word_embeddings": c.tie_word_embeddings, "rope_parameters": dict(NLD_ROPE),
            "mask_token_id": MASK, "bos_token_id": BOS, "eos_token_id": EOS,
            "block_size": block_size, "dlm_paradigm": "bidirectional"}


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<mask>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<mask>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "mask_token": "<mask>", "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE}))


def write_checkpoint(directory: Path, oracle, block_size: int = 8) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(nld_state_dict(oracle), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(nld_config_dict(oracle, block_size)))
    write_tokenizer(directory, oracle.config.vocab_size)
    return directory


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread (2 threads only add synchronisation, and stall
    when another process holds a core); the real model gets both cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(2 if "embedded_llm" in request.fixturenames else 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(checkpoint dir, oracle) for seed 0; shared read-only by many tests."""
    oracle = make_oracle(seed=0)
    return write_checkpoint(tmp_path_factory.mktemp("tiny0"), oracle), oracle


@pytest.fixture(scope="session")
def tiny_llm(tiny):
    from trimode import LLM

    return LLM(str(tiny[0]))


@pytest.fixture(scope="session")
def embedded_llm():
    """The real embedded SmolLM2-135M-Instruct (converted on first use)."""
    from trimode import LLM

    return LLM(progress=False)
