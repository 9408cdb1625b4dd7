"""Run a benchmark: every mode configuration over the prompt set, per category and per batch
size, the transformers peer on the same prompts, and the speed-of-light oracle.

Every configuration and the peer run batch by batch in turn (configuration 1, 2, ..., peer,
then the next batch), so that on a shared machine all of them see the same load and their
ratios stay meaningful. Per category (batches of the smallest batch size, formed within the
category): nfe,
tokens_per_forward, acceptance_length, tokens/s (generated tokens / wall seconds of the
category's batches), time to first token (first committed token, from the batch start),
latency p50/p95 (request end, from the batch start), accuracy where the set has a scorer.
Per batch size: tokens/s over ``ceil(n / b)`` batches of ``b`` prompts (the prompt list cycled
to fill the last batch). Peak memory: ``torch.cuda.max_memory_allocated`` per configuration on
CUDA (reset before each batch); on CPU the process's peak resident set size (monotone over the
run, so an upper bound that does not separate the configurations).
Greedy decoding (temperature 0) throughout, as the token-equality check and the oracle need.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..decoding.registry import STRATEGIES
from ..defaults import MODES, PARALLEL_MODES, THRESHOLD
from ..params import SamplingParams
from .datasets import Item
from .sol import sol_request

PARALLEL = PARALLEL_MODES


@dataclass(frozen=True)
class BenchConfig:
    """What to run. Raises ValueError naming the field for bad values."""

    modes: tuple[str, ...] = ("ar", "diffusion", "linear_spec")
    block_lengths: tuple[int, ...] = (8,)
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    threshold: float | None = THRESHOLD["diffusion"]
    max_tokens: int = 64
    peer: str | None = None
    sol: bool = True
    sol_budget: int = 5000
    sol_exact_max_block: int = 8

    def __post_init__(self) -> None:
        if not self.modes or any(m not in MODES for m in self.modes):
            raise ValueError(f"modes must be a non-empty list of {', '.join(MODES)}; got {self.modes}")
        for name in ("block_lengths", "batch_sizes"):
            values = getattr(self, name)
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                 for v in values):
                raise ValueError(f"{name} must be a non-empty list of integers >= 1; got {values}")
        SamplingParams(mode="diffusion", threshold=self.threshold, max_tokens=self.max_tokens)
        if self.peer not in (None, "transformers"):
            raise ValueError(f"peer must be 'transformers' or None; got {self.peer!r}")
        if isinstance(self.sol_budget, bool) or not isinstance(self.sol_budget, int) \
                or self.sol_budget < 1:
            raise ValueError(f"sol_budget must be an integer >= 1; got {self.sol_budget!r}")


@dataclass
class Run:
    """One configuration's requests at one batch size: per-request records and batch walls."""

    label: str
    mode: str
    block_length: int | None
    batch_size: int
    records: list[dict] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    peak_memory_mb: float | None = None


def configurations(config: BenchConfig) -> list[tuple[str, SamplingParams]]:
    """(label, params) per mode and block length; ``ar`` once."""
    out = []
    for mode in config.modes:
        strategy = STRATEGIES.get(mode)  # None for auto
        if strategy is not None and not strategy.blocks:
            out.append((mode, SamplingParams(mode=mode, max_tokens=config.max_tokens)))
            continue
        tuned = tunes_threshold(mode)
        for b in config.block_lengths:
            threshold = {"threshold": config.threshold} if tuned else {}
            label = f"{mode} L={b}" + (f" t={config.threshold}" if tuned else "")
            out.append((label, SamplingParams(mode=mode, max_tokens=config.max_tokens,
                                              block_length=b, **threshold)))
    return out


def tunes_threshold(mode: str) -> bool:
    """Whether ``BenchConfig.threshold`` applies to ``mode`` (and is shown in its label)."""
    strategy = STRATEGIES.get(mode)
    return strategy is not None and strategy.tunes_threshold


def prompt_ids(llm, item: Item) -> list[int]:
    if llm.tokenizer.has_chat_template:
        return llm.tokenizer.apply_chat_template([{"role": "user", "content": item.prompt}])
    return llm.tokenizer.encode(item.prompt)


def _sync(llm) -> None:
    if llm.model.device.type == "cuda":
        torch.cuda.synchronize()


