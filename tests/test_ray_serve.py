"""Ray Serve replicas (``trimode.entrypoints.ray``): 2 replicas of the tiny model on a local
Ray (loopback only): the ``openai`` client streams from it, 16 concurrent requests each
equal their single-engine output, and killing one replica's process leaves the endpoint
serving. In the default suite (Ray's start-up and two model loads: about 30 s on 2 cores);
``trimode[ray]`` is part of the ``test`` extra.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import ray
from ray import serve

from serve_utils import free_port
from trimode import SamplingParams

MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
KNOBS = {"ar": {}, "diffusion": {"block_length": 4, "threshold": 0.5},
         "linear_spec": {"block_length": 4}, "quadratic_spec": {"block_length": 4}}
PROMPTS = ["w5 w6 w7", "w10 w11", "w40 w41 w42 w43", "w20", "w90 w31 w7", "w8 w8 w8 w9"]



@pytest.fixture(scope="module")
def endpoint(tiny):
    """(base URL, deployment handle) of 2 replicas; Ray and Serve are shut down after."""
    from trimode.entrypoints.ray import application
    from trimode.entrypoints.server.cli import check_flags, serve_args

    port = free_port()
    args = serve_args({"model": str(tiny[0]), "ray": True, "replicas": 2, "max-batch-size": 16,
                       "served-model-name": "tiny", "mode": "ar", "temperature": 0,
                       "max-tokens": 12, "host": "127.0.0.1", "port": port,
                       "log-level": "warning"})
    check_flags(args)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(application(args), name="trimode", route_prefix="/")
        yield f"http://127.0.0.1:{port}", handle
    finally:
        serve.shutdown()
        ray.shutdown()


def alone(llm, prompt: str, mode: str, max_tokens: int = 12) -> str:
    params = SamplingParams(mode=mode, max_tokens=max_tokens, temperature=0, **KNOBS[mode])
    return llm.generate(prompt, params)[0].text


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_openai_client_streams_from_the_replicas(endpoint, tiny_llm):
    url, _ = endpoint
    for mode in MODES:
        stream = client(url).completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
            extra_body={"mode": mode, **KNOBS[mode]})
        pieces = [c.choices[0].text for c in stream if c.choices]
        assert "".join(pieces) == alone(tiny_llm, PROMPTS[0], mode)
        assert len([p for p in pieces if p]) > 1  # streamed in several chunks, not one


def test_16_concurrent_requests_each_equal_alone(endpoint, tiny_llm):
    from openai import AsyncOpenAI

    url, handle = endpoint
    jobs = [(PROMPTS[i % len(PROMPTS)] + f" w{50 + i}", MODES[i % len(MODES)]) for i in range(16)]

    async def run():
        c = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        rs = await asyncio.gather(*(c.completions.create(
            model="tiny", prompt=p, max_tokens=12, temperature=0,
            extra_body={"mode": m, **KNOBS[m]}) for p, m in jobs))
        await c.close()
        return [r.choices[0].text for r in rs]

    assert asyncio.run(run()) == [alone(tiny_llm, p, m) for p, m in jobs]
    assert len(_pids(handle)) == 2  # both replicas are up and answer


def _pids(handle, tries: int = 40) -> set[int]:
    return {handle.pid.remote().result(timeout_s=30) for _ in range(tries)}


def test_killing_a_replica_leaves_the_endpoint_serving(endpoint, tiny_llm):
    url, handle = endpoint
    victim = min(_pids(handle))
    os.kill(victim, signal.SIGKILL)
    want = alone(tiny_llm, PROMPTS[1], "ar")
    served, failures, deadline = 0, 0, time.monotonic() + 60
    while served < 8 and time.monotonic() < deadline:  # bounded: 60 s at most
        try:
            r = client(url).completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12,
                                               temperature=0)
            assert r.choices[0].text == want
            served += 1
        except Exception:  # noqa: BLE001 - a request routed to the dying replica
            failures += 1
            time.sleep(0.5)
    assert served == 8, f"{served} served, {failures} failed within 60 s"
    assert failures <= 2
    assert victim not in _pids(handle, tries=10)
