"""Fused q/k/v and gate/up projections (model.fused): an LLM fuses them at load, and the
fused forward equals the separate projections' (bitwise for the int kernels), with the draft
adapter's deltas still applied per projection."""

from __future__ import annotations

import pytest
import torch
from test_adapter import save_peft_adapter

from trimode import LLM


def _unfused_hidden(model, ids):
    saved = [(layer.self_attn.qkv, layer.mlp.gate_up) for layer in model.encoder.layers]
    for layer in model.encoder.layers:
        object.__setattr__(layer.self_attn, "qkv", None)
        object.__setattr__(layer.mlp, "gate_up", None)
    try:
        return model.forward(ids, model.new_cache(2, 16), adapter=torch.tensor([True, False]))
    finally:
        for layer, (qkv, gate_up) in zip(model.encoder.layers, saved):
            object.__setattr__(layer.self_attn, "qkv", qkv)
            object.__setattr__(layer.mlp, "gate_up", gate_up)


def test_fp32_dense_stays_unfused(tiny_llm):
    assert all(x.self_attn.qkv is None and x.mlp.gate_up is None for x in tiny_llm.model.encoder.layers)


@pytest.mark.parametrize("quantization,dtype", [(None, "bfloat16"), ("int8", None), ("int4", None)])
def test_fused_projections_equal_separate_ones(tiny, tmp_path, quantization, dtype):
    directory, oracle = tiny
    save_peft_adapter(oracle, tmp_path, targets=("q_proj", "v_proj", "up_proj"))
    llm = LLM(str(directory), quantization=quantization, dtype=dtype, draft_adapter=str(tmp_path))
    model = llm.model
    attn, mlp = model.encoder.layers[0].self_attn, model.encoder.layers[0].mlp
    assert attn.qkv is not None and mlp.gate_up is not None
    assert attn.qkv.out_features == sum(p.out_features for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    # the module tree (state_dict, parameters) keeps the checkpoint's names
    assert not any(".qkv." in k or ".gate_up." in k for k in model.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    fused = model.forward(ids, model.new_cache(2, 16), adapter=torch.tensor([True, False]))
    separate = _unfused_hidden(model, ids)
    if quantization is None:
        torch.testing.assert_close(fused, separate, atol=2e-2, rtol=1e-5)
    else:
        assert torch.equal(fused, separate), (fused - separate).abs().max()
