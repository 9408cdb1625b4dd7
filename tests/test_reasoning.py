"""Reasoning end to end: ``chat_template_kwargs`` reach the chat template (a shipped NLD-style
template: thinking off renders ``<think></think>``), the thinking budget on the tiny random
checkpoint (whose thinking would run on to max_tokens) in every mode, and ``trimode serve
--reasoning-parser think``: reasoning_content / content in messages and stream deltas (equal
splits, tags cut anywhere across deltas, multi-token tags of a BPE tokenizer), usage's
reasoning_tokens, and 400s naming the field while the server keeps serving.
"""

from __future__ import annotations

import json

import httpx
import pytest

from serve_utils import ScriptedEngine, running
from think_utils import END_THINK, THINK, write_think_checkpoint
from trimode import SamplingParams
from trimode.decoding.thinking import ThinkTags, split

MODES = ["ar", "linear_spec", "quadratic_spec", "diffusion"]
KNOBS = {"ar": {}, "linear_spec": {"block_length": 4}, "quadratic_spec": {"block_length": 4},
         "diffusion": {"block_length": 4, "threshold": 0.5}}
CHAT = [{"role": "user", "content": "w5 w6 w7"}]


@pytest.fixture(scope="module")
def think_dir(tmp_path_factory):
    return write_think_checkpoint(tmp_path_factory.mktemp("think"))


@pytest.fixture(scope="module")
def think_llm(think_dir):
    from trimode import LLM

    return LLM(str(think_dir), progress=False)


def test_chat_template_kwargs_reach_the_template(think_llm):
    tok = think_llm.tokenizer
    on = tok.apply_chat_template(CHAT)
    off = tok.apply_chat_template(CHAT, {"enable_thinking": False})
    assert on[-1] == THINK and off[-2:] == [THINK, END_THINK] and off[:-1] == on
    out = think_llm.chat(CHAT, SamplingParams(max_tokens=4),
                         chat_template_kwargs={"enable_thinking": False})[0]
    assert out.prompt_token_ids == off
    chunks = list(think_llm.stream_chat(CHAT, SamplingParams(max_tokens=4),
                                        chat_template_kwargs={"enable_thinking": False}))
    assert chunks[-1].output.prompt_token_ids == off
    # thinking off: the reply is all answer
    assert think_llm.reasoning(out).reasoning_content is None
    for bad in ([1], {"tokenize": True}, {"": 1}, "x"):
        with pytest.raises(ValueError, match="chat_template_kwargs"):
            think_llm.chat(CHAT, SamplingParams(max_tokens=2), chat_template_kwargs=bad)


def test_budget_every_mode_closes_the_tag_and_spec_modes_equal_ar(think_llm):
    tags = think_llm.think_tags
    free = think_llm.chat(CHAT, SamplingParams(max_tokens=40))[0]
    assert think_llm.reasoning(free).reasoning_tokens == 40  # it would think on otherwise
    outs = {}
    for mode in MODES:
        for budget in (0, 5, 13):
            out = think_llm.chat(CHAT, SamplingParams(mode=mode, max_tokens=40,
                                                      max_thinking_tokens=budget,
                                                      **KNOBS[mode]))[0]
            r = think_llm.reasoning(out)
            assert r.reasoning_tokens <= budget and END_THINK in out.token_ids, (mode, budget)
            assert len(split(tags, out.prompt_token_ids, out.token_ids)[0]) == r.reasoning_tokens
            outs[mode, budget] = out.token_ids
    for budget in (0, 5, 13):
        assert outs["ar", budget][budget] == END_THINK
        for mode in ("linear_spec", "quadratic_spec"):
            assert outs[mode, budget] == outs["ar", budget], (mode, budget)


def test_budget_needs_tags_in_the_tokenizer(tiny_llm):
    assert tiny_llm.think_tags is None  # the plain tiny tokenizer has no <think>
    with pytest.raises(ValueError, match="max_thinking_tokens"):
        tiny_llm.generate("w5", SamplingParams(max_tokens=2, max_thinking_tokens=3))


