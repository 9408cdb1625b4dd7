"""The ``trimode_events`` stream extension (issue 21, part 1) against a live server on the
tiny checkpoint: the schema of every event, and its agreement with the final output in
every mode (the events' committed tokens, concatenated, are the response's tokens, and the
committed slots show exactly those tokens). Ordinary streams never carry an event.
"""

from __future__ import annotations

import json

import httpx
import pytest

from serve_utils import running
from test_server import KNOBS, MODES, PROMPTS, start
from trimode import SamplingParams

KINDS = {"ar": {"prefill", "ar"}, "diffusion": {"prefill", "denoise", "commit"},
         "linear_spec": {"prefill", "draft", "verify"}, "quadratic_spec": {"prefill", "fused"}}
STATES = {"masked", "provisional", "committed", "rejected"}
EVENT_KEYS = {"index", "forward", "kind", "mode", "block", "drafted", "accepted", "rejected",
              "committed", "nfe", "generated_tokens", "tokens_per_forward", "acceptance_length"}


@pytest.fixture(scope="module")
def served(tiny, tiny_llm):
    from trimode import LLM

    engine, app = start(LLM(str(tiny[0]), max_batch_size=8))
    with running(app) as url:
        yield url, tiny_llm, engine
    engine.shutdown()


def stream(url: str, endpoint: str, body: dict) -> list[dict]:
    """Every ``data:`` payload of one stream, [DONE] excluded."""
    out = []
    with httpx.stream("POST", f"{url}/v1/{endpoint}", json={**body, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def check_events(events: list[dict], tokens: list[int], mode: str, nfe: int) -> None:
    """Schema and agreement with the final ``tokens`` and ``nfe`` of one choice."""
    assert [e["forward"] for e in events] == list(range(1, nfe + 1))
    committed = []
    for e in events:
        # auto: each forward shows the exact mode that ran it (the controller may switch)
        ran = e["mode"] if mode == "auto" and e["mode"] in KINDS and e["mode"] != "diffusion" \
            else mode
        assert set(e) == EVENT_KEYS and e["mode"] == ran and e["kind"] in KINDS[ran]
        assert e["nfe"] == e["forward"]
        committed += e["committed"]
        assert e["generated_tokens"] >= len(committed)
        assert e["tokens_per_forward"] == round(e["generated_tokens"] / e["nfe"], 4)
        slots = e["block"]["slots"]
        assert [s["position"] for s in slots] == list(range(e["block"]["start"],
                                                            e["block"]["start"] + len(slots)))
        for s in slots:
            assert s["state"] in STATES
            assert (s["token"] is None) == (s["state"] in ("masked", "rejected"))
            if s["state"] == "committed" and s["position"] < len(tokens):
                assert s["position"] < len(committed) and s["token"] == tokens[s["position"]]
            if s["state"] == "provisional":
                assert s["position"] >= len(committed) and s["forward"] <= e["forward"]
            if s["token"] is not None:
                assert isinstance(s["text"], str) and s["text"]
        if e["kind"] in ("denoise", "draft"):
            assert e["drafted"] and not e["committed"] or mode == "diffusion"
        if e["kind"] not in ("verify", "fused"):
            assert not e["accepted"] and not e["rejected"]
        assert not set(e["accepted"]) & set(e["rejected"])
        by_position = {s["position"]: s for s in slots}
        for p in e["accepted"]:
            assert by_position[p]["state"] == "committed" and by_position[p]["token"] == tokens[p]
        for s in slots:
            if "rejected" in s:
                assert s["position"] in e["rejected"]
                if s["state"] == "committed":  # the bonus token replaced a wrong draft
                    assert s["rejected"]["token"] != s["token"]
    assert committed == tokens
    assert events[0]["kind"] == "prefill"
    if mode in ("linear_spec", "quadratic_spec"):
        assert any(e["accepted"] or e["rejected"] for e in events)


@pytest.mark.parametrize("mode", MODES)
def test_events_agree_with_output(served, mode):
    url, llm, _ = served
    params = SamplingParams(mode=mode, max_tokens=14, temperature=0, **KNOBS[mode])
    want = llm.generate(PROMPTS[0], params)[0]
    body = {"prompt": PROMPTS[0], "max_tokens": 14, "temperature": 0, "mode": mode,
            **KNOBS[mode], "stream_options": {"trimode_events": True, "include_usage": True}}
    chunks = stream(url, "completions", body)
    events = [c["trimode_event"] for c in chunks if c["object"] == "trimode.forward"]
    assert all(c["choices"] == [] for c in chunks if c["object"] == "trimode.forward")
    text = "".join(c["choices"][0]["text"] for c in chunks
                   if c["object"] == "text_completion" and c["choices"])
    assert text == want.text
    info = chunks[-1]["trimode"]
    check_events(events, want.token_ids, want.mode if mode != "auto" else "auto", info["nfe"])
    assert events[-1]["acceptance_length"] == info["acceptance_length"]
    assert events[-1]["tokens_per_forward"] == info["tokens_per_forward"]


def test_chat_events_interleave_and_sampling(served):
    """Chat streams carry events too (before the text they commit); at temperature > 0
    (speculative sampling) the events still agree with the output."""
    url, llm, _ = served
    body = {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 12,
            "temperature": 1.0, "seed": 7, "mode": "linear_spec", "block_length": 4,
            "stream_options": {"trimode_events": True}}
    chunks = stream(url, "chat/completions", body)
    events = [c["trimode_event"] for c in chunks if c["object"] == "trimode.forward"]
    seen, text = [], ""
    for c in chunks:
        if c["object"] == "trimode.forward":
            seen += c["trimode_event"]["committed"]
        elif c["choices"] and c["choices"][0]["delta"].get("content"):
            text += c["choices"][0]["delta"]["content"]
            assert llm.tokenizer.decode(seen).startswith(text)  # events come first
    tokens = llm.tokenizer.encode(llm.tokenizer.decode(seen))
    assert llm.tokenizer.decode(seen) == text and tokens == seen
    check_events(events, seen, "linear_spec", events[-1]["nfe"])


def test_ordinary_streams_carry_no_events(served):
    url, _, _ = served
    for options in (None, {"include_usage": True}, {"trimode_events": False}):
        body = {"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "mode": "diffusion",
                "block_length": 4, "stream_options": options}
        chunks = stream(url, "completions", body)
        assert chunks and all(c["object"] == "text_completion" and "trimode_event" not in c
                              for c in chunks)
    r = httpx.post(f"{url}/v1/completions", json={**body, "stream": True,
                                                  "stream_options": {"trimode_events": "yes"}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "stream_options"


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear_spec", "quadratic_spec"])
def test_events_with_a_stop_token(served, mode):
    """A stop token inside a block (AsyncEngine.generate(events=True) directly): the events
    still commit exactly the output, and the last block ends at the stop token."""
    import asyncio

    _, llm, engine = served
    ids = llm.tokenizer.encode(PROMPTS[0])
    base = SamplingParams(mode=mode, max_tokens=14, temperature=0, **KNOBS[mode])
    full = llm.generate(PROMPTS[0], base)[0].token_ids
    stop = full[5]
    params = SamplingParams(mode=mode, max_tokens=14, temperature=0, stop_token_ids=[stop],
                            **KNOBS[mode])
    want = llm.generate(PROMPTS[0], params)[0]

    async def run():
        events, updates = [], []
        async for item in engine.generate(ids, params, events=True):
            (updates if hasattr(item, "new_token_ids") else events).append(item)
        return events, updates

    events, updates = asyncio.run(run())
    assert updates[-1].finish_reason == want.finish_reason == "stop"
    assert [t for e in events for t in e.committed] == want.token_ids == full[:full.index(stop)]
    slots = {s.position: s for s in events[-1].slots}
    end = slots[len(want.token_ids)]  # later slots: only drafts thrown away, if any
    assert (end.token, end.state) == (stop, "committed")
    assert all(s.state == "rejected" for p, s in slots.items() if p > end.position)
    assert events[-1].forward == updates[-1].metrics.nfe
