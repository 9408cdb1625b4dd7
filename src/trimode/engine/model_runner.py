"""The model runner: packs every row's Step into one batched forward and returns the logits.

``forward_rows`` right-pads rows to the longest (each row keeps its own attention kind, cache
write flag and adapter flags); ``run`` adds the check the engine needs (rows whose logits hold
NaN or +inf). The stepping itself lives in ``engine.py``. Knows nothing about modes beyond
the Step interface.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..decoding.sequence import Step
from ..model.config import ModelConfig
from ..model.kv_cache import KVCache


class DecodingModel(Protocol):
    """What the engine needs of a model (``TriModeModel`` follows it; so do the tests' stubs).

    ``__call__(tokens [B, T], cache, n_valid [B], bidirectional [B], write [B],
    adapter [B, T], attention [B, T, T] | None, offsets [B, T] | None) -> hidden [B, T, d]``:
    row b runs its first ``n_valid[b]`` tokens after its cached prefix, causal or
    block-bidirectional (or the explicit fused pattern), writing its KV (advancing
    ``cache.lengths``) only where ``write``; ``embeds`` (VLM prefill only: where ``[B, T]``,
    values ``[N, d]``) replaces those token embeddings. ``logits(hidden [N, d]) -> [N, V]``.
    ``new_cache(rows, capacity, zeroed)``: a KVCache (``zeroed=False`` may leave it
    uninitialised; the pool zeroes rows on first use).
    """

    config: ModelConfig

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def new_cache(self, rows: int, capacity: int, zeroed: bool = True) -> KVCache: ...

    def __call__(self, tokens: torch.Tensor, cache: KVCache, n_valid: torch.Tensor,
                 bidirectional: torch.Tensor, write: torch.Tensor, adapter: torch.Tensor,
                 attention: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
                 embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


def run(model: DecodingModel, cache, steps: list[Step], prefill: bool):
    """``forward_rows``, plus one flag per row: True where its logits hold NaN or +inf."""
    logits = forward_rows(model, cache, steps, prefill)
    return logits, [bool((torch.isnan(r) | torch.isposinf(r)).any()) for r in logits]


def forward_rows(model: DecodingModel, cache, steps: list[Step],
                 prefill: bool) -> torch.Tensor | list[torch.Tensor]:
    """One packed forward of ``steps`` (row i of ``cache`` runs ``steps[i]``) -> fp32 logits
    on the CPU: ``[B, V]`` at each row's last real token when ``prefill``, else one
    ``[len(steps[i].tokens), V]`` tensor per row. The LM head runs on real tokens only,
    never on a short row's padding."""
    hidden, n_valid = _forward(model, cache, steps)
    if prefill:
        return model.logits(hidden[torch.arange(len(steps)), n_valid.to(hidden.device) - 1]).cpu()
    real = torch.arange(hidden.shape[1])[None, :] < n_valid[:, None]
    logits = model.logits(hidden[real.to(hidden.device)]).cpu()
    return list(torch.split(logits, n_valid.tolist()))


def _forward(model: DecodingModel, cache, steps: list[Step]) -> tuple[torch.Tensor, torch.Tensor]:
    device = model.device
    width = max(len(s.tokens) for s in steps)
    tokens = torch.zeros(len(steps), width, dtype=torch.long)
    for i, s in enumerate(steps):
        tokens[i, : len(s.tokens)] = torch.tensor(s.tokens, dtype=torch.long)
    n_valid = torch.tensor([len(s.tokens) for s in steps], device=device)
    bidirectional, write = (torch.tensor([getattr(s, f) for s in steps], device=device)
                            for f in ("bidirectional", "write"))
    adapter = torch.zeros(len(steps), width, dtype=torch.bool)
    for i, s in enumerate(steps):
        adapter[i, : len(s.tokens)] = torch.tensor(s.adapter_tokens or [s.adapter] * len(s.tokens))
    fused = {}
    if any(s.attention is not None for s in steps):
        fused = dict(zip(("attention", "offsets"), _fused_patterns(steps, width)))
    if any(s.embeds is not None for s in steps):  # image features at pad slots (VLM prefill)
        fused["embeds"] = _embeds(steps, width)
    hidden = model(tokens.to(device), cache, n_valid, bidirectional, write, adapter.to(device),
                   **fused)
    return hidden, n_valid.cpu()


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
