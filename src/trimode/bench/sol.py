"""The speed-of-light oracle (``oracle.py``) run on a real model over whole requests.

A request is decoded block by block exactly as ``diffusion`` mode with ``threshold=None``
decodes it (causal prefill, blocks ``[seed, MASK x (L-1)]``, one causal commit forward per
finished block that gives the next seed, the same stop and ``max_tokens`` rules); inside
each block the oracle finds the fewest denoising forwards that reproduce that block's
serial output. Forwards are counted like ``RequestMetrics.nfe`` (prefill and commits
included), so ``tokens_per_forward`` compares directly with the threshold sampler's and
linear_spec's. Greedy (temperature 0) only: the oracle is defined for a deterministic target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.kv_cache import KVCache
from ..params import SamplingParams
from ..decoding.sampling import confidence, pick
from .oracle import Block, BlockOracle, BlockSOL, Prediction

GREEDY = SamplingParams()


@dataclass
class RequestSOL:
    """One request. ``token_ids``: the serial output (stop token excluded);
    ``generated_tokens``: the same count ``RequestMetrics`` uses (a stop token included).
    ``*_nfe``: prefill + denoising forwards of that search + commit forwards."""

    token_ids: list[int] = field(default_factory=list)
    generated_tokens: int = 0
    blocks: list[BlockSOL] = field(default_factory=list)
    fixed_forwards: int = 1  # prefill + commit forwards, shared by every schedule

    @property
    def serial_nfe(self) -> int:
        return self.fixed_forwards + sum(b.serial_forwards for b in self.blocks)

    @property
    def compaction_nfe(self) -> int:
        return self.fixed_forwards + sum(b.compaction_forwards for b in self.blocks)

    @property
    def exact_nfe(self) -> int | None:
        if any(b.exact_forwards is None for b in self.blocks):
            return None
        return self.fixed_forwards + sum(b.exact_forwards for b in self.blocks)

    @property
    def denoise_forwards(self) -> dict[str, int | None]:
        exact = [b.exact_forwards for b in self.blocks]
        return {"serial": sum(b.serial_forwards for b in self.blocks),
                "compaction": sum(b.compaction_forwards for b in self.blocks),
                "exact": None if None in exact else sum(exact)}


def _replicate(cache: KVCache, rows: int) -> KVCache:
    """A ``rows``-row copy of the one-row ``cache`` (read-only forwards of several states)."""
    out = KVCache.__new__(KVCache)
    index = torch.zeros(rows, dtype=torch.long, device=cache.lengths.device)
    out.keys = [k.index_select(0, index) for k in cache.keys]
    out.values = [v.index_select(0, index) for v in cache.values]
    out.lengths, out.capacity = cache.lengths.index_select(0, index), cache.capacity
    return out


def predictor(model, cache: KVCache, mask_token_id: int, rows: int = 1):
    """``predict(blocks)`` for ``BlockOracle``: bidirectional read-only forwards of ``[L]``
    blocks after the cached prefix, ``rows`` states per forward; greedy candidates with the
    mask id excluded and the reference confidence (docs/spec.md 3.3)."""
    wide: dict[int, KVCache] = {1: cache}

    def predict(blocks: list[Block]) -> list[Prediction]:
        out: list[Prediction] = []
        for k in range(0, len(blocks), rows):
            chunk = blocks[k : k + rows]
            if len(chunk) not in wide:
                wide[len(chunk)] = _replicate(cache, len(chunk))
            logits = model.logits(_forward(model, wide[len(chunk)], chunk, True)).cpu()
            for row in logits:
                cand = pick(row, GREEDY, mask_token_id, None)
                out.append((cand.tolist(), confidence(row, cand).tolist()))
        return out

    return predict


def sol_request(model, prompt_ids: list[int], block_length: int, max_tokens: int,
                stop_ids: set[int], mask_token_id: int, budget: int = 5000,
                exact: bool = True, rows: int = 1) -> RequestSOL:
    """The serial target and the oracle's forwards for one prompt (token ids).

    block_length, max_tokens: as SamplingParams (>= 1). budget: predicted states per block
    and search (>= 1). rows: states per forward in the searches.
    Raises ValueError for a bad block_length, max_tokens, budget or rows.
    """
    for name, value in (("block_length", block_length), ("max_tokens", max_tokens),
                        ("budget", budget), ("rows", rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    blocks = -(-max_tokens // block_length)
    cache = model.new_cache(1, len(prompt_ids) + (blocks + 1) * block_length + 1)
    hidden = _forward(model, cache, [prompt_ids], False)
    seed = int(pick(model.logits(hidden[0, -1:]).cpu(), GREEDY, mask_token_id, None)[0])
    result = RequestSOL()
    while True:
        limit = min(block_length, max_tokens - len(result.token_ids))
        start = (seed,) + (mask_token_id,) * (block_length - 1)
        oracle = BlockOracle(predictor(model, cache, mask_token_id, rows), start, mask_token_id,
                             limit, stop_ids, budget)
        block = oracle.run(exact=exact)
        result.blocks.append(block)
        if _commit(result, block.target[: block.end], stop_ids, max_tokens):
            return result
        hidden = _forward(model, cache, [block.target], False)
        result.fixed_forwards += 1
        seed = int(pick(model.logits(hidden[0, -1:]).cpu(), GREEDY, mask_token_id, None)[0])


def _forward(model, cache: KVCache, rows: list, bidirectional: bool) -> torch.Tensor:
    """One forward of equal-length ``rows``: causal and written, or bidirectional read-only."""
    tokens = torch.tensor([list(r) for r in rows], dtype=torch.long, device=model.device)
    n = len(rows)
    flag = torch.full((n,), bidirectional, dtype=torch.bool, device=model.device)
    return model(tokens, cache, torch.full((n,), tokens.shape[1], device=model.device), flag,
                 ~flag, torch.zeros(n, dtype=torch.bool, device=model.device))


def _commit(result: RequestSOL, tokens: Block, stop_ids: set[int], max_tokens: int) -> bool:
    """Append like ``Sequence.commit``; True when the request is finished."""
    for tok in tokens:
        result.generated_tokens += 1
        if tok in stop_ids:
            return True
        result.token_ids.append(tok)
        if len(result.token_ids) >= max_tokens:
            return True
    return False
