"""The ``trimode`` command line: the parser of every subcommand and the entry point.

``generate`` and ``chat`` live in ``generate.py``, ``serve`` in ``entrypoints/server/cli.py``,
``bench`` in ``bench/cli.py``, ``train`` in ``training/cli.py``; shared flag parsing and the
one-line ``UsageError`` in ``common.py``.

Parses flags into a validated SamplingParams before any model is loaded, so a bad flag
fails in well under a second with one line ``error: ...`` (exit 2), never a traceback
(docs/cases.md B25). stdout carries only the answer, printed as it is committed (or one JSON
object per answer with ``--json``); loading, the metrics summary and the ``--visual`` live
view go to stderr, or the live view to a terminal stdout. A subcommand whose optional extra is
missing names the pip command before doing any work (``extras.require``). Knows nothing about
decoding beyond ``LLM``.
"""

from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from ...defaults import DRAFT_SEGMENTS, MAX_TOKENS, MODES, UNMASK_POLICIES
from ...extras import require
from ..server.cli import add_serve_parser
from .common import (Parser, UsageError, add_model_args, load, one_line, segments_arg,
                     threshold_arg)
from .llamacpp import add_llamacpp_args, positive_int, resolve_steps
from .generate import (DEFAULT, DIFFUSION_THRESHOLD, Interrupted, chat_loop, decode_input,
                       template_kwargs_arg,
                       run_one, sampling_params, summary, user_text)
from .visual import MASK_GLYPH, LiveView

__all__ = ["main", "build_parser", "UsageError", "load", "summary", "LiveView", "MASK_GLYPH"]

EXAMPLES = """flags: trimode generate --help, trimode chat --help

examples:
  trimode generate "What is the capital of France?"
  trimode generate --mode linear_spec --json --max-tokens 64 "Write a haiku."
  trimode generate --mode diffusion --block-length 32 --threshold 0.9 --visual "Count to 20."
  trimode generate --mode diffusion --unmask margin --steps 8 "Count to 20."
  trimode generate --diffusion-steps 64 --diffusion-algorithm 1 --diffusion-block-length 32 "Hi"
  echo "Hi" | trimode chat --mode linear_spec

exit codes: 0 ok, 2 bad flag/input/checkpoint (one line on stderr), 130 interrupted
"""


