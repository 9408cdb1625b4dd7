"""``trimode serve`` end to end: the official ``openai`` client against a live uvicorn server
(127.0.0.1, a free port, a background thread) running the real AsyncEngine on the tiny
random checkpoint. The oracle is the offline ``LLM.generate`` on the same weights:
at temperature 0 every mode's served text equals it, alone or among 32 concurrent requests
of mixed modes (B24); streamed deltas equal the full text (B21); logprobs of linear_spec
equal ar's (B17); a client that disconnects has its request aborted and the KV pool returns
to idle (B23); the context limit is checked with diffusion block rounding (B27); a bounded
schemathesis run against the server's OpenAPI document finds no 5xx and no hang.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import pytest
from openai import AsyncOpenAI, BadRequestError, OpenAI

from serve_utils import running
from trimode import SamplingParams

MODES = ["ar", "diffusion", "linear_spec", "quadratic_spec", "auto"]
KNOBS = {"diffusion": {"block_length": 4, "threshold": 0.5}, "linear_spec": {"block_length": 4},
         "quadratic_spec": {"block_length": 4}, "ar": {}, "auto": {"block_length": 4}}
LONG = "w10 w11"  # greedy decoding of the tiny model never reaches EOS from here (checked offline)
PROMPTS = ["w5 w6 w7", "w10 w11", "w40 w41 w42 w43", "w20", "w90 w31 w7", "w8 w8 w8 w9"]


def start(llm, **config):
    from trimode.engine import AsyncEngine
    from trimode.entrypoints.server.app import ServerConfig, build_app

    engine = AsyncEngine(llm)
    config = {"model_name": "tiny", "mode": "ar", "max_tokens": 16, "temperature": 0.0, **config}
    return engine, build_app(engine, llm.tokenizer, llm.config.vocab_size, ServerConfig(**config))


@pytest.fixture(scope="module")
def served(tiny, tiny_llm):
    """(url, engine, oracle): the server's own LLM is stepped by its AsyncEngine; the
    oracle is a second LLM on the same checkpoint, used offline."""
    from trimode import LLM

    engine, app = start(LLM(str(tiny[0]), max_batch_size=16))
    with running(app) as url:
        yield url, engine, tiny_llm
    engine.shutdown()


@pytest.fixture(scope="module")
def client(served):
    return OpenAI(base_url=served[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def offline(llm, prompt: str, mode: str, max_tokens: int, **kw):
    """The offline LLM's RequestOutput for the same request (the oracle)."""
    params = SamplingParams(mode=mode, max_tokens=max_tokens, temperature=0, **KNOBS[mode], **kw)
    return llm.generate(prompt, params)[0]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_equals_offline(served, client, mode):
    url, _, llm = served
    out = offline(llm, PROMPTS[0], mode, 12)
    want = out.text
    extra = {"mode": mode, **KNOBS[mode]}
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                  extra_body=extra)
    c = r.choices[0]
    assert c.text == want and c.finish_reason in ("stop", "length")
    info = r.model_extra["trimode"]
    # auto: the exact mode that committed most of the tokens (the controller may switch)
    assert info["mode"] == out.mode == mode if mode != "auto" else \
        info["mode"] in ("ar", "linear_spec", "quadratic_spec")
    assert info["nfe"] >= 1 and info["tokens_per_forward"] > 0
    assert r.usage.completion_tokens == len(out.token_ids)
    assert c.finish_reason == out.finish_reason
    stream = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12,
                                       temperature=0, stream=True, extra_body=extra,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == c.finish_reason
    one = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=1,
                                         temperature=0, stream=True, extra_body=extra,
                                         stream_options={"include_usage": True}))
    assert one[-1].usage.completion_tokens == 1  # B21: max_tokens 1 streams exactly one token
    assert "".join(ch.choices[0].text for ch in one if ch.choices) == \
        llm.tokenizer.decode(out.token_ids[:1])