def run_batch(llm, items: list[Item], ids: list[list[int]], params: SamplingParams,
              run: Run, score: bool) -> None:
    """Decode one batch; append one record per request and the batch's wall time."""
    ensure_rows(llm, len(ids))
    first: dict[int, float] = {}
    _memory_start(llm)
    _sync(llm)
    start = time.perf_counter()

    def on_step(index, seq):
        if index not in first and (seq.generated or seq.finished):
            first[index] = time.perf_counter() - start

    outs = llm.generate(ids, params, on_step=on_step)
    _sync(llm)
    run.walls.append(time.perf_counter() - start)
    run.peak_memory_mb = max(run.peak_memory_mb or 0.0, _memory_peak(llm))
    for k, (item, out) in enumerate(zip(items, outs)):
        m = out.metrics
        run.records.append({
            "id": item.id, "category": item.category, "nfe": m.nfe,
            "generated_tokens": m.generated_tokens, "acceptance_length": m.acceptance_length,
            "latency_s": m.latency_s, "ttft_s": first.get(k, m.latency_s),
            "token_ids": out.token_ids, "text": out.text,
            "correct": item.score(out.text) if score and item.score is not None else None})


def ensure_rows(llm, rows: int) -> None:
    """Give ``llm``'s engine at least ``rows`` KV rows, so a batch of ``rows`` is admitted
    at once (one batch, not a queue)."""
    import dataclasses

    from ..engine import Engine

    if llm.engine.config.max_num_seqs < rows:
        llm.engine = Engine(llm.model, dataclasses.replace(llm.engine.config, max_num_seqs=rows))
        llm.max_batch_size = rows


def _memory_start(llm) -> None:
    if llm.model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _memory_peak(llm) -> float:
    if llm.model.device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def by_category(items: list[Item]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.category, []).append(i)
    return groups


def category_batches(items: list[Item], batch_size: int) -> list[list[int]]:
    """Item indices in batches of ``batch_size`` formed within each category, in order."""
    return [idx[k : k + batch_size] for idx in by_category(items).values()
            for k in range(0, len(idx), batch_size)]


def sweep_batches(n: int, batch_size: int) -> list[list[int]]:
    """``ceil(n / b)`` full batches of ``b`` indices, ``range(n)`` cycled to fill them."""
    order = [i % n for i in range(math.ceil(n / batch_size) * batch_size)]
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def summarize(records: list[dict], walls: float | None = None) -> dict:
    """Aggregate records: sums, ratios, medians; tokens/s needs the batches' wall time."""
    tokens = sum(r["generated_tokens"] for r in records)
    nfe = sum(r["nfe"] for r in records)
    acc = [r["acceptance_length"] for r in records if r["acceptance_length"] is not None]
    lat = sorted(r["latency_s"] for r in records)
    scored = [r["correct"] for r in records if r["correct"] is not None]
    return {"requests": len(records), "generated_tokens": tokens, "nfe": nfe,
            "tokens_per_forward": round(tokens / nfe, 4) if nfe else None,
            "acceptance_length": round(statistics.mean(acc), 4) if acc else None,
            "tokens_per_s": round(tokens / walls, 3) if walls else None,
            "ttft_s": round(statistics.median(r["ttft_s"] for r in records), 4),
            "latency_p50_s": round(_quantile(lat, 0.50), 4),
            "latency_p95_s": round(_quantile(lat, 0.95), 4),
            "accuracy": round(sum(scored) / len(scored), 4) if scored else None}


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a sorted list."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def category_walls(run: Run, items: list[Item], batch_size: int) -> dict[str, float]:
    """Wall seconds per category (batches were formed within categories, in order)."""
    out, k = {}, 0
    for category, idx in by_category(items).items():
        n = math.ceil(len(idx) / batch_size)
        out[category] = sum(run.walls[k : k + n])
        k += n
    return out


def run_sol(llm, items, ids, block_length, config: BenchConfig) -> list[dict]:
    """The oracle per item at ``block_length`` (greedy serial target, docs/spec.md 7.3)."""
    stop = set(llm.config.eos_token_ids)
    exact = block_length <= config.sol_exact_max_block
    out = []
    for item, p in zip(items, ids):
        # rows=8: the exact search predicts up to 8 states per forward (the serial target
        # and compaction always run one state per forward, as diffusion mode at batch 1)
        r = sol_request(llm.model, p, block_length, config.max_tokens, stop,
                        llm.config.mask_token_id, config.sol_budget, exact, rows=8)
        out.append({"id": item.id, "category": item.category,
                    "generated_tokens": r.generated_tokens, "serial_nfe": r.serial_nfe,
                    "compaction_nfe": r.compaction_nfe, "exact_nfe": r.exact_nfe,
                    "denoise": r.denoise_forwards, "simulated": sum(b.simulated for b in r.blocks),
                    "budget_exhausted": any(b.budget_exhausted for b in r.blocks)})
    return out
