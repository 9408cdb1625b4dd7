"""The batched device step: host syncs per engine step, seeds independent of the batch, and
the bench-only forced acceptance kept out of the public API."""

from __future__ import annotations

import inspect

import pytest
import torch

from trimode.bench.sync_counter import SyncCounter
from trimode.engine import Engine, EngineConfig
from trimode.model.config import ModelConfig
from trimode.model.model import TriModeModel
from trimode.params import SamplingParams

MODES = {"ar": {}, "diffusion": {"block_length": 8, "threshold": 0.9},
         "diffusion_even": {"block_length": 8}, "linear_spec": {"block_length": 4},
         "quadratic_spec": {"block_length": 4}}


@pytest.fixture(scope="module")
def nano():
    config = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=16, max_position_embeddings=1024, mask_token_id=100,
                         bos_token_id=1, eos_token_ids=(), block_size=8)
    torch.manual_seed(0)
    return TriModeModel(config).eval()


def _params(name: str, **kw) -> SamplingParams:
    return SamplingParams(mode=name.replace("_even", ""), **MODES[name], **kw)


def _prompts(n: int, vocab: int = 512) -> list[list[int]]:
    gen = torch.Generator().manual_seed(n)
    return torch.randint(200, vocab, (n, 6), generator=gen).tolist()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("name", list(MODES))
def test_at_most_two_host_syncs_per_step_at_batch_16(nano, name, temperature):
    engine = Engine(nano, EngineConfig(max_num_seqs=16, max_model_len=256, min_shared_prefix=0))
    for i, prompt in enumerate(_prompts(16)):
        engine.add_request(prompt, _params(name, max_tokens=64, temperature=temperature, seed=i))
    engine.step()  # admission and prefill: two forwards, two transfers
    counts = []
    for _ in range(4):
        with SyncCounter() as counter:
            engine.step()
        counts.append((counter.syncs, dict(counter.by_call)))
    assert all(n <= 2 for n, _ in counts), counts
    assert all(n == 1 for n, _ in counts), counts  # no logprobs asked: one transfer


@pytest.mark.parametrize("name", list(MODES))
def test_same_seed_same_sampled_output_at_batch_1_and_16(nano, name):
    from trimode.decoding.sequence import Sequence
    from trimode.engine.decode import decode

    def run(prompts, seeds):
        seqs = [Sequence(p, _params(name, max_tokens=12, temperature=0.9, top_k=50, seed=s),
                         set(), 100, MODES[name].get("block_length", 8)) for p, s in zip(prompts, seeds)]
        decode(nano, seqs)
        return [s.generated for s in seqs]

    prompts = _prompts(16)
    batch = run(prompts, list(range(100, 116)))
    alone = run(prompts[5:6], [105])
    assert alone[0] == batch[5] and len(alone[0]) == 12
    assert batch[5] != batch[6]


def test_forced_acceptance_is_not_public():
    from trimode import LLM
    from trimode.engine.config import EngineConfig as Config

    assert "forced_acceptance" not in inspect.signature(LLM).parameters
    assert "forced_acceptance" not in SamplingParams.__dataclass_fields__
    assert "forced_acceptance" not in Config.__dataclass_fields__
    from trimode.entrypoints.server import protocol

    assert "forced_acceptance" not in inspect.getsource(protocol)


@pytest.mark.parametrize("mode,max_tokens,verifies", [("linear_spec", 17, [4, 4, 4, 4]),
                                                      ("quadratic_spec", 18, [1, 4, 4, 4, 1, 3])])
def test_forced_acceptance_accepts_exactly_k_drafts(nano, mode, max_tokens, verifies):
    """k = 3: every verify with 3 drafts or more commits 3 drafts + 1 (random weights would
    accept fewer); quadratic_spec verifies the seed alone when no draft segment is ready (its
    first cycle, and when the last segment was not drafted because the request could end)."""
    from trimode.decoding.sequence import Sequence

    engine = Engine(nano, EngineConfig(max_num_seqs=2, max_model_len=256, min_shared_prefix=0))
    seqs = []
    for prompt in _prompts(2):
        seq = Sequence(prompt, SamplingParams(mode=mode, max_tokens=max_tokens, block_length=8,
                                              draft_segments=None, trace=True), set(), 100, 8)
        seq.forced_acceptance = 3
        engine.add_sequence(seq)
        seqs.append(seq)
    while engine.has_unfinished():
        engine.step()
    for seq in seqs:
        sizes = [len(t.tokens) for t in seq.metrics.trace if t.kind == "verify"]
        assert len(seq.generated) == max_tokens and sizes == verifies


def test_gpu_benchmark_tiny_on_cpu(tmp_path):
    import json

    from trimode.bench.gpu import main

    assert main(["--shape", "tiny", "--device", "cpu", "--batch-sizes", "1,2", "--max-tokens", "8",
                 "--block-length", "4", "--prefix", "8", "--forced", "1,3",
                 "--copy-bytes", str(1 << 20), "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "gpu_results.json").read_text())
    assert [row["tokens"] for row in r["forward_cost"]] == [1, 2, 4, 8, 16, 32, 64]
    runs = {(d["mode"], d["batch_size"], d["forced_acceptance"], d["cuda_graphs"]) for d in r["decode"]}
    assert ("linear_spec", 2, 3, False) in runs and ("ar", 1, None, True) in runs and len(runs) == 24
    assert r["roofline_tokens_per_s"] > 0 and r["ar_roofline_percent"] > 0
    assert "| linear_spec (forced 3) |" in (tmp_path / "gpu_results.md").read_text()


def test_gpu_sh_fails_fast_without_cuda(tmp_path):
    import subprocess
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"
    done = subprocess.run(["bash", str(script)], check=False, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin:" + __import__("os").environ["PATH"],
                               "OUT": str(tmp_path)})
    assert done.returncode == 2 and "no CUDA device" in done.stderr