@pytest.mark.parametrize("mode", MODES)
def test_chat_every_mode(served, client, mode):
    _, _, llm = served
    messages = [{"role": "user", "content": "w5 w6"}]
    params = SamplingParams(mode=mode, max_tokens=10, temperature=0, **KNOBS[mode])
    want = llm.chat(messages, params)[0].text
    extra = {"mode": mode, **KNOBS[mode]}
    r = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10,
                                       temperature=0, extra_body=extra)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                            temperature=0, stream=True, extra_body=extra)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == want


def test_n_choices_follow_seeds(client):
    kw = dict(model="tiny", prompt=PROMPTS[1], max_tokens=8, temperature=1.0)
    r = client.completions.create(n=3, seed=11, **kw)
    alone = [client.completions.create(seed=11 + j, **kw).choices[0].text for j in range(3)]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == alone
    assert r.usage.completion_tokens == sum(
        client.completions.create(seed=11 + j, **kw).usage.completion_tokens for j in range(3))


def test_stop_string_across_tokens(served, client):
    _, _, llm = served
    full = offline(llm, PROMPTS[2], "linear_spec", 16).text
    words = full.split(" ")
    assert len(words) >= 4, full
    stop = words[1][-1:] + " " + words[2][:2]  # ends a token, spans the space, starts the next
    cut = full.index(stop)
    for stream in (False, True):
        r = client.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16,
                                      temperature=0, stop=[stop], stream=stream,
                                      extra_body={"mode": "linear_spec", "block_length": 4})
        if stream:
            chunks = list(r)
            text = "".join(ch.choices[0].text for ch in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert text == full[:cut] and reason == "stop"


def test_logprobs_spec_equal_ar_and_diffusion_documented(client):
    """B17: linear_spec's tokens and logprobs equal ar's (the verifier's distribution);
    diffusion returns logprobs (probability at commit time), never null."""
    got = {}
    for mode in ("ar", "linear_spec", "diffusion"):
        r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10,
                                      temperature=0, logprobs=3,
                                      extra_body={"mode": mode, **KNOBS[mode]})
        got[mode] = r.choices[0].logprobs
        lp = got[mode]
        assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
        for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert value <= 0 and len(top) == 3 and token in top
            assert list(top.values()) == sorted(top.values(), reverse=True)
        assert any(v < 0 for v in lp.token_logprobs)
    assert got["linear_spec"].tokens == got["ar"].tokens
    assert got["linear_spec"].token_logprobs == pytest.approx(got["ar"].token_logprobs, abs=1e-3)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}],
                                          max_tokens=5, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"mode": "linear_spec"})
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in content)


def test_32_concurrent_requests_equal_alone(served):
    """B24: mixed modes, prompts and max_tokens at once; each equals its own run alone."""
    url = served[0]
    jobs = []
    for i in range(32):  # auto picks linear_spec or ar by load: both give ar's text
        mode = MODES[i % len(MODES)]
        jobs.append(dict(model="tiny", prompt=PROMPTS[i % len(PROMPTS)] + f" w{50 + i}",
                         max_tokens=8 + (i * 7) % 20, temperature=0,
                         extra_body={"mode": mode, **KNOBS[mode]}))

    async def run(batch):
        aclient = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        rs = await asyncio.gather(*(aclient.completions.create(**j) for j in batch))
        await aclient.close()
        return [(r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens)
                for r in rs]

    alone = [asyncio.run(run([j]))[0] for j in jobs]
    together = asyncio.run(run(jobs))
    assert together == alone
    assert asyncio.run(run(jobs)) == alone  # and again


