"""Exactness under quantized / bf16 kernels on the embedded model: how many held-out prompts
give linear_spec and quadratic_spec exactly ar's greedy tokens, and ar at batch 1 exactly
ar batched, with the batch-invariant attention (``model.invariant.attend``) off and on.

    python benchmarks/bench_invariance.py [--dtype bfloat16] [--quantization int8|int4|none]
        [--prompts 3] [--tokens 48] [--gguf FILE]

Default: trimode's own Q8_0 export of the embedded model loaded as int8 (as bench_llamacpp).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from trimode import LLM, SamplingParams
    from trimode.checkpoint.embedded import shipped_adapter
    from trimode.model.invariant import set_batch_invariant
    from trimode.quant.cpu import describe
    from trimode.training.corpora import eval_prompts

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quantization", default="int8")
    ap.add_argument("--prompts", type=int, default=3, help="per held-out set (3 sets)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("cpu:", describe(), "| machine shared with other jobs", flush=True)
    gguf = args.gguf
    if gguf is None:
        from trimode.checkpoint.gguf_export import export_gguf

        gguf = export_gguf(None, Path(tempfile.mkdtemp()) / "smollm2-q8_0.gguf", "q8_0", arch="dream")
    llm = LLM(str(gguf), dtype=args.dtype, draft_adapter=shipped_adapter() or False, progress=False,
              quantization=None if args.quantization == "none" else args.quantization)
    sets = eval_prompts(n_gsm=args.prompts)
    prompts = [[{"role": "user", "content": sets[n][i]}] for i in range(args.prompts)
               for n in ("mt_bench", "humaneval", "gsm_symbolic")]
    greedy = dict(max_tokens=args.tokens, temperature=0)
    for invariant in (False, True):
        set_batch_invariant(llm.model, invariant)
        start = time.time()
        ar = [o.token_ids for o in llm.chat(prompts, SamplingParams(mode="ar", **greedy))]
        row = {"invariant_attention": invariant, "prompts": len(prompts)}
        for mode in ("linear_spec", "quadratic_spec"):
            outs = llm.chat(prompts, SamplingParams(mode=mode, block_length=8, **greedy))
            row[f"{mode} == ar"] = sum(o.token_ids == a for o, a in zip(outs, ar))
        single = [llm.chat([p], SamplingParams(mode="ar", **greedy))[0].token_ids for p in prompts[:4]]
        row["ar batch 1 == batched (first 4)"] = sum(a == b for a, b in zip(single, ar))
        row["seconds"] = round(time.time() - start)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
