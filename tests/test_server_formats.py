"""The HTTP layer against a scripted engine (fixed token steps, several tokens per step) and
the byte-level SmolLM2 tokenizer: exact OpenAI formats, streamed deltas equal the
non-stream text (B21), multi-byte characters and stop strings across step boundaries,
logprobs layout, usage counts, disconnect aborts, and OpenAI error bodies (B25, B27)."""

from __future__ import annotations

import json
import math
import re
import time

import httpx
import pytest

from serve_utils import ScriptedEngine, running

TARGET = "héllo 日本語 🎉 ok </think>done 1, 2, 3"
THINK = "<think>plan</think>answer"


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from transformers import AutoTokenizer

    from trimode.checkpoint.embedded import cache_root
    from trimode.checkpoint.tokenizer import Tokenizer

    path = next(cache_root().glob("smollm2-135m-instruct-v*"), None)
    assert path is not None, "the embedded model cache is missing: run `trimode generate hi` once"
    return Tokenizer(AutoTokenizer.from_pretrained(str(path)), 16, 1)


@pytest.fixture(scope="module")
def server(bpe_tokenizer):
    """Prompt "split K" plays TARGET back in steps of K tokens; "slow" runs 4000 steps."""
    from trimode.entrypoints.server.app import ServerConfig, build_app

    ids = bpe_tokenizer.encode(TARGET)
    think = bpe_tokenizer.encode(THINK)

    def script(prompt_ids, params):
        prompt = bpe_tokenizer.decode(prompt_ids)
        if "slow" in prompt:
            return [[ids[0]]] * 4000, "stop"
        if "think" in prompt:
            return [think[:1], think[1:3], think[3:4], think[4:]], "stop"
        found = re.search(r"split (\d+)", prompt)
        k = int(found.group(1)) if found else 3
        return [ids[i : i + k] for i in range(0, len(ids), k)], "stop"

    engine = ScriptedEngine(script, delay=0.002, limit=8192)
    app = build_app(engine, bpe_tokenizer, 49152, ServerConfig(model_name="stub", mode="ar"))
    with running(app) as url:
        yield url, engine, ids


def sse(client: httpx.Client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


@pytest.mark.parametrize("split", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_equals_full_response(server, split, endpoint):
    url, _, ids = server
    client = httpx.Client(base_url=url, timeout=30)
    path, body = request(endpoint, f"split {split}", max_tokens=100)
    full = client.post(path, json=body).json()
    events = sse(client, path, {**body, "stream_options": {"include_usage": True}})
    text = choice_text(full["choices"][0], endpoint)
    assert text == TARGET
    deltas = [piece(c, endpoint) for e in events for c in e["choices"]]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    finals = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert len(finals) == 1 and finals[0]["finish_reason"] == "stop" == full["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]
    assert full["usage"]["completion_tokens"] == len(ids)
    assert full["trimode"]["nfe"] == -(-len(ids) // split) == events[-1]["trimode"]["nfe"]


def test_max_tokens_one_streams_one_token(server, bpe_tokenizer):
    url, _, ids = server
    client = httpx.Client(base_url=url, timeout=30)
    events = sse(client, "/v1/completions", {"prompt": "split 5", "max_tokens": 1,
                                             "stream_options": {"include_usage": True}})
    assert "".join(c["text"] for e in events for c in e["choices"]) == bpe_tokenizer.decode(ids[:1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("stop", ["🎉", "</think>", "2,", ["zzz", "k </th"]])
@pytest.mark.parametrize("split", [1, 4])
def test_stop_string_cut_never_leaks(server, bpe_tokenizer, stop, split):
    url, _, ids = server
    client = httpx.Client(base_url=url, timeout=30)
    stops = [stop] if isinstance(stop, str) else stop
    cut = min(TARGET.find(s) for s in stops if s in TARGET)
    needed = next(k for k in range(1, len(ids) + 1)
                  if any(s in bpe_tokenizer.decode(ids[:k]) for s in stops))
    body = {"prompt": f"split {split}", "max_tokens": 100, "stop": stop}
    full = client.post("/v1/completions", json=body).json()
    assert full["choices"][0]["text"] == TARGET[:cut]
    assert full["choices"][0]["finish_reason"] == "stop"
    assert full["usage"]["completion_tokens"] == needed
    events = sse(client, "/v1/completions", body)
    assert "".join(c["text"] for e in events for c in e["choices"]) == TARGET[:cut]


def test_logprobs_layout(server):
    url, _, ids = server
    client = httpx.Client(base_url=url, timeout=30)
    comp = client.post("/v1/completions", json={"prompt": "split 3", "max_tokens": 100,
                                                 "logprobs": 1}).json()["choices"][0]["logprobs"]
    assert len(comp["tokens"]) == len(comp["token_logprobs"]) == len(comp["top_logprobs"]) == len(ids)
    assert comp["text_offset"][0] == 0 and comp["text_offset"] == sorted(comp["text_offset"])
    chat = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "split 3"}], "max_tokens": 100,
        "logprobs": True, "top_logprobs": 1}).json()["choices"][0]["logprobs"]["content"]
    assert len(chat) == len(ids) and all(len(e["top_logprobs"]) == 2 for e in chat)
    assert all(e["logprob"] == -0.5 and isinstance(e["bytes"], list) for e in chat)
    # each token's real bytes, even mid-character (TARGET has 3- and 4-byte characters)
    assert bytes(b for e in chat for b in e["bytes"]) == TARGET.encode()
    assert any(e["token"] == "\ufffd" for e in chat)
    off = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "split 3"}], "max_tokens": 5}).json()
    assert off["choices"][0]["logprobs"] is None


