"""Per-step engine overhead: host syncs, bytes copied to the host, host ms and total ms.

    python benchmarks/bench_overhead.py [--batches 1,16,64] [--modes ar,diffusion,...]
        [--steps 3] [--temperature 0] [--threads 1] [--json PATH]
        [--compare OLD_SRC]   # before/after: OLD_SRC = the src/ folder of another checkout

An NLD-shaped nano model made here (2 layers, width 64, NLD's vocabulary of 131,072 ids,
mask id 100, block 32, random weights, no EOS so nothing stops early): its forward is small,
so a step's time is the engine's. For each mode and batch size, ``batch`` requests are
admitted and decoded for two warm-up steps, then ``--steps`` engine steps are measured one
by one:

- host syncs: calls that on CUDA wait for the device (``Tensor.item``, ``tolist``, ``cpu``,
  ``numpy``, ``nonzero`` and ``bool()/int()/float()/index`` of a tensor), counted with a
  ``torch.overrides.TorchFunctionMode`` around ``Engine.step``;
- bytes to the host: the bytes those calls read (element size for scalars, ``nbytes`` for
  ``cpu``/``tolist``/``numpy``, the result for ``nonzero``);
- total ms per step, and host ms = total minus the time inside the model's forward and LM
  head (``model.__call__`` and ``model.logits``, timed by wrapping them); host CPU ms is the
  same difference in this process's CPU time (``time.process_time``), which a shared,
  overloaded machine inflates far less than wall time.

``--compare OLD_SRC`` runs each batch size twice in fresh processes, alternating the code
under ``OLD_SRC`` (before) and this checkout's (after), and prints one table with both.

Diffusion runs block 32 with threshold 0.9 (the CLI and server default); linear_spec and
quadratic_spec block 8 (draft_segments 1). Batch sizes run in one process, interleaved by
mode, on one thread (the machine may be shared: compare columns measured in the same run).
``trimode.bench.sync_counter`` is the counting mode; the tests use it too.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from trimode.bench.sync_counter import SyncCounter

MODES = {"ar": {}, "diffusion": {"block_length": 32, "threshold": 0.9},
         "linear_spec": {"block_length": 8}, "quadratic_spec": {"block_length": 8}}


def nano_model(vocab: int = 131072, seed: int = 0):
    """The NLD-shaped nano model (random weights, fp32, CPU)."""
    from trimode.model.config import ModelConfig
    from trimode.model.model import TriModeModel

    config = ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=4096, mask_token_id=100,
                         bos_token_id=1, eos_token_ids=(), block_size=32)
    torch.manual_seed(seed)
    return TriModeModel(config).eval()


class ModelTimer:
    """Wraps ``model.forward`` and ``model.logits`` and sums the wall and CPU seconds spent
    in them."""

    def __init__(self, model):
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        for name in ("forward", "logits"):
            setattr(model, name, self._timed(getattr(model, name)))

    def _timed(self, fn):
        def run(*args, **kwargs):
            start, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.cpu_seconds += time.process_time() - cpu
        return run


def measure(model, timer: ModelTimer, mode: str, batch: int, steps: int,
            temperature: float) -> dict:
    """Per-step means over ``steps`` measured engine steps of ``batch`` requests."""
    from trimode.engine import Engine, EngineConfig
    from trimode.params import SamplingParams

    engine = Engine(model, EngineConfig(max_num_seqs=batch, max_model_len=1024,
                                        min_shared_prefix=0))
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = (torch.randint(200, model.config.vocab_size, (16,), generator=gen)).tolist()
        params = SamplingParams(mode=mode, max_tokens=512, temperature=temperature, seed=i,
                                **MODES[mode])
        engine.add_request(prompt, params)
    for _ in range(2):  # admission + prefill, then the first decode step
        engine.step()
    rows = []
    for _ in range(steps):
        counter = SyncCounter()
        model_s, model_cpu = timer.seconds, timer.cpu_seconds
        start, cpu = time.perf_counter(), time.process_time()
        with counter:
            engine.step()
        total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
        model_s, model_cpu = timer.seconds - model_s, timer.cpu_seconds - model_cpu
        rows.append({"syncs": counter.syncs, "bytes": counter.bytes, "total_ms": 1e3 * total,
                     "host_ms": 1e3 * (total - model_s),
                     "host_cpu_ms": 1e3 * (total_cpu - model_cpu)})
    return {"mode": mode, "batch": batch, "steps": steps,
            "syncs": max(r["syncs"] for r in rows),
            "bytes": max(r["bytes"] for r in rows),
            "bytes_per_row": max(r["bytes"] for r in rows) / batch,
            "host_ms": statistics.median(r["host_ms"] for r in rows),
            "host_cpu_ms": statistics.median(r["host_cpu_ms"] for r in rows),
            "total_ms": statistics.median(r["total_ms"] for r in rows),
            "by_call": counter.by_call}


def cpu_line() -> str:
    try:
        info = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    simd = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")]
    return f"{fields.get('Model name', '?').strip()}; {' '.join(simd)}"


def table(results: list[dict]) -> str:
    modes = list(dict.fromkeys(r["mode"] for r in results))
    batches = sorted({r["batch"] for r in results})
    get = {(r["mode"], r["batch"]): r for r in results}
    lines = ["| per engine step | " + " | ".join(modes) + " |",
             "|---|" + "---:|" * len(modes)]
    for key, label, fmt in (("syncs", "host syncs", "{:.0f}"), ("bytes_per_row", "bytes to host per row", "{:.0f}"),
                            ("host_ms", "host ms", "{:.1f}"), ("host_cpu_ms", "host CPU ms", "{:.1f}"),
                            ("total_ms", "total ms", "{:.1f}")):
        for b in batches:
            cells = [fmt.format(get[m, b][key]) if (m, b) in get else "–" for m in modes]
            lines.append(f"| {label}, batch {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(args, old_src: Path) -> None:
    """Before/after in one run: each batch size in fresh processes, old code first."""
    import os
    import tempfile

    new_src = Path(__file__).resolve().parents[1] / "src"
    rows = {}
    for batch in args.batches.split(","):
        for label, src in (("before", old_src), ("after", new_src)):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                cmd = [sys.executable, __file__, "--batches", batch, "--modes", args.modes,
                       "--steps", str(args.steps), "--temperature", str(args.temperature),
                       "--threads", str(args.threads), "--vocab", str(args.vocab),
                       "--json", out.name]
                env = dict(os.environ, PYTHONPATH=str(src))
                subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                for r in json.loads(Path(out.name).read_text())["results"]:
                    rows[label, r["mode"], r["batch"]] = r
                    print(f"{label:6s} {r['mode']:15s} batch {r['batch']:3d}: {r['syncs']:4d} syncs, "
                          f"host {r['host_ms']:8.1f} ms (CPU {r['host_cpu_ms']:8.1f}), total {r['total_ms']:8.1f} ms",
                          flush=True)
    modes = args.modes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    print(f"\nCPU: {cpu_line()}; torch {torch.__version__}, {args.threads} thread(s), "
          f"temperature {args.temperature}; before = {old_src}\n")
    print("| per engine step (before → after) | " + " | ".join(modes) + " |")
    print("|---|" + "---:|" * len(modes))
    for key, label, fmt in (("syncs", "host syncs", "{:.0f}"),
                            ("bytes_per_row", "bytes to host per row", "{:.0f}"),
                            ("host_ms", "host ms", "{:.1f}"), ("host_cpu_ms", "host CPU ms", "{:.1f}"),
                            ("total_ms", "total ms", "{:.1f}")):
        for b in batches:
            cells = [f"{fmt.format(rows['before', m, b][key])} → {fmt.format(rows['after', m, b][key])}"
                     for m in modes]
            print(f"| {label}, batch {b} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps([dict(r, code=k[0]) for k, r in rows.items()], indent=1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--compare", type=Path, default=None,
                    help="src/ folder of the code to compare against (before)")
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args, args.compare.resolve())
    torch.set_num_threads(args.threads)
    model = nano_model(args.vocab)
    timer = ModelTimer(model)
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        for mode in args.modes.split(","):
            r = measure(model, timer, mode, batch, args.steps, args.temperature)
            print(f"{mode:15s} batch {batch:3d}: {r['syncs']:4d} syncs, {r['bytes']:9d} B, "
                  f"host {r['host_ms']:8.1f} ms (CPU {r['host_cpu_ms']:8.1f}), total {r['total_ms']:8.1f} ms",
                          flush=True)
            results.append(r)
    print(f"\nCPU: {cpu_line()}; torch {torch.__version__}, {args.threads} thread(s), "
          f"temperature {args.temperature}\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "temperature": args.temperature,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
