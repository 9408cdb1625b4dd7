"""Load generator for ``trimode serve``: throughput, time to first token and latency per mode
and concurrency, over the OpenAI streaming chat API (async HTTP, httpx).

    python benchmarks/serve_bench.py [--url http://127.0.0.1:8000] [--model M]
        [--modes ar,diffusion,linear_spec,auto] [--concurrency 1,4,16,64]
        [--requests N] [--max-tokens 32] [--block-length 8] [--out benchmarks/sections/serve.md]
        [--prompts default|mixed] [--rounds N] [--auto-block-length L] [--auto-cost PATH]

Adaptive auto against the fixed exact modes (README "mode auto"; RESULTS.md section):

    python benchmarks/serve_bench.py --modes ar,linear_spec,quadratic_spec,auto \
        --prompts mixed --rounds 2 --max-batch-size 64 --max-tokens 24 \
        --out benchmarks/sections/auto.md

Without ``--url`` it starts ``python -m trimode serve`` itself (``--model``, default the
embedded model; ``--max-batch-size``, ``--threads``) on a free port and stops it at the end.
For each mode
and concurrency C it sends ``--requests`` requests (default max(C, 8)) from C concurrent
clients, streaming, temperature 0, prompts cycled from PROMPTS. Reports output tokens/s
(completion tokens from ``usage`` / wall time of the level), requests/s, time to first
token (first non-empty content chunk) p50/p95, end-to-end latency p50/p95, and the mean
tokens_per_forward and the mode mix the server reported. Prints a table and a final JSON
line; ``--out`` writes the table as markdown. With ``--rounds N`` each concurrency runs every
mode once per round, in rotated order, so all modes see the same machine load; with auto and a
fixed exact mode among ``--modes`` a second table gives auto's tok/s over each fixed mode's.
The CPU's lscpu model and flags are printed and written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

PROMPTS = [
    "Count from 1 to 20 separated by commas.",
    "Write a Python function that returns the sum of a list of numbers.",
    "Give three tips for staying healthy.",
    "Explain why the sky is blue in simple terms.",
    "List the planets of the solar system.",
    "What is the capital of France? Answer in one sentence.",
]
# --prompts mixed: predictable text (counting, copying, lists: drafts tend to pass) and
# open-ended text (drafts tend to fail), interleaved so every level sees both
MIXED = [
    "Count from 1 to 30 separated by commas.",
    "Explain why the sky is blue in simple terms.",
    "Repeat this sentence three times: The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea.",
    "Write the English alphabet in capital letters separated by spaces.",
    "Give three tips for staying healthy.",
    "List the days of the week, one per line.",
    "What is the capital of France? Answer in one sentence.",
]


async def one(client: httpx.AsyncClient, prompt: str, mode: str, args) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "mode": mode}
    block = args.auto_block_length if mode == "auto" else args.block_length
    if block:
        body["block_length"] = block
    start = time.perf_counter()
    first = None
    usage = info = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode()}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            for c in event["choices"]:
                if first is None and c.get("delta", {}).get("content"):
                    first = time.perf_counter() - start
            if event.get("usage"):
                usage, info = event["usage"], event["trimode"]
    return {"ttft": first if first is not None else time.perf_counter() - start,
            "latency": time.perf_counter() - start, "tokens": usage["completion_tokens"],
            "mode": info["mode"], "tpf": info["tokens_per_forward"],
            "mode_tokens": info.get("mode_tokens", {}), "switches": info.get("mode_switches", 0)}


async def level(url: str, mode: str, concurrency: int, n_requests: int, args) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(args.prompt_set[i % len(args.prompt_set)])
    results: list[dict] = []

    async def worker(client):
        while not queue.empty():
            results.append(await one(client, queue.get_nowait(), mode, args))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    q = lambda xs, p: statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    ttft = [r["ttft"] for r in results]
    lat = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"mode": mode, "concurrency": concurrency, "requests": len(results), "tokens": tokens,
            "wall_s": round(wall, 3), "tok_per_s": round(tokens / wall, 2),
            "req_per_s": round(len(results) / wall, 3),
            "ttft_p50_s": round(q(ttft, 50), 3), "ttft_p95_s": round(q(ttft, 95), 3),
            "latency_p50_s": round(q(lat, 50), 3), "latency_p95_s": round(q(lat, 95), 3),
            "tokens_per_forward": round(statistics.mean(r["tpf"] for r in results), 3),
            "modes_used": dict(Counter(r["mode"] for r in results)),
            "mode_tokens": dict(sum((Counter(r["mode_tokens"]) for r in results), Counter())),
            "mode_switches": sum(r["switches"] for r in results)}


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "trimode", "serve", "--port", str(port), "--log-level",
           "warning", "--max-batch-size", str(args.max_batch_size)]
    if args.model:
        cmd += ["--model", args.model]
    if args.auto_cost:
        cmd += ["--auto-cost", args.auto_cost]
    if args.max_model_len:  # the KV pool is preallocated: max_batch_size rows of this
        cmd += ["--max-model-len", str(args.max_model_len)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start in 300 s")


def combine(runs: list[dict]) -> dict:
    """One row from the rounds of a (mode, concurrency): totals summed, latencies pooled
    by their means (rounds > 1)."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[-1])
    for key in ("requests", "tokens", "wall_s", "mode_switches"):
        out[key] = round(sum(r[key] for r in runs), 3)
    out["tok_per_s"] = round(out["tokens"] / out["wall_s"], 2)
    out["req_per_s"] = round(out["requests"] / out["wall_s"], 3)
    for key in ("ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s", "tokens_per_forward"):
        out[key] = round(statistics.mean(r[key] for r in runs), 3)
    out["modes_used"] = dict(sum((Counter(r["modes_used"]) for r in runs), Counter()))
    out["mode_tokens"] = dict(sum((Counter(r["mode_tokens"]) for r in runs), Counter()))
    return out