def test_n_choices_and_batch_prompts(server, bpe_tokenizer):
    url, _, ids = server
    tok = bpe_tokenizer
    client = httpx.Client(base_url=url, timeout=30)
    r = client.post("/v1/completions", json={"prompt": ["split 2", "split 5"], "n": 2,
                                             "max_tokens": 100}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] == TARGET for c in r["choices"])
    assert r["usage"]["completion_tokens"] == 4 * len(ids)
    assert r["usage"]["prompt_tokens"] == len(tok.encode("split 2")) + len(tok.encode("split 5"))
    events = sse(client, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "split 3"}], "n": 3, "max_tokens": 100})
    for i in range(3):
        assert "".join(piece(c, "chat") for e in events for c in e["choices"]
                       if c["index"] == i) == TARGET


def test_disconnect_aborts_stream_and_nonstream(server):
    url, engine, _ = server
    client = httpx.Client(base_url=url, timeout=30)
    with client.stream("POST", "/v1/completions", json={"prompt": "slow", "max_tokens": 4000,
                                                        "stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert len(engine.live) == 1
    wait_for(lambda: not engine.live, "the stream's engine request was not aborted")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json={"prompt": "slow", "max_tokens": 4000},
                   timeout=0.5)
    wait_for(lambda: not engine.live, "the non-stream engine request was not aborted")
    metrics = client.get("/metrics").text
    assert 'status="499"' in metrics
    for _ in range(5):  # later requests are served normally
        assert client.post("/v1/completions", json={"prompt": "split 9", "max_tokens": 100}) \
            .json()["choices"][0]["text"] == TARGET


BAD = [  # (body, param) for /v1/completions; B25
    ({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"max_tokens": -5}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"block_length": 0}, "block_length"), ({"threshold": 2}, "threshold"),
    ({"mode": "foo"}, "mode"), ({"n": 0}, "n"), ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"), ({"prompt": [49152]}, "prompt"), ({"prompt": [16]}, "prompt"),
    ({"model": "other"}, "model"), ({"seed": -1}, "seed"), ({"stop": [""]}, "stop"),
    ({"logprobs": 21}, "logprobs"), ({"top_logprobs": 99}, "top_logprobs"),
    ({"temperature": 1e-9}, "temperature"), ({"presence_penalty": 1}, "presence_penalty"),
    ({"max_tokens": 9000}, "prompt"), ({"echo": True}, "echo"),
    ({"mode": "quadratic_spec", "threshold": 0.5}, "threshold"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[json.dumps(b) for b, _ in BAD])
def test_bad_input_is_400_naming_the_field(server, body, param):
    url, _, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "split 3", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "threshold"])
