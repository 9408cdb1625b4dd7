"""Per-mode tokens per forward and wall-clock on the embedded model, and the forward-cost curve.

    python benchmarks/bench_modes.py [--model M] [--max-tokens 48] [--block-length 8]
        [--draft-adapter PATH] [--out benchmarks/out]

Prints a table (tokens_per_forward, acceptance_length, tokens/s, ratio to ar) for ar,
diffusion, linear_spec and quadratic_spec (full and pruned layouts), the time of one forward
against the number of query tokens after a fixed prefix, and a final JSON line. Writes
``forward_cost.png`` and ``modes.json`` to ``--out``. Same prompts, greedy, batch 1, fp32.
"""

from __future__ import annotations

import argparse
import json
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
]


def configs(block_length: int) -> tuple[list[tuple[str, dict]], type]:
    from trimode import SamplingParams as P

    b = block_length
    return [
        ("ar", dict(mode="ar")),
        ("diffusion t=0.9", dict(mode="diffusion", block_length=b, threshold=0.9)),
        ("linear_spec", dict(mode="linear_spec", block_length=b)),
        ("quadratic_spec full", dict(mode="quadratic_spec", block_length=b, draft_segments=None)),
        ("quadratic_spec 2 segments", dict(mode="quadratic_spec", block_length=b, draft_segments=2)),
        ("quadratic_spec 1 segment", dict(mode="quadratic_spec", block_length=b, draft_segments=1)),
    ], P


def run_modes(llm, max_tokens: int, block_length: int) -> list[dict]:
    rows = []
    table, params_cls = configs(block_length)
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    llm.chat(conversations[:1], params_cls(max_tokens=4))  # warm-up
    reference = None
    for name, kwargs in table:
        params = params_cls(max_tokens=max_tokens, **kwargs)
        tokens = nfe = 0
        seconds = 0.0
        outputs = []
        for conv in conversations:  # batch 1
            start = time.perf_counter()
            out = llm.chat([conv], params)[0]
            seconds += time.perf_counter() - start
            tokens += out.metrics.generated_tokens
            nfe += out.metrics.nfe
            outputs.append(out)
        acc = [o.metrics.acceptance_length for o in outputs if o.metrics.acceptance_length]
        ids = [o.token_ids for o in outputs]
        reference = reference or ids
        rows.append({"mode": name, "tokens": tokens, "nfe": nfe,
                     "tokens_per_forward": round(tokens / nfe, 3),
                     "acceptance_length": round(statistics.mean(acc), 3) if acc else None,
                     "tokens_per_s": round(tokens / seconds, 2),
                     "equals_ar": ids == reference if kwargs["mode"] != "diffusion" else None})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["ratio_to_ar"] = round(r["tokens_per_s"] / base, 3)
    return rows


def forward_cost(model, prefix: int = 128, widths=(1, 2, 4, 8, 16, 24, 32, 48, 64, 72),
                 repeats: int = 7) -> list[dict]:
    """Median seconds of one read-only forward of ``width`` tokens after ``prefix`` cached
    (``trimode.bench.forward_cost``, shared with ``make_results.py`` and ``gpu.sh``)."""
    from trimode.bench.forward_cost import forward_cost as shared

    return shared(model, prefix, widths, 1, repeats)


def plot(curve: list[dict], path: Path) -> None:
    from trimode.bench.forward_cost import plot_curve as shared

    shared(curve, path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--draft-adapter", default=None)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--block-length", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from trimode import LLM

    llm = LLM(args.model, draft_adapter=args.draft_adapter, progress=False)
    rows = run_modes(llm, args.max_tokens, args.block_length)
    curve = forward_cost(llm.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(curve, out / "forward_cost.png")
    print(f"{'mode':28} {'tok/fwd':>8} {'accept':>7} {'tok/s':>7} {'vs ar':>6} {'= ar':>5}")
    for r in rows:
        print(f"{r['mode']:28} {r['tokens_per_forward']:8.3f} {str(r['acceptance_length']):>7} "
              f"{r['tokens_per_s']:7.2f} {r['ratio_to_ar']:6.3f} {str(r['equals_ar']):>5}")
    print("forward cost (query tokens: ms, x one-token):",
          ", ".join(f"{r['tokens']}: {r['seconds'] * 1000:.1f} ({r['relative_to_1']}x)" for r in curve))
    result = {"modes": rows, "forward_cost": curve, "max_tokens": args.max_tokens,
              "block_length": args.block_length, "threads": args.threads,
              "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
    (out / "modes.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
