"""Presentation of a ``trimode bench`` result: rich tables, the final JSON line, the plots
(matplotlib PNGs) and ``crossover.json``. Knows nothing about models or decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

# Fields every result carries (the tests check them): per mode and category ...
SUMMARY_FIELDS = ("nfe", "tokens_per_forward", "acceptance_length", "tokens_per_s", "ttft_s",
                  "latency_p50_s", "latency_p95_s", "accuracy")
# ... and at the top level.
FIELDS = ("machine", "config", "batch_size", "categories", "modes", "batch_sweep", "peer", "sol",
          "crossover")


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def mode_rows(result: dict) -> list[list[str]]:
    """One row per (configuration, category), overall last per configuration."""
    rows = []
    for m in result["modes"]:
        parts = list(m["categories"].items()) + [("all", m["overall"])]
        eq = m.get("equal_to_peer")
        for category, s in parts:
            rows.append([m["label"], category, _fmt(s["nfe"]), _fmt(s["tokens_per_forward"]),
                         _fmt(s["acceptance_length"]), _fmt(s["tokens_per_s"], 1),
                         _fmt(s.get("ratio_to_peer")), _fmt(s["ttft_s"], 3),
                         _fmt(s["latency_p50_s"]), _fmt(s["latency_p95_s"]),
                         _fmt(s["accuracy"]),
                         (f"{eq['equal']}/{eq['requests']}" if eq and category == "all" else "")])
    return rows


MODE_HEADER = ["config", "category", "nfe", "tokens/fwd", "acceptance", "tokens/s", "x peer",
               "ttft s", "p50 s", "p95 s", "accuracy", "= peer"]
SOL_HEADER = ["block", "category", "serial", "threshold sampler", "linear_spec", "SOL (compaction)",
              "exact", "SOL / linear_spec", "SOL per denoise"]


def sol_rows(result: dict) -> list[list[str]]:
    rows = []
    for entry in result["sol"]:
        for category, s in list(entry["categories"].items()) + [("all", entry["overall"])]:
            ls = s.get("linear_spec_tokens_per_forward")
            ratio = s["sol_tokens_per_forward"] / ls if ls else None
            rows.append([str(entry["block_length"]), category,
                         _fmt(s["serial_tokens_per_forward"]),
                         _fmt(s.get("diffusion_tokens_per_forward")), _fmt(ls),
                         _fmt(s["sol_tokens_per_forward"]), _fmt(s["exact_tokens_per_forward"]),
                         _fmt(ratio), _fmt(s["sol_tokens_per_denoise"])])
    return rows


SWEEP_HEADER = ["config", "batch", "tokens/s", "tokens/fwd", "x peer", "peak MiB"]


def sweep_rows(result: dict) -> list[list[str]]:
    rows = [[s["label"], str(s["batch_size"]), _fmt(s["tokens_per_s"], 1),
             _fmt(s["tokens_per_forward"]), _fmt(s.get("ratio_to_peer")),
             _fmt(s["peak_memory_mb"], 0)] for s in result["batch_sweep"]]
    if result["peer"]:
        rows += [["transformers (peer)", b, _fmt(v, 1), "1.00", "1.00", ""]
                 for b, v in result["peer"]["sweep"].items()]
    return rows


def print_tables(result: dict, console: Console) -> None:
    for title, header, rows in (("Per mode and category", MODE_HEADER, mode_rows(result)),
                                ("Batch sweep", SWEEP_HEADER, sweep_rows(result)),
                                ("Speed of light (tokens per forward, docs/spec.md 7.3)", SOL_HEADER,
                                 sol_rows(result))):
        if not rows:
            continue
        table = Table(title=title, show_lines=False)
        for h in header:
            table.add_column(h, justify="left" if h in ("config", "category") else "right")
        for r in rows:
            table.add_row(*r)
        console.print(table)
    cross = result["crossover"].get("modes", {})
    if cross:
        console.print("ar faster from batch size: " + ", ".join(
            f"{m} (L={c['block_length']}): {_fmt(c['ar_faster_from_batch_size'])}"
            for m, c in cross.items()))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    right = ["---" if h in ("config", "category") else "---:" for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(right) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def json_line(result: dict) -> str:
    """The result without per-request token ids (kept in the file written by ``--out``)."""
    slim = json.loads(json.dumps(result))
    for m in slim["modes"]:
        m.pop("records", None)
    if slim["peer"]:
        slim["peer"].pop("records", None)
    return json.dumps(slim)


def write_crossover(result: dict, path: Path) -> None:
    """``crossover.json``: per parallel mode, the batch size from which ar is faster.

    Format: ``{"source", "date", "machine": {device, dtype, cpu, gpu}, "max_tokens",
    "batch_sizes", "modes": {mode: {"block_length", "ar_faster_from_batch_size",
    "max_parallel_batch"}}, "configs": {label: {"mode", "block_length", "tokens_per_s":
    {batch: tok/s}, "ar_faster_from_batch_size", "max_parallel_batch"}}, "ar_tokens_per_s":
    {batch: tok/s}}``. ``ar_faster_from_batch_size`` null: the parallel mode was faster at the
    largest batch size measured (the crossover lies above it). ``max_parallel_batch``: the
    largest measured batch size below the crossover (0: ar was faster at every size from 1;
    null: ar was faster at the smallest size measured, which was above 1), the value
    for ``engine.AutoPolicy(parallel_mode=mode, max_parallel_batch=...)``. Per mode, the block
    length is the one fastest at the smallest batch size."""
    m = result["machine"]
    out = {"source": "trimode bench", "date": result["date"],
           "machine": {k: m[k] for k in ("device", "dtype", "cpu", "gpu")},
           "max_tokens": result["config"]["max_tokens"],
           "batch_sizes": sorted(set(result["config"]["batch_sizes"]))}
    out.update(result["crossover"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


def plot(result: dict, directory: Path) -> list[Path]:
    """``tokens_per_forward.png`` (by category and mode, with the SOL oracle) and
    ``tokens_per_s_vs_batch.png``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    series = {m["label"]: {c: s["tokens_per_forward"] for c, s in m["categories"].items()}
              for m in result["modes"]}
    for entry in result["sol"]:
        series[f"diffusion SOL L={entry['block_length']}"] = {
            c: s["sol_tokens_per_forward"] for c, s in entry["categories"].items()}
    cats = result["categories"]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cats) + 3), 4))
    width = 0.8 / max(1, len(series))
    for k, (label, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(cats))], [values.get(c, 0) or 0 for c in cats],
               width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=30, ha="right")
    ax.set_ylabel("tokens per forward")
    ax.set_title("tokens_per_forward by category and mode")
    ax.legend(fontsize=7)
    fig.tight_layout()
    first = directory / "tokens_per_forward.png"
    fig.savefig(first, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    lines: dict[str, list] = {}
    for s in result["batch_sweep"]:
        lines.setdefault(s["label"], []).append((s["batch_size"], s["tokens_per_s"]))
    if result["peer"]:
        lines["transformers (peer)"] = [(int(b), v) for b, v in result["peer"]["sweep"].items()]
    for label, points in lines.items():
        points.sort()
        ax.plot(*zip(*points), marker="o", label=label,
                linestyle="--" if "peer" in label else "-")
    ax.set_xscale("log", base=2)
    sizes = sorted({b for points in lines.values() for b, _ in points})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    ax.set_title("tokens/s against batch size")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    second = directory / "tokens_per_s_vs_batch.png"
    fig.savefig(second, dpi=110)
    plt.close(fig)
    return [first, second]
