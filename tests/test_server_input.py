"""Careless and hostile input against a live server on the tiny checkpoint (issue 15):
invalid Unicode in every text field is a 400 naming the field; an exception that escapes a
route is a counted OpenAI-style 500 on a connection that stays usable; a body over the cap is
a 413; counts are checked before anything is tokenized and tokenizing runs off the event
loop (``/health`` answers while a huge prompt is in the tokenizer); errors name the field the
user can change; booleans and strings are not numbers; metrics use the mode that ran; and a
hypothesis fuzz pass over the text fields finds no 5xx.
"""

from __future__ import annotations

import http.client
import json
import threading
from urllib.parse import urlparse

import httpx
import pytest

from serve_utils import running

BAD = "bad \ud800 surrogate"


class Probe:
    """The real tokenizer, plus two test hooks: text "crash!" raises TypeError (a bug
    stand-in), and a text over 100,000 characters waits for ``gate`` (set by the test once
    /health has answered) before it is tokenized."""

    def __init__(self, tokenizer):
        self.inner, self.gate, self.calls = tokenizer, threading.Event(), 0
        self.waiting = threading.Event()  # a huge prompt is in encode, waiting for the gate
        self.released: list[bool] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, text, *args, **kwargs):
        self.calls += 1
        if text == "crash!":
            raise TypeError("a bug")
        if len(text) > 100_000:
            self.waiting.set()
            self.released.append(self.gate.wait(timeout=60))
        return self.inner.encode(text, *args, **kwargs)


@pytest.fixture(scope="module")
def server(tiny):
    from trimode import LLM
    from trimode import AsyncEngine
    from trimode.entrypoints.server.app import ServerConfig, build_app

    llm = LLM(str(tiny[0]), max_batch_size=8, max_model_len=512)
    engine = AsyncEngine(llm)
    probe = Probe(llm.tokenizer)
    config = ServerConfig(model_name="tiny", mode="auto", max_tokens=4, temperature=0.0,
                          max_model_len=512, max_body_bytes=2 * 2**20)
    app = build_app(engine, probe, llm.config.vocab_size, config)
    with running(app) as url:
        yield url, engine, probe
    engine.shutdown()


def post(url, path="/v1/completions", **body):
    """json.dumps escapes lone surrogates (``\\ud800``), as a hostile client would send them."""
    return httpx.post(url + path, content=json.dumps(body).encode(), timeout=60,
                      headers={"content-type": "application/json"})


def chat(content, **extra):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": BAD}, "prompt"),
    ("/v1/completions", {"prompt": ["w5", BAD]}, "prompt"),
    ("/v1/completions", {"prompt": "w5", "stop": ["w6", BAD]}, "stop"),
    ("/v1/chat/completions", chat(BAD), "messages"),
    ("/v1/chat/completions", chat([{"type": "text", "text": BAD}]), "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": BAD},
                                           {"role": "user", "content": "w5"}]}, "messages"),
    ("/v1/completions", {"prompt": "w5", "model": BAD}, "model"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_invalid_unicode_is_400_naming_the_field(server, path, body, param, stream):
    url, _, _ = server
    r = post(url, path, **{"max_tokens": 2, **body, "stream": stream})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert "surrogate" in err["message"] or "not served" in err["message"]


def test_route_exception_is_counted_500_and_keeps_the_connection(server):
    """One keep-alive connection: the crash answers JSON 500, then the same socket serves
    the next request (uvicorn drops it when an exception escapes the app)."""
    url, _, _ = server
    where = urlparse(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    headers = {"content-type": "application/json"}
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "crash!"}), headers)
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 500 and body["error"]["type"] == "internal_server_error", body
    assert (r.getheader("connection") or "").lower() != "close"
    sock = conn.sock
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "w5", "max_tokens": 2}), headers)
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["choices"][0]["finish_reason"]
    assert conn.sock is sock  # the same connection
    conn.close()
    metrics = httpx.get(url + "/metrics").text
    assert 'trimode_requests_total{endpoint="completions",mode="none",status="500"} 1.0' in metrics


def test_body_encoding_and_size(server):
    url, _, _ = server
    headers = {"content-type": "application/json"}
    for content in (b'{"prompt": "caf\xe9 \xff"}', b'{"prompt": "w5",'):
        r = httpx.post(url + "/v1/completions", content=content, headers=headers)
        assert r.status_code == 422 and "not valid JSON" in r.json()["error"]["message"], r.text
    assert "UTF-8" in httpx.post(url + "/v1/completions", content=b'{"prompt": "\xff"}',
                                 headers=headers).json()["error"]["message"]
    big = json.dumps({"prompt": "w5 " * 800_000}).encode()  # 2.4 MB > the 2 MiB cap
    r = httpx.post(url + "/v1/completions", content=big, headers=headers)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(30):
            yield b"w5 " * 30_000
        yield b'"}'

    r = httpx.post(url + "/v1/completions", content=chunks(), headers=headers)
    assert r.status_code == 413, r.text
    assert httpx.get(url + "/health").status_code == 200


