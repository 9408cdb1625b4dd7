"""``trimode train``: flags -> TrainConfig -> ``train``. Bad flags fail before any model
is loaded with one ``error: ...`` line naming the flag (exit 2, like ``generate``)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from .trainer import METHODS, TARGETS, TrainConfig

EXAMPLES = """examples:
  trimode train data.jsonl --out runs/a --steps 300                  # draft LoRA, joint noising
  trimode train notes.txt --out runs/b --method full --alpha 0.3     # full parameters
  python -m trimode.training.recipe runs/embedded                    # the shipped adapter
"""


def add_train_parser(sub, parser_class) -> None:
    p = sub.add_parser("train", help="fine-tune with the joint AR + diffusion objective",
                       description="Fine-tune a checkpoint with the joint AR + diffusion "
                       "objective (dual-stream block-diff mask, docs/spec.md 2.3).", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="+", help=".txt files, or .jsonl with {'text'} or "
                   "{'messages'} (chat: loss on assistant turns only)")
    p.add_argument("--out", required=True, help="run directory: checkpoint.pt, train_log.jsonl, "
                   "adapter/ or model/")
    p.add_argument("--model", default=None, help="checkpoint to train (default: embedded model)")
    p.add_argument("--method", choices=METHODS, default="draft_lora",
                   help="draft_lora: LoRA on the noisy stream only, base frozen (AR untouched); "
                   "full: all parameters, both streams (default: draft_lora)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--no-denoise", dest="denoise", action="store_false",
                   help="mark the adapter for linear_spec drafts only, not diffusion denoising")
    p.add_argument("--targets", choices=TARGETS, default="data",
                   help="labels of masked positions: the data, or the clean stream's own argmax "
                   "where it is an exact greedy chain (default: data)")
    p.add_argument("--block-length", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.3, help="diffusion loss weight, >= 0")
    p.add_argument("--eps", type=float, default=1e-3, help="mask rate floor: p = (1-eps) t + eps")
    p.add_argument("--draft-layout-rate", type=float, default=0.0,
                   help="fraction of rows noised as linear_spec drafts (seed + masks), in [0, 1]")
    p.add_argument("--draft-blocks", type=int, default=0,
                   help="draft_lora only: sample this many decode-time blocks per row (each "
                   "sees the clean keys before its start, as at inference) instead of the "
                   "aligned dual-stream noising; --draft-layout-rate, --denoise-layout-rate and "
                   "--masked-layout-rate then weigh the seed+masks, random-ratio and all-masks "
                   "layouts (default 0: aligned noising)")
    p.add_argument("--denoise-layout-rate", type=float, default=0.3)
    p.add_argument("--masked-layout-rate", type=float, default=0.2)
    p.add_argument("--kl-weight", type=float, default=0.5,
                   help="with --draft-blocks: weight of KL(base || adapter) against CE on the "
                   "base's argmax, in [0, 1]")
    p.add_argument("--certainty-weight", type=float, default=0.0,
                   help="with --draft-blocks: weight of the certainty-forcing term (the "
                   "adapter's entropy where its argmax is already right), in [0, 10]")
    p.add_argument("--init-adapter", default=None, metavar="DIR",
                   help="draft_lora: start from this saved adapter (same rank) instead of "
                   "PEFT's initialisation")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--no-pack", dest="pack", action="store_false",
                   help="one example per row (truncated, padded) instead of packing")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor, in [0, 1]")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=0, help="steps (0: only at the end)")
    p.add_argument("--eval-prompts", type=int, default=4)
    p.add_argument("--eval-max-tokens", type=int, default=32)
    p.add_argument("--save-every", type=int, default=0, help="steps (0: only at the end)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start fresh even if OUT/checkpoint.pt exists")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """Namespace -> TrainConfig; a ValueError names the flag (``--block-length ...``)."""
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["data"] = tuple(values["data"])
    try:
        return TrainConfig(**values)
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        raise ValueError(f"--{field.replace('_', '-')} {rest}" if field in names else str(exc)) \
            from None


def run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .trainer import train

    config = train_config(args)
    for path in config.data:
        if not Path(path).is_file():
            raise ValueError(f"data: {path} does not exist or is not a file")
    trainer, log = train(config, resume=args.resume)
    print(summary_line(trainer.step, log, config.out))
    return 0


def summary_line(steps: int, log: list[dict], out) -> str:
    """One line: steps, the last training step's losses, the held-out evaluation (or why
    there is none), where the result went."""
    last = next((r for r in reversed(log) if "ar_loss" in r), None)
    final = log[-1] if log else {}
    parts = [f"trained {steps} step{'' if steps == 1 else 's'}"]
    if last is not None:
        parts.append(f"last step: ar_loss {last['ar_loss']:.4f}, diff_loss {last['diff_loss']:.4f}")
    held = {k: v for k, v in final.items() if k.startswith("eval_") or k in
            ("diffusion_tokens_per_forward", "linear_spec_acceptance_length")}
    if held:
        parts.append("held-out: " + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}"
                                                for k, v in held.items()
                                                if isinstance(v, (int, float))))
    else:
        parts.append("no held-out evaluation (--eval-fraction 0 or too little data)")
    return "; ".join(parts) + f"; wrote {out}"
