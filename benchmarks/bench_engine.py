"""Engine throughput and latency by concurrency, per fixed mode and for "auto".

    python benchmarks/bench_engine.py [--model M] [--concurrency 1,4,16,64] [--max-tokens 32]
        [--block-length 8] [--requests-per-client 2] [--out benchmarks]
        [--section benchmarks/sections/engine.md]

Closed loop: C clients each keep one request in flight (a new one is submitted the moment one
finishes) until ``C * requests_per_client`` requests (at least 8) have finished. Prompts are
chat-templated instructions, greedy, ``max_tokens`` each (EOS may end them earlier).
Per (mode, C): output tokens/s over the wall time, time to first token and latency p50/p95
(from submission). "auto" runs with the policy derived from the fixed-mode runs of the same
invocation: the parallel mode is used up to the largest concurrency at which the best
parallel mode beat ar (0 if none did). Also measures one packed forward against one forward
per kind (grouped) on the same mixed batch, which is the engine's packing decision.
Writes ``engine.json`` and ``engine_concurrency.png`` to ``--out`` and a Markdown section.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

PROMPTS = [
    "Count from 1 to 20 separated by commas.",
    "Write a Python function that returns the sum of a list of numbers.",
    "Give three tips for staying healthy.",
    "Explain why the sky is blue in simple terms.",
    "What is the capital of France? Answer in one sentence.",
    "List the days of the week.",
    "Describe a cat in two sentences.",
    "Write a haiku about the sea.",
]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def closed_loop(llm, params, concurrency: int, total: int, prompts: list[list[int]],
                auto=None) -> dict:
    from trimode.engine import AutoPolicy, Engine, EngineConfig

    engine = Engine(llm.model, EngineConfig(max_num_seqs=concurrency, max_model_len=512,
                                            auto=auto or AutoPolicy()))
    submitted = finished = 0
    latencies, ttfts, tokens, modes = [], [], 0, []
    start = time.perf_counter()
    for _ in range(min(concurrency, total)):
        engine.add_request(prompts[submitted % len(prompts)], params)
        submitted += 1
    while engine.has_unfinished():
        for update in engine.step():
            if not update.finished:
                continue
            seq = engine.pop_finished(update.request_id)
            finished += 1
            tokens += len(seq.generated)
            latencies.append(seq.metrics.latency_s)
            ttfts.append(seq.metrics.ttft_s or seq.metrics.latency_s)
            modes.append(seq.params.mode)
            if submitted < total:
                engine.add_request(prompts[submitted % len(prompts)], params)
                submitted += 1
    wall = time.perf_counter() - start
    return {"requests": finished, "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "forwards": engine.forwards,
            "ttft_p50_s": round(percentile(ttfts, 0.5), 3),
            "latency_p50_s": round(percentile(latencies, 0.5), 3),
            "latency_p95_s": round(percentile(latencies, 0.95), 3),
            "modes": {m: modes.count(m) for m in sorted(set(modes))}}


def packing(llm, rows_per_kind: int = 4, prefix: int = 96, block_length: int = 8,
            repeats: int = 5) -> dict:
    """Median seconds of one decode forward over a mixed batch (ar 1 token, linear_spec
    draft of block_length, diffusion denoise of block_length per row) packed into one
    forward vs one forward per kind on contiguous row ranges."""
    from trimode.engine.model_runner import forward_rows
    from trimode.decoding.sequence import Step

    model = llm.model
    n = 3 * rows_per_kind
    cache = model.new_cache(n, prefix + 2 * block_length + 2)
    g = torch.Generator().manual_seed(0)
    forward_rows(model, cache, [Step(torch.randint(100, 20000, (prefix,), generator=g).tolist(),
                                     "prefill")] * n, prefill=True)
    mask = model.config.mask_token_id
    kinds = ([Step([500], "ar", write=False)] * rows_per_kind
             + [Step([500] + [mask] * (block_length - 1), "draft", bidirectional=True, write=False,
                     adapter=True)] * rows_per_kind
             + [Step([500] + [mask] * (block_length - 1), "denoise", bidirectional=True,
                     write=False)] * rows_per_kind)

    def view(a, b):
        from trimode.engine.kv_pool import KVPool

        pool = KVPool(cache)
        pool.live = n
        return pool.view(a, b)

    def packed():
        forward_rows(model, view(0, n), kinds, prefill=False)

    def grouped():
        for k in range(3):
            a, b = k * rows_per_kind, (k + 1) * rows_per_kind
            forward_rows(model, view(a, b), kinds[a:b], prefill=False)

    out = {}
    for name, fn in (("packed", packed), ("grouped", grouped)):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name + "_s"] = round(statistics.median(times), 4)
    out["grouped_over_packed"] = round(out["grouped_s"] / out["packed_s"], 3)
    out.update(rows_per_kind=rows_per_kind, prefix=prefix, block_length=block_length)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--modes", default="ar,diffusion,linear_spec,quadratic_spec")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--section", default="benchmarks/sections/engine.md")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from trimode import LLM, SamplingParams
    from trimode.engine import AutoPolicy

    llm = LLM(args.model, progress=False)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    b = args.block_length
    fixed = {"ar": dict(mode="ar"), "diffusion": dict(mode="diffusion", block_length=b, threshold=0.9),
             "linear_spec": dict(mode="linear_spec", block_length=b),
             "quadratic_spec": dict(mode="quadratic_spec", block_length=b)}
    modes = args.modes.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    llm.generate(prompts[0], SamplingParams(max_tokens=4))  # warm-up
    results: dict[str, dict[int, dict]] = {}
    load = os.getloadavg()[0]
    for mode in modes:
        results[mode] = {}
        for c in levels:
            total = max(8, c * args.requests_per_client)
            r = closed_loop(llm, SamplingParams(max_tokens=args.max_tokens, **fixed[mode]), c, total,
                            prompts)
            results[mode][c] = r
            print(f"{mode:15s} C={c:3d} {r['tokens_per_s']:8.2f} tok/s  ttft p50 "
                  f"{r['ttft_p50_s']:.2f} s  latency p50 {r['latency_p50_s']:.2f} p95 "
                  f"{r['latency_p95_s']:.2f} s", flush=True)
    parallel = [m for m in modes if m != "ar"]
    best_parallel = max(parallel, key=lambda m: sum(results[m][c]["tokens_per_s"] for c in levels)) \
        if parallel else "linear_spec"
    wins = [c for c in levels if "ar" in results and parallel
            and results[best_parallel][c]["tokens_per_s"] > results["ar"][c]["tokens_per_s"]]
    policy = AutoPolicy(parallel_mode=best_parallel, max_parallel_batch=max(wins, default=0))
    results["auto"] = {}
    for c in levels:
        total = max(8, c * args.requests_per_client)
        params = SamplingParams(mode="auto", max_tokens=args.max_tokens, block_length=b)
        r = closed_loop(llm, params, c, total, prompts, auto=policy)
        results["auto"][c] = r
        print(f"{'auto':15s} C={c:3d} {r['tokens_per_s']:8.2f} tok/s  modes {r['modes']}", flush=True)
    pack = packing(llm, block_length=b)
    print(f"packed forward {pack['packed_s']*1000:.1f} ms, grouped {pack['grouped_s']*1000:.1f} ms "
          f"({pack['grouped_over_packed']}x)")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_avg_start": round(load, 2), "load_avg_end": round(os.getloadavg()[0], 2),
            "max_tokens": args.max_tokens, "block_length": b,
            "requests_per_client": args.requests_per_client}
    summary = {"meta": meta, "results": results, "auto_policy": {
        "parallel_mode": policy.parallel_mode, "max_parallel_batch": policy.max_parallel_batch},
        "packing": pack}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(summary, indent=1))
    write_outputs(summary, out, Path(args.section), args)
    print(json.dumps(summary))


def write_outputs(summary: dict, out: Path, section_path: Path, args) -> None:
    """The plot and the Markdown section from a summary (``engine.json``)."""
    results = {m: {int(c): r for c, r in per.items()} for m, per in summary["results"].items()}
    levels = sorted(next(iter(results.values())))
    summary = {**summary, "results": results}
    plot(results, levels, out / "engine_concurrency.png")
    section_path.parent.mkdir(parents=True, exist_ok=True)
    section_path.write_text(section(summary, levels, args))


def plot(results: dict, levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, per in results.items():
        ax.plot(levels, [per[c]["tokens_per_s"] for c in levels], marker="o", label=mode,
                linestyle="--" if mode == "auto" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title("trimode engine, embedded model, fp32 CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def section(summary: dict, levels: list[int], args) -> str:
    meta, results, pack = summary["meta"], summary["results"], summary["packing"]
    lines = ["## Engine: continuous batching by concurrency", "",
             f"Date {meta['date']}; {meta['cpus']} CPUs ({meta['machine']}), "
             f"{meta['threads']} torch threads, torch {meta['torch']}; 1-minute load average "
             f"{meta['load_avg_start']} at start, {meta['load_avg_end']} at end (other jobs shared "
             "the machine). Embedded model, fp32, greedy, closed loop: C clients each keep one "
             f"request in flight; max(8, {meta['requests_per_client']} x C) requests of up to "
             f"{meta['max_tokens']} tokens; block_length {meta['block_length']} (diffusion "
             "threshold 0.9).", "",
             "| mode | " + " | ".join(f"C={c} tok/s" for c in levels) + " | "
             + " | ".join(f"C={c} p50 / p95 s" for c in levels) + " |",
             "|---|" + "---:|" * (2 * len(levels))]
    for mode, per in results.items():
        lines.append(f"| {mode} | " + " | ".join(f"{per[c]['tokens_per_s']:.1f}" for c in levels)
                     + " | " + " | ".join(f"{per[c]['latency_p50_s']:.1f} / {per[c]['latency_p95_s']:.1f}"
                                          for c in levels) + " |")
    best = {c: max((m for m in results if m != "auto"), key=lambda m: results[m][c]["tokens_per_s"])
            for c in levels}
    lines += ["", "auto policy derived in this run: " + json.dumps(summary["auto_policy"]) + "; "
              + "; ".join(f"C={c}: auto {results['auto'][c]['tokens_per_s']:.1f} vs best fixed "
                          f"({best[c]}) {results[best[c]][c]['tokens_per_s']:.1f} tok/s "
                          f"({results['auto'][c]['tokens_per_s'] / results[best[c]][c]['tokens_per_s']:.2f}x)"
                          for c in levels)]
    if 1 in levels and 16 in levels:
        lines.append("")
        lines.append("Continuous batching at C=16 against one request at a time (C=1), same mode: "
                     + "; ".join(f"{m} {results[m][16]['tokens_per_s'] / results[m][1]['tokens_per_s']:.2f}x"
                                 for m in results))
    lines += ["", f"Packing (the engine's choice): one decode forward over {3 * pack['rows_per_kind']} "
              f"rows ({pack['rows_per_kind']} ar, {pack['rows_per_kind']} linear_spec drafts, "
              f"{pack['rows_per_kind']} diffusion denoise blocks of {pack['block_length']}, after a "
              f"{pack['prefix']}-token prefix): packed {pack['packed_s'] * 1000:.1f} ms, one forward "
              f"per kind {pack['grouped_s'] * 1000:.1f} ms ({pack['grouped_over_packed']}x).", "",
              "![tokens/s by concurrency](engine_concurrency.png)", "", "Command:", "", "```",
              "python benchmarks/bench_engine.py --concurrency " + args.concurrency
              + f" --max-tokens {args.max_tokens} --block-length {args.block_length}"
              + f" --requests-per-client {meta['requests_per_client']}", "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