def build_parser() -> Parser:
    common = Parser(add_help=False)
    m = common.add_argument_group("model")
    add_model_args(m, "checkpoint directory, .gguf file or cached hub id (default: the embedded "
                   "SmolLM2-135M-Instruct, converted on first use)",
                   "PEFT LoRA directory used for linear_spec / quadratic_spec draft passes "
                   "(and diffusion denoising if trained for it); 'none' for no adapter "
                   "(default: the shipped tri-mode adapter on the embedded model)")
    d = common.add_argument_group("decoding")
    d.add_argument("--mode", choices=MODES, default=None,
                   help="ar: one token per forward; diffusion: block diffusion; linear_spec: "
                   "self-speculation (draft a block bidirectionally, verify causally); "
                   "quadratic_spec: the same with draft and verify fused in one forward "
                   "(default: ar; diffusion with a --diffusion-* flag)")
    d.add_argument("--max-tokens", type=int, default=MAX_TOKENS, metavar="N",
                   help=f"generated-token limit, integer >= 1 (default: {MAX_TOKENS})")
    d.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help=">= 0; 0 is greedy (default: 0)")
    d.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling, in (0, 1]; 1 is off (default: 1)")
    d.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="integer >= 0; 0 is off (default: 0)")
    d.add_argument("--seed", type=int, default=None, metavar="S",
                   help="integer >= 0; makes sampling reproducible (default: random)")
    d.add_argument("--block-length", type=int, default=None, metavar="N",
                   help="diffusion block / linear_spec draft window, integer >= 1 "
                   "(default: the checkpoint's block_size)")
    d.add_argument("--threshold", type=threshold_arg, default=DEFAULT, metavar="X|none",
                   help="in [0, 1]. diffusion: unmask every slot whose confidence reaches X "
                   f"(at least one per pass; default {DIFFUSION_THRESHOLD}), 'none' for the even "
                   "schedule; linear_spec: draft confidence threshold (default 0: draft the "
                   "whole block in one pass); ignored by ar")
    d.add_argument("--unmask", choices=UNMASK_POLICIES, default=None,
                   help="diffusion: which masked slots a denoising pass fills first: confidence "
                   "(the candidate's probability), margin (top-1 minus top-2 probability), "
                   "entropy (lowest first), random (order keyed by --seed), leftmost "
                   "(default: confidence)")
    d.add_argument("--steps", type=positive_int, default=None, metavar="N",
                   help="diffusion: denoising passes per block, integer >= 1: each pass unmasks "
                   "an even share of the block (the quota schedule; no threshold unless "
                   "--threshold is given, then also every slot reaching it) "
                   "(default: none, the threshold rule)")
    d.add_argument("--draft-segments", type=segments_arg, default=DRAFT_SEGMENTS, metavar="M|all",
                   help="quadratic_spec: keep draft segments for only the M acceptance outcomes "
                   "nearest the last one, integer >= 1, or 'all' for the full layout "
                   "(block_length^2 extra tokens per forward) (default: 1)")
    d.add_argument("--max-thinking-tokens", type=int, default=None, metavar="N",
                   help="at most N tokens inside <think>, then </think> is forced, in every "
                   "mode (default: no budget)")
    d.add_argument("--chat-template-kwargs", type=template_kwargs_arg, default=None,
                   metavar="JSON", help="extra chat template variables, a JSON object, e.g. "
                   "'{\"enable_thinking\": false}'")
    o = common.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object per answer: "
                   "text, token_ids, finish_reason, mode, metrics")
    o.add_argument("--visual", action="store_true", help="live view of the block being denoised "
                   f"or drafted (masks shown as {MASK_GLYPH})")
    add_llamacpp_args(common)
    parser = Parser(prog="trimode", description="Generate with a tri-mode diffusion LM "
                    "in ar, diffusion, linear_spec or quadratic_spec mode.", epilog=EXAMPLES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{generate,chat,serve,bench,train}")
    gen = sub.add_parser("generate", parents=[common], help="answer one prompt",
                         description="Answer one prompt and print the text (stdout); a metrics "
                         "summary goes to stderr.")
    gen.add_argument("--raw", action="store_true",
                     help="send PROMPT as is, without the chat template")
    gen.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="an image shown before PROMPT (NLD-VLM checkpoints); repeat for more")
    gen.add_argument("prompt", metavar="PROMPT", help="the prompt; '-' reads it from stdin")
    sub.add_parser("chat", parents=[common], help="interactive multi-turn chat",
                   description="Multi-turn chat reading one user turn per stdin line. "
                   "Commands (a line of one word starting with '/'): /help lists them, /reset "
                   "clears the history, /exit (or end of input) quits; any other such word is "
                   "refused, not sent. Exits 2 if a turn failed.")
    add_serve_parser(sub)
    from ...bench.cli import add_parser as add_bench

    add_bench(sub)
    from ...training.cli import add_train_parser

    add_train_parser(sub, Parser)
    from .convert import add_convert_parser

    add_convert_parser(sub, Parser)
    return parser


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve" and args.ray:
        from ..ray import run

        return run(args)
    if args.command == "serve":
        require("serve", "fastapi", "uvicorn", "prometheus_client")
        from ..server.cli import serve

        return serve(args)
    if args.command == "bench":
        from ...bench.cli import run as bench

        return bench(args)
    if args.command == "train":
        require("train", "peft")
        from ...training.cli import run_train

        return run_train(args)
    if args.command == "convert":
        from .convert import run_convert

        return run_convert(args)
    params = sampling_params(args)
    stderr = Console(stderr=True, highlight=False)
    prompt = None
    if args.command == "generate":
        if args.prompt == "-":
            prompt = decode_input(sys.stdin.buffer.read(), "PROMPT (stdin)").rstrip("\n")
        else:
            prompt = user_text(args.prompt, "PROMPT")
        if not prompt.strip():
            raise UsageError("PROMPT must not be empty")
        if args.image and args.raw:
            raise UsageError("--image needs the chat template; drop --raw")
        if args.chat_template_kwargs is not None and args.raw:
            raise UsageError("--chat-template-kwargs needs the chat template; drop --raw")
    llm = load(args, stderr)
    params = resolve_steps(params, args, llm.config.block_size)
    if args.command == "chat":
        if not llm.tokenizer.has_chat_template:
            raise UsageError("this checkpoint has no chat template; use 'trimode generate --raw'")
        return chat_loop(llm, params, args, stderr)
    if not args.raw:
        if not llm.tokenizer.has_chat_template:
            raise UsageError("this checkpoint has no chat template; add --raw")
        images = [{"type": "image_url", "image_url": {"url": p}} for p in args.image]
        prompt = [{"role": "user", "content": images + [{"type": "text", "text": prompt}]
                   if images else prompt}]
    run_one(llm, prompt, params, args, stderr, raw=args.raw)
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point: exit 0 on success, 2 on a usage, input or checkpoint error (one line on
    stderr), 130 on Ctrl-C, 1 on an unexpected failure (set TRIMODE_DEBUG=1 for the traceback)."""
    try:
        code = _main(argv)
    except KeyboardInterrupt as exc:
        if not isinstance(exc, Interrupted):  # Interrupted has said so already
            sys.stderr.write("\n")
        code = 130
    except BrokenPipeError:  # e.g. `| head`: stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    except (ValueError, OSError, ImportError) as exc:  # CheckpointError is a ValueError
        print(f"error: {one_line(exc)}", file=sys.stderr)
        code = 2
    except Exception as exc:
        if os.environ.get("TRIMODE_DEBUG"):
            raise
        print(f"error: internal error: {type(exc).__name__}: {one_line(exc)} "
              "(set TRIMODE_DEBUG=1 for the traceback)", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
