"""Orchestrates one ``trimode bench`` run and returns its result as one JSON-ready dict.

Order: the category batches at the smallest batch size (scored), then the batch-size sweep;
within each, every configuration and the peer take the same batch in turn before the next
batch, so that all see the same machine load. Then the speed-of-light oracle per diffusion
block length; ratios, token equality and the crossover batch size. ``log`` receives one line per
finished step (the CLI shows it as progress on stderr).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from typing import Callable

import torch

from ..decoding.registry import equals_ar
from ..params import SamplingParams
from .datasets import Item
from .peer import build_peer, peer_generate
from .runner import (PARALLEL, BenchConfig, Run, by_category, category_batches, category_walls,
                     configurations, prompt_ids, run_batch, run_sol, summarize, sweep_batches,
                     tunes_threshold)


def benchmark(llm, items: list[Item], config: BenchConfig,
              log: Callable[[str], None] = lambda line: None) -> dict:
    """Run ``config`` over ``items`` with ``llm`` -> the result dict (see ``report.FIELDS``)."""
    if not items:
        raise ValueError("the dataset selection holds no items")
    ids = [prompt_ids(llm, item) for item in items]
    b0, sizes = min(config.batch_sizes), sorted(set(config.batch_sizes))
    confs = configurations(config)
    peer = Peer(llm, config.max_tokens) if config.peer else None
    llm.generate([ids[0]], SamplingParams(max_tokens=2))  # warm-up
    runs = {label: Run(label, p.mode, p.block_length, b0) for label, p in confs}
    for part in category_batches(items, b0):  # interleaved: the same load for everyone
        for label, params in confs:
            run_batch(llm, [items[i] for i in part], [ids[i] for i in part], params,
                      runs[label], True)
        if peer:
            peer.batch(items, ids, part, b0, record=True)
        log(f"batch {b0}: {items[part[0]].category} done")
    walls = {label: category_walls(run, items, b0) for label, run in runs.items()}
    modes = [_mode_entry(runs[label], items, walls[label], params) for label, params in confs]
    sweep = [_sweep_entry(runs[label], sum(runs[label].walls)) for label, _ in confs]
    for b in sizes[1:]:
        swept = {label: Run(label, p.mode, p.block_length, b) for label, p in confs}
        for part in sweep_batches(len(items), b):
            for label, params in confs:
                run_batch(llm, [items[i] for i in part], [ids[i] for i in part], params,
                          swept[label], False)
            if peer:
                peer.batch(items, ids, part, b)
        sweep += [_sweep_entry(swept[label], sum(swept[label].walls)) for label, _ in confs]
        log(f"batch {b}: " + ", ".join(f"{s['label']} {s['tokens_per_s']}" for s in sweep[-len(confs):]))
    peer_result = peer.result(items, b0) if peer else None
    if peer_result:
        _compare_to_peer(modes, sweep, peer_result, items)
    sol = []
    if config.sol and "diffusion" in config.modes:
        for block_length in config.block_lengths:
            sol.append(_sol_entry(llm, items, ids, block_length, config, modes))
            log(f"speed of light L={block_length}: {sol[-1]['overall']}")
    return {"benchmark": "trimode bench", "date": dt.datetime.now(dt.timezone.utc).isoformat(
                timespec="seconds"),
            "machine": machine(llm), "config": _config_dict(config), "batch_size": b0,
            "categories": list(by_category(items)), "modes": modes, "batch_sweep": sweep,
            "peer": peer_result, "sol": sol, "crossover": crossover(sweep)}


def _mode_entry(run: Run, items, walls: dict[str, float], params) -> dict:
    cats = {}
    for category, idx in by_category(items).items():
        ids = {items[i].id for i in idx}
        cats[category] = summarize([r for r in run.records if r["id"] in ids], walls[category])
    return {"label": run.label, "mode": run.mode, "block_length": run.block_length,
            "threshold": params.threshold if tunes_threshold(run.mode) else None,
            "batch_size": run.batch_size, "overall": summarize(run.records, sum(run.walls)),
            "categories": cats, "peak_memory_mb": round(run.peak_memory_mb, 1),
            "records": [{k: r[k] for k in ("id", "category", "token_ids", "nfe",
                                           "generated_tokens", "correct")} for r in run.records]}


def _sweep_entry(run: Run, wall: float) -> dict:
    s = summarize(run.records, wall)
    return {"label": run.label, "mode": run.mode, "block_length": run.block_length,
            "batch_size": run.batch_size, "tokens_per_s": s["tokens_per_s"],
            "tokens_per_forward": s["tokens_per_forward"], "requests": s["requests"],
            "peak_memory_mb": round(run.peak_memory_mb, 1)}


class Peer:
    """transformers' ``generate`` on the same weights, fed the same batches as the modes."""

    def __init__(self, llm, max_tokens: int):
        self.llm, self.max_tokens = llm, max_tokens
        self.model = build_peer(llm)
        self.stop = set(llm.config.eos_token_ids)
        self.records: list[dict] = []  # the category batches (smallest batch size)
        self.walls: dict[str, float] = {}  # per category, smallest batch size
        self.totals: dict[int, list[float]] = {}  # batch size -> [tokens, seconds]
        peer_generate(self.model, llm, [[llm.config.bos_token_id or 1]], 2, self.stop)  # warm-up

    def batch(self, items: list[Item], ids: list[list[int]], part: list[int], size: int,
              record: bool = False) -> None:
        """One batch of ``size`` (``part``: item indices); ``record``: a category batch."""
        wall, tokens, counts = peer_generate(self.model, self.llm, [ids[i] for i in part],
                                             self.max_tokens, self.stop)
        total = self.totals.setdefault(size, [0, 0.0])
        total[0], total[1] = total[0] + sum(counts), total[1] + wall
        if record:
            category = items[part[0]].category
            self.walls[category] = self.walls.get(category, 0.0) + wall
            self.records += [{"id": items[i].id, "category": items[i].category, "token_ids": t,
                              "generated_tokens": c} for i, t, c in zip(part, tokens, counts)]

    def result(self, items: list[Item], b0: int) -> dict:
        sweep = {b: round(n / s, 3) for b, (n, s) in sorted(self.totals.items())}
        cats = {}
        for category in by_category(items):
            n = sum(r["generated_tokens"] for r in self.records if r["category"] == category)
            cats[category] = {"tokens_per_s": round(n / self.walls[category], 3)}
        return {"name": "transformers", "model_class": type(self.model).__name__,
                "dtype": str(self.llm.model.dtype).replace("torch.", ""),
                "tokens_per_s": sweep[b0], "categories": cats,
                "sweep": {str(b): v for b, v in sweep.items()}, "records": self.records}


