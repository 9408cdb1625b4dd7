"""Self-distillation data: the base model's own greedy answers to training prompts.

A greedy answer is its own greedy chain, so every position of it is an exact draft target
for linear_spec and a consistent denoising target for diffusion (see the draft-adapter
experiment, docs/draft-adapter-experiment.md). Answers are written as chat
jsonl (``{"messages": [user, assistant]}``) one batch at a time, so a partial file is usable.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def generate(out: Path, prompts: list[str], model=None, max_tokens: int = 128,
             batch: int = 32, resume: bool = True) -> int:
    """Append greedy ``ar`` answers for ``prompts`` to ``out``; returns answer tokens written."""
    from ..entrypoints.llm import LLM
    from ..params import SamplingParams

    done = len(out.read_text().splitlines()) if resume and out.exists() else 0
    llm = LLM(model, draft_adapter=False, max_batch_size=batch, progress=False)
    params = SamplingParams(mode="ar", max_tokens=max_tokens)
    total, start = 0, time.time()
    with out.open("a") as f:
        for k in range(done, len(prompts), batch):
            chunk = prompts[k : k + batch]
            outs = llm.chat([[{"role": "user", "content": p}] for p in chunk], params)
            for p, o in zip(chunk, outs):
                f.write(json.dumps({"messages": [{"role": "user", "content": p},
                                                 {"role": "assistant", "content": o.text}]}) + "\n")
                total += len(o.token_ids)
            f.flush()
            print(f"{k + len(chunk)}/{len(prompts)} prompts, {total} tokens, "
                  f"{total / (time.time() - start):.1f} tok/s", flush=True)
    return total


def main(argv: list[str] | None = None) -> None:
    from .corpora import TRAIN_SEED, training_prompts

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=TRAIN_SEED)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--start", type=int, default=0, help="first prompt (a shard's offset)")
    p.add_argument("--limit", type=int, default=None, help="prompts to answer from --start")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    prompts = training_prompts(args.seed)[args.start:]
    prompts = prompts if args.limit is None else prompts[: args.limit]
    generate(args.out, prompts, max_tokens=args.max_tokens, batch=args.batch)


if __name__ == "__main__":
    main()
