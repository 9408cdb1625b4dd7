"""``trimode bench``: flags, loading, progress on stderr, tables and one final JSON line on
stdout, and (with ``--out DIR``) ``result.json``, the plots and ``crossover.json`` in DIR.

Flags are validated into a ``BenchConfig`` and the dataset is loaded before the model, so bad
input fails fast with one ``error: ...`` line (exit 2), like the other subcommands.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from ..defaults import MODES, THRESHOLD
from .datasets import DATASETS

EXAMPLES = """examples:
  trimode bench --max-tokens 32 --per-category 1
  trimode bench --modes ar,diffusion,linear_spec --dataset mt_bench --per-category 2 \\
      --batch-sizes 1,4,16 --block-lengths 8,16,32 --peer transformers --out bench_out
  trimode bench --dataset speed_bench.jsonl --device cuda --dtype bfloat16 --model PATH
"""


def _ints(flag: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            values = ()
        if not values or any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"{flag} must be comma-separated integers >= 1; "
                                             f"got {text!r}")
        return values
    return parse


def _modes(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in values if v not in MODES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"--modes must be a comma-separated list of "
                                         f"{', '.join(MODES)}; got {text!r}")
    return values


def add_parser(sub) -> None:
    """Register the ``bench`` subcommand on the ``trimode`` subparsers."""
    from ..entrypoints.cli.common import threshold_arg

    p = sub.add_parser("bench", help="per-mode, per-category benchmarks",
                       description="Decode a prompt set in every mode; print per-mode, "
                       "per-category metrics, the batch sweep, the peer ratio and the "
                       "speed-of-light analysis as tables and one final JSON line.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    m.add_argument("--device", choices=["cpu", "cuda"], default=None)
    m.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on cuda, run every forward eagerly (no captured CUDA graphs)")
    m.add_argument("--draft-adapter", metavar="PATH", default=None)
    m.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's)")
    b = p.add_argument_group("benchmark")
    b.add_argument("--modes", type=_modes, default=("ar", "diffusion", "linear_spec"),
                   help="comma-separated modes (default: ar,diffusion,linear_spec)")
    b.add_argument("--dataset", default="speed_sample", metavar="NAME|PATH",
                   help=f"{', '.join(DATASETS)}, or a .jsonl in SPEED-Bench format "
                   "(category + turns) (default: speed_sample)")
    b.add_argument("--per-category", type=int, default=2, metavar="N",
                   help="prompts per category, integer >= 1 (default: 2)")
    b.add_argument("--batch-sizes", type=_ints("--batch-sizes"), default=(1, 4, 16),
                   help="comma-separated (default: 1,4,16); per-category numbers use the smallest")
    b.add_argument("--block-lengths", type=_ints("--block-lengths"), default=(8,),
                   help="comma-separated, for the parallel modes (default: 8)")
    b.add_argument("--threshold", type=threshold_arg, default=THRESHOLD["diffusion"],
                   metavar="X|none", help="diffusion threshold in [0, 1], or 'none' "
                   f"(default: {THRESHOLD['diffusion']})")
    b.add_argument("--max-tokens", type=int, default=64, metavar="N", help="(default: 64)")
    b.add_argument("--peer", choices=["transformers", "none"], default="none",
                   help="run transformers' generate on the same weights (default: none)")
    b.add_argument("--no-sol", action="store_true", help="skip the speed-of-light oracle")
    b.add_argument("--sol-budget", type=int, default=5000, metavar="N",
                   help="oracle: predicted states per block and search (default: 5000, the "
                   "paper's)")
    b.add_argument("--out", default=None, metavar="DIR",
                   help="write result.json, the plots and crossover.json there")


def config_from(args):
    from .runner import BenchConfig

    try:
        return BenchConfig(modes=args.modes, block_lengths=args.block_lengths,
                           batch_sizes=args.batch_sizes, threshold=args.threshold,
                           max_tokens=args.max_tokens,
                           peer=None if args.peer == "none" else args.peer,
                           sol=not args.no_sol, sol_budget=args.sol_budget)
    except ValueError as exc:
        from ..entrypoints.cli.common import UsageError

        field, _, rest = str(exc).partition(" ")
        raise UsageError(f"--{field.replace('_', '-')} {rest}") from None


def run(args) -> int:
    """The ``bench`` subcommand body; returns the exit code."""
    import torch

    from ..entrypoints.cli.common import UsageError, load
    from ..decoding.registry import needs_mask
    from . import datasets, report, suite

    config = config_from(args)
    if args.out:  # the plots need matplotlib: say so now, not after the run
        from ..extras import require

        require("bench", "matplotlib")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be an integer >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.per_category < 1:
        raise UsageError(f"--per-category must be an integer >= 1; got {args.per_category}")
    try:
        items = datasets.load(args.dataset, args.per_category)
    except (OSError, ValueError) as exc:  # a missing or malformed file: name the flag
        detail = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.strerror \
            else str(exc)
        raise UsageError(f"--dataset {detail}") from None
    stderr = Console(stderr=True, highlight=False)
    llm = load(args, stderr)
    if any(needs_mask(m) for m in config.modes) and llm.config.mask_token_id is None:
        raise UsageError("--modes: this checkpoint has no mask_token_id; only ar can run")
    with stderr.status("benchmarking") as status:
        def log(line: str) -> None:
            stderr.print(line, style="dim", soft_wrap=True)
            status.update(line)

        result = suite.benchmark(llm, items, config, log)
    result["dataset"] = args.dataset
    result["model"] = args.model or "embedded SmolLM2-135M-Instruct"
    report.print_tables(result, Console(highlight=False, width=160))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        report.plot(result, out)
        report.write_crossover(result, out / "crossover.json")
        _write_cost(llm, config.batch_sizes, out / "forward_cost.json", stderr)
    print(report.json_line(result), flush=True)
    return 0


def _write_cost(llm, batch_sizes, path: Path, stderr) -> None:
    """``forward_cost.json`` next to ``crossover.json``: the curve ``mode="auto"`` plans with
    (``trimode serve --auto-cost DIR``)."""
    from .forward_cost import cost_curve

    with stderr.status("measuring the forward-cost curve"):
        curve = cost_curve(llm.model, sorted(set(batch_sizes)))
    path.write_text(json.dumps(curve, indent=1) + "\n")
