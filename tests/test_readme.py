"""The README's snippets are executed (issue 15): every ``python`` block runs (the OpenAI
client ones against a live server on the tiny checkpoint or the tiny random VLM, with a
random ``cat.png``; the others on the embedded model),
every ``trimode ...`` command line in a ``bash`` block parses with the real argument parser,
and the ``curl`` example gets a 200. The default run caps ``max_tokens`` at 2 to stay fast;
the slow run checks each block's ``# prints:`` lines against what it really prints.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README.read_text(), re.S)
PYTHON = [body for lang, body in BLOCKS if lang == "python"]
BASH = [body for lang, body in BLOCKS if lang == "bash"]
SERVED = "http://127.0.0.1:8000"


def shown(block: str) -> list[str]:
    """The output a block documents: the comment lines after each ``# prints`` marker."""
    out, on = [], False
    for line in block.splitlines():
        if line.startswith("# prints"):
            on = True
        elif on and line.startswith("# "):
            out.append(line[2:])
        else:
            on = False
    return out


def commands(block: str) -> list[str]:
    """Logical lines of a bash block (continuations joined), comments dropped."""
    text = block.replace("\\\n", " ")
    return [ln.split(" # ")[0].strip() for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


@pytest.fixture(scope="module")
def tiny_server(tiny):
    from serve_utils import running
    from trimode import LLM
    from trimode import AsyncEngine
    from trimode.entrypoints.server.app import ServerConfig, build_app

    llm = LLM(str(tiny[0]), max_batch_size=4)
    engine = AsyncEngine(llm)
    app = build_app(engine, llm.tokenizer, llm.config.vocab_size,
                    ServerConfig(model_name="tiny", max_tokens=8))
    with running(app) as url:
        yield url
    engine.shutdown()


@pytest.fixture(scope="module")
def vlm_server(tmp_path_factory):
    from serve_utils import running
    from trimode import LLM, AsyncEngine
    from trimode.checkpoint.tiny_vlm import write_tiny_vlm
    from trimode.entrypoints.server.app import ServerConfig, build_app

    llm = LLM(str(write_tiny_vlm(tmp_path_factory.mktemp("readme_vlm"), seed=4)[0]))
    engine = AsyncEngine(llm)
    app = build_app(engine, llm.tokenizer, llm.config.vocab_size,
                    ServerConfig(model_name="tiny-vlm", max_tokens=8), vision=llm.config.vision)
    with running(app) as url:
        yield url
    engine.shutdown()


def run_block(block: str, monkeypatch, llm, cap: int | None) -> str:
    """Exec ``block``; ``LLM(...)`` (its arguments checked against the real signature) gives
    the shared embedded model; with ``cap``, every SamplingParams' max_tokens is capped."""
    import trimode

    real_llm, real_params = trimode.LLM, trimode.SamplingParams

    def make_llm(*args, **kwargs):
        bound = inspect.signature(real_llm).bind(*args, **kwargs)
        assert bound.arguments.get("model") is None, "README examples use the embedded model"
        return llm

    def make_params(**kwargs):
        if cap is not None:
            kwargs["max_tokens"] = min(kwargs.get("max_tokens", cap), cap)
        return real_params(**kwargs)

    monkeypatch.setattr(trimode, "LLM", make_llm)
    monkeypatch.setattr(trimode, "SamplingParams", make_params)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    return out.getvalue()


def test_readme_has_the_snippets_this_file_runs():
    assert len(PYTHON) == 4 and sum("OpenAI(" in b for b in PYTHON) == 2
    assert sum(bool(shown(b)) for b in PYTHON) == 2 and any("curl" in b for b in BASH)


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_snippet_runs(index, monkeypatch, request, tmp_path):
    block = PYTHON[index]
    if "cat.png" in block:  # the image example, against a live server on the tiny VLM
        from vlm_utils import random_image

        url = request.getfixturevalue("vlm_server")
        random_image(5).save(tmp_path / "cat.png")
        monkeypatch.chdir(tmp_path)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block.replace(SERVED, url), "README.md", "exec"), {})
        assert out.getvalue().strip()
        return
    if "OpenAI(" in block:  # the server example, against a live server on the tiny model
        url = request.getfixturevalue("tiny_server")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block.replace(SERVED, url), "README.md", "exec"), {})
        assert "prompt_tokens" in out.getvalue() and "tokens_per_forward" in out.getvalue()
        return
    llm = request.getfixturevalue("embedded_llm")
    printed = run_block(block, monkeypatch, llm, cap=2)
    assert printed.strip()  # it shows something (the old stream example printed nothing)
    assert len(printed.splitlines()) == len(shown(block))


@pytest.mark.slow
@pytest.mark.parametrize("index", [i for i, b in enumerate(PYTHON) if shown(b)])
def test_python_snippet_prints_what_the_readme_shows(index, monkeypatch, embedded_llm):
    block = PYTHON[index]
    assert run_block(block, monkeypatch, embedded_llm, cap=None).splitlines() == shown(block)


def test_command_lines_parse():
    from trimode.entrypoints.cli.main import build_parser

    parser = build_parser()
    seen = 0
    for block in BASH:
        for line in commands(block):
            for part in line.split("&&"):
                words = shlex.split(part)
                if words and words[0] == "trimode":
                    parser.parse_args(words[1:])  # raises on an unknown or bad flag
                    seen += 1
    assert seen >= 8


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_example(tiny_server):
    block = next(b for b in BASH if b.lstrip().startswith("curl"))
    line = commands(block)[0].replace("localhost:8000", tiny_server.removeprefix("http://"))
    done = subprocess.run(shlex.split(line) + ["-w", "\n%{http_code}"], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.rstrip().endswith("200") and '"text_completion"' in done.stdout
