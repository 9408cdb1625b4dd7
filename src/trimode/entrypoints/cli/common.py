"""What every ``trimode`` subcommand shares: the one-line UsageError, the parser that raises
it, flag value parsers, and loading the LLM with stdout kept clean."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import redirect_stdout

from rich.console import Console


class UsageError(ValueError):
    """A flag or input problem found by the CLI itself."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UsageError(f"{message} (see '{self.prog} --help')")


def flag_error(exc: ValueError, fields) -> UsageError:
    """A SamplingParams ``FieldError`` as the flag that set the field (``--max-tokens ...``);
    other errors as they are."""
    field = getattr(exc, "field", None)
    if field in fields:
        return UsageError(f"--{field.replace('_', '-')} {exc.message}")
    return UsageError(str(exc))


def add_model_args(group, model_help: str, adapter_help: str) -> None:
    """The model flags ``generate``, ``chat``, ``bench`` and ``serve`` share (--model, --dtype,
    --quantization, --device, --no-cuda-graphs, --draft-adapter)."""
    group.add_argument("--model", default=None, help=model_help)
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto"], default=None,
                       help="weight dtype (default: float32 on cpu, bfloat16 on cuda; auto: "
                       "bfloat16 on CPUs with AMX or AVX512-BF16, else float32)")
    group.add_argument("--quantization", choices=["none", "int8", "int4", "w8a8", "auto"], default=None,
                       help="quantized linear layers on the CPU: int8/int4 weight-only (GGUF Q4 "
                       "blocks load exactly as int4), w8a8 int8 weights and per-token int8 "
                       "activations (x86, fastest, less accurate); auto: follow the GGUF "
                       "file's type; default: none)")
    group.add_argument("--device", choices=["cpu", "cuda"], default=None,
                       help="where to run (default: cuda when available, else cpu)")
    group.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                       help="on cuda, run every forward eagerly instead of replaying captured "
                       "CUDA graphs of the decode forward")
    group.add_argument("--draft-adapter", metavar="PATH", default=None, help=adapter_help)


def threshold_arg(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'none'; got {text!r}")


def segments_arg(text: str) -> int | None:
    if text.lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'all'; got {text!r}") from None


def load(args: argparse.Namespace, stderr: Console):
    """The LLM, with anything a library prints kept off stdout."""
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: CUDA is not available in this torch build/machine")
    from ... import LLM, CheckpointError

    with redirect_stdout(sys.stderr):
        model = args.model
        if model is None:
            from ...checkpoint.embedded import default_model_dir

            model = default_model_dir(progress=stderr.is_terminal)
        try:
            with stderr.status(f"Loading {model}"):
                return LLM(args.model, dtype=args.dtype, device=args.device,
                           draft_adapter=args.draft_adapter, progress=False, quantization=getattr(args, "quantization", None),
                           cuda_graphs=args.cuda_graphs)
        except CheckpointError as exc:
            raise UsageError(f"{_culprit(exc)}: {exc}") from None


def _culprit(exc: BaseException) -> str:
    """The flag whose file failed: the draft adapter loads after the model (adapter.py)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.sep + "adapter.py"):
            return "--draft-adapter"
        tb = tb.tb_next
    return "--model"


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n")).strip() or type(exc).__name__