# ----------------------------------------------------------------------------- the server


def sse(client, body) -> list[dict]:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[len("data: "):]) for ln in lines[:-1]]


def joined(events, field) -> str:
    return "".join(e["choices"][0]["delta"].get(field) or "" for e in events if e["choices"])


@pytest.fixture(scope="module")
def think_server(think_dir):
    """The server steps its own LLM (the test's ``think_llm`` is the offline oracle)."""
    from trimode import LLM
    from trimode.engine import AsyncEngine
    from trimode.entrypoints.server.app import ServerConfig, build_app

    llm = LLM(str(think_dir), progress=False)
    engine = AsyncEngine(llm)
    app = build_app(engine, llm.tokenizer, llm.config.vocab_size,
                    ServerConfig(model_name="tiny", mode="ar", max_tokens=24, temperature=0.0,
                                 reasoning_parser="think"))
    with running(app) as url:
        yield httpx.Client(base_url=url, timeout=60)
    engine.shutdown()


@pytest.mark.parametrize("mode", MODES)
def test_served_split_equals_offline_and_stream(think_server, think_llm, mode):
    body = {"messages": CHAT, "max_tokens": 24, "mode": mode, "max_thinking_tokens": 6,
            **KNOBS[mode]}
    full = think_server.post("/v1/chat/completions", json=body).json()
    message = full["choices"][0]["message"]
    offline = think_llm.chat(CHAT, SamplingParams(mode=mode, max_tokens=24,
                                                  max_thinking_tokens=6, **KNOBS[mode]))[0]
    want = think_llm.reasoning(offline)
    assert message["reasoning_content"] == want.reasoning_content
    assert message["content"] == want.content and "think>" not in message["content"]
    details = full["usage"]["completion_tokens_details"]
    assert details["reasoning_tokens"] == want.reasoning_tokens <= 6
    events = sse(think_server, {**body, "stream_options": {"include_usage": True}})
    assert joined(events, "reasoning_content") == message["reasoning_content"]
    assert joined(events, "content") == message["content"]
    assert events[-1]["usage"] == full["usage"]


