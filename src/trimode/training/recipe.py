"""The one command that reproduces the embedded model's shipped tri-mode adapter.

``python -m trimode.training.recipe OUT`` (1 thread, as shipped):
1. ``OUT/selfgen.jsonl``: the base model's greedy answers (128 tokens max) to the first
   ``PROMPTS`` training prompts of ``corpora.training_prompts(TRAIN_SEED)`` (resumes a
   partial file);
2. ``trimode train`` on it with ``RECIPE`` below: a draft/denoise LoRA on the noisy stream
   (base frozen, so ar and linear_spec output are the base model's exactly), masked
   positions labelled by the base's own argmax where it is an exact greedy chain.
The adapter lands in ``OUT/run/adapter``; copy it to ``src/trimode/weights/smollm2-tri``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PROMPTS = 320  # of 1,740: what the shared 2 cores answered in about 20 minutes
RECIPE = dict(method="draft_lora", lora_rank=16, lora_alpha=32.0, denoise=True,
              targets="teacher", block_length=8, alpha=0.3, draft_layout_rate=0.3,
              seq_length=256, pack=True, batch_size=1, grad_accum=1, steps=540, lr=1e-3,
              warmup_steps=20, min_lr_ratio=0.1, seed=0, eval_fraction=0.02, eval_every=150,
              eval_prompts=4, eval_max_tokens=32, save_every=25)


def main(argv: list[str] | None = None) -> None:
    import torch

    from .corpora import TRAIN_SEED, training_prompts
    from .selfgen import generate
    from .trainer import TrainConfig, train

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=RECIPE["steps"])
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop and save at this step (the schedule stays that of --steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=PROMPTS,
                   help="how many training prompts to answer (the first of the shuffled list)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "selfgen.jsonl"
    prompts = training_prompts(TRAIN_SEED)[: args.prompts]
    have = len(data.read_text().splitlines()) if data.exists() else 0
    if have < len(prompts):
        generate(data, prompts, max_tokens=128)
    config = TrainConfig(data=(str(data),), out=str(args.out / "run"),
                         **{**RECIPE, "steps": args.steps})
    train(config, resume=True, stop_after=args.stop_after)


if __name__ == "__main__":
    main()
