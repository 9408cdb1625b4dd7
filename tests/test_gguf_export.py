"""``trimode convert --to gguf``: a tiny NLD checkpoint with a byte-level BPE tokenizer is
exported (dream and llama views, each outtype) and loaded back by trimode: config, tokenizer,
tensors, then identical greedy tokens."""

from __future__ import annotations

import pytest
import torch

from conftest import make_oracle, write_checkpoint
from trimode import LLM, SamplingParams
from trimode.checkpoint.gguf_export import export_gguf

TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, hello trimode",
        "diffusion language models decode blocks in parallel"] * 20


@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    oracle = make_oracle(seed=4, vocab_size=300)
    directory = write_checkpoint(tmp_path_factory.mktemp("bpe"), oracle)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    assert tok.get_vocab_size() == 300 and tok.token_to_id("<mask>") == 3
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.mark.parametrize("arch,outtype", [("dream", "f32"), ("llama", "f32"), ("dream", "q8_0")])
def test_export_round_trip(bpe_checkpoint, tmp_path, arch, outtype):
    import gguf

    out = export_gguf(bpe_checkpoint, tmp_path / f"tiny-{arch}-{outtype}.gguf", outtype, arch=arch)
    reader = gguf.GGUFReader(str(out))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == arch
    assert field("tokenizer.ggml.model") == "gpt2" and len(field("tokenizer.ggml.tokens")) == 300
    assert field("tokenizer.ggml.mask_token_id") == 3 and field("tokenizer.chat_template")
    if arch == "dream":
        assert field("dream.attention.causal") is False and field("diffusion.shift_logits") is False
        assert field("trimode.block_size") == 8
    src = LLM(str(bpe_checkpoint), draft_adapter=False)
    back = LLM(str(out), draft_adapter=False)
    assert back.config.num_hidden_layers == src.config.num_hidden_layers
    assert back.config.mask_token_id == (3 if arch == "dream" else None)
    assert back.config.rope.llama_4_scaling_beta == (0.1 if arch == "dream" else None) or arch == "llama"
    text = "the lazy fox says hello"
    assert back.tokenizer.encode(text) == src.tokenizer.encode(text)
    state, restored = src.model.state_dict(), back.model.state_dict()
    for name, tensor in state.items():
        tol = 0 if outtype == "f32" else 0.01 * float(tensor.abs().max())
        assert (restored[name] - tensor).abs().max() <= tol, name
    if outtype == "f32" and arch == "dream":
        params = SamplingParams(mode="ar", max_tokens=10)
        assert back.generate(text, params)[0].token_ids == src.generate(text, params)[0].token_ids
