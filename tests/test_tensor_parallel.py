"""Tensor parallelism on 2 gloo ranks (spawned processes on this machine): every mode,
greedy, token-identical to the single-process engine, mixed-mode batches, a draft adapter
on column- and row-parallel layers, an odd vocabulary, num_key_value_heads 1 (replicated)
and 2 (split); start-up errors; a dead rank and a timed-out rank end requests with errors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import make_oracle, write_checkpoint
from serve_utils import free_port
from test_adapter import save_peft_adapter
from trimode import LLM, SamplingParams
from trimode.distributed import Launch, check_divisible
from trimode.distributed.launch import check_devices

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23], [30, 31], [40, 41, 42, 43, 44, 45]]


def greedy(mode: str, **extra) -> SamplingParams:
    return SamplingParams(mode=mode, max_tokens=12, temperature=0, **extra)


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """Vocabulary 97 (odd: padded to 98 over 2 ranks), one KV head (replicated on both
    ranks), and a draft + denoise adapter on q/o/gate/down."""
    oracle = make_oracle(seed=3, vocab_size=97, num_key_value_heads=1)
    ckpt = write_checkpoint(tmp_path_factory.mktemp("tp_odd"), oracle)
    adapter = tmp_path_factory.mktemp("tp_lora")
    save_peft_adapter(oracle, adapter, targets=("q_proj", "o_proj", "gate_proj", "down_proj"))
    (adapter / "trimode_adapter.json").write_text(json.dumps({"passes": ["draft", "denoise"]}))
    return str(ckpt), str(adapter)


@pytest.fixture(scope="module")
def tp_llm():
    """``tp_llm(model, **kwargs)``: a 2-rank LLM, kept for the next test asking for the same
    one (a process holds one tensor-parallel group at a time)."""
    live: dict = {}

    def get(model: str, **kwargs) -> LLM:
        key = (model, tuple(sorted(kwargs.items())))
        if key not in live:
            for llm in live.values():
                llm.close()
            live.clear()
            if model == "none":
                return None
            live[key] = LLM(model, tensor_parallel_size=2, **kwargs)
        return live[key]

    yield get
    for llm in live.values():
        llm.close()


@pytest.fixture
def odd_tp(odd, tp_llm):
    return tp_llm(odd[0], draft_adapter=odd[1])


def assert_same(ref, out):
    for a, b in zip(ref, out, strict=True):
        assert (a.mode, a.token_ids, a.finish_reason) == (b.mode, b.token_ids, b.finish_reason)
        assert (a.metrics.nfe, a.metrics.acceptance_length) == \
            (b.metrics.nfe, b.metrics.acceptance_length)


def test_every_mode_and_a_mixed_batch_match_one_process(odd, odd_tp):
    single = LLM(odd[0], draft_adapter=odd[1])
    for mode in MODES:  # each mode alone, then all modes in one batch
        assert_same(single.generate(PROMPTS, greedy(mode)), odd_tp.generate(PROMPTS, greedy(mode)))
    mixed = [greedy(m) for m in (*MODES, "ar")]
    assert_same(single.generate(PROMPTS, mixed), odd_tp.generate(PROMPTS, mixed))
    # the adapter is really in play: without it diffusion and the drafts differ
    plain = LLM(odd[0], draft_adapter=False).generate(PROMPTS, mixed)
    ref = single.generate(PROMPTS, mixed)
    assert [o.token_ids for o in plain[1:2]] != [o.token_ids for o in ref[1:2]] or \
        [o.metrics.nfe for o in plain[2:4]] != [o.metrics.nfe for o in ref[2:4]]


def test_sharded_logits_equal_full_logits(odd, odd_tp):
    """Causal prefill logits over the padded vocabulary, cut back to 97 (fp32, 1e-5)."""
    single = LLM(odd[0], draft_adapter=odd[1])
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10]])
    full = single.model.logits(single.model(tokens, single.model.new_cache(1, 8)))
    cache = odd_tp.model.new_cache(1, 8)
    sharded = odd_tp.model.logits(odd_tp.model(tokens, cache))
    assert sharded.shape == (1, 6, 97)
    torch.testing.assert_close(sharded, full, atol=1e-5, rtol=1e-5)
    assert int(cache.lengths[0]) == 6


def _fail_a_rank(llm, caplog, signum: int, expect: str) -> None:
    worker = llm.model.workers[0]
    try:
        assert llm.generate(PROMPTS[0], greedy("ar"))[0].finish_reason == "length"
        os.kill(worker.pid, signum)
        with caplog.at_level(logging.ERROR, logger="trimode.distributed"):
            out = llm.generate(PROMPTS[:2], [greedy("ar"), greedy("diffusion")])
        assert [o.finish_reason for o in out] == ["error", "error"]
        assert expect in out[0].error and "tensor-parallel group failed" in out[0].error
        assert "tensor-parallel group failed (2 ranks)" in caplog.text
        again = llm.generate(PROMPTS[0], greedy("ar"))[0]  # fails at once, no hang
        assert again.finish_reason == "error" and "tensor-parallel group is down" in again.error
        assert _health(llm) == 503
    finally:
        if worker.is_alive():
            worker.kill()
        llm.close()


def _health(llm) -> int:
    from fastapi.testclient import TestClient

    from trimode.engine import AsyncEngine
    from trimode.entrypoints.server.app import ServerConfig, build_app

    engine = AsyncEngine(llm)
    try:
        app = build_app(engine, llm.tokenizer, llm.config.vocab_size, ServerConfig("tiny"))
        return TestClient(app).get("/health").status_code
    finally:
        engine.shutdown()


def test_a_dead_rank_ends_requests_with_an_error(odd, caplog, tp_llm):
    """Breaks the shared odd group (the last test to use it)."""
    llm = tp_llm(odd[0], draft_adapter=odd[1])
    _fail_a_rank(llm, caplog, signal.SIGKILL, "rank 1 (pid")
    tp_llm("none")


def test_split_kv_heads_and_streaming_across_two_nodes(tiny, tiny_llm, tp_llm):
    """The default tiny model (4 heads, 2 KV heads: one per rank), vocabulary 96, with the
    torchrun-style flags: rank 1 is ``trimode serve --nnodes 2 --node-rank 1`` in another
    process (loopback), which exits 0 when rank 0 closes the group."""
    port = free_port()
    node1 = subprocess.Popen(
        [sys.executable, "-m", "trimode", "serve", "--model", str(tiny[0]),
         "--tensor-parallel-size", "2", "--nnodes", "2", "--node-rank", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        llm = tp_llm(str(tiny[0]), distributed=Launch(2, 0, "127.0.0.1", port))
        assert llm.tensor_parallel_size == 2 and llm.model.workers == []
        mixed = [greedy(m) for m in (*MODES, "diffusion")]
        assert_same(tiny_llm.generate(PROMPTS, mixed), llm.generate(PROMPTS, mixed))
        chunks = list(llm.stream(PROMPTS[0], greedy("linear_spec")))
        ref = tiny_llm.generate(PROMPTS[0], greedy("linear_spec"))[0]
        assert sum((c.token_ids for c in chunks), []) == ref.token_ids
        tp_llm("none")
        assert node1.wait(timeout=60) == 0, node1.stderr.read()
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()



def test_geometry_and_device_errors(tiny, monkeypatch):
    config = tiny[1].config
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide num_attention_heads 4"):
        LLM(str(tiny[0]), tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an integer >= 1"):
        LLM(str(tiny[0]), tensor_parallel_size=0)

    class Geometry:
        num_attention_heads, num_key_value_heads, intermediate_size = 12, 3, 64

    with pytest.raises(ValueError, match="num_key_value_heads 3: one must divide the other"):
        check_divisible(Geometry, 2)
    check_divisible(config, 4)  # 4 heads, 2 KV heads replicated twice: fine
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(ValueError, match="needs 4 CPU cores on this machine .*; 2 available"):
        check_devices(4, "cpu", Launch())
    with pytest.raises(ValueError, match="CUDA devices"):
        check_devices(2, "cuda", Launch()) if torch.cuda.device_count() < 2 else \
            pytest.fail("needs a machine with fewer than 2 GPUs")
    with pytest.raises(ValueError, match="master_addr and master_port are needed"):
        Launch(nnodes=2, node_rank=1)


@pytest.mark.slow  # a group of its own (~15 s on a loaded 2-core machine)
def test_a_hung_rank_times_out(tiny, caplog, monkeypatch, tp_llm):
    tp_llm("none")  # one group per process
    monkeypatch.setenv("TRIMODE_TP_TIMEOUT_S", "3")
    start = time.perf_counter()
    _fail_a_rank(LLM(str(tiny[0]), tensor_parallel_size=2), caplog, signal.SIGSTOP, "")
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("flags, message", [
    ({"tensor-parallel-size": 0}, "--tensor-parallel-size must be an integer >= 1"),
    ({"replicas": 2}, "--replicas needs --ray"),
    ({"nnodes": 2, "tensor-parallel-size": 2}, "--nnodes 2 needs --master-addr and --master-port"),
    ({"nnodes": 2, "node-rank": 2}, "--node-rank must be in [0, 1]"),
    ({"nnodes": 2, "tensor-parallel-size": 3, "master-addr": "h", "master-port": 1},
     "--tensor-parallel-size 3 must be a multiple of --nnodes 2"),
    ({"ray": True, "nnodes": 2, "tensor-parallel-size": 2, "master-addr": "h",
      "master-port": 1}, "--ray places replicas"),
])
def test_serve_scale_flags_fail_before_loading(flags, message):
    from trimode.entrypoints.cli.main import UsageError
    from trimode.entrypoints.server.cli import check_flags, serve_args

    with pytest.raises(UsageError, match=re.escape(message)):
        check_flags(serve_args(flags))


def test_each_rank_shards_in_host_memory_then_moves_its_shard(tiny, monkeypatch):
    """A model larger than one GPU must fit N GPUs: the full weights stay in host memory, only a
    rank's shard reaches its device (here the meta device stands in for a GPU)."""
    import trimode.distributed.launch as launch
    from trimode.distributed import ModelSpec

    assert launch.rank_device(ModelSpec("m", None, "cuda:1", None), 2) == torch.device("cuda", 3)
    assert launch.rank_device(ModelSpec("m", None, "cpu", None), 1) == torch.device("cpu")
    seen = []
    monkeypatch.setattr(launch, "shard_model", lambda model, shard: seen.append(model.device) or model)
    model = launch.load_spec(ModelSpec(str(tiny[0]), "float32", "meta", None))
    assert model.device == torch.device("cpu")  # loaded in host memory whatever the target
    moved = launch._shard_on_device(model, None, ModelSpec("m", None, "meta", None), 0)
    assert seen == [torch.device("cpu")] and moved.device == torch.device("meta")
