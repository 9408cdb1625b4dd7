"""llama.cpp's ``llama-diffusion-cli`` flags on ``trimode generate`` / ``chat``, so its users'
commands work: each is mapped onto trimode's own flag before SamplingParams is built.

- ``--diffusion-steps N``: llama.cpp's total denoising steps, split evenly among the blocks
  (its ``steps_per_block = steps / num_blocks``); here among the ceil(max_tokens /
  block_length) blocks of the answer: ``steps = max(1, N // blocks)`` per block, with no
  threshold unless ``--threshold`` is given (llama.cpp has none).
- ``--diffusion-algorithm 0-4`` (llama.cpp's ``diffusion_algorithm`` enum): 0 ORIGIN and
  3 RANDOM -> ``--unmask random`` (ORIGIN reveals each mask with probability quota / masks;
  trimode reveals exactly the quota, in a random order), 1 ENTROPY_BASED -> ``entropy``,
  2 MARGIN_BASED -> ``margin``, 4 CONFIDENCE_BASED (llama.cpp's default) -> ``confidence``.
- ``--diffusion-block-length N`` -> ``--block-length N``.
- ``--diffusion-visual`` -> ``--visual`` (the live view of the block being denoised).

Any of them selects ``--mode diffusion`` when no ``--mode`` is given. Knows nothing about
decoding beyond the flags.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from .common import UsageError

# llama.cpp examples/diffusion/diffusion.h, enum diffusion_algorithm
ALGORITHMS = {0: "random", 1: "entropy", 2: "margin", 3: "random", 4: "confidence"}
NAMES = "0 ORIGIN, 1 ENTROPY_BASED, 2 MARGIN_BASED, 3 RANDOM, 4 CONFIDENCE_BASED"
FLAGS = ("diffusion_steps", "diffusion_algorithm", "diffusion_block_length", "diffusion_visual")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}")
    return value


def algorithm_arg(text: str) -> int:
    if text.strip() not in {str(k) for k in ALGORITHMS}:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 4] (llama.cpp's "
                                         f"numbering: {NAMES}); got {text!r}")
    return int(text)


def add_llamacpp_args(parser) -> None:
    """The llama.cpp spellings, in their own help group."""
    g = parser.add_argument_group("llama.cpp diffusion flags (llama-diffusion-cli spellings; "
                                  "each implies --mode diffusion)")
    g.add_argument("--diffusion-steps", type=positive_int, default=None, metavar="N",
                   help="total denoising steps, split evenly among the blocks of the answer "
                   "(--steps N // ceil(max_tokens / block_length), at least 1), integer >= 1")
    g.add_argument("--diffusion-algorithm", type=algorithm_arg, default=None, metavar="0-4",
                   help=f"unmasking order, llama.cpp's numbering: {NAMES} (0 and 3: --unmask "
                   "random; 1: entropy; 2: margin; 4: confidence)")
    g.add_argument("--diffusion-block-length", type=positive_int, default=None, metavar="N",
                   help="--block-length N")
    g.add_argument("--diffusion-visual", action="store_true", help="--visual")


def given(args: argparse.Namespace) -> list[str]:
    """The llama.cpp flags on the command line, spelled as flags."""
    return ["--" + f.replace("_", "-") for f in FLAGS
            if getattr(args, f, None) is not None and getattr(args, f) is not False]


def apply(args: argparse.Namespace) -> None:
    """Map the llama.cpp flags onto trimode's in ``args`` (mode, block_length, unmask,
    visual); UsageError for a conflict. ``--diffusion-steps`` is resolved by ``steps_of``
    once the block length is known."""
    flags = given(args)
    if flags and args.mode not in (None, "diffusion"):
        raise UsageError(f"{flags[0]} needs --mode diffusion (or no --mode); got --mode {args.mode}")
    if flags:
        args.mode = "diffusion"
    if args.diffusion_block_length is not None:
        if args.block_length not in (None, args.diffusion_block_length):
            raise UsageError("--diffusion-block-length and --block-length differ; give one")
        args.block_length = args.diffusion_block_length
    if args.diffusion_algorithm is not None:
        policy = ALGORITHMS[args.diffusion_algorithm]
        if args.unmask not in (None, policy):
            raise UsageError(f"--diffusion-algorithm {args.diffusion_algorithm} is --unmask "
                             f"{policy}, but --unmask {args.unmask} was given; give one")
        args.unmask = policy
    if args.diffusion_steps is not None and args.steps is not None:
        raise UsageError("--diffusion-steps (total, llama.cpp) and --steps (per block) both "
                         "given; give one")
    args.visual = args.visual or args.diffusion_visual


def steps_of(total: int, max_tokens: int, block_length: int) -> int:
    """Per-block steps for llama.cpp's total ``--diffusion-steps``."""
    blocks = -(-max_tokens // block_length)
    return max(1, total // blocks)


def resolve_steps(params, args: argparse.Namespace, block_size: int):
    """``params`` with ``--diffusion-steps`` turned into per-block ``steps`` for the block
    length in use (the checkpoint's ``block_size`` when none was given)."""
    if getattr(args, "diffusion_steps", None) is None:
        return params
    block = params.block_length or block_size
    return replace(params, steps=steps_of(args.diffusion_steps, params.max_tokens, block))
