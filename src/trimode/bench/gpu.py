"""The GPU benchmark of issue 13 (run by ``benchmarks/gpu.sh``): forward cost, HBM roofline
and every mode's decode speed with forced acceptance, CUDA graphs on and off.

``python -m trimode.bench.gpu --out DIR`` on an NLD-8B-shaped model with random bf16
weights (``--shape tiny --device cpu`` for a smoke test) measures

- the forward-cost curve: one read-only forward of 1, 2, 4, ..., 64 query tokens at batch 1
  after a cached prefix (``forward_cost.forward_cost``);
- the HBM roofline: weight bytes / measured device copy bandwidth (a large
  device-to-device copy, read + write bytes over time) gives the best possible ar batch-1
  tokens/s; ar batch 1 is reported as a percentage of it;
- decode tokens/s of every mode at batch 1, 8 and 32, linear_spec and quadratic_spec with
  forced acceptance 1, 3 and 6 (verification accepts exactly k drafts: random weights
  would accept about one, so this measures the speed at a realistic acceptance; a bench-only
  switch, ``Sequence.forced_acceptance``, never reachable from the API), each with CUDA
  graphs on and off.

A wall-clock guard (``--time-limit``) skips what is left and records it. Writes
``gpu_results.json`` and ``gpu_results.md`` (a table) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..params import SamplingParams
from .forward_cost import SHAPES, _sync, forward_cost, random_model

SPEC = ("linear_spec", "quadratic_spec")


def weight_bytes(model) -> int:
    """Bytes of the distinct parameter tensors (tied weights counted once)."""
    seen = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel() * p.element_size()
    return sum(seen.values())


def copy_bandwidth(device: str, nbytes: int = 2 << 30, repeats: int = 5) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of ``repeats``."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def make_engine(model, batch: int, block_length: int, graphs: bool, max_tokens: int,
                prompt_length: int = 64):
    """An Engine for ``batch`` rows (graphs captured by a warm-up run stay with it)."""
    from ..engine import Engine, EngineConfig

    return Engine(model, EngineConfig(
        max_num_seqs=batch, max_model_len=prompt_length + 2 * max_tokens + 4 * block_length,
        scratch_tokens=4 * block_length * block_length + 1, min_shared_prefix=0,
        cuda_graphs=graphs))


def decode_run(engine, mode: str, batch: int, max_tokens: int, block_length: int,
               forced: int | None, prompt_length: int = 64) -> dict:
    """tokens/s of one batch of random prompts (stops off) on ``engine``."""
    from ..decoding.sequence import Sequence

    model = engine.model
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(mode=mode, max_tokens=max_tokens,
                            block_length=None if mode == "ar" else block_length,
                            threshold=0.9 if mode == "diffusion" else None)
    block = params.block_length or model.config.block_size
    seqs = []
    for _ in range(batch):
        prompt = torch.randint(101, vocab - 1, (prompt_length,), generator=gen).tolist()
        seq = Sequence(prompt, params, set(), model.config.mask_token_id, block)
        seq.forced_acceptance = forced
        engine.add_sequence(seq)
        seqs.append(seq)
    _sync(model.device)
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    _sync(model.device)
    wall = time.perf_counter() - start
    tokens = sum(s.metrics.generated_tokens for s in seqs)
    nfe = sum(s.metrics.nfe for s in seqs)
    return {"mode": mode, "batch_size": batch, "forced_acceptance": forced,
            "cuda_graphs": engine.graphs is not None, "graphs_captured":
            len(engine.graphs.graphs) if engine.graphs is not None else 0,
            "tokens": tokens, "seconds": round(wall, 4), "tokens_per_s": round(tokens / wall, 2),
            "tokens_per_forward": round(tokens / nfe, 4)}


def jobs(modes: list[str], batches: list[int], forced: list[int]) -> list[tuple]:
    """(mode, batch, forced acceptance or None, graphs) in the order they run: the most
    important first (ar batch 1, spec at batch 1), graphs on before off."""
    out = []
    for batch in batches:
        for mode in modes:
            for k in (forced if mode in SPEC else [None]):
                for graphs in (True, False):
                    out.append((mode, batch, k, graphs))
    return out


def table(result: dict) -> str:
    """Markdown: tokens/s per (mode, forced acceptance) x (batch, graphs)."""
    runs = result["decode"]
    cols = sorted({(r["batch_size"], r["cuda_graphs"]) for r in runs}, key=lambda c: (c[0], not c[1]))
    rows = sorted({(r["mode"], r["forced_acceptance"]) for r in runs},
                  key=lambda r: (r[0], r[1] or 0))
    get = {(r["mode"], r["forced_acceptance"], r["batch_size"], r["cuda_graphs"]): r for r in runs}
    head = [f"batch {b} graphs {'on' if g else 'off'}" for b, g in cols]
    roofline = (f"Roofline (weight bytes {result['weight_bytes'] / 1e9:.3g} GB / copy bandwidth "
                f"{result['copy_bandwidth_gbs']:.3g} GB/s): {result['roofline_tokens_per_s']:.1f} "
                f"tokens/s at batch 1; ar batch 1: {result.get('ar_roofline_percent', '–')}%.")
    lines = [roofline, "",
             "| tokens/s | " + " | ".join(head) + " |", "|---|" + "---:|" * len(cols)]
    for mode, k in rows:
        label = mode + (f" (forced {k})" if k is not None else "")
        cells = [f"{get[mode, k, b, g]['tokens_per_s']:.1f}" if (mode, k, b, g) in get else "–"
                 for b, g in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="nld-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--modes", default="ar,diffusion,linear_spec,quadratic_spec")
    p.add_argument("--forced", default="1,3,6", help="forced acceptance values (spec modes)")
    p.add_argument("--block-length", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prefix", type=int, default=512)
    p.add_argument("--copy-bytes", type=int, default=2 << 30)
    p.add_argument("--time-limit", type=float, default=420.0, help="seconds; skip the rest after")
    p.add_argument("--out", default="benchmarks/gpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("trimode.bench.gpu: no CUDA device here (torch.cuda.is_available() is "
                         "False); run it on a GPU machine, or use --device cpu --shape tiny for "
                         "a smoke test")
    t0 = time.perf_counter()
    cuda = torch.device(args.device).type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    model = random_model(args.shape, args.device, dtype)
    wb, bw = weight_bytes(model), copy_bandwidth(args.device, args.copy_bytes)
    result = {"shape": args.shape, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
              "weight_bytes": wb, "copy_bandwidth_gbs": round(bw / 1e9, 1),
              "roofline_tokens_per_s": round(bw / wb, 2), "block_length": args.block_length,
              "max_tokens": args.max_tokens, "decode": [], "skipped": []}
    result["forward_cost"] = forward_cost(model, args.prefix, batch_size=1, repeats=5)
    print("forward: " + ", ".join(f"{r['tokens']}: {r['seconds'] * 1e3:.2f} ms"
                                  for r in result["forward_cost"]), flush=True)
    forced = [int(k) for k in args.forced.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    for mode, batch, k, graphs in jobs(args.modes.split(","), batches, forced):
        name = f"{mode} batch {batch} forced {k} graphs {graphs}"
        if time.perf_counter() - t0 > args.time_limit:
            result["skipped"].append(name)
            continue
        engine = make_engine(model, batch, args.block_length, graphs, args.max_tokens)
        run = {"mode": mode, "batch": batch, "block_length": args.block_length, "forced": k}
        decode_run(engine, max_tokens=args.max_tokens, **run)  # warm-up (and graph capture)
        row = decode_run(engine, max_tokens=args.max_tokens, **run)
        row["cuda_graphs"] = graphs  # asked for (used only on cuda)
        result["decode"].append(row)
        print(f"{name}: {row['tokens_per_s']} tokens/s", flush=True)
        if mode == "ar" and batch == 1 and graphs:
            result["ar_roofline_percent"] = round(100 * row["tokens_per_s"] / (bw / wb), 1)
    if cuda:
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "gpu_results.md").write_text(table(result))
    print(table(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