def test_bad_values_are_400s_naming_the_field_and_serving_goes_on(think_server):
    for extra, field in (({"max_thinking_tokens": -1}, "max_thinking_tokens"),
                         ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
                         ({"chat_template_kwargs": {"not a name": 1}}, "chat_template_kwargs")):
        r = think_server.post("/v1/chat/completions",
                              json={"messages": CHAT, "max_tokens": 4, **extra})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]
    r = think_server.post("/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 4, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200
    message = r.json()["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["content"]


def test_budget_without_tags_is_a_400(tiny):
    from trimode import LLM
    from trimode.engine import AsyncEngine
    from trimode.entrypoints.server.app import ServerConfig, build_app

    tiny_llm = LLM(str(tiny[0]), progress=False)
    engine = AsyncEngine(tiny_llm)
    try:
        app = build_app(engine, tiny_llm.tokenizer, tiny_llm.config.vocab_size,
                        ServerConfig(model_name="tiny", mode="ar", max_tokens=4))
        with running(app) as url:
            r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": CHAT, "max_thinking_tokens": 3})
            assert r.status_code == 400 and r.json()["error"]["param"] == "max_thinking_tokens"
            ok = httpx.post(url + "/v1/chat/completions", timeout=60, json={"messages": CHAT})
            assert ok.status_code == 200
            assert "completion_tokens_details" not in ok.json()["usage"]
        with pytest.raises(ValueError, match="reasoning parser"):
            build_app(engine, tiny_llm.tokenizer, tiny_llm.config.vocab_size,
                      ServerConfig(model_name="tiny", reasoning_parser="think"))
        from trimode.entrypoints.cli.common import UsageError
        from trimode.entrypoints.server.cli import serve_args, server_config

        for flag, value in (("reasoning_parser", "think"), ("max_thinking_tokens", 5)):
            with pytest.raises(UsageError, match=f"--{flag.replace('_', '-')}"):
                server_config(serve_args({flag: value}), tiny_llm, tiny[0])
    finally:
        engine.shutdown()


# ------------------------------------------- multi-token tags, cut anywhere across deltas


TEXT = "<think>plan 日本 </ think> x</think>\n\nThe answer 🎉"


@pytest.fixture(scope="module")
def bpe_server():
    """SmolLM2's byte-level BPE spells each tag in three ids; a scripted engine plays TEXT
    back in steps of K ids (prompt "split K")."""
    from transformers import AutoTokenizer

    from trimode.checkpoint.embedded import cache_root
    from trimode.checkpoint.tokenizer import Tokenizer
    from trimode.entrypoints.server.app import ServerConfig, build_app

    path = next(cache_root().glob("smollm2-135m-instruct-v*"), None)
    assert path is not None, "the embedded model cache is missing: run `trimode generate hi` once"
    tok = Tokenizer(AutoTokenizer.from_pretrained(str(path)), 16, 1)
    ids = tok.encode(TEXT)

    def script(prompt_ids, params):
        k = int(tok.decode(prompt_ids).split("split ")[1].split()[0])
        return [ids[i: i + k] for i in range(0, len(ids), k)], "stop"

    app = build_app(ScriptedEngine(script, limit=8192), tok, 49152,
                    ServerConfig(model_name="stub", mode="ar", reasoning_parser="think"))
    with running(app) as url:
        yield httpx.Client(base_url=url, timeout=30), tok, ids


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 100])
def test_multi_token_tags_split_across_deltas(bpe_server, k):
    client, tok, ids = bpe_server
    tags = ThinkTags.of(tok)
    assert len(tags.open) > 1 and len(tags.close) > 1
    body = {"messages": [{"role": "user", "content": f"split {k}"}], "max_tokens": 200}
    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message["reasoning_content"] == "plan 日本 </ think> x"
    assert message["content"] == "\n\nThe answer 🎉"
    events = sse(client, body)
    assert joined(events, "reasoning_content") == message["reasoning_content"]
    assert joined(events, "content") == message["content"]
    # a stop string applies to the answer only
    stopped = client.post("/v1/chat/completions", json={**body, "stop": ["answer", "plan"]})
    assert stopped.json()["choices"][0]["message"]["content"] == "\n\nThe "
    assert stopped.json()["choices"][0]["message"]["reasoning_content"] == "plan 日本 </ think> x"


def test_cli_flags(think_dir, capsys):
    from trimode.entrypoints.cli.main import main

    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    gen = ["generate", "--model", str(think_dir), "--json", "--max-tokens", "8"]
    code, out, _ = run(*gen, "--max-thinking-tokens", "2", "w5 w6 w7")
    assert code == 0 and json.loads(out)["token_ids"][2] == END_THINK
    code, out, _ = run(*gen, "--chat-template-kwargs", '{"enable_thinking": false}', "w5 w6 w7")
    free = run(*gen, "w5 w6 w7")[1]
    assert code == 0 and json.loads(out)["token_ids"] != json.loads(free)["token_ids"]
    for flags, name in ((["--max-thinking-tokens", "-1"], "--max-thinking-tokens"),
                        (["--chat-template-kwargs", "[1]"], "--chat-template-kwargs"),
                        (["--chat-template-kwargs", "{}", "--raw"], "--chat-template-kwargs")):
        code, out, err = run(*gen, *flags, "w5")
        assert code == 2 and out == "" and name in err, err
    code, _, err = run("serve", "--max-thinking-tokens", "-3")
    assert code == 2 and "--max-thinking-tokens" in err
