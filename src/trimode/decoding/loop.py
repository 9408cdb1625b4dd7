"""The one decoding loop: prefill, then step every live request until all are finished.

Each step asks every live request's strategy for its next forward, packs them into one
batched forward (rows right-padded to the longest; each row keeps its own attention kind,
cache write flag and adapter flag), and hands each row its logits back. Finished requests
leave the batch at once. Knows nothing about modes beyond the Step interface.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..model import TriModeModel
from .sequence import Sequence, Step
from .modes import STRATEGIES, scratch_slots


def decode(model: TriModeModel, seqs: list[Sequence],
           on_step: Callable[[Sequence], None] | None = None) -> None:
    """Decode ``seqs`` to completion in place (tokens, finish reasons, metrics).

    ``on_step(seq)`` is called after every forward a request took part in (live views).
    """
    if not seqs:
        return
    start = time.perf_counter()
    capacity = max(len(s.prompt_ids) + s.params.max_tokens + scratch_slots(s.params.mode, s.block_length,
                                                                    s.params.max_tokens,
                                                                    s.params.draft_segments)
                   for s in seqs)
    cache = model.new_cache(len(seqs), capacity)
    live = list(seqs)
    prompts = [Step(s.prompt_ids, "prefill") for s in seqs]
    hidden, n_valid = _forward(model, cache, prompts)
    last = hidden[torch.arange(len(seqs)), n_valid - 1]
    logits = model.logits(last).cpu()
    for i, seq in enumerate(seqs):
        seq.strategy = STRATEGIES[seq.params.mode]()
        seq.metrics.nfe += 1
        seq.strategy.start(seq, logits[i : i + 1])
        if on_step:
            on_step(seq)
    live = _drop_finished(live, cache, start)
    while live:
        steps = [s.strategy.next_step(s) for s in live]
        hidden, _ = _forward(model, cache, steps)
        logits = model.logits(hidden).cpu()
        for i, (seq, step) in enumerate(zip(live, steps)):
            seq.metrics.nfe += 1
            seq.strategy.update(seq, logits[i, : len(step.tokens)])
            if on_step:
                on_step(seq)
        rollback = torch.tensor([s.rollback for s in live], device=cache.lengths.device)
        if bool(rollback.any()):
            cache.crop(cache.lengths - rollback)
            for s in live:
                s.rollback = 0
        live = _drop_finished(live, cache, start)


def _forward(model: TriModeModel, cache, steps: list[Step]) -> tuple[torch.Tensor, torch.Tensor]:
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
    hidden = model(tokens.to(device), cache, n_valid, bidirectional, write, adapter.to(device),
                   **fused)
    return hidden, n_valid.cpu()


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


def _drop_finished(live: list[Sequence], cache, start: float) -> list[Sequence]:
    keep = [i for i, s in enumerate(live) if not s.finished]
    now = time.perf_counter()
    for s in live:
        if s.finished and not s.metrics.latency_s:
            s.metrics.latency_s = now - start
            if s.verifies:
                s.metrics.acceptance_length = _acceptance(s)
    if len(keep) < len(live):
        cache.select_rows(torch.tensor(keep, dtype=torch.long, device=cache.lengths.device))
    return [live[i] for i in keep]


def _acceptance(seq: Sequence) -> float:
    """Tokens committed per verify, bonus included (the prefill's seed is not a verify)."""
    return (seq.metrics.generated_tokens - 1) / seq.verifies
