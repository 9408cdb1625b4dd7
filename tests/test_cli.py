"""The ``trimode`` command line, run as a subprocess against the tiny checkpoint (and once
against the embedded model): stdout holds only the answer or its JSON, results equal the
Python API's with the CLI's defaults, bad flags fail in one line naming the flag (B25).

Flag errors are found before any model loads, so most are checked in-process (``main``).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from rich.console import Console

from trimode import SamplingParams
from trimode.entrypoints.cli import main as cli
from trimode.entrypoints.cli.main import MASK_GLYPH, LiveView, main

PROMPT = "w5 w6 w7"
MAX = 12


def run_cli(*args: str, stdin: str | None = None, env: dict | None = None):
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "trimode", *args], input=stdin,
                          capture_output=True, text=True, timeout=300, env=environ)


@pytest.fixture(scope="module")
def runs(tiny):
    """Every CLI subprocess of this file, started together (each pays ~2 s of imports).
    The tiny model runs single-threaded: its matrices are too small to gain from threads."""
    model, one = ["--model", str(tiny[0])], {"OMP_NUM_THREADS": "1"}
    gen = ["generate", *model, "--raw", "--max-tokens", str(MAX)]
    jobs = {"ar": ([*gen, "--json", "--top-p", "1", "--temperature", "0", "-"], PROMPT, one)}
    for mode in ("diffusion", "linear_spec"):  # TTY_COMPATIBLE=1: rich draws on piped stderr
        jobs[mode] = ([*gen, "--json", "--visual", "--mode", mode, PROMPT], None,
                      {**one, "TTY_COMPATIBLE": "1"})
    jobs["visual text"] = ([*gen, "--visual", "--mode", "diffusion", PROMPT], None, one)
    jobs["chat"] = (["chat", *model, "--max-tokens", "5"],
                    "w5 w6\n\nw7 w8\n/reset\nw7 w8\n/exit\nw9\n", one)
    jobs["bad flag"] = (["generate", "--block-length", "0", "hi"], None, one)
    jobs["embedded"] = (["generate", "What is the capital of France?", "--json",
                         "--max-tokens", "20"], None, None)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_cli, *args, stdin=stdin, env=env)
                   for name, (args, stdin, env) in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def api_params(mode: str, **overrides) -> SamplingParams:
    """What the CLI must send for ``--mode mode --max-tokens MAX`` (diffusion: threshold 0.9)."""
    threshold = 0.9 if mode == "diffusion" else None
    return SamplingParams(**{"mode": mode, "max_tokens": MAX, "threshold": threshold, **overrides})


@pytest.mark.parametrize("flags, name", [
    (["--block-length", "0"], "--block-length"), (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"), (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "0"], "--top-p"), (["--top-k", "-2"], "--top-k"),
    (["--max-tokens", "0"], "--max-tokens"), (["--mode", "foo"], "--mode"),
    (["--threshold", "2"], "--threshold"), (["--threshold", "x"], "--threshold"),
    (["--seed", "-1"], "--seed"), (["--model", "/nonexistent"], "--model"),
])
def test_bad_flag_is_one_line_naming_it(capsys, flags, name):
    code, out, err = run_main(capsys, "generate", *flags, "hi")
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and name in err, err


def test_bad_flag_in_a_real_process(runs):
    done = runs["bad flag"]
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr == "error: --block-length must be an integer >= 1; got 0\n"


@pytest.mark.parametrize("flags, threshold", [
    (["--mode", "diffusion"], 0.9), (["--mode", "diffusion", "--threshold", "none"], None),
    (["--mode", "diffusion", "--threshold", "0.5"], 0.5), (["--mode", "linear_spec"], 0.0),
    (["--mode", "ar"], None),
])
def test_threshold_defaults(flags, threshold):
    args = cli.build_parser().parse_args(["generate", *flags, "hi"])
    assert cli.sampling_params(args).threshold == threshold


def test_ctrl_c_exits_130_quietly(capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load", interrupted)
    code, out, err = run_main(capsys, "generate", "hi")
    assert code == 130 and out == "" and err.strip() == ""


def test_help_names_every_flag_and_range(capsys):
    code, out, _ = run_main(capsys, "generate", "--help")
    assert code == 0
    text = " ".join(out.split())
    for flag in ["--model", "--mode", "--max-tokens", "--temperature", "--top-p", "--top-k",
                 "--seed", "--block-length", "--threshold", "--draft-adapter", "--dtype",
                 "--device", "--json", "--raw", "--visual"]:
        assert flag in text
    for rule in ["integer >= 1", "(0, 1]", "in [0, 1]", ">= 0", "'none'"]:
        assert rule in text
    assert run_main(capsys, "chat", "--help")[0] == 0


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear_spec"])
def test_json_equals_the_api(runs, tiny_llm, mode):
    done = runs[mode]
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # stdout is exactly one JSON object
    metrics = result["metrics"]
    assert result["mode"] == mode and result["finish_reason"] in ("stop", "length")
    assert 0 < len(result["token_ids"]) <= MAX and metrics["nfe"] > 0
    stop = result["finish_reason"] == "stop"
    assert metrics["generated_tokens"] == len(result["token_ids"]) + stop
    assert metrics["tokens_per_forward"] == pytest.approx(
        metrics["generated_tokens"] / metrics["nfe"], abs=1e-4)
    assert (metrics["acceptance_length"] is not None) == (mode == "linear_spec")
    expected = tiny_llm.generate(PROMPT, api_params(mode))[0]
    assert result["token_ids"] == expected.token_ids and result["text"] == expected.text
    if mode == "linear_spec":  # lossless at temperature 0
        assert expected.token_ids == tiny_llm.generate(PROMPT, api_params("ar"))[0].token_ids


@pytest.mark.parametrize("mode", ["diffusion", "linear_spec"])
def test_visual_draws_masks_and_keeps_stdout_clean(runs, mode):
    """The --json --visual runs: stdout held only the JSON (checked above); the view
    went to stderr, with masks."""
    assert MASK_GLYPH in runs[mode].stderr and "Traceback" not in runs[mode].stderr


def test_visual_text_ends_with_the_answer(runs, tiny_llm):
    done = runs["visual text"]
    assert done.returncode == 0, done.stderr
    assert done.stdout == tiny_llm.generate(PROMPT, api_params("diffusion"))[0].text + "\n"
    assert "nfe" in done.stderr and "Traceback" not in done.stderr


def uncommitted(seq) -> list[int]:
    """The block tokens a frame must show after the committed text (strategy contract:
    diffusion's block is committed once its phase is "commit"; linear_spec's block[0] is
    already committed; only the first ``remaining`` slots of a block can become output)."""
    block = getattr(seq.strategy, "block", [])
    if seq.finished or not block or getattr(seq.strategy, "phase", None) == "commit":
        return []
    return block[: seq.remaining] if seq.params.mode == "diffusion" else block[1:]


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear_spec"])
def test_live_view_frames(tiny_llm, mode):
    """Each frame is the committed text, then one word or mask glyph per uncommitted block
    token; the last frame is exactly the answer. block_length 5 does not divide MAX, so the
    last diffusion block is cut to fit."""
    view = LiveView(tiny_llm, Console(file=io.StringIO(), width=400, height=50))
    frames = []

    def on_step(index, seq):
        frame = view.render(seq).renderables[1].plain
        pending = uncommitted(seq)
        frames.append((frame, tiny_llm.tokenizer.decode(seq.generated), len(seq.generated),
                       pending.count(seq.mask_token_id), len(pending)))

    out = tiny_llm.generate(PROMPT, api_params(mode, block_length=5), on_step=on_step)[0]
    assert len(frames) == out.metrics.nfe and frames[-1][0] == out.text
    assert (mode != "ar") == any(masks for *_, masks, _ in frames)
    for frame, committed, n_committed, masks, n_pending in frames:
        assert out.text.startswith(committed) and frame.startswith(committed)
        assert frame.count(MASK_GLYPH) == masks
        assert len(frame.replace(MASK_GLYPH, f" {MASK_GLYPH} ").split()) == n_committed + n_pending


def test_live_view_of_a_finished_request_shows_no_block(tiny_llm):
    """A request that stopped mid-block (EOS after accepted drafts) shows only its text."""
    view = LiveView(tiny_llm, Console(file=io.StringIO()))
    seq = SimpleNamespace(generated=[5, 6], finished=True, mask_token_id=3,
                          params=SamplingParams(mode="linear_spec"), metrics=SimpleNamespace(nfe=3),
                          strategy=SimpleNamespace(block=[6, 7, 8], phase="verify"))
    assert view.render(seq).renderables[1].plain == "w5 w6"


def test_chat_keeps_history_and_resets(runs, tiny_llm):
    """Plain-text answers, one per turn, with a metrics summary per turn on stderr."""
    done = runs["chat"]
    assert done.returncode == 0, done.stderr
    answers = done.stdout.splitlines()
    assert done.stderr.count("nfe") == 3 and "(history cleared)" in done.stderr
    params = SamplingParams(max_tokens=5)
    first = tiny_llm.chat([{"role": "user", "content": "w5 w6"}], params)[0].text
    history = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "w7 w8"}]
    second = tiny_llm.chat(history, params)[0].text
    fresh = tiny_llm.chat([{"role": "user", "content": "w7 w8"}], params)[0].text
    assert second != fresh  # the history matters to this model (else this test is blind)
    assert answers == [first, second, fresh]  # nothing after /exit


def test_embedded_model_answers(runs):
    done = runs["embedded"]
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert "Paris" in result["text"] and len(result["token_ids"]) <= 20
    assert result["metrics"]["nfe"] > 0


def test_summary_counts_the_stop_token_like_the_metrics():
    """The stderr summary and --json agree: a stop token counts in generated_tokens (and
    tokens/forward), so the summary says so next to the returned tokens."""
    from trimode.entrypoints.cli.main import summary
    from trimode.outputs import RequestMetrics

    stopped = SimpleNamespace(token_ids=[5, 6], finish_reason="stop", mode="ar",
                              metrics=RequestMetrics(nfe=3, generated_tokens=3))
    assert summary(stopped).startswith("ar · 2 tokens + 1 stop token (stop)")
    cut = SimpleNamespace(token_ids=[5], finish_reason="length", mode="linear_spec",
                          metrics=RequestMetrics(nfe=2, generated_tokens=1))
    assert summary(cut).startswith("linear_spec · 1 token (length)")  # the mode that ran
