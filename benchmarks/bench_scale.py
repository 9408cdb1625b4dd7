"""Scaling out on this machine: tensor_parallel_size 1 vs 2, and 1 vs 2 Ray Serve replicas.

    python benchmarks/bench_scale.py [--part tp,ray] [--rounds 3] [--max-tokens 32]
        [--section benchmarks/sections/scale.md]

tp: a random NLD-shaped checkpoint (hidden 1024, 16 heads / 8 KV heads, FFN 4096, 8 layers,
  the embedded model's 49,152-token vocabulary; SmolLM2-135M itself has 9 heads, which 2
  ranks cannot split) decoded greedily by ``LLM(tensor_parallel_size=1)`` (all cores, and
  one thread) and ``=2`` (gloo, one thread per rank), interleaved round by round: ar at
  batch 1 and 8, linear_spec at batch 8;
  outputs must be token-identical. tokens/s = generated tokens / wall time.
ray: the embedded model behind Ray Serve (``trimode.entrypoints.ray``) with 1 then 2
  replicas (one CPU each), 16 concurrent ``/v1/completions`` requests (ar, greedy), rounds
  interleaved by redeploying; tokens/s = completion tokens / wall time of the 16.
Prints the CPU model and flags and the load average: the machine is shared, so read the
ratios, not the absolute numbers. Multi-GPU numbers need a multi-GPU machine (not run).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GEOMETRY = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=8, head_dim=64,
                tie_word_embeddings=False)
PROMPTS = ["Count from 1 to 20 separated by commas.", "Give three tips for staying healthy.",
           "Explain why the sky is blue in simple terms.", "List the days of the week.",
           "Write a haiku about the sea.", "Describe a cat in two sentences.",
           "What is the capital of France?", "Write a Python function that adds two numbers."]


def cpu_info() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    simd = " ".join(f for f in flags if f.startswith(("avx", "amx", "sse4")))
    return (f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} cores; SIMD: {simd}; "
            f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def synthetic_checkpoint(directory: Path) -> Path:
    """Random weights in the NLD layout with the embedded model's tokenizer."""
    from safetensors.torch import save_file

    from trimode.model.config import ModelConfig
    from trimode.checkpoint.embedded import default_model_dir
    from trimode.model.model import TriModeModel

    source = Path(default_model_dir(progress=False))
    raw = json.loads((source / "config.json").read_text())
    raw.update(GEOMETRY)
    raw.pop("trimode_source", None)
    torch.manual_seed(0)
    model = TriModeModel(ModelConfig.from_dict(raw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(raw))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, directory / name)
    return directory


def timed(llm, prompts, params) -> tuple[float, int, list]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    return wall, sum(len(o.token_ids) for o in outs), [o.token_ids for o in outs]