def test_nan_and_infinity_rejected_without_echo(server, raw, field):
    url, _, _ = server
    body = '{"prompt": "split 3", "max_tokens": 2, "%s": %s}' % (field, raw)
    r = httpx.post(f"{url}/v1/completions", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == field
    json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} echoed in the error body"))


def test_schema_errors_are_422_and_server_keeps_serving(server):
    url, _, _ = server
    client = httpx.Client(base_url=url, timeout=30)
    for path, content in [("/v1/completions", "{not json"), ("/v1/completions", "{}"),
                          ("/v1/completions", '{"prompt": 5}'), ("/v1/chat/completions", "[]"),
                          ("/v1/chat/completions", '{"messages": "hi"}')]:
        r = client.post(path, content=content, headers={"content-type": "application/json"})
        assert r.status_code == 422, (content, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert r.status_code in (400, 422) and r.json()["error"]["param"] == "messages"
    for field, raw in (("stream", '"yes"'), ("temperature", "true"), ("max_tokens", "false")):
        r = client.post("/v1/completions", content='{"prompt": "x", "%s": %s}' % (field, raw),
                        headers={"content-type": "application/json"})
        assert r.status_code in (400, 422) and r.json()["error"]["param"] == field, r.text
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "top_logprobs": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    assert client.get("/health").status_code == 200
    ok = client.post("/v1/completions", json={"prompt": "split 3", "max_tokens": 100,
                                              "temperature": 0, "top_p": 1})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == TARGET


@pytest.mark.parametrize("user", ["think", "think <think> literal"])
def test_think_tags_pass_through(server, user):
    """B29: no reasoning parser, so tags split over steps reach the content unchanged, the
    same in stream and non-stream, and a literal tag in the user's text changes nothing."""
    url, _, _ = server
    client = httpx.Client(base_url=url, timeout=30)
    body = {"messages": [{"role": "user", "content": user}], "max_tokens": 50}
    full = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert full == {"role": "assistant", "content": THINK}
    events = sse(client, "/v1/chat/completions", body)
    deltas = [c["delta"] for e in events for c in e["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == THINK
    assert all(set(d) <= {"role", "content"} for d in deltas)


def test_models_health_metrics(server):
    url, _, _ = server
    client = httpx.Client(base_url=url, timeout=30)
    assert client.get("/v1/models").json()["data"][0]["id"] == "stub"
    assert client.get("/health").json() == {"status": "ok"}
    text = client.get("/metrics").text
    for name in ("trimode_requests_total", "trimode_generation_tokens_total", "trimode_nfe_total",
                 "trimode_tokens_per_forward_bucket", "trimode_waiting", "trimode_kv_rows_used"):
        assert name in text, name


def request(endpoint: str, prompt: str, **kw) -> tuple[str, dict]:
    if endpoint == "chat":
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **kw}
    return "/v1/completions", {"prompt": prompt, **kw}


def choice_text(c: dict, endpoint: str) -> str:
    return c["message"]["content"] if endpoint == "chat" else c["text"]


def piece(c: dict, endpoint: str) -> str:
    return c.get("delta", {}).get("content") or "" if endpoint == "chat" else c["text"]


def wait_for(cond, message: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, message
        time.sleep(0.01)


def test_floor_for_minus_infinity():
    from trimode.entrypoints.server.format import _lp

    assert _lp(-math.inf) == -9999.0 and _lp(float("nan")) == -9999.0 and _lp(-0.25) == -0.25


def test_token_bytes_of_invalid_utf8_keep_the_raw_bytes(bpe_tokenizer):
    """A token sequence that is not UTF-8 (as diffusion can produce: a character's tail
    before its head): the text holds U+FFFD, token_bytes the exact bytes."""
    ids = bpe_tokenizer.encode("日本")
    swapped = ids[::-1]
    raw = b"".join(bpe_tokenizer.token_bytes(i) for i in swapped)
    assert b"".join(bpe_tokenizer.token_bytes(i) for i in ids) == "日本".encode()
    assert len(raw) == 6 and raw != "日本".encode()
    assert "\ufffd" in bpe_tokenizer.decode(swapped)
    assert bpe_tokenizer.decode(swapped) == raw.decode("utf-8", "replace")