def wait_idle(engine, idle: dict, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    def now() -> dict:  # counters and the prefix cache may grow; what is in use may not
        return {k: v for k, v in engine.stats().items() if k in idle}

    while now() != idle:
        assert time.monotonic() < deadline, f"engine not idle: {now()} != {idle}"
        time.sleep(0.01)


@pytest.mark.parametrize("mode", MODES)
def test_disconnect_cancels_and_frees_kv(served, mode):
    """B23: close the stream after 3 chunks: the request is aborted and the KV pool is
    back at its idle level; a non-stream request whose client times out too."""
    url, engine, _ = served
    wait_idle(engine, idle := _idle(engine))
    body = {"prompt": LONG, "max_tokens": 4000, "temperature": 0, "stream": True,
            "mode": mode, **KNOBS[mode]}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = (ln for ln in r.iter_lines() if ln)
        for _ in range(3):
            assert next(lines).startswith("data: {")
        assert engine.stats()["running"] + engine.stats()["waiting"] == 1
    wait_idle(engine, idle)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=0.5)
    wait_idle(engine, idle)
    r = httpx.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 4})
    assert r.status_code == 200


def _idle(engine) -> dict:
    stats = engine.stats()
    return {"kv_rows_total": stats["kv_rows_total"], "kv_pages_total": stats["kv_pages_total"],
            "running": 0, "waiting": 0, "kv_rows_used": 0, "kv_tokens_used": 0,
            "kv_pages_used": 0}


