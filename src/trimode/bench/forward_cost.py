"""Forward latency against query tokens, and per-mode decode speed, on any model shape.

``python -m trimode.bench.forward_cost`` (run by ``benchmarks/gpu.sh``) builds a model with
random weights of a named shape (``nld-8b``: NLD-8B's config, docs/spec.md 1.2; ``tiny``: a few
layers, for a CPU smoke test) or loads a local checkpoint (``--model``), then measures

- the time of one read-only forward of ``T`` query tokens after a ``--prefix``-token cached
  prefix, for ``T`` = 1, 2, 4, ..., 64 and each batch size (median of ``--repeats``);
- decode tokens/s of ar, diffusion, linear_spec and quadratic_spec at each batch size
  (random prompts, stop tokens off so every row generates ``--max-tokens``).

With random weights the parallel modes accept about one token per cycle, so their tokens/s
measures the cost of their forwards, not their speed on a trained model. A wall-clock guard
(``--time-limit``) skips what is left and records it. Writes one JSON file (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ..model.config import ModelConfig, RopeConfig
from ..model.model import TriModeModel
from ..params import SamplingParams

SHAPES = {
    "nld-8b": dict(vocab_size=131072, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=34, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=128, max_position_embeddings=262144, mask_token_id=100,
                   bos_token_id=1, eos_token_ids=(11,), block_size=32,
                   rope=RopeConfig(theta=1e6, rope_type="yarn", factor=16.0,
                                   original_max_position_embeddings=16384, mscale=1.0,
                                   mscale_all_dim=1.0, llama_4_scaling_beta=0.1)),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=262144, mask_token_id=3, bos_token_id=1,
                 eos_token_ids=(2,), block_size=8),
}
WIDTHS = (1, 2, 4, 8, 16, 32, 64)


def random_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> TriModeModel:
    """A TriModeModel of ``shape`` with N(0, 0.02) matrices and unit norms, built directly on
    ``device`` in ``dtype`` (no fp32 copy: an 8B model needs 16 GiB in bf16)."""
    config = ModelConfig(**SHAPES[shape])
    with torch.device("meta"):
        net = TriModeModel(config).to(dtype)
    net = net.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
    net.rotary = type(net.rotary)(config.rope, config.head_dim).to(device)
    return net.eval()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def forward_cost(model, prefix: int = 128, widths=WIDTHS, batch_size: int = 1,
                 repeats: int = 7) -> list[dict]:
    """Median seconds of one read-only forward (logits included) of ``width`` query tokens
    per row after ``prefix`` cached tokens, for ``batch_size`` rows."""
    vocab = model.config.vocab_size
    low = min(100, vocab // 2)  # ordinary ids, away from the special ones
    cache = model.new_cache(batch_size, prefix + max(widths) + 1)
    model(torch.randint(low, vocab - 1, (batch_size, prefix), device=model.device), cache)
    rows = []
    for width in widths:
        tokens = torch.randint(low, vocab - 1, (batch_size, width), device=model.device)
        model.logits(model(tokens, cache, write=False))  # warm-up of this shape
        times = []
        for _ in range(repeats):
            _sync(model.device)
            start = time.perf_counter()
            model.logits(model(tokens, cache, write=False))
            _sync(model.device)
            times.append(time.perf_counter() - start)
        rows.append({"tokens": width, "batch_size": batch_size,
                     "seconds": round(statistics.median(times), 6)})
    for r in rows:
        r["relative_to_1"] = round(r["seconds"] / rows[0]["seconds"], 3)
    return rows


def cost_curve(model, batch_sizes, widths=(1, 2, 4, 8, 16, 32), prefix: int = 64,
                repeats: int = 3) -> dict:
    """The forward-cost curve ``mode="auto"`` plans with (``engine.ForwardCost.load`` reads
    it): ``forward_cost`` at each batch size, as ``{"forward_cost": [...], "widths",
    "prefix"}``."""
    rows = []
    for b in batch_sizes:
        rows += forward_cost(model, prefix, widths, b, repeats)
    return {"forward_cost": rows, "widths": list(widths), "prefix": prefix}


def decode_speed(model, mode: str, batch_size: int, max_tokens: int, block_length: int,
                 prompt_length: int = 64, seed: int = 0) -> dict:
    """tokens/s, nfe and tokens_per_forward of one batch of random prompts, stops off."""
    from ..decoding.registry import STRATEGIES
    from ..engine.decode import decode
    from ..decoding.sequence import Sequence

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    low = min(100, vocab // 2) + 1
    blocks = STRATEGIES[mode].blocks
    params = SamplingParams(mode=mode, max_tokens=max_tokens,
                            block_length=block_length if blocks else None)
    block = params.block_length or model.config.block_size
    seqs = [Sequence(torch.randint(low, vocab - 1, (prompt_length,), generator=gen).tolist(),
                     params, set(), model.config.mask_token_id, block) for _ in range(batch_size)]
    _sync(model.device)
    start = time.perf_counter()
    decode(model, seqs)
    _sync(model.device)
    wall = time.perf_counter() - start
    tokens = sum(s.metrics.generated_tokens for s in seqs)
    nfe = sum(s.metrics.nfe for s in seqs)
    return {"mode": mode, "batch_size": batch_size, "block_length": params.block_length,
            "tokens": tokens, "seconds": round(wall, 4), "tokens_per_s": round(tokens / wall, 2),
            "tokens_per_forward": round(tokens / nfe, 4)}


def plot_curve(curve: list[dict], path: Path, dpi: int = 120) -> None:
    """Forward time (ms) against query tokens in one forward, saved as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["tokens"] for r in curve], [r["seconds"] * 1000 for r in curve], marker="o")
    ax.set_xlabel("query tokens in one forward")
    ax.set_ylabel("forward time (ms)")
    ax.set_title("Forward cost, embedded model, fp32 CPU")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="local checkpoint (default: random weights)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="nld-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--modes", default="ar,diffusion,linear_spec,quadratic_spec")
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prefix", type=int, default=512)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--time-limit", type=float, default=420.0, help="seconds; skip the rest after")
    p.add_argument("--out", default="benchmarks/gpu_results.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.model:
        from ..checkpoint.loader import load_model

        model = load_model(args.model, dtype=dtype, device=args.device)[0]
    else:
        model = random_model(args.shape, args.device, dtype)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    result = {"model": args.model or f"random weights, {args.shape} shape",
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else
              platform.processor() or platform.machine(),
              "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
              "prefix": args.prefix, "max_tokens": args.max_tokens,
              "block_length": args.block_length, "setup_s": round(time.perf_counter() - t0, 1),
              "forward_cost": [], "decode": [], "skipped": []}
    print(f"model ready in {result['setup_s']} s", flush=True)
    jobs = [("forward_cost", b, None) for b in sizes]
    jobs += [("decode", b, m) for b in sizes for m in args.modes.split(",")]
    for kind, b, mode in jobs:
        if time.perf_counter() - t0 > args.time_limit:
            result["skipped"].append(f"{kind} batch {b}" + (f" {mode}" if mode else ""))
            continue
        if kind == "forward_cost":
            rows = forward_cost(model, args.prefix, WIDTHS, b, args.repeats)
            result["forward_cost"] += rows
            print(f"forward batch {b}: " + ", ".join(f"{r['tokens']}: {r['seconds'] * 1e3:.2f} ms"
                                                    for r in rows), flush=True)
        else:
            decode_speed(model, mode, b, min(8, args.max_tokens), args.block_length)  # warm-up
            row = decode_speed(model, mode, b, args.max_tokens, args.block_length)
            result["decode"].append(row)
            print(f"decode {mode} batch {b}: {row['tokens_per_s']} tokens/s", flush=True)
        if torch.device(args.device).type == "cuda":
            result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
