"""CUDA graphs of the decode forward, per padded (rows, query width, key span) bucket.

On CUDA a small decode forward is dominated by kernel launches (hundreds per layer stack);
replaying a captured graph launches them all at once, as vLLM and SGLang do. ``GraphRunner``
captures ``model(...)`` lazily the first time a bucket is seen:

- rows: exactly the decode rows of the step (rows 0 .. B-1 of the KV pool, so the cache
  tensors have the same addresses at every replay);
- query width: padded up to a power of two (at most ``max_width``); padding queries are
  masked out and write only scratch slots past the row's length, as in an eager forward;
- key span: padded up to a power of two (at least 256, at most the cache capacity), so the
  attention reads only what the longest row needs, rounded.

Inputs (and a paged cache's page table) are copied into the graph's static buffers before
each replay; the forward runs
dense (no ragged-row packing) so every shape is static. Anything outside a bucket (prefill,
wider steps, CPU) runs eagerly. Only used when ``model.device.type == "cuda"`` and
``EngineConfig.cuda_graphs`` is on. NOT YET RUN ON A GPU: written and reviewed on a CPU-only
machine (see docs/ARCHITECTURE.md); ``benchmarks/gpu.sh`` measures it on and off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.kv_cache import ForwardPlan, KVCache
from ..model.paged_cache import PagedKVCache

MIN_SPAN = 256


def _pow2(n: int, low: int = 1) -> int:
    return max(low, 1 << (max(n, 1) - 1).bit_length())


@dataclass
class _Graph:
    graph: object
    inputs: dict
    lengths: torch.Tensor
    hidden: torch.Tensor
    out_lengths: torch.Tensor
    table: torch.Tensor | None = None  # a paged cache's page table (copied in per replay)


class GraphRunner:
    """Captured decode forwards of one model, keyed by bucket (at most ``max_graphs``)."""

    def __init__(self, model, max_width: int = 64, max_graphs: int = 64):
        self.model = model
        self.max_width = max_width
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def bucket(self, cache: KVCache, width: int, plan: ForwardPlan, fused: bool) -> tuple | None:
        """The bucket of a forward, or None when it must run eagerly."""
        if width > self.max_width or max(map(sum, zip(plan.lengths, plan.n_valid))) > cache.capacity:
            return None  # too wide, or over capacity (the eager forward raises)
        w = _pow2(width)
        span = min(_pow2(max(plan.lengths) + w, MIN_SPAN), cache.capacity)
        if max(plan.lengths) + w > span:
            return None
        key = (len(plan.lengths), w, span, plan.adapter, fused)
        if key not in self.graphs and len(self.graphs) >= self.max_graphs:
            return None
        return key

    def run(self, key: tuple, cache: KVCache, inputs: dict) -> torch.Tensor:
        """Replay (capturing first if new) the forward of ``inputs`` (the eager call's
        tensors: tokens, n_valid, bidirectional, write, adapter and, for fused rows,
        attention and offsets) on ``cache``; returns hidden ``[B, T, d]`` (a view of the
        graph's output, valid until the next replay) and updates ``cache.lengths``."""
        entry = self.graphs.get(key) or self._capture(key, cache)
        self.graphs[key] = entry
        width = inputs["tokens"].shape[1]
        for name, value in _pad(inputs, key[1]).items():
            entry.inputs[name].copy_(value)
        entry.lengths.copy_(cache.lengths)
        if entry.table is not None:
            entry.table.copy_(cache.table)
        entry.graph.replay()
        cache.lengths = entry.out_lengths.clone()
        return entry.hidden[:, :width]

    def _capture(self, key: tuple, cache: KVCache) -> _Graph:
        rows, width, span, adapter, fused = key
        device = cache.lengths.device
        inputs = {"tokens": torch.zeros(rows, width, dtype=torch.long, device=device),
                  "n_valid": torch.ones(rows, dtype=torch.long, device=device),
                  "bidirectional": torch.zeros(rows, dtype=torch.bool, device=device),
                  "write": torch.zeros(rows, dtype=torch.bool, device=device),
                  "adapter": torch.zeros(rows, width, dtype=torch.bool, device=device)}
        if fused:
            inputs["attention"] = torch.zeros(rows, width, width, dtype=torch.bool, device=device)
            inputs["offsets"] = torch.arange(width, device=device).repeat(rows, 1)
        lengths = cache.lengths.clone()
        table = None
        if isinstance(cache, PagedKVCache):
            view = cache.view(0, rows)
            view.table = table = cache.table.clone()
        else:
            view = KVCache.__new__(KVCache)
            view.keys, view.values, view.capacity = cache.keys, cache.values, cache.capacity
        # dense and span-sized: every row "full" and the longest row at span - width
        plan = ForwardPlan([span - width] * rows, [width] * rows, adapter)

        def forward() -> torch.Tensor:
            view.lengths = lengths
            return self.model(inputs["tokens"], view, inputs["n_valid"], inputs["bidirectional"],
                              inputs["write"], inputs["adapter"], inputs.get("attention"),
                              inputs.get("offsets"), plan=plan)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (kernels selected, workspaces allocated)
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = forward()
        return _Graph(graph, inputs, lengths, hidden, view.lengths, table)


def _pad(inputs: dict, width: int) -> dict:
    """The eager call's tensors padded from their width to ``width`` query slots."""
    out = dict(inputs)
    t = inputs["tokens"].shape[1]
    if t == width:
        return out
    pad = width - t
    out["tokens"] = torch.nn.functional.pad(inputs["tokens"], (0, pad))
    out["adapter"] = torch.nn.functional.pad(inputs["adapter"], (0, pad))
    if "attention" in inputs:
        out["attention"] = torch.nn.functional.pad(inputs["attention"], (0, pad, 0, pad))
        rows = inputs["offsets"].shape[0]
        extra = torch.arange(t, width, device=inputs["offsets"].device).repeat(rows, 1)
        out["offsets"] = torch.cat([inputs["offsets"], extra], dim=1)
    return out
