"""NLD-VLM on a tiny random checkpoint written in the VLM layout: logits parity with
transformers (Pixtral tower + Mistral3 projector + Ministral3ForCausalLM, features spliced by
hand), every mode token-identical to its slow reference after an image prefill, image and
text requests in one batch, prefix sharing keyed by image content, and the loader's errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import EOS, MASK
from reference import logits_of, ref_ar, ref_diffusion, ref_linear_spec
from test_quadratic import ref_quadratic
from trimode import LLM, CheckpointError, SamplingParams
from trimode.engine import Engine, EngineConfig
from trimode.multimodal.prompt import chat_prompt
from trimode.checkpoint.tiny_vlm import write_tiny_vlm
from vlm_utils import PAD, SplicedOracle, random_image, reference_features

TOL = 1e-4


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    directory, (lm, tower, projector) = write_tiny_vlm(tmp_path_factory.mktemp("vlm"), seed=3)
    return LLM(str(directory), max_batch_size=8), lm, tower, projector, directory


def conversation(*images, text: str = "w5 w6 w7"):
    parts = [{"type": "image", "image": im} for im in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def oracle_for(vlm, conv):
    llm, lm, tower, projector, _ = vlm
    ids, images = chat_prompt(llm.tokenizer, llm.config.vision, conv)
    pil = [p["image"] for p in conv[0]["content"] if p["type"] == "image"]
    return ids, images, SplicedOracle(lm, ids, reference_features(tower, projector, pil))


def trimode_logits(llm, ids, images) -> torch.Tensor:
    net = llm.model
    feats = torch.cat([net.image_encoder.features(im) for im in images])
    where = torch.tensor([[t == PAD for t in ids]])
    cache = net.new_cache(1, len(ids) + 4)
    return net.logits(net(torch.tensor([ids]), cache, embeds=(where, feats)))[0]


@pytest.mark.parametrize("sizes", [[(60, 90)], [(28, 28), (70, 40)]])
def test_logits_equal_transformers_reference(vlm, sizes):
    images = [random_image(i, h, w) for i, (h, w) in enumerate(sizes)]
    ids, inputs, oracle = oracle_for(vlm, conversation(*images))
    assert ids.count(PAD) == sum(x.rows * x.cols for x in inputs) > 0
    ref = logits_of(oracle, ids)
    mine = trimode_logits(vlm[0], ids, inputs)
    assert (mine - ref).abs().max().item() <= TOL
    assert ref.abs().max().item() > 1.0
    assert vlm[0].config.vocab_size == 97 and mine.shape[-1] == 97  # from config.json


def test_output_depends_on_the_image(vlm):
    llm = vlm[0]
    a = chat_prompt(llm.tokenizer, llm.config.vision, conversation(random_image(1)))
    b = chat_prompt(llm.tokenizer, llm.config.vision, conversation(random_image(2)))
    assert a[0] == b[0]  # same ids: only the features differ
    diff = (trimode_logits(llm, *a)[-1] - trimode_logits(llm, *b)[-1]).abs().max().item()
    assert diff > 1e-2


MODES = [("ar", {}), ("diffusion", {"block_length": 4, "threshold": 0.9}),
         ("diffusion", {"block_length": 8, "threshold": None}), ("linear_spec", {"block_length": 4}),
         ("quadratic_spec", {"block_length": 4, "draft_segments": None})]


@pytest.mark.parametrize("mode,extra", MODES)
def test_every_mode_equals_its_reference_after_an_image_prefill(vlm, mode, extra):
    conv = conversation(random_image(7, 50, 100))
    ids, _, oracle = oracle_for(vlm, conv)
    out = vlm[0].chat(conv, SamplingParams(mode=mode, max_tokens=11, temperature=0, **extra))[0]
    assert out.prompt_token_ids == ids
    b = extra.get("block_length")
    if mode == "ar":
        ref = ref_ar(oracle, ids, 11, {EOS}, MASK)[0]
    elif mode == "diffusion":
        ref = ref_diffusion(oracle, ids, 11, b, extra["threshold"], {EOS}, MASK)[0]
    elif mode == "linear_spec":
        ref = ref_linear_spec(oracle, ids, 11, b, {EOS}, MASK)[0]
    else:
        ref = ref_quadratic(oracle, ids, 11, b)[0]
    assert out.token_ids == ref
    assert len(ref) >= 3


def test_ar_linear_quadratic_identical_at_temperature_zero(vlm):
    conv = conversation(random_image(8, 84, 56), random_image(9, 30, 30))
    outs = [vlm[0].chat(conv, SamplingParams(mode=m, max_tokens=16, temperature=0))[0].token_ids
            for m in ("ar", "linear_spec", "quadratic_spec")]
    assert outs[0] == outs[1] == outs[2]


def test_batch_mixing_image_and_text_requests_equals_each_alone(vlm):
    llm = vlm[0]
    convs = [conversation(random_image(11)), [{"role": "user", "content": "w9 w10"}],
             conversation(random_image(12, 40, 120), text="w20"), conversation(random_image(11))]
    params = [SamplingParams(mode=m, max_tokens=9, temperature=0, block_length=4)
              for m in ("linear_spec", "ar", "diffusion", "quadratic_spec")]
    together = llm.chat(convs, params)
    for conv, p, out in zip(convs, params, together):
        assert llm.chat(conv, p)[0].token_ids == out.token_ids


def test_different_images_never_share_a_prefix(vlm):
    llm = vlm[0]
    a, b = random_image(21), random_image(22)
    engine = Engine(llm.model, EngineConfig(max_num_seqs=4, min_shared_prefix=2))

    def alone(conv):
        return llm.chat(conv, SamplingParams(max_tokens=6, temperature=0))[0].token_ids

    def run_after_first(first, second):
        before = engine.shared_prefix_tokens
        ids1, im1 = chat_prompt(llm.tokenizer, llm.config.vision, first)
        ids2, im2 = chat_prompt(llm.tokenizer, llm.config.vision, second)
        first_id = engine.add_request(ids1, SamplingParams(max_tokens=30), images=im1)
        engine.step()  # the first request now holds KV
        assert not engine.requests[first_id].finished
        rid = engine.add_request(ids2, SamplingParams(max_tokens=6, temperature=0), images=im2)
        while engine.has_unfinished():
            engine.step()
        out = engine.pop_finished(rid).generated
        return engine.shared_prefix_tokens - before, ids1, out

    shared, ids, out = run_after_first(conversation(a), conversation(b))
    # the whole pages of text before the first pad only (an engine default page: 4 in tests)
    assert shared == ids.index(PAD) // engine.pool.page_size * engine.pool.page_size
    assert out == alone(conversation(b))
    shared, ids, out = run_after_first(conversation(a), conversation(a, text="w30"))
    assert shared > ids.count(PAD)  # the same image is shared
    assert out == alone(conversation(a, text="w30"))
    # finished requests leave their pages in the prefix cache: still keyed by the image
    c = random_image(23)
    shared, ids, out = run_after_first(conversation(c), conversation(b, text="w30"))
    assert shared > ids.count(PAD)  # b's pages, from the finished request above
    assert out == alone(conversation(b, text="w30"))
    ids, images = chat_prompt(llm.tokenizer, llm.config.vision,
                              conversation(random_image(24), text="w30"))
    rid = engine.add_request(ids, SamplingParams(max_tokens=1), images=images)
    pages, _ = engine.prefix.match(engine.requests[rid], len(ids) - 1)
    size = engine.pool.page_size
    assert len(pages) * size == ids.index(PAD) // size * size  # a new image: its text only


def test_top_level_vision_names_load_the_same_model(vlm, tmp_path):
    directory, _ = write_tiny_vlm(tmp_path / "top", seed=3, top_level=True)
    other = LLM(str(directory))
    conv = conversation(random_image(5))
    p = SamplingParams(mode="linear_spec", max_tokens=8, temperature=0)
    assert other.chat(conv, p)[0].token_ids == vlm[0].chat(conv, p)[0].token_ids


@pytest.mark.parametrize("change", ["missing", "shape"])
def test_bad_vision_tensor_is_named(vlm, tmp_path, change):
    import shutil

    directory = tmp_path / change
    shutil.copytree(vlm[4], directory)
    shard = directory / "model-00002-of-00002.safetensors"
    tensors = load_file(str(shard))
    name = "encoder.multi_modal_projector.patch_merger.merging_layer.weight"
    if change == "missing":
        del tensors[name]
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        del index["weight_map"][name]
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=name):
        LLM(str(directory))


def test_images_rejected_by_text_only_checkpoints(tiny_llm, vlm):
    with pytest.raises(ValueError, match="text only"):
        tiny_llm.chat(conversation(random_image(1)))
    with pytest.raises(ValueError, match="image pad tokens"):
        vlm[0].generate([[1, 5, PAD, 6]])  # pads without an image


def test_8b_shaped_key_and_shape_contract():
    """The 8B geometry on the meta device (no memory): the parameter names and shapes the
    loader expects are spec vlm-tp-quant 1.3's, and the total is the reported 8.92B."""
    from trimode.checkpoint.tiny_vlm import tiny_vlm_config
    from trimode.model.config import ModelConfig
    from trimode.model.model import TriModeModel
    from trimode.model.vision import attach_vision

    raw = tiny_vlm_config(vocab_size=131073)
    raw.update(hidden_size=4096, intermediate_size=14336, num_hidden_layers=34,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    raw["vision_config"].update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                num_attention_heads=16, head_dim=64)
    config = ModelConfig.from_dict(raw)
    with torch.device("meta"):
        net = TriModeModel(config)
        attach_vision(net, config.vision)
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
    v, m = "encoder.vision_tower.", "encoder.multi_modal_projector."
    assert shapes[v + "patch_conv.weight"] == (1024, 3, 14, 14)
    assert shapes[v + "transformer.layers.23.attention.q_proj.weight"] == (1024, 1024)
    assert shapes[v + "transformer.layers.23.feed_forward.gate_proj.weight"] == (4096, 1024)
    assert shapes[m + "patch_merger.merging_layer.weight"] == (1024, 4096)
    assert shapes[m + "linear_1.weight"] == (4096, 1024)
    assert shapes[m + "linear_2.weight"] == (4096, 4096)
    assert shapes["encoder.embed_tokens.weight"] == shapes["diffusion_head.weight"] == (131073, 4096)
    assert not any(n.endswith("bias") for n in shapes)
    total = sum(math.prod(s) for s in shapes.values())
    assert abs(total - 8.918e9) < 0.005e9, total


def test_auto_mode_keeps_the_images(vlm):
    """auto resolves to a new Sequence at admission; it must carry the image features."""
    conv = conversation(random_image(31, 90, 60))
    auto = vlm[0].chat(conv, SamplingParams(mode="auto", max_tokens=10, block_length=4))[0]
    ar = vlm[0].chat(conv, SamplingParams(mode="ar", max_tokens=10))[0]
    assert auto.mode in ("ar", "linear_spec", "quadratic_spec") and auto.token_ids == ar.token_ids