def test_counts_checked_before_tokenizing(server):
    url, _, probe = server
    before = probe.calls
    r = post(url, prompt=["w5"] * 300, max_tokens=1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    r = post(url, prompt=["w5"] * 10, n=30, max_tokens=1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    r = post(url, prompt=[5] * 600, max_tokens=1)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
    assert probe.calls == before  # nothing was tokenized


def test_health_answers_while_a_huge_prompt_is_tokenized(server):
    """The big prompt's tokenizing waits for a gate that opens only after /health has
    answered. Were tokenizing on the event loop, /health could not answer (its client
    gives up after 30 s, the gate after 60 s) and the test fails."""
    url, _, probe = server
    probe.gate.clear()
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=post(url, prompt="w5 " * 200_000)))
    worker.start()
    try:
        assert probe.waiting.wait(timeout=60), "the big prompt never reached the tokenizer"
        assert httpx.get(url + "/health", timeout=30).status_code == 200
    finally:
        probe.gate.set()
        worker.join(timeout=120)
    assert probe.released == [True]
    r = result["r"]
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


@pytest.mark.parametrize("body, status, param", [
    ({"max_tokens": 1_000_000_000}, 400, "max_tokens"),
    ({"mode": "diffusion", "block_length": 1024, "max_tokens": 8}, 400, "block_length"),
    ({"prompt": [5] * 510, "max_tokens": 8}, 400, "max_tokens"),
    ({"prompt": [5] * 512, "max_tokens": 1}, 400, "prompt"),
    ({"prompt": [True, 20]}, 422, "prompt"), ({"prompt": [[5, False]]}, 422, "prompt"),
    ({"temperature": "0"}, 422, "temperature"), ({"max_tokens": "4"}, 422, "max_tokens"),
    ({"temperature": True}, 422, "temperature"), ({"n": 1.0}, 422, "n"),
])
def test_errors_name_the_field_to_change(server, body, status, param):
    url, _, _ = server
    r = post(url, **{"prompt": "w5", **body})
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_chat_context_error_names_max_tokens(server):
    r = post(server[0], "/v1/chat/completions", **chat("w5", max_tokens=1_000_000_000))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text


def test_metrics_count_the_mode_that_ran(server):
    """mode auto counts under the exact mode that committed most of its tokens: every
    counter says the same."""
    url, _, _ = server
    r = post(url, prompt="w5 w6", max_tokens=3, mode="auto")
    ran = r.json()["trimode"]["mode"]
    assert r.status_code == 200 and ran in ("ar", "linear_spec", "quadratic_spec")
    text = httpx.get(url + "/metrics").text
    assert f'trimode_prompt_tokens_total{{mode="{ran}"}}' in text
    assert f'trimode_requests_total{{endpoint="completions",mode="{ran}",status="200"}}' in text
    assert 'trimode_prompt_tokens_total{mode="auto"}' not in text
    assert 'mode="auto",status="200"' not in text  # only refused requests keep "auto"


def test_fuzz_text_fields_never_5xx(server):
    """hypothesis over every text field: invalid Unicode (lone surrogates), control
    characters, very long strings. Every answer is 200 or 400 with an OpenAI error body;
    the server stays healthy and idle afterwards."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    url, engine, _ = server
    client = httpx.Client(base_url=url, timeout=60)
    chars = st.characters(codec=None, categories=("Cc", "Cs", "Zs", "Ll", "So", "Co", "Cn"))
    text = st.one_of(st.text(chars, max_size=40), st.text(chars, min_size=2_000, max_size=10_000),
                     st.builds(lambda a, b: a + "w5 " * b, st.text(chars, max_size=8),
                               st.integers(0, 600)))
    where = st.sampled_from(["prompt", "prompts", "stop", "content", "part", "system"])

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(where=where, value=text, stream=st.booleans())
    def check(where, value, stream):
        if where in ("prompt", "prompts", "stop"):
            path, body = "/v1/completions", {"prompt": "w5"}
            body[where.rstrip("s")] = [value, "w6"] if where == "prompts" else value
        else:
            content = [{"type": "text", "text": value}] if where == "part" else value
            role = "system" if where == "system" else "user"
            messages = [{"role": role, "content": content}] + \
                ([{"role": "user", "content": "w5"}] if role == "system" else [])
            path, body = "/v1/chat/completions", {"messages": messages}
        raw = json.dumps({**body, "max_tokens": 1, "stream": stream}).encode()
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code in (200, 400), (where, r.status_code, r.text[:300])
        if r.status_code == 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    check()
    assert client.get("/health").status_code == 200
    client.close()