def _compare_to_peer(modes, sweep, peer, items) -> None:
    """tokens/s ratios to the peer; token equality for ar and linear_spec (temperature 0)."""
    theirs = {r["id"]: r["token_ids"] for r in peer["records"]}
    for m in modes:
        m["overall"]["ratio_to_peer"] = round(m["overall"]["tokens_per_s"] / peer["tokens_per_s"], 3)
        for category, s in m["categories"].items():
            s["ratio_to_peer"] = round(s["tokens_per_s"] / peer["categories"][category]["tokens_per_s"], 3)
        if equals_ar(m["mode"]):
            same = [r["token_ids"] == theirs[r["id"]] for r in m["records"]]
            first = [_first_diff(r["token_ids"], theirs[r["id"]]) for r in m["records"]]
            m["equal_to_peer"] = {"requests": len(same), "equal": sum(same),
                                  "first_differences": [f for f in first if f is not None]}
    for s in sweep:
        peer_tps = peer["sweep"][str(s["batch_size"])]
        s["ratio_to_peer"] = round(s["tokens_per_s"] / peer_tps, 3)


def _first_diff(a: list[int], b: list[int]) -> int | None:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    return n if n is not None else (None if len(a) == len(b) else min(len(a), len(b)))


def _sol_entry(llm, items, ids, block_length, config, modes) -> dict:
    rows = run_sol(llm, items, ids, block_length, config)
    tpf = {m["label"]: m for m in modes if m["block_length"] == block_length}

    def stats(part, category=None):
        tokens = sum(r["generated_tokens"] for r in part)
        exact = [r["exact_nfe"] for r in part]
        out = {"requests": len(part), "generated_tokens": tokens,
               "serial_tokens_per_forward": round(tokens / sum(r["serial_nfe"] for r in part), 4),
               "sol_tokens_per_forward": round(tokens / sum(r["compaction_nfe"] for r in part), 4),
               "exact_tokens_per_forward": None if None in exact else round(tokens / sum(exact), 4),
               "sol_tokens_per_denoise": round(tokens / max(1, sum(r["denoise"]["compaction"]
                                                                  for r in part)), 4),
               "budget_exhausted": sum(r["budget_exhausted"] for r in part),
               "simulated_forwards": sum(r["simulated"] for r in part)}
        for m in tpf.values():
            src = m["categories"][category] if category else m["overall"]
            out[f"{m['mode']}_tokens_per_forward"] = src["tokens_per_forward"]
        return out

    cats = {c: stats([rows[i] for i in idx], c) for c, idx in by_category(items).items()}
    return {"block_length": block_length, "budget": config.sol_budget,
            "exact_searched": block_length <= config.sol_exact_max_block,
            "overall": stats(rows), "categories": cats}


