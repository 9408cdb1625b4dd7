"""``trimode generate`` and ``trimode chat``: flags -> SamplingParams, then stream one answer
(or a chat loop) to the terminal.

Text is printed as it is committed (``LLM.stream`` / ``LLM.stream_chat``), in every mode;
``--json`` prints one object at the end; ``--visual`` draws the live view on a terminal (and
says so on stderr when there is none). Ctrl-C prints what was generated so far, says it was
interrupted and raises ``Interrupted`` (exit 130). Every text that reaches the tokenizer is
checked first (``user_text``): undecodable bytes are a usage error naming where they came
from, never an internal error. Knows nothing about decoding beyond ``LLM``.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext

from rich.console import Console
from rich.text import Text

from ...checkpoint.tokenizer import check_template_kwargs, check_text
from ...defaults import THRESHOLD
from ...params import MODE_DEFAULT, SamplingParams
from . import llamacpp
from .common import UsageError, flag_error
from .visual import LiveView

DIFFUSION_THRESHOLD = THRESHOLD["diffusion"]  # shown in --help
DEFAULT = MODE_DEFAULT  # --threshold not given: the mode's own default (defaults.THRESHOLD)
FLAGS = ("mode", "max_tokens", "temperature", "top_k", "top_p", "seed", "block_length",
         "threshold", "draft_segments", "max_thinking_tokens", "unmask", "steps")

COMMANDS = {"/help": "list these commands", "/reset": "clear the conversation history",
            "/exit": "quit (end of input quits too)"}


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The flags as SamplingParams; UsageError naming the flag for a bad value. llama.cpp's
    ``--diffusion-*`` spellings are mapped first (``llamacpp.py``); ``--diffusion-steps``
    without a block length gets its final per-block value from ``llamacpp.resolve_steps``
    once the checkpoint is loaded."""
    llamacpp.apply(args)
    mode = args.mode or "ar"
    for flag in ("unmask", "steps"):
        if getattr(args, flag) is not None and mode not in ("diffusion", "auto"):
            raise UsageError(f"--{flag} applies to --mode diffusion; got --mode {mode}")
    steps = args.steps
    if args.diffusion_steps is not None:
        steps = llamacpp.steps_of(args.diffusion_steps, args.max_tokens, args.block_length) \
            if args.block_length and args.max_tokens >= 1 else 1
    try:
        return SamplingParams(mode=mode, max_tokens=args.max_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.seed, block_length=args.block_length,
                              threshold=args.threshold, draft_segments=args.draft_segments,
                              max_thinking_tokens=args.max_thinking_tokens,
                              unmask=args.unmask or "confidence", steps=steps)
    except ValueError as exc:
        # the flag's spelling: --threshold takes 'none', not None
        raise UsageError(str(flag_error(exc, FLAGS)).replace(" or None", " or 'none'")) from None


def template_kwargs_arg(text: str) -> dict:
    """``--chat-template-kwargs``: a JSON object of template variables."""
    try:
        return check_template_kwargs(json.loads(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as "
                                         f"'{{\"enable_thinking\": false}}'; {exc}") from None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after the partial answer and the notice were printed (exit 130)."""


def user_text(text: str, where: str) -> str:
    """``text`` if valid; else ValueError naming ``where`` (undecodable argv bytes arrive as
    surrogates U+DC80..U+DCFF: reported as the byte they stand for)."""
    try:
        return check_text(text, where)
    except ValueError:
        bad = next(i for i, ch in enumerate(text) if 0xD800 <= ord(ch) <= 0xDFFF)
        code = ord(text[bad])
        what = f"byte 0x{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise ValueError(f"{where} is not valid UTF-8 text ({what} at character {bad})") from None


def decode_input(data: bytes, where: str) -> str:
    """UTF-8 bytes from stdin -> text; ValueError naming ``where`` and the bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where} is not valid UTF-8 (byte 0x{data[exc.start]:02X} at "
                         f"offset {exc.start})") from None


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary(out) -> str:
    m = out.metrics
    acc = f"{m.acceptance_length:.2f}" if m.acceptance_length is not None else "–"
    stop = " + 1 stop token" if m.generated_tokens > len(out.token_ids) else ""
    return (f"{out.mode} · {plural(len(out.token_ids), 'token')}{stop} ({out.finish_reason}) · "
            f"nfe {m.nfe} · {m.tokens_per_forward:.2f} tokens/forward · acceptance_length {acc} · "
            f"latency {m.latency_s:.2f} s")