def cpu_info() -> dict:
    """lscpu's model name and flags (this machine's, read at run time)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {"model": fields.get("Model name", platform.processor() or "?").strip(),
            "flags": fields.get("Flags", "?").strip()}


def compare(rows: list[dict], cpu: dict) -> str:
    """auto against each fixed exact mode, per concurrency (ratios of tok/s measured in
    the same interleaved rounds), or nothing when auto or the fixed modes were not run."""
    fixed = [m for m in ("ar", "linear_spec", "quadratic_spec") if any(r["mode"] == m for r in rows)]
    autos = {r["concurrency"]: r for r in rows if r["mode"] == "auto"}
    if not autos or not fixed:
        return ""
    lines = ["", "### Adaptive auto against each fixed exact mode", "",
             "| concurrency | " + " | ".join(f"{m} tok/s" for m in fixed) + " | auto tok/s | "
             "auto / best fixed | auto's tokens by mode | switches |",
             "|---:|" + "---:|" * (len(fixed) + 2) + "---|---:|"]
    for c, a in sorted(autos.items()):
        speeds = {r["mode"]: r["tok_per_s"] for r in rows if r["concurrency"] == c and r["mode"] in fixed}
        best = max(speeds.values())
        used = ", ".join(f"{k} {v}" for k, v in sorted(a.get("mode_tokens", {}).items()))
        lines.append(f"| {c} | " + " | ".join(str(speeds.get(m, "")) for m in fixed) +
                     f" | {a['tok_per_s']} | {a['tok_per_s'] / best:.3f} | {used} | "
                     f"{a.get('mode_switches', 0)} |")
    lines += ["", f"CPU (lscpu): {cpu['model']}. Flags: `{cpu['flags']}`.", ""]
    return "\n".join(lines)


def markdown(rows: list[dict], args, server: str) -> str:
    lines = [
        "## Serving (`trimode serve`, OpenAI streaming chat API)", "",
        f"Date: {time.strftime('%Y-%m-%d')}. Server: {server}. Greedy, `max_tokens` "
        f"{args.max_tokens}, block_length {args.block_length or 'checkpoint default'}, "
        f"prompts cycled from the {len(args.prompt_set)} of `--prompts {args.prompts}` in "
        "`benchmarks/serve_bench.py`, streaming with "
        "`include_usage`. tok/s = completion tokens / wall time of the level; TTFT = first "
        "non-empty content chunk; latency = request start to `[DONE]`.", "",
        "| mode | concurrency | requests | tok/s | req/s | TTFT p50 s | TTFT p95 s | latency p50 s "
        "| latency p95 s | tokens/forward | modes used |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        used = ", ".join(f"{k} {v}" for k, v in r["modes_used"].items())
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['tok_per_s']} | "
                     f"{r['req_per_s']} | {r['ttft_p50_s']} | {r['ttft_p95_s']} | "
                     f"{r['latency_p50_s']} | {r['latency_p95_s']} | {r['tokens_per_forward']} "
                     f"| {used} |")
    lines += ["", "Command:", "", "```", "python " + " ".join(sys.argv), "```", "",
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"Python {platform.python_version()}; 1-minute load average at the end "
              f"{os.getloadavg()[0]:.2f}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=None, help="an already running server")
    ap.add_argument("--model", default=None, help="checkpoint for the server this script starts")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server this "
                    "script starts (default 1: on a shared 2-core machine a second thread "
                    "mostly waits for the core another process holds)")
    ap.add_argument("--modes", default="ar,diffusion,linear_spec,auto")
    ap.add_argument("--prompts", choices=["default", "mixed"], default="default",
                    help="mixed: predictable and open-ended prompts interleaved (MIXED)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds: per concurrency, "
                    "every mode runs once per round (order rotated), totals summed")
    ap.add_argument("--auto-block-length", type=int, default=None,
                    help="block_length sent with mode auto (default: none, auto picks)")
    ap.add_argument("--auto-cost", default=None, help="the started server's --auto-cost")
    ap.add_argument("--max-model-len", type=int, default=512, help="the started server's "
                    "(default 512: a 64-row KV pool of 4096 positions would take 13 GB)")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=None, help="per level (default max(C, 8))")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--block-length", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args()
    args.prompt_set = MIXED if args.prompts == "mixed" else PROMPTS
    cpu = cpu_info()
    print(f"CPU: {cpu['model']}; flags: {cpu['flags']}", flush=True)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args)
    model = args.model or "embedded SmolLM2-135M-Instruct"
    server = url if args.url else (f"started here (model {model}, fp32 CPU, max_batch_size "
                                   f"{args.max_batch_size}, max_model_len {args.max_model_len}, "
                                   f"OMP_NUM_THREADS={args.threads})")
    rows = []
    try:
        asyncio.run(level(url, "ar", 1, 2, args))  # warm-up
        modes = args.modes.split(",")
        for c in map(int, args.concurrency.split(",")):
            runs: dict[str, list[dict]] = {m: [] for m in modes}
            for r in range(args.rounds):  # interleaved: every mode sees the same load
                for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
                    row = asyncio.run(level(url, mode, c, args.requests or max(c, 8), args))
                    runs[mode].append(row)
                    print(json.dumps(row), flush=True)
            rows += [combine(runs[m]) for m in modes]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    text = markdown(rows, args, server) + compare(rows, cpu)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(json.dumps({"serve_bench": rows}))


if __name__ == "__main__":
    main()
