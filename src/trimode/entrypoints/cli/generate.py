"""``trimode generate`` and ``trimode chat``: flags -> SamplingParams, one answer or a chat
loop, the metrics summary and the ``--visual`` live view."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.text import Text

from ...defaults import THRESHOLD
from ...params import MODE_DEFAULT, SamplingParams
from .common import UsageError, flag_error, one_line
from .visual import LiveView

DIFFUSION_THRESHOLD = THRESHOLD["diffusion"]  # shown in --help
DEFAULT = MODE_DEFAULT  # --threshold not given: the mode's own default (defaults.THRESHOLD)
FLAGS = ("mode", "max_tokens", "temperature", "top_k", "top_p", "seed", "block_length",
         "threshold", "draft_segments")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The flags as SamplingParams; UsageError naming the flag for a bad value."""
    try:
        return SamplingParams(mode=args.mode, max_tokens=args.max_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed, block_length=args.block_length,
                              threshold=args.threshold, draft_segments=args.draft_segments)
    except ValueError as exc:
        raise flag_error(exc, FLAGS) from None


def summary(out, mode: str) -> str:
    m = out.metrics
    acc = f"{m.acceptance_length:.2f}" if m.acceptance_length is not None else "–"
    stop = " + 1 stop token" if m.generated_tokens > len(out.token_ids) else ""
    return (f"{mode} · {len(out.token_ids)} tokens{stop} ({out.finish_reason}) · nfe {m.nfe} · "
            f"{m.tokens_per_forward:.2f} tokens/forward · acceptance_length {acc} · "
            f"latency {m.latency_s:.2f} s")


def run_one(llm, prompt, params: SamplingParams, args, stderr: Console, raw: bool = False):
    """Decode one prompt (a string with ``raw``, else a conversation), print the answer."""
    call = llm.generate if raw else llm.chat
    if args.visual:
        console = Console() if sys.stdout.isatty() else stderr
        with LiveView(llm, console) as view:
            out = call(prompt, params, on_step=view)[0]
    else:
        out = call(prompt, params)[0]
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids,
                          "finish_reason": out.finish_reason, "mode": params.mode,
                          "metrics": out.metrics.to_dict()}, ensure_ascii=False), flush=True)
    else:
        print(out.text, flush=True)
        stderr.print(Text(summary(out, params.mode), style="dim"), soft_wrap=True)
    return out


def read_turn(interactive: bool) -> str:
    """One stdin line; the "> " prompt only for a person at a terminal (on stderr when
    stdout is redirected, so stdout keeps only answers)."""
    if interactive and sys.stdout.isatty():
        return input("> ")
    if interactive:
        sys.stderr.write("> ")
        sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


def chat_loop(llm, params: SamplingParams, args, stderr: Console) -> int:
    if not llm.tokenizer.has_chat_template:
        raise UsageError("this checkpoint has no chat template; use 'trimode generate --raw'")
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing for input())
        except ImportError:
            pass
    history: list[dict] = []
    failed = False
    while True:
        try:
            line = read_turn(interactive).strip()
        except EOFError:
            if interactive:
                sys.stderr.write("\n")
            break
        if line == "/exit":
            break
        if line == "/reset":
            history.clear()
            stderr.print(Text("(history cleared)", style="dim"))
            continue
        if not line:
            continue
        turn = history + [{"role": "user", "content": line}]
        try:
            out = run_one(llm, turn, params, args, stderr)
        except ValueError as exc:  # e.g. the context limit: report, keep the session
            stderr.print(Text(f"error: {one_line(exc)}"))
            failed = True
            continue
        history = turn + [{"role": "assistant", "content": out.text}]
    return 2 if failed else 0