def note(stderr: Console, message: str, style: str = "dim") -> None:
    """One stderr line, never wrapped mid-sentence (piped output has no width)."""
    stderr.print(Text(message, style=style), soft_wrap=True)


def live_view(llm, args, stderr: Console):
    """The --visual view, or None (with a note on stderr when no terminal can show it)."""
    if not args.visual:
        return None
    console = Console() if sys.stdout.isatty() else stderr
    if not console.is_terminal:
        note(stderr, "--visual: no terminal to draw on (stdout and stderr are not terminals); "
             "printing the answer only", style="")
        return None
    return LiveView(llm, console)


def run_one(llm, prompt, params, args, stderr: Console, raw: bool = False):
    """Decode one prompt (a string with ``raw``, else a conversation) and print the answer
    as it is committed. Returns the RequestOutput; raises Interrupted on Ctrl-C."""
    view = live_view(llm, args, stderr)
    streaming = not args.json and view is None
    kw = {} if raw else {"chat_template_kwargs": getattr(args, "chat_template_kwargs", None)}
    stream = llm.stream if raw else llm.stream_chat
    pieces, ids, out = [], [], None
    try:
        with view or nullcontext():
            for chunk in stream(prompt, params, on_step=view, **kw):
                pieces.append(chunk.text)
                ids += chunk.token_ids
                if streaming and chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                out = chunk.output or out
    except KeyboardInterrupt:
        text = "".join(pieces)
        if args.json:
            print(json.dumps({"text": text, "token_ids": ids, "finish_reason": "abort",
                              "interrupted": True}, ensure_ascii=False), flush=True)
        else:
            print(text if not streaming else "", flush=True)
        note(stderr, f"interrupted after {plural(len(ids), 'token')}", style="")
        raise Interrupted from None
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids,
                          "finish_reason": out.finish_reason, "mode": out.mode,
                          "metrics": out.metrics.to_dict()}, ensure_ascii=False), flush=True)
    else:
        print("" if streaming else out.text, flush=True)
        note(stderr, summary(out))
    return out


def read_turn(interactive: bool) -> str:
    """One stdin line; the "> " prompt only for a person at a terminal (on stderr when
    stdout is redirected, so stdout keeps only answers)."""
    if interactive and sys.stdout.isatty():
        return input("> ")
    if interactive:
        sys.stderr.write("> ")
        sys.stderr.flush()
    line = sys.stdin.buffer.readline()
    if not line:
        raise EOFError
    return decode_input(line, "the input line")


def command(line: str, history: list, stderr: Console) -> bool | None:
    """Handle a slash command (a line that is one word starting with '/'): True to quit,
    False when handled, None for a line that is not a command. Unknown commands are
    refused, never sent to the model."""
    if not line.startswith("/") or len(line.split()) != 1:
        return None
    if line == "/exit":
        return True
    if line == "/reset":
        history.clear()
        note(stderr, "(history cleared)")
    elif line == "/help":
        for name, text in COMMANDS.items():
            note(stderr, f"{name:7} {text}", style="")
    else:
        note(stderr, f"unknown command {line}; commands: {', '.join(COMMANDS)} "
             "(a message of one word starting with '/' is taken as a command)", style="")
    return False


def chat_loop(llm, params, args, stderr: Console) -> int:
    """Multi-turn chat over stdin; exit code 2 if a turn failed, else 0."""
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
            line = user_text(read_turn(interactive), "the input line").strip()
        except EOFError:
            if interactive:
                sys.stderr.write("\n")
            break
        except ValueError as exc:  # undecodable bytes: report, keep the session
            note(stderr, f"error: {exc}", style="")
            failed = True
            continue
        handled = command(line, history, stderr)
        if handled:
            break
        if handled is not None or not line:
            continue
        turn = history + [{"role": "user", "content": line}]
        try:
            out = run_one(llm, turn, params, args, stderr)
        except ValueError as exc:  # e.g. the context limit: report, keep the session
            note(stderr, f"error: {' '.join(str(exc).split())}", style="")
            failed = True
            continue
        history[:] = turn + [{"role": "assistant", "content": out.text}]
    return 2 if failed else 0
