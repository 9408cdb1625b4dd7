"""A bounded soak test of a live server on the tiny checkpoint (issue 15): three rounds of 32
concurrent streams of mixed modes and both endpoints, a third of them disconnecting at random
points (seeded). After every round nothing is running or waiting and the KV pool is back to
idle; every stream that completed equals the same request run alone offline (temperature 0);
no response is a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from serve_utils import running
from trimode import SamplingParams

MODES = ["ar", "diffusion", "linear_spec", "quadratic_spec", "auto"]
KNOBS = {"diffusion": {"block_length": 4, "threshold": 0.5}, "linear_spec": {"block_length": 4},
         "quadratic_spec": {"block_length": 4}, "ar": {}, "auto": {"block_length": 4}}
PROMPTS = ["w5 w6 w7", "w10 w11", "w40 w41 w42 w43", "w20", "w90 w31 w7", "w8 w8 w8 w9"]


def job(i: int, rng: random.Random) -> dict:
    mode = MODES[i % len(MODES)]
    cut = rng.randrange(3) == 0  # a third disconnect, after 0 to 5 chunks
    body = {"max_tokens": 60 if cut else 4 + (i * 5) % 17, "temperature": 0, "stream": True,
            "mode": mode, **KNOBS[mode]}
    prompt = PROMPTS[i % len(PROMPTS)] + f" w{50 + i % 40}"
    if i % 4 == 3:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    return {"path": path, "body": body, "cut": rng.randrange(6) if cut else None}


def alone(llm, j: dict) -> tuple[str, str]:
    """(text, finish_reason) of the request run by itself, offline."""
    b = j["body"]
    mode = "linear_spec" if b["mode"] == "auto" else b["mode"]  # auto at load 1; same text
    params = SamplingParams(mode=mode, max_tokens=b["max_tokens"], temperature=0,
                            **KNOBS[b["mode"]])
    out = (llm.chat(b["messages"], params) if "messages" in b else llm.generate(b["prompt"], params))[0]
    return out.text, out.finish_reason


async def stream(client: httpx.AsyncClient, j: dict) -> tuple[int, str | None, str | None]:
    """(status, text, finish_reason); text None for a stream this client cut."""
    text, reason, chunks = [], None, 0
    async with client.stream("POST", j["path"], json=j["body"]) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None, None
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if j["cut"] is not None and chunks >= j["cut"]:
                return 200, None, None  # leaving the block drops the connection
            chunks += 1
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
            reason = choice.get("finish_reason") or reason
    return 200, "".join(text), reason


def wait_idle(engine, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats["running"] == stats["waiting"] == stats["kv_rows_used"] == stats["kv_tokens_used"] \
                == stats["kv_pages_used"] == 0:
            return stats
        assert time.monotonic() < deadline, f"engine not idle: {stats}"
        time.sleep(0.02)


def test_soak_mixed_streams_with_disconnects(tiny, tiny_llm):
    from trimode import LLM
    from trimode import AsyncEngine
    from trimode.entrypoints.server.app import ServerConfig, build_app

    engine = AsyncEngine(LLM(str(tiny[0]), max_batch_size=16, max_model_len=256))
    app = build_app(engine, engine.llm.tokenizer, engine.llm.config.vocab_size,
                    ServerConfig(model_name="tiny", mode="ar", temperature=0.0))
    rng = random.Random(15)
    oracle: dict[str, tuple[str, str]] = {}
    completed = cut = 0
    with running(app) as url:
        for _ in range(3):
            jobs = [job(i, rng) for i in range(32)]

            async def round_():
                async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                    return await asyncio.gather(*(stream(client, j) for j in jobs))

            results = asyncio.run(round_())
            assert [status for status, _, _ in results] == [200] * 32
            wait_idle(engine)
            for j, (_, text, reason) in zip(jobs, results):
                if text is None:
                    cut += 1
                    continue
                key = json.dumps(j["body"], sort_keys=True)
                if key not in oracle:
                    oracle[key] = alone(tiny_llm, j)
                assert (text, reason) == oracle[key], j
                completed += 1
        metrics = httpx.get(url + "/metrics").text
    engine.shutdown()
    assert completed >= 48 and cut >= 16
    statuses = [line for line in metrics.splitlines() if line.startswith("trimode_requests_total")]
    assert statuses and not any('status="5' in line for line in statuses), statuses
    assert any('status="499"' in line for line in statuses)  # the cut streams were seen
