"""The one command that reproduces the embedded model's shipped tri-mode adapter.

``python -m trimode.training.recipe OUT`` (2 generation workers and 2 training threads, as
shipped; about 100 minutes on the 2-core CPU this was made on: 17 of generation, 83 of
training):
1. ``OUT/selfgen.jsonl``: the base model's greedy answers (128 tokens max, batches of 32)
   to all ``PROMPTS`` training prompts of ``corpora.training_prompts(TRAIN_SEED)``, made by
   ``--workers`` 1-thread ``trimode.training.selfgen`` processes on contiguous shards
   (each shard file resumes where it stopped);
2. ``trimode train`` on it with ``RECIPE`` below: a draft/denoise LoRA (base frozen, so ar,
   linear_spec and quadratic_spec output stays the base model's exactly) trained on 32
   sampled decode-time blocks per 256-token row (``--draft-blocks``: seed + masks as a
   linear_spec draft, random-ratio masks as a diffusion pass, all masks as a quadratic_spec
   segment), labelled by the base's own argmax and distribution.
3. stage 2, ``WARM``: the stage-1 adapter (``OUT/run/adapter``, or ``--stage1 DIR`` to
   start from an adapter already made, such as the previously shipped one) trained 600 more
   steps with certainty forcing (dParallel: the adapter's entropy where its argmax is
   already the base's) and a lower KL weight, into ``OUT/run2``.
The adapter lands in ``OUT/run2/adapter``; copy it to ``src/trimode/weights/smollm2-tri``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

PROMPTS = 1740  # every prepared training prompt
RECIPE = dict(method="draft_lora", lora_rank=16, lora_alpha=32.0, denoise=True,
              targets="teacher", block_length=8, draft_blocks=32, draft_layout_rate=0.6,
              denoise_layout_rate=0.25, masked_layout_rate=0.15, kl_weight=0.5,
              seq_length=256, pack=False, batch_size=1, grad_accum=1, steps=2000, lr=1e-3,
              warmup_steps=20, min_lr_ratio=0.1, seed=0, eval_fraction=0.01,
              eval_every=500, eval_prompts=4, eval_max_tokens=32, save_every=25)
WARM = {**RECIPE, "steps": 600, "lr": 5e-4, "kl_weight": 0.1, "certainty_weight": 0.5,
        "eval_every": 0}


def self_distill(out: Path, prompts: int, workers: int) -> Path:
    """Answer the first ``prompts`` training prompts in ``workers`` parallel shards and
    join them, in prompt order, into ``out/selfgen.jsonl``."""
    data = out / "selfgen.jsonl"
    if data.exists() and len(data.read_text().splitlines()) >= prompts:
        return data
    size = -(-prompts // workers)
    shards = [(out / f"selfgen.part{i}.jsonl", i * size, min(size, prompts - i * size))
              for i in range(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen([sys.executable, "-m", "trimode.training.selfgen", str(path),
                              "--start", str(start), "--limit", str(n), "--threads", "1"],
                             env=env) for path, start, n in shards if n > 0]
    if any(job.wait() for job in jobs):
        raise RuntimeError("self-distillation: a generation worker failed (see its output)")
    lines = [line for path, _, n in shards if n > 0 for line in path.read_text().splitlines()]
    if len(lines) < prompts:
        raise RuntimeError(f"self-distillation: {len(lines)} answers for {prompts} prompts")
    data.write_text("\n".join(lines) + "\n")
    return data


def main(argv: list[str] | None = None) -> None:
    import torch

    from .trainer import TrainConfig, train

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--stage1", type=Path, default=None, metavar="DIR",
                   help="skip stage 1 and warm-start stage 2 from this adapter directory")
    p.add_argument("--threads", type=int, default=2, help="training threads")
    p.add_argument("--workers", type=int, default=2, help="generation processes (1 thread each)")
    p.add_argument("--prompts", type=int, default=PROMPTS,
                   help="how many training prompts to answer (the first of the shuffled list)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = self_distill(args.out, args.prompts, args.workers)
    torch.set_num_threads(args.threads)
    stage1 = args.stage1
    if stage1 is None:
        train(TrainConfig(data=(str(data),), out=str(args.out / "run"), **RECIPE), resume=True)
        stage1 = args.out / "run" / "adapter"
    train(TrainConfig(data=(str(data),), out=str(args.out / "run2"),
                      init_adapter=str(stage1), **WARM), resume=True)


if __name__ == "__main__":
    main()