def test_bad_requests_keep_server_up(served, client):
    url, _, _ = served
    for extra in [{"temperature": -1}, {"top_p": 1.5}, {"top_p": 0}, {"top_k": -2},
                  {"max_tokens": -5}, {"block_length": 0}, {"threshold": 2}, {"mode": "foo"},
                  {"n": 0}, {"prompt": ""}, {"model": "nope"}, {"prompt": [3]}]:
        body = {"model": "tiny", "prompt": "w5", "max_tokens": 4, **extra}
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == next(iter(extra)), (extra, r.text)
    with pytest.raises(BadRequestError):
        client.completions.create(model="tiny", prompt="w5", extra_body={"mode": "spec"})
    r = httpx.post(f"{url}/v1/completions", content='{"prompt": "w5", "temperature": NaN}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "NaN" not in r.text
    ok = client.completions.create(model="tiny", prompt="w5", max_tokens=3, temperature=0, top_p=1)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_context_limit_with_block_rounding(tiny):
    """B27: max_model_len 512: 500 + 64 is refused naming 512 and the total; diffusion
    rounds its canvas up to whole blocks; exactly the limit is served; the server stays up."""
    from trimode import LLM

    llm = LLM(str(tiny[0]), max_batch_size=4, max_model_len=512)
    engine, app = start(llm, max_model_len=512)
    with running(app) as url:
        def post(n_prompt, max_tokens, **kw):
            return httpx.post(f"{url}/v1/completions", timeout=60, json={
                "prompt": [5 + i % 80 for i in range(n_prompt)], "max_tokens": max_tokens,
                "temperature": 0, **kw})

        r = post(500, 64)
        assert r.status_code == 400 and "512" in r.text and "564" in r.text, r.text
        r = post(513, 1)
        assert r.status_code == 400 and "512" in r.text, r.text
        r = post(450, 40, mode="diffusion", block_length=32)  # 450 + 64 after rounding
        assert r.status_code == 400 and "512" in r.text and "514" in r.text, r.text
        assert post(450, 40, mode="ar").status_code == 200
        r = post(448, 64, mode="ar", stream=False)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{url}/health").status_code == 200
    engine.shutdown()


def test_metrics_exposed(served, client):
    client.completions.create(model="tiny", prompt="w5", max_tokens=3, temperature=0,
                              extra_body={"mode": "linear_spec"})
    text = httpx.get(served[0] + "/metrics").text
    assert 'trimode_requests_total{endpoint="completions",mode="linear_spec",status="200"}' in text
    for name in ("trimode_nfe_total", "trimode_generation_tokens_total",
                 "trimode_tokens_per_forward_bucket", "trimode_acceptance_length_bucket",
                 "trimode_waiting", "trimode_running", "trimode_kv_tokens_used",
                 "trimode_kv_rows_total", "trimode_step_duration_seconds_bucket",
                 "trimode_step_rows_bucket", "trimode_step_query_tokens_bucket",
                 'trimode_draft_slot_proposed_total{mode="linear_spec",slot="1"}',
                 'trimode_draft_acceptance_rate{mode="linear_spec"}',
                 "trimode_kv_pages_total", "trimode_kv_pages_used",
                 "trimode_kv_pages_cached", "trimode_kv_page_evictions_total",
                 "trimode_preemptions_total", "trimode_prefix_cache_hit_rate",
                 "trimode_prefix_cache_hits_total"):
        assert name in text, name
    pages = next(float(line.split()[1]) for line in text.splitlines()
                 if line.startswith("trimode_kv_pages_total "))
    assert pages > 0


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(served[0] + "/health").status_code == 200


def test_schema_fuzzer_finds_no_5xx_or_hang(tiny, tmp_path):
    """schemathesis (its CLI) against /openapi.json, bounded: 60 generated cases per
    operation plus its boundary-value coverage phase, 20 s per request, one seed."""
    from trimode import LLM

    llm = LLM(str(tiny[0]), max_batch_size=8, max_model_len=64)
    engine, app = start(llm, max_model_len=64, max_tokens=8)
    with running(app) as url:
        r = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json",
                            "--checks", "not_a_server_error", "-n", "60",
                            "--request-timeout", "20", "--generation-deterministic",
                            "--phases", "coverage,fuzzing", "--no-color"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert "passed" in r.stdout
        print(r.stdout[-700:])  # the case count, shown with pytest -s
        assert httpx.get(f"{url}/health").status_code == 200
        assert engine.stats()["running"] == 0
    engine.shutdown()


def test_cli_serve_subprocess(tiny):
    """``trimode serve`` starts, answers an OpenAI client, and exits on SIGTERM; a bad flag
    fails in one line before loading anything (B25)."""
    import os
    import signal
    import socket

    bad = subprocess.run([sys.executable, "-m", "trimode", "serve", "--block-length", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--block-length" in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trimode", "serve", "--model", str(tiny[0]),
                             "--port", str(port), "--served-model-name", "tiny", "--mode", "ar",
                             "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and r.model_extra["trimode"]["mode"] == "ar"
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises SIGTERM for the default handler
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)


def test_serve_auto_policy_flags(tmp_path):
    from types import SimpleNamespace

    from trimode.entrypoints.cli.main import UsageError
    from trimode.engine import AutoPolicy
    from trimode.entrypoints.server.cli import auto_policy

    def args(**kw):
        base = dict(auto_crossover=None, auto_parallel_mode=None, auto_max_parallel_batch=None)
        return SimpleNamespace(**{**base, **kw})

    assert auto_policy(args()) is None
    assert auto_policy(args(auto_parallel_mode="quadratic_spec", auto_max_parallel_batch=2)) == \
        AutoPolicy("quadratic_spec", 2)
    path = tmp_path / "crossover.json"
    path.write_text('{"modes": {"diffusion": {"max_parallel_batch": 8}}}')
    assert auto_policy(args(auto_crossover=str(path))) == AutoPolicy("diffusion", 8)
    for bad, message in ((args(auto_max_parallel_batch=-1), "--auto-max-parallel-batch"),
                         (args(auto_crossover=str(tmp_path / "none.json")), "--auto-crossover"),
                         (args(auto_crossover=str(path), auto_max_parallel_batch=1), "one or the other"),
                         (args(auto_cost=str(tmp_path)), "--auto-cost: .*forward_cost.json"),
                         (args(auto_cost=str(tmp_path), auto_crossover=str(path)), "exclude")):
        with pytest.raises(UsageError, match=message):
            auto_policy(bad)
    (tmp_path / "forward_cost.json").write_text(
        '{"forward_cost": [{"batch_size": 1, "tokens": 1, "seconds": 0.01}]}')
    from trimode.engine import AdaptivePolicy

    policy = auto_policy(args(auto_cost=str(path)))  # the crossover.json: its sibling is read
    assert isinstance(policy, AdaptivePolicy) and policy.cost.points == ((1, 1, 0.01),)
