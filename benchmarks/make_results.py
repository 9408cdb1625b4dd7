"""Regenerate benchmarks/RESULTS.md: one command, embedded model, CPU.

    python benchmarks/make_results.py [--dataset mt_bench,humaneval,gsm_symbolic]
        [--per-category 1] [--max-tokens 64] [--batch-sizes 1,4,16] [--block-lengths 8]
        [--modes ar,diffusion,linear_spec] [--sol-budget 500] [--threads N]

Runs ``trimode bench`` in-process on the embedded model (per-mode, per-category numbers, the
transformers peer, the speed-of-light oracle, the batch sweep), measures the forward-cost
curve, writes the plots (``tokens_per_forward.png``, ``tokens_per_s_vs_batch.png``,
``forward_cost.png``) and ``crossover.json`` next to this file and the full result to
``benchmarks/out/result.json``, then rewrites RESULTS.md and appends every
``benchmarks/sections/*.md`` verbatim, in name order (other benchmarks write their sections
there; ``--sections-only`` re-appends them without running anything). The defaults take about 20 minutes on a quiet 2-core CPU; raise ``--per-category`` and
``--max-tokens`` for bigger runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from trimode.bench import report  # noqa: E402
from trimode.bench.runner import BenchConfig  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mt_bench,humaneval,gsm_symbolic")
    p.add_argument("--per-category", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--block-lengths", default="8")
    p.add_argument("--modes", default="ar,diffusion,linear_spec")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--sol-budget", type=int, default=500)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 when the load average exceeds the cores, "
                   "else all cores; a contended OpenMP region waits for a descheduled worker)")
    p.add_argument("--no-forward-cost", action="store_true")
    p.add_argument("--sections-only", action="store_true",
                   help="run nothing: keep the generated part of RESULTS.md and re-append the "
                   "current benchmarks/sections/*.md (after another benchmark wrote its section)")
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    p.add_argument("--out-dir", default=str(HERE),
                   help="where RESULTS.md, the plots and crossover.json go (default: benchmarks/)")
    return p.parse_args(argv)


MARKER = "<!-- generated above; below, benchmarks/sections/*.md appended verbatim in name order -->"


def with_sections(generated: str) -> str:
    text = generated.rstrip() + "\n\n" + MARKER + "\n"
    for section in sorted((HERE / "sections").glob("*.md")):
        text += "\n" + section.read_text().rstrip() + "\n"
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sections_only:
        path = Path(args.out_dir) / "RESULTS.md"
        generated = path.read_text().split(MARKER)[0]
        path.write_text(with_sections(generated))
        return 0
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    torch.set_num_threads(args.threads or (1 if load_before > cores else cores))
    from trimode import LLM
    from trimode.bench import datasets, suite
    from trimode.bench.forward_cost import forward_cost

    config = BenchConfig(modes=tuple(args.modes.split(",")),
                         block_lengths=tuple(int(b) for b in args.block_lengths.split(",")),
                         batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
                         threshold=args.threshold, max_tokens=args.max_tokens,
                         peer="transformers", sol=True, sol_budget=args.sol_budget)
    items = datasets.load(args.dataset, args.per_category)
    llm = LLM(args.model, progress=False)
    result = suite.benchmark(llm, items, config, log=lambda line: print(line, flush=True))
    result.update(dataset=args.dataset, model=args.model or "embedded SmolLM2-135M-Instruct",
                  per_category=args.per_category)
    curve = [] if args.no_forward_cost else forward_cost(llm.model, 128, (1, 2, 4, 8, 16, 32, 64))
    target = Path(args.out_dir)
    (target / "out").mkdir(parents=True, exist_ok=True)
    (target / "out" / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    report.plot(result, target)
    report.write_crossover(result, target / "crossover.json")
    if curve:
        plot_curve(curve, target / "forward_cost.png")
    result["loadavg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    result["minutes"] = round((time.perf_counter() - start) / 60, 1)
    command = "python benchmarks/make_results.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    (target / "RESULTS.md").write_text(with_sections(render(result, curve, command)))
    print(report.json_line(result))
    print(f"wrote {target / 'RESULTS.md'} in {result['minutes']} min", file=sys.stderr)
    return 0


def plot_curve(curve: list[dict], path: Path) -> None:
    from trimode.bench.forward_cost import plot_curve as shared

    shared(curve, path, dpi=110)


def render(result: dict, curve: list[dict], command: str) -> str:
    m, c = result["machine"], result["config"]
    peer = result["peer"]
    lines = [
        "# trimode benchmarks",
        "",
        f"Regenerated {result['date']} by `{command}` in {result['minutes']} minutes "
        "(everything above the appended sections; those come verbatim from "
        "`benchmarks/sections/*.md`).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['threads']}, "
        f"{m['device']} {m['dtype']}; Python {m['python']}, torch {m['torch']}, transformers "
        f"{m['transformers']}. 1-minute load average {result['loadavg_1m'][0]} at start, "
        f"{result['loadavg_1m'][1]} at end: **the machine was shared** with other jobs, so "
        "absolute tokens/s are low and noisy; the ratios below were measured in the same run, "
        "under the same load, and are the numbers to read.",
        "",
        f"Model: {result['model']} ({m['dtype']})"
        + (", with the shipped tri-mode draft/denoise adapter (README \"Training\"): drafts "
           "are accepted about twice per verify and diffusion unmasks about one token per pass, "
           "so on this CPU the parallel modes do not beat `ar`; the same commands on an NLD "
           "checkpoint (`--model`) measure what they gain" if "embedded" in result["model"] else "")
        + f". Dataset `{result['dataset']}`, {result['per_category']} prompt(s) per category "
        "(MT-Bench: first turns; gsm_symbolic: reasoning-gym's generator with a fixed seed), "
        f"chat template, greedy, max_tokens {c['max_tokens']}, block_length "
        f"{', '.join(map(str, c['block_lengths']))}, diffusion threshold {c['threshold']}.",
        "",
        "## Per mode and category",
        "",
        f"Batch size {result['batch_size']} (each request alone). tokens/s = generated tokens / "
        "wall seconds (prefill included); `x peer` = tokens/s over transformers' `generate` on "
        "the same weights and prompts, in the same process, every mode and the peer taking each "
        "batch in turn (so all see the same machine load); `= peer` = requests "
        "whose tokens equal the peer's (checked for ar and linear_spec, which must match at "
        "temperature 0). ttft = time to the first committed token. Accuracy: HumanEval by its "
        "execution harness (subprocess, 5 s timeout), gsm_symbolic by reasoning-gym's scorer.",
        "",
        report.markdown_table(report.MODE_HEADER, report.mode_rows(result)),
        "",
    ]
    if peer:
        lines += [f"Peer: transformers `{peer['model_class']}.generate` ({peer['dtype']}), "
                  f"{peer['tokens_per_s']} tokens/s at batch {result['batch_size']}.", ""]
    lines += sol_section(result) + sweep_section(result) + curve_section(curve) + gpu_section()
    return "\n".join(lines)


def gpu_section() -> list[str]:
    """``benchmarks/gpu/gpu_results.md`` (written by ``bash benchmarks/gpu.sh``) if present."""
    path = HERE / "gpu" / "gpu_results.md"
    head = ["## GPU", "", "`bash benchmarks/gpu.sh` (offline, under 8 minutes on one GPU): an "
            "NLD-8B-shaped model with random bf16 weights; the forward-cost curve for 1 to 64 "
            "query tokens, ar batch 1 tokens/s as a percentage of the HBM roofline (weight "
            "bytes / measured copy bandwidth), and every mode at batch 1, 8 and 32 with forced "
            "acceptance 1, 3 and 6 for the speculative modes, CUDA graphs on and off. It writes "
            "`benchmarks/gpu/gpu_results.json` and `gpu_results.md`, which this section shows "
            "when present.", ""]
    if not path.exists():
        return head + ["Not run yet: no GPU was available when this file was regenerated. Its "
                       "CPU path is tested with a tiny shape (`OUT=/tmp/g bash benchmarks/gpu.sh "
                       "--shape tiny --device cpu --batch-sizes 1,2`); on a machine without CUDA "
                       "it stops at once with a message.", ""]
    return head + [path.read_text(), ""]


def sol_section(result: dict) -> list[str]:
    if not result["sol"]:
        return []
    return [
        "## Speed of light (spec 7.3)",
        "",
        "Tokens per forward, all forwards counted (prefill, denoising, commit), per category. "
        "*serial*: diffusion unmasking one position per forward (`threshold=None`), the target "
        "the oracle must reproduce; *threshold sampler*: diffusion at the threshold above; "
        "*SOL (compaction)*: the paper's recursive dynamic compaction, the fewest forwards its "
        "greedy search finds whose parallel commits reproduce the serial output exactly "
        f"(budget {result['sol'][0]['budget']} predicted states per block); *exact*: breadth-first "
        "search over all commit subsets, the true minimum under the same definition "
        "(`src/trimode/bench/oracle.py`). The paper's +76.5% is SOL / linear_spec on NLD-8B "
        "(6.02 vs 3.41 tokens per forward): the last column is that ratio here. The two preserve "
        "different outputs (the diffusion serial target vs the AR output), so it is an upper-bound "
        "comparison, as in the paper. *SOL per denoise* counts denoising forwards only (the "
        "paper's block-32 SOL TPF of 7.60 does not count every forward; its \"real TPF\" of "
        "6.02, which does, is the one compared with linear_spec; spec 7.3).",
        "",
        report.markdown_table(report.SOL_HEADER, report.sol_rows(result)),
        "",
        "![tokens per forward](tokens_per_forward.png)",
        "",
    ]


def sweep_section(result: dict) -> list[str]:
    cross = result["crossover"].get("modes", {})
    text = ", ".join(f"{mode} (block_length {c['block_length']}): "
                     f"{c['ar_faster_from_batch_size'] if c['ar_faster_from_batch_size'] else 'above the largest size measured'}"
                     for mode, c in cross.items())
    return [
        "## Batch size, and the crossover",
        "",
        "tokens/s over ceil(n / b) batches of b prompts (the prompt list cycled to fill them); "
        "peak MiB is the process's peak resident set on CPU (monotone over the run).",
        "",
        report.markdown_table(report.SWEEP_HEADER, report.sweep_rows(result)),
        "",
        f"Batch size from which `ar` is at least as fast as each parallel mode: {text}. "
        "Machine-readable in `benchmarks/crossover.json` (format in "
        "`trimode.bench.report.write_crossover`), which the `auto` mode policy reads.",
        "",
        "![tokens/s against batch size](tokens_per_s_vs_batch.png)",
        "",
    ]


def curve_section(curve: list[dict]) -> list[str]:
    if not curve:
        return []
    return [
        "## Forward cost",
        "",
        "One read-only forward (logits included) of T query tokens after a 128-token cached "
        "prefix, batch 1, median of 7 (`trimode.bench.forward_cost`; on a GPU, "
        "`bash benchmarks/gpu.sh` measures the same on an NLD-8B shape).",
        "",
        "| query tokens | " + " | ".join(str(r["tokens"]) for r in curve) + " |",
        "|---|" + "---:|" * len(curve),
        "| ms | " + " | ".join(f"{r['seconds'] * 1000:.1f}" for r in curve) + " |",
        "| x one token | " + " | ".join(f"{r['relative_to_1']:.2f}" for r in curve) + " |",
        "",
        "![forward cost](forward_cost.png)",
        "",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
