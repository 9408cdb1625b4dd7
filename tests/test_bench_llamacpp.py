"""benchmarks/bench_llamacpp.py's model-building helpers on a tiny shape: the random-weight
checkpoint of ``--shape`` loads, exports to Q8_0 and generates; the per-mode rates and the
forward-cost ratios come out keyed as the table reads them. (llama.cpp itself is not built here.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from trimode import LLM, SamplingParams
from trimode.checkpoint.gguf_export import export_gguf
from trimode.quant.layers import w8a8_unavailable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_llamacpp  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)


def test_random_checkpoint_loads_exports_and_generates(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_llamacpp, "cache_dir", lambda: tmp_path / "llamacpp")
    monkeypatch.setitem(bench_llamacpp.WIDE, "tiny", TINY)
    path = bench_llamacpp.random_checkpoint("tiny", 2)
    assert path == tmp_path / "bench" / "tiny-2-layers"
    assert bench_llamacpp.random_checkpoint("tiny", 2) == path  # written once, then reused
    llm = LLM(str(path), draft_adapter=False, progress=False)
    config = llm.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (2, 64, 2)
    assert config.vocab_size == 49152  # the embedded tokenizer's vocabulary
    weights = [p for p in llm.model.parameters() if p.dim() == 2]
    assert all(0.01 < float(p.std()) < 0.03 for p in weights)  # N(0, 0.02), not left at init

    gguf = export_gguf(path, tmp_path / "tiny-q8_0-dream.gguf", "q8_0", arch="dream")
    scheme = "int8" if w8a8_unavailable() else "w8a8"
    quant = bench_llamacpp.timed_llm(gguf, scheme, False)
    out = quant.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0))[0]
    assert 1 <= out.metrics.generated_tokens <= 4

    rates = bench_llamacpp.trimode_rates(quant, ["Hello", "Bye"], 4, blocks=(4,),
                                         modes=("linear_spec",))
    assert set(rates) == {f"{k}{s}" for k in ("ar", "linear_spec B=4")
                          for s in ("", " whole", " identical to ar")}
    assert rates["ar identical to ar"] == 2 and rates["linear_spec B=4 identical to ar"] == 2
    assert rates["ar"] > 0 and rates["ar whole"] > 0

    ratios = bench_llamacpp.forward_ratios(quant.model, widths=(1, 2, 4))
    assert set(ratios) == {1, 2, 4} and ratios[1] == pytest.approx(1.0)
    assert all(r > 0 for r in ratios.values())
