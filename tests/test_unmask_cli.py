"""``--unmask`` / ``--steps`` and llama.cpp's ``--diffusion-*`` spellings on the CLI, and the
server's ``unmask`` / ``steps`` request fields."""

from __future__ import annotations

import json

import pytest

from trimode import SamplingParams
from trimode.entrypoints.cli import llamacpp
from trimode.entrypoints.cli.generate import sampling_params
from trimode.entrypoints.cli.main import build_parser, main


def parsed(*flags: str):
    args = build_parser().parse_args(["generate", *flags, "hi"])
    return args, sampling_params(args)


def run_main(capsys, *args: str):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_llamacpp_command_maps_onto_trimode_flags():
    args, p = parsed("--diffusion-steps", "64", "--diffusion-algorithm", "2",
                     "--diffusion-block-length", "32", "--max-tokens", "256", "--diffusion-visual")
    assert (p.mode, p.block_length, p.unmask, p.steps, p.threshold) == \
        ("diffusion", 32, "margin", 8, None)  # 64 steps over 256 / 32 = 8 blocks
    assert args.visual is True


@pytest.mark.parametrize("number, policy", [(0, "random"), (1, "entropy"), (2, "margin"),
                                            (3, "random"), (4, "confidence")])
def test_diffusion_algorithm_numbering_is_llamacpps(number, policy):
    assert parsed("--diffusion-algorithm", str(number))[1].unmask == policy


def test_steps_split_like_llamacpp():
    assert llamacpp.steps_of(256, 256, 32) == 32  # llama.cpp's defaults: 8 blocks of 32 steps
    assert llamacpp.steps_of(64, 100, 32) == 16  # 4 blocks (the last one straddles)
    assert llamacpp.steps_of(3, 256, 32) == 1  # at least one per block
    args, p = parsed("--diffusion-steps", "8", "--max-tokens", "12")  # block length unknown yet
    assert llamacpp.resolve_steps(p, args, block_size=8).steps == 4  # 2 blocks of the checkpoint's 8
    args, p = parsed("--mode", "diffusion", "--steps", "5")
    assert llamacpp.resolve_steps(p, args, block_size=8).steps == 5  # --steps is per block


@pytest.mark.parametrize("flags, text", [
    (["--diffusion-algorithm", "5"], "--diffusion-algorithm: expected an integer in [0, 4]"),
    (["--diffusion-algorithm", "x"], "--diffusion-algorithm"),
    (["--diffusion-steps", "0"], "--diffusion-steps: expected an integer >= 1"),
    (["--diffusion-block-length", "-1"], "--diffusion-block-length"),
    (["--mode", "ar", "--diffusion-steps", "8"], "--diffusion-steps needs --mode diffusion"),
    (["--steps", "4", "--diffusion-steps", "8"], "--diffusion-steps (total, llama.cpp) and --steps"),
    (["--unmask", "margin", "--diffusion-algorithm", "1"], "--unmask margin was given"),
    (["--block-length", "8", "--diffusion-block-length", "16"], "differ"),
    (["--unmask", "margin"], "--unmask applies to --mode diffusion; got --mode ar"),
    (["--mode", "diffusion", "--unmask", "best"], "--unmask: invalid choice"),
    (["--mode", "diffusion", "--steps", "0"], "--steps: expected an integer >= 1"),
])
def test_bad_flags_are_one_line_naming_the_flag(capsys, flags, text):
    code, out, err = run_main(capsys, "generate", *flags, "hi")
    assert code == 2 and out == "" and err.count("\n") == 1 and text in err, err


def test_llamacpp_flags_generate_what_the_api_does(capsys, tiny, tiny_llm):
    code, out, err = run_main(capsys, "generate", "--model", str(tiny[0]), "--raw", "--json",
                              "--max-tokens", "12", "--diffusion-steps", "6",
                              "--diffusion-algorithm", "1", "w5 w6 w7")
    assert code == 0, err
    got = json.loads(out)
    want = tiny_llm.generate("w5 w6 w7", SamplingParams(mode="diffusion", max_tokens=12,
                                                        unmask="entropy", steps=3))[0]
    assert got["token_ids"] == want.token_ids and got["metrics"]["nfe"] == want.metrics.nfe


@pytest.fixture(scope="module")
def server(tiny):
    from serve_utils import running

    from trimode import LLM, AsyncEngine
    from trimode.entrypoints.server.app import ServerConfig, build_app

    llm = LLM(str(tiny[0]), max_batch_size=4, max_model_len=256)
    engine = AsyncEngine(llm)
    config = ServerConfig(model_name="tiny", mode="diffusion", max_tokens=10, temperature=0.0)
    with running(build_app(engine, llm.tokenizer, llm.config.vocab_size, config)) as url:
        yield url
    engine.shutdown()


@pytest.mark.parametrize("extra, status, param", [
    ({"unmask": "best"}, 400, "unmask"), ({"steps": 0}, 400, "steps"),
    ({"steps": "2"}, 422, "steps"), ({"unmask": 1}, 400, "unmask"),
])
def test_server_rejects_bad_policy_fields(server, extra, status, param):
    import httpx

    r = httpx.post(server + "/v1/completions", json={"prompt": "w5", **extra}, timeout=60)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_server_request_fields_equal_the_api(server, tiny_llm):
    import httpx

    body = {"prompt": "w5 w6 w7", "unmask": "leftmost", "steps": 4, "seed": 3}
    r = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    want = tiny_llm.generate("w5 w6 w7", SamplingParams(mode="diffusion", max_tokens=10,
                                                        unmask="leftmost", steps=4, seed=3))[0]
    assert r.json()["choices"][0]["text"] == want.text


def test_readme_policy_commands_build_valid_params():
    """The README's unmask / llama.cpp commands pass the CLI's own checks (not only parse)."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    lines = [line for line in re.findall(r"^trimode generate .*$", text, re.M)
             if "--unmask" in line or "--diffusion-" in line]
    assert len(lines) >= 5
    for line in lines:
        args = build_parser().parse_args(shlex.split(line.split("#")[0])[1:])
        assert sampling_params(args).mode == "diffusion", line