def bench_tp(args) -> list[dict]:
    from trimode import LLM, SamplingParams

    ckpt = synthetic_checkpoint(Path(tempfile.mkdtemp(prefix="bench_scale_")) / "nld-shaped")
    torch.set_num_threads(os.cpu_count())
    single = LLM(str(ckpt), draft_adapter=False, max_batch_size=8)
    sharded = LLM(str(ckpt), draft_adapter=False, max_batch_size=8, tensor_parallel_size=2)
    rows = []
    cores = os.cpu_count()
    runs = (("tp1", single, cores), ("tp1_1thread", single, 1), ("tp2", sharded, max(1, cores // 2)))
    try:
        for mode, batch in (("ar", 1), ("ar", 8), ("linear_spec", 8)):
            params = SamplingParams(mode=mode, max_tokens=args.max_tokens, temperature=0)
            prompts = PROMPTS[:batch]
            walls: dict[str, list] = {name: [] for name, _, _ in runs}
            want = None
            for _ in range(args.rounds):  # interleaved: tp1, tp1 at 1 thread, tp2, tp1, ...
                for name, llm, threads in runs:
                    torch.set_num_threads(threads)  # tp2: this rank's threads (each rank 1)
                    wall, tokens, ids = timed(llm, prompts, params)
                    walls[name].append(wall)
                    if want is None:
                        want = ids
                    elif ids != want:
                        raise SystemExit(f"{name} differs from tp1 ({mode}, batch {batch})")
            row = {"mode": mode, "batch": batch, "tokens": tokens}
            row.update({f"{n}_tokens_per_s": tokens / min(w) for n, w in walls.items()})
            row["speedup"] = min(walls["tp1"]) / min(walls["tp2"])
            rows.append(row)
            print(f"tp  {mode:12s} batch {batch}: " + ", ".join(
                f"{n} {tokens / min(w):6.1f} tok/s" for n, w in walls.items()), flush=True)
    finally:
        sharded.close()
    return rows


def bench_ray(args) -> list[dict]:
    import asyncio

    import ray
    from openai import AsyncOpenAI
    from ray import serve

    from trimode.entrypoints.ray import application
    from trimode.entrypoints.server.cli import serve_args

    port = _free_port()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    async def burst() -> tuple[float, int]:
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                             max_retries=0, timeout=600)
        start = time.perf_counter()
        rs = await asyncio.gather(*(client.completions.create(
            model="embedded", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=args.max_tokens,
            temperature=0, extra_body={"mode": "ar"}) for i in range(16)))
        wall = time.perf_counter() - start
        await client.close()
        return wall, sum(r.usage.completion_tokens for r in rs)

    walls: dict[int, list] = {1: [], 2: []}
    try:
        for _ in range(args.rounds):
            for replicas in (1, 2):
                opts = serve_args({"replicas": replicas, "ray": True, "served-model-name": "embedded",
                                   "max-batch-size": 16, "log-level": "warning"})
                serve.run(application(opts), name="trimode", route_prefix="/")
                asyncio.run(burst())  # warm-up: first requests of fresh replicas
                wall, tokens = asyncio.run(burst())
                walls[replicas].append(wall)
                print(f"ray {replicas} replica(s), 16 concurrent: {tokens / wall:7.1f} tok/s "
                      f"({tokens} tokens in {wall:.1f} s)", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    best = {r: min(w) for r, w in walls.items()}
    return [{"replicas": r, "concurrency": 16, "tokens": tokens, "tokens_per_s": tokens / best[r]}
            for r in (1, 2)]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def section(cpu: str, tp: list[dict], rays: list[dict], command: str) -> str:
    lines = ["## Scaling out: tensor parallel and Ray Serve replicas (CPU)", "",
             f"`{command}` on {cpu}. The machine was shared with other jobs, so only the "
             "interleaved ratios mean anything; multi-GPU numbers need a multi-GPU machine and "
             "were not measured.", ""]
    if tp:
        lines += ["Tensor parallel (gloo, 2 ranks with one thread each vs 1 process with all "
                  "cores), random NLD-shaped model (hidden 1024, 16/8 heads, FFN 4096, 8 layers, "
                  "vocab 49,152), greedy, outputs token-identical:", "",
                  "| mode | batch | tp 1 tok/s (all cores) | tp 1 tok/s (1 thread) | tp 2 tok/s | "
                  "tp 2 / tp 1 (all cores) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['batch']} | {r['tp1_tokens_per_s']:.1f} | "
                  f"{r['tp1_1thread_tokens_per_s']:.1f} | {r['tp2_tokens_per_s']:.1f} | "
                  f"{r['speedup']:.2f} |" for r in tp]
        lines.append("")
    if rays:
        lines += ["Ray Serve replicas of the embedded model (one CPU each), 16 concurrent "
                  "requests, ar, greedy:", "", "| replicas | tok/s |", "|---|---|"]
        lines += [f"| {r['replicas']} | {r['tokens_per_s']:.1f} |" for r in rays]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", default="tp,ray")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--section", default=None, help="write a Markdown section here")
    args = p.parse_args()
    cpu = cpu_info()
    print(cpu, flush=True)
    parts = args.part.split(",")
    tp = bench_tp(args) if "tp" in parts else []
    rays = bench_ray(args) if "ray" in parts else []
    if args.section:
        command = "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:])
        Path(args.section).write_text(section(cpu, tp, rays, command))
    print(json.dumps({"cpu": cpu, "tp": tp, "ray": rays}))


if __name__ == "__main__":
    main()
