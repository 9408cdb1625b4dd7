"""The model runner: one packed forward for every row's Step, then every row's selection.

``forward_select`` right-pads rows to the longest (each row keeps its own attention kind,
cache write flag and adapter flags), runs the forward (replaying a captured CUDA graph where
one fits, ``cuda_graphs.py``), the LM head only at the slots a row needs a choice at, and
one batched selection on the model's device (``decoding/batch.py``): a step copies only
token ids and a few integers per row to the host. The host-side cache lengths and a
``ForwardPlan`` mean the forward itself reads nothing back. ``forward_rows`` returns plain
logits (benchmarks). Knows nothing about modes beyond the Step and Need interfaces.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..decoding.batch import Need, Result, select_rows
from ..decoding.sequence import Step
from ..model.attention import ForwardPlan
from ..model.config import ModelConfig
from ..model.kv_cache import KVCache
from ..model.paged_cache import PagedKVCache


class DecodingModel(Protocol):
    """What the engine needs of a model (``TriModeModel`` follows it; so do the tests' stubs).

    ``__call__(tokens [B, T], cache, n_valid [B], bidirectional [B], write [B],
    adapter [B, T], attention [B, T, T] | None, offsets [B, T] | None) -> hidden [B, T, d]``:
    row b runs its first ``n_valid[b]`` tokens after its cached prefix, causal or
    block-bidirectional (or the explicit fused pattern), writing its KV (advancing
    ``cache.lengths``) only where ``write``; ``embeds`` (VLM prefill only: where ``[B, T]``,
    values ``[N, d]``) replaces those token embeddings; ``plan`` (a ``ForwardPlan``: what
    the host knows, so nothing is read back) may be ignored. ``logits(hidden [N, d]) -> [N, V]``.
    ``new_cache(rows, capacity, zeroed)``: a dense KVCache; ``new_paged_cache(pages,
    page_size, rows, max_pages, zeroed)``: a PagedKVCache, the engine's pool
    (``zeroed=False`` may leave it uninitialised; the pool zeroes pages on first use).
    A model reads and writes a cache only through its ``write_index``/``store``/``window``.
    """

    config: ModelConfig

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def new_cache(self, rows: int, capacity: int, zeroed: bool = True) -> KVCache: ...

    def new_paged_cache(self, pages: int, page_size: int, rows: int, max_pages: int,
                        zeroed: bool = True) -> PagedKVCache: ...

    def __call__(self, tokens: torch.Tensor, cache: KVCache, n_valid: torch.Tensor,
                 bidirectional: torch.Tensor, write: torch.Tensor, adapter: torch.Tensor,
                 attention: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
                 embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                 plan: ForwardPlan | None = None) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


def forward_select(model: DecodingModel, cache, steps: list[Step], needs: list[Need],
                   graphs=None) -> list[Result]:
    """One packed forward of ``steps`` (row i of ``cache`` runs ``steps[i]``), then the LM
    head at exactly the slots ``needs`` name and one batched selection on the model's
    device (``batch.select_rows``): one host transfer of token ids and counts per row.
    ``graphs``: a ``cuda_graphs.GraphRunner`` replaying captured forwards where it can."""
    hidden = _forward(model, cache, steps, graphs)
    rows = torch.tensor([i for i, n in enumerate(needs) for _ in n.slots], device=hidden.device)
    cols = torch.tensor([c for n in needs for c in n.slots], device=hidden.device)
    logits = model.logits(hidden[rows, cols])
    return select_rows(logits, needs, model.config.mask_token_id)


def fill(model: DecodingModel, cache, steps: list[Step]) -> None:
    """One packed forward of ``steps`` for their KV alone (no LM head, no selection)."""
    _forward(model, cache, steps)


def forward_rows(model: DecodingModel, cache, steps: list[Step],
                 prefill: bool) -> torch.Tensor | list[torch.Tensor]:
    """One packed forward of ``steps`` -> fp32 logits on the CPU: ``[B, V]`` at each row's
    last real token when ``prefill``, else one ``[len(steps[i].tokens), V]`` tensor per row
    (benchmarks and tests; the engine uses ``forward_select``)."""
    n_valid = [len(s.tokens) for s in steps]
    hidden = _forward(model, cache, steps)
    rows = torch.tensor([i for i, n in enumerate(n_valid) for _ in range(n)])
    cols = torch.tensor([t for n in n_valid for t in range(n)])
    if prefill:
        rows, cols = torch.arange(len(steps)), torch.tensor(n_valid) - 1
    logits = model.logits(hidden[rows.to(hidden.device), cols.to(hidden.device)]).cpu()
    return logits if prefill else list(torch.split(logits, n_valid))


def _forward(model: DecodingModel, cache, steps: list[Step], graphs=None) -> torch.Tensor:
    """Hidden states ``[B, T, d]`` of the packed forward; the cache's host lengths follow."""
    device = model.device
    width = max(len(s.tokens) for s in steps)
    n_valid = [len(s.tokens) for s in steps]
    tokens = torch.tensor([s.tokens + [0] * (width - len(s.tokens)) for s in steps])
    flags = [[getattr(s, f) for s in steps] for f in ("bidirectional", "write")]
    bidirectional, write = (torch.tensor(f, device=device) for f in flags)
    per_token = [(s.adapter_tokens or [s.adapter] * len(s.tokens)) + [False] * (width - len(s.tokens))
                 for s in steps]
    adapter = torch.tensor(per_token, device=device)
    fused = {}
    if any(s.attention is not None for s in steps):
        fused = {k: v.to(device) for k, v in zip(("attention", "offsets"),
                                                  _fused_patterns(steps, width))}
    extra = {}
    if any(s.embeds is not None for s in steps):  # image features at pad slots (VLM prefill)
        extra["embeds"] = _embeds(steps, width)
    lengths = cache.host_lengths()
    plan = ForwardPlan(lengths, n_valid, any(map(any, per_token)))
    args = dict(tokens=tokens.to(device), n_valid=torch.tensor(n_valid, device=device),
                bidirectional=bidirectional, write=write, adapter=adapter, **fused)
    key = None
    if graphs is not None and not extra:
        key = graphs.bucket(cache, width, plan, bool(fused))
    if key is not None:
        hidden = graphs.run(key, cache, args)
    else:
        hidden = model(args.pop("tokens"), cache, args.pop("n_valid"), args.pop("bidirectional"),
                       args.pop("write"), args.pop("adapter"), plan=plan, **args, **extra)
    cache.set_host_lengths([n0 + (n if w else 0) for n0, n, w in zip(lengths, n_valid, flags[1])])
    return hidden


def _embeds(steps: list[Step], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``where`` ``[B, T]`` bool, ``values`` ``[N, d]`` row-major) for ``model.run``."""
    where = torch.zeros(len(steps), width, dtype=torch.bool)
    for i, s in enumerate(steps):
        where[i, list(s.embed_positions)] = True
    return where, torch.cat([s.embeds for s in steps if s.embeds is not None])


def _fused_patterns(steps: list[Step], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``[B, T, T]`` patterns and ``[B, T]`` offsets when any row uses a fused layout."""
    attention = torch.zeros(len(steps), width, width, dtype=torch.bool)
    offsets = torch.arange(width).repeat(len(steps), 1)
    for i, s in enumerate(steps):
        n = len(s.tokens)
        if s.attention is not None:
            attention[i, :n, :n] = s.attention
        elif s.bidirectional:
            attention[i, :n, :n] = True
        else:
            attention[i, :n, :n] = torch.ones(n, n).tril().bool()
        if s.offsets is not None:
            offsets[i, :n] = torch.tensor(s.offsets)
    return attention, offsets