def crossover(sweep: list[dict]) -> dict:
    """Per parallel configuration: ``ar_faster_from_batch_size``, the smallest measured batch
    size from which ``ar``'s tokens/s is at least the configuration's at every larger measured
    size (None: ar is slower at the largest size measured), and ``max_parallel_batch``, the
    largest measured size below it (0: ar is faster everywhere from batch size 1; None: ar
    is faster at the smallest size measured and that size is above 1), which is what
    ``engine.AutoPolicy.max_parallel_batch`` takes. Per mode: the block length fastest at the
    smallest batch size, and its numbers."""
    ar = {s["batch_size"]: s["tokens_per_s"] for s in sweep if s["mode"] == "ar"}
    if not ar:
        return {}
    configs: dict[str, dict] = {}
    for s in sweep:
        if s["mode"] in PARALLEL:
            configs.setdefault(s["label"], {"mode": s["mode"], "block_length": s["block_length"],
                                            "tokens_per_s": {}})["tokens_per_s"][s["batch_size"]] = s["tokens_per_s"]
    for c in configs.values():
        sizes = sorted(b for b in c["tokens_per_s"] if b in ar)
        start = None
        for b in reversed(sizes):
            if ar[b] >= c["tokens_per_s"][b]:
                start = b
            else:
                break
        c["ar_faster_from_batch_size"] = start
        # AutoPolicy.max_parallel_batch: run the parallel mode up to this batch size
        below = [b for b in sizes if start is None or b < start]
        # ar faster already at the smallest size measured: 0 only if that size is 1; above 1
        # the sizes below were never measured, so the value is unknown (None), not 0
        c["max_parallel_batch"] = below[-1] if below else (0 if sizes and sizes[0] == 1 else None)
        c["tokens_per_s"] = {str(b): v for b, v in sorted(c["tokens_per_s"].items())}
    modes = {}
    for c in configs.values():
        best = modes.get(c["mode"])
        first = lambda x: next(iter(x["tokens_per_s"].values()))
        if best is None or first(c) > first(best):
            modes[c["mode"]] = c
    return {"ar_tokens_per_s": {str(b): v for b, v in sorted(ar.items())},
            "configs": configs,
            "modes": {m: {"block_length": c["block_length"],
                          "ar_faster_from_batch_size": c["ar_faster_from_batch_size"],
                          "max_parallel_batch": c["max_parallel_batch"]}
                      for m, c in modes.items()}}


def _config_dict(config: BenchConfig) -> dict:
    from dataclasses import asdict

    return asdict(config)


def machine(llm) -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = llm.model.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "gpu": gpu,
            "device": device.type, "dtype": str(llm.model.dtype).replace("torch.", ""),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "loadavg_1m": load}
