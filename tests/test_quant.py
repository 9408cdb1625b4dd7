"""Weight-only int8/int4 layers (trimode.quant): kernels against a dequantized fp32 reference,
GGUF blocks mapped exactly, Q8_0 GGUF files loaded quantized, exact modes still exact, the draft
adapter on quantized layers, and clear errors for unreadable GGUF types."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_oracle
from test_adapter import save_peft_adapter
from test_loader import write_gguf
from trimode import LLM, CheckpointError, SamplingParams
from trimode.quant import COMPUTE_DTYPE, QuantLinear, int4_from_float, int8_from_float
from trimode.quant.gguf_blocks import int4_from_blocks


def _ref(weight, x: torch.Tensor) -> torch.Tensor:
    """fp32 product of the bf16-rounded activations with the weight the kernel sees (its scales
    rounded to bf16, as stored)."""
    bf = lambda t: t.to(COMPUTE_DTYPE).float()  # noqa: E731
    if hasattr(weight, "zero"):
        w = type(weight)(weight.q, bf(weight.scale), bf(weight.zero), weight.group_size).dequantize()
    else:
        w = type(weight)(weight.q, bf(weight.scale)).dequantize()
    return bf(x) @ w.T


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    # bf16 output: 8 significant bits, plus the kernel's own summation order
    assert (out.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


def _q4k_blocks(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random but valid Q4_K bytes (the gguf package only dequantizes K-quants)."""
    rng = np.random.default_rng(seed)
    nb = rows * cols // 256
    raw = rng.integers(0, 256, size=(nb, 144), dtype=np.uint8)
    raw[:, 0:2] = np.full((nb, 1), 0.01, np.float16).view(np.uint8)
    raw[:, 2:4] = np.full((nb, 1), 0.004, np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_gguf_int4_blocks_map_exactly(kind):
    """Q4_0 / Q4_1 / Q4_K blocks become int4 (q, scale, zero) that dequantize to exactly the
    gguf package's values (before the kernel's bf16 scale rounding)."""
    import gguf
    from gguf import quants

    rows, cols = 48, 512
    qtype = gguf.GGMLQuantizationType[kind]
    if kind == "Q4_K":
        data = _q4k_blocks(rows, cols)
    else:
        data = quants.quantize(torch.randn(rows, cols).numpy(), qtype)
    want = quants.dequantize(data, qtype).reshape(rows, cols)
    got = int4_from_blocks(kind, data, rows, cols).dequantize().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["int8", "int4", "Q4_1"])
def test_quant_linear_matches_dequantized_reference(fmt):
    torch.manual_seed(0)
    w = torch.randn(96, 64)
    if fmt == "int8":
        weight = int8_from_float(w)
    elif fmt == "int4":
        weight = int4_from_float(w)
    else:
        import gguf

        data = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_1)
        weight = int4_from_blocks("Q4_1", data, 96, 64)
    layer = QuantLinear(weight, torch.float32)
    x = torch.randn(2, 5, 64)
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 96)
    _close(out, _ref(weight, x))
    # quantization error itself is bounded (int8 ~0.5%, int4 ~10% of the weight range)
    assert (weight.dequantize() - w).abs().max() <= (0.01 if fmt == "int8" else 0.15) * w.abs().max()
    # each row's result is independent of the rows sharing the call (keeps exact modes exact)
    rows = torch.cat([layer(x.view(10, 64)[i:i + 1]) for i in range(10)])
    assert torch.equal(rows, out.view(10, 96))


