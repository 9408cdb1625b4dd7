"""Paged KV (issue 17): memory and concurrency at a fixed ``kv_cache_memory``, decode speed
through the page tables, and time to first token with and without the prefix cache.

    python benchmarks/bench_paged.py --compare OLD_SRC [--kv-cache-mib 128] [--requests 16]
        [--threads 1] [--section benchmarks/sections/paged.md]

On the embedded model (SmolLM2-135M, fp32, CPU), each measurement in a fresh process:

- capacity: ``--requests`` greedy ar requests (prompts of 50-500 random ids, 4 tokens each,
  max_model_len 1024, max_batch_size 64) submitted at once to an engine with
  ``kv_cache_memory`` fixed; the most requests running in one step, the KV memory the pool
  touched (rows zeroed on first use before; pages after) and the process's resident memory
  (VmRSS after loading, VmHWM at the end). Before (``OLD_SRC``, a ``src/`` folder of the
  code before paging) and after run alternately.
- decode: 8 greedy ar requests (300-token prompts) decoding 24 tokens together; the median
  wall and process-CPU time of an engine step after the prefill, before and after
  (attention gathers every row's pages per layer after).
- ttft: a ~1,000-token system prompt followed by a short question, one request at a time,
  alternating an engine with the prefix cache and one without (same model, same process).

The machine may be shared: compare columns measured in the same run, and read the CPU-time
columns where the wall clock is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", default=None, metavar="OLD_SRC",
                   help="src/ folder of the code before paging (capacity and decode columns)")
    p.add_argument("--kv-cache-mib", type=int, default=128)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--ttft-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--section", default=None, help="write a markdown section here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _llm(args, **kw):
    import torch

    from trimode import LLM

    torch.set_num_threads(args.threads)
    return LLM(None, progress=False, max_model_len=1024, **kw)


def _prompts(n: int, lengths: tuple[int, int], seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randint(1000, 40000) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def child_capacity(args) -> dict:
    from trimode import SamplingParams

    llm = _llm(args, max_batch_size=64, kv_cache_memory=args.kv_cache_mib << 20)
    engine, rss = llm.engine, _status("VmRSS")
    params = SamplingParams(mode="ar", max_tokens=4, temperature=0)
    for prompt in _prompts(args.requests, (50, 500), 1):
        engine.add_request(prompt, params)
    most, start, cpu = 0, time.perf_counter(), time.process_time()
    while engine.has_unfinished():
        engine.step()
        most = max(most, len(engine.running))
    pool = engine.pool
    if hasattr(pool, "allocator"):
        touched = (pool.allocator.touched - 1) * engine.kv_bytes // pool.allocator.pages
    else:
        touched = pool.touched * engine.kv_bytes // pool.rows
    return {"max_running": most, "kv_touched": touched, "rss_loaded": rss,
            "rss_peak": _status("VmHWM"), "wall_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu}


def child_decode(args) -> dict:
    from trimode import SamplingParams

    llm = _llm(args, max_batch_size=8)
    engine = llm.engine
    for prompt in _prompts(8, (300, 300), 2):
        engine.add_request(prompt, SamplingParams(mode="ar", max_tokens=24, temperature=0))
    engine.step()  # prefill
    walls, cpus = [], []
    while engine.has_unfinished():
        t, c = time.perf_counter(), time.process_time()
        engine.step()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return {"step_ms": 1e3 * statistics.median(walls), "step_cpu_ms": 1e3 * statistics.median(cpus)}


def child_ttft(args) -> dict:
    from trimode import SamplingParams
    from trimode.engine import Engine, EngineConfig

    llm = _llm(args, max_batch_size=4)
    system = llm.tokenizer.encode(" ".join(f"Rule {k}: answer politely, cite sources and keep "
                                           f"numbers exact ({k * 7 % 13})." for k in range(60)))
    system = system[:1000]
    off = Engine(llm.model, EngineConfig(max_num_seqs=4, max_model_len=1024, min_shared_prefix=0))
    engines = {"cache": llm.engine, "no cache": off}
    out: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(args.ttft_rounds + 1):  # round 0 fills the cache (not counted)
        question = llm.tokenizer.encode(f" Question {r}: what is {r} times {r + 3}?")
        for name, engine in engines.items():
            rid = engine.add_request(system + question, SamplingParams(max_tokens=1, temperature=0))
            while engine.has_unfinished():
                engine.step()
            if r:
                out[name].append(engine.output(rid).metrics.ttft_s)
    return {"prompt_tokens": len(system) + len(question), **{k: statistics.median(v)
                                                             for k, v in out.items()},
            "hit_rate": llm.engine.stats()["prefix_cache_hit_rate"]}


def run_child(kind: str, src: Path, args) -> dict:
    argv = [sys.executable, __file__, "--child", kind, "--threads", str(args.threads),
            "--kv-cache-mib", str(args.kv_cache_mib), "--requests", str(args.requests),
            "--ttft-rounds", str(args.ttft_rounds)]
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(globals()[f"child_{args.child}"](args)))
        return 0
    after = HERE.parent / "src"
    sides = {"after": after} if args.compare is None else {"before": Path(args.compare), "after": after}
    results: dict[str, dict] = {side: {} for side in sides}
    for kind in ("capacity", "decode"):
        for side, src in sides.items():
            results[side][kind] = run_child(kind, src, args)
            print(side, kind, results[side][kind], flush=True)
    results["after"]["ttft"] = run_child("ttft", after, args)
    print("ttft", results["after"]["ttft"], flush=True)
    text = section(args, results)
    print(text)
    if args.section:
        Path(args.section).write_text(text)
    return 0


def _cpu() -> str:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("Model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                  if ln.startswith("Flags")), [])
    isa = [f for f in flags if f.startswith(("avx512", "amx"))]
    return f"{model} ({', '.join(isa[:6]) or 'no AVX-512'})"


def section(args, results: dict) -> str:
    import torch

    mib = 1 << 20
    sides = [s for s in ("before", "after") if s in results]
    load = os.getloadavg()[0]
    lines = ["## Paged KV cache and prefix cache (issue 17)", "",
             f"`python benchmarks/bench_paged.py --compare OLD_SRC --kv-cache-mib "
             f"{args.kv_cache_mib} --requests {args.requests} --threads {args.threads}` on the "
             "embedded model (SmolLM2-135M, fp32), each measurement in a fresh process. Before: "
             "one whole `max_model_len` row per request (rows zeroed on first use); after: "
             "16-position pages handed out as requests grow. "
             f"{time.strftime('%Y-%m-%d')}; {_cpu()}; torch {torch.__version__}; "
             f"{args.threads} thread(s). The machine was shared (1-minute load average "
             f"{load:.0f} at the end of the run on {os.cpu_count()} cores): times are "
             "noisy, compare columns of this table only.", "",
             f"**Capacity** at kv_cache_memory {args.kv_cache_mib} MiB, max_model_len 1024, "
             f"{args.requests} greedy ar requests (prompts 50-500 tokens, 4 tokens each) "
             "submitted at once:", "",
             "| | " + " | ".join(sides) + " |", "|---|" + "---:|" * len(sides)]
    cap = {s: results[s]["capacity"] for s in sides}
    rows = [("most requests running at once", lambda c: f"{c['max_running']}"),
            ("KV memory touched (MiB)", lambda c: f"{c['kv_touched'] / mib:.0f}"),
            ("process RSS after loading (MiB)", lambda c: f"{c['rss_loaded'] / mib:.0f}"),
            ("process peak RSS (MiB)", lambda c: f"{c['rss_peak'] / mib:.0f}"),
            ("wall time for all requests (s)", lambda c: f"{c['wall_s']:.1f}"),
            ("process CPU time (s)", lambda c: f"{c['cpu_s']:.1f}")]
    lines += [f"| {name} | " + " | ".join(fmt(cap[s]) for s in sides) + " |" for name, fmt in rows]
    lines += ["", "Before, the pool held whole rows of max_model_len + scratch, so the memory "
              "capped concurrency whatever the prompts; after, the same memory holds the pages "
              "the requests use, then the pages finished requests leave in the prefix cache "
              "(kept until evicted), so touched KV memory grows towards kv_cache_memory. "
              "Peak RSS includes the activations of the larger prefill batches."]
    dec = {s: results[s]["decode"] for s in sides}
    lines += ["", "**Decode step** (8 greedy ar requests, 300-token prompts, median step of 24 "
              "after the prefill; after: attention gathers each row's pages per layer):", "",
              "| | " + " | ".join(sides) + " |", "|---|" + "---:|" * len(sides),
              "| wall ms per step | " + " | ".join(f"{dec[s]['step_ms']:.1f}" for s in sides) + " |",
              "| CPU ms per step | " + " | ".join(f"{dec[s]['step_cpu_ms']:.1f}" for s in sides) + " |"]
    t = results["after"]["ttft"]
    lines += ["", f"**Time to first token**, a {t['prompt_tokens']}-token prompt (a 1,000-token "
              "system prompt + a short question that changes every time), one request at a "
              f"time, median of {args.ttft_rounds} after one warm-up request each, engines "
              "alternating:", "",
              "| prefix cache | TTFT (s) |", "|---|---:|",
              f"| off | {t['no cache']:.3f} |", f"| on | {t['cache']:.3f} |", "",
              f"With the cache the repeated system prompt is prefilled once: prompt tokens read "
              f"from cached pages, warm-up included: {100 * t['hit_rate']:.0f}%.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