def test_lora_delta_on_quantized_layer():
    torch.manual_seed(1)
    layer = QuantLinear(int4_from_float(torch.randn(64, 32)), torch.float32)
    layer.lora_A, layer.lora_B, layer.lora_scale = torch.randn(4, 32), torch.randn(64, 4), 0.5
    x = torch.randn(3, 32)
    rows = torch.tensor([[1.0], [0.0], [1.0]])
    delta = (x @ layer.lora_A.T @ layer.lora_B.T) * 0.5
    torch.testing.assert_close(layer(x, rows), layer(x) + delta * rows)


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory):
    """A llama-architecture GGUF with every matrix in Q8_0, written by the test."""
    from test_loader import hf_causal_lm

    oracle = hf_causal_lm("llama", tied=False, seed=21)
    path = tmp_path_factory.mktemp("q8") / "tiny-q8_0.gguf"
    write_gguf(path, oracle, quantize=("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                       "ffn_up", "ffn_down", "output"))
    return path


def test_q8_0_gguf_loads_quantized_and_generates(q8_gguf):
    from trimode.checkpoint.loader import load_model

    dense, _ = load_model(q8_gguf, dtype=torch.float32, device="cpu")
    net, _ = load_model(q8_gguf, dtype=torch.float32, device="cpu", quantization="auto")
    q = net.encoder.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.bits == 8 and "Q8_0" in q.source
    assert isinstance(net.diffusion_head, QuantLinear)
    ids = torch.tensor([[4, 9, 17, 33, 51, 60]])
    h_dense = dense.logits(dense.forward(ids, dense.new_cache(1, 16)))
    h_quant = net.logits(net.forward(ids, net.new_cache(1, 16)))
    assert (h_quant - h_dense).abs().max() < 0.05 * h_dense.abs().max()
    # greedy generation through the quantized model: 8 AR steps on its KV cache
    cache = net.new_cache(1, 32)
    token = net.logits(net.forward(ids, cache))[:, -1].argmax(-1, keepdim=True)
    out = []
    for _ in range(8):
        out.append(int(token))
        token = net.logits(net.forward(token, cache))[:, -1].argmax(-1, keepdim=True)
    assert int(cache.lengths[0]) == 6 + 8 and all(0 <= t < net.config.vocab_size for t in out)


@pytest.mark.parametrize("scheme", ["int4", "w8a8"])
def test_exact_modes_equal_ar_within_a_quantized_model(tiny, tmp_path, scheme):
    """int4 everywhere (int8 head), or w8a8, plus a draft adapter on quantized layers:
    linear_spec and quadratic_spec still give exactly ar's tokens."""
    directory, oracle = tiny
    save_peft_adapter(oracle, tmp_path, targets=("o_proj", "gate_proj", "q_proj"))
    llm = LLM(str(directory), quantization=scheme, draft_adapter=str(tmp_path))
    assert llm.quantization == scheme
    assert llm.model.encoder.layers[0].self_attn.q_proj.lora_A is not None
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [40]]
    ar = [o.token_ids for o in llm.generate(prompts, SamplingParams(mode="ar", max_tokens=12))]
    for mode, block in (("linear_spec", 4), ("quadratic_spec", 3)):
        outs = llm.generate(prompts, SamplingParams(mode=mode, block_length=block, max_tokens=12))
        assert [o.token_ids for o in outs] == ar, mode


def test_unreadable_gguf_type_names_tensor_and_type(tmp_path):
    import gguf

    oracle = make_oracle(seed=3)
    path = tmp_path / "q8_1.gguf"
    from test_loader import hf_causal_lm

    oracle = hf_causal_lm("llama", tied=False, seed=22)
    write_gguf(path, oracle)
    reader = gguf.GGUFReader(str(path))
    # rewrite one tensor as Q8_1 (a type llama.cpp uses only for activations)
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        writer.add_key_value(key, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        if t.name == "blk.0.ffn_up.weight":
            raw = np.zeros((shape[0], shape[1] // 32 * 40), np.uint8)
            writer.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"blk\.0\.ffn_up\.weight.*Q8_1"):
        LLM(str(tmp_path / "bad.gguf"))


@pytest.mark.parametrize("reduce_range", [False, True])
def test_w8a8_is_per_token_int8_on_exact_integer_products(monkeypatch, reduce_range):
    """w8a8: each token's activations rounded to integers on their own scale (max |x| -> 127,
    or 63 on CPUs without VNNI), multiplied by the int8 weights in integers: equal to a
    textbook int64 reference up to fp32 rounding. A token's result does not depend on its
    neighbours in the call (the exact modes rely on it); zero rows give zeros."""
    from trimode.quant import layers

    monkeypatch.setattr(layers, "_reduce_range", lambda: reduce_range)
    if layers.w8a8_unavailable():
        pytest.skip(layers.w8a8_unavailable())
    torch.manual_seed(3)
    w = torch.randn(80, 96)
    weight = int8_from_float(w)
    layer = QuantLinear(weight, torch.float32, activations="int8")
    x = torch.randn(12, 96) * torch.logspace(-3, 2, 12)[:, None]  # rows of very different size
    x[5] = 0.0
    out = layer(x)
    level = layer._level
    assert level == (63 if reduce_range else 127)
    step = x.abs().amax(1, keepdim=True).clamp(min=1e-30) / level
    qx = torch.round(x / step).long()
    assert int(qx.abs().max()) == level
    ref = (qx @ weight.q.long().T).double() * weight.scale.double() * step.double()
    err = (out.double() - ref).abs() / ref.abs().amax(1, keepdim=True).clamp(min=1e-30)
    assert float(err.max()) < 1e-5, float(err.max())
    assert torch.equal(out[5], torch.zeros(80))
    # the quantization error against the float product is that of 8-bit activations
    dense = x @ weight.dequantize().T
    assert (out - dense).abs().max() <= (4e-2 if reduce_range else 2e-2) * dense.abs().max()
    rows = torch.cat([layer(x[i:i + 1]) for i in range(12)])
    assert torch.equal(rows, out)
    shuffled = layer(x.flip(0)).flip(0)
    assert torch.equal(shuffled, out)


def test_bad_quantization_value():
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM("unused", quantization="int3")


@pytest.mark.parametrize("flags,want", [({"avx2", "fma"}, torch.float32),
                                        ({"avx512f", "avx512_bf16"}, torch.bfloat16),
                                        ({"amx_tile", "amx_bf16"}, torch.bfloat16)])
def test_preferred_dtype_follows_the_cpu_flags(monkeypatch, flags, want):
    from trimode.quant import cpu

    monkeypatch.setattr(cpu, "cpu_info", lambda: {"model": "test", "flags": flags,
                                                   "capability": "AVX2", "cores": 2})
    assert cpu.preferred_dtype() == want
    assert "test" in cpu.describe()
