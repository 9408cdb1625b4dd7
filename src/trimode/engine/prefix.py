"""Prefix sharing: a new request copies the KV of the longest prompt prefix another live row
already holds instead of recomputing it."""

from __future__ import annotations

from ..decoding.sequence import Sequence
from ..multimodal.requests import share_keys
from ..model.kv_cache import KVCache


def share_prefix(seq: Sequence, running: list[Sequence], cache: KVCache, minimum: int) -> int:
    """Copy the KV of the longest prompt prefix (>= ``minimum`` tokens, 0 = off) that another
    live row of ``cache`` already holds into ``seq``'s row; returns how many prompt tokens
    need no prefill. Keys depend only on the tokens before them (causal prefill and commit
    passes), so the copy is the prefill's own result up to fp32 summation order."""
    if not minimum:
        return 0
    prompt, keys, best, source = seq.prompt_ids, share_keys(seq), 0, -1
    for other in running:
        if other.metrics.nfe == 0:
            continue  # admitted in this step (seq itself included): no KV yet
        limit = min(len(prompt) - 1, cache.host_lengths()[other.row], len(other.prompt_ids))
        n, other_keys = 0, share_keys(other)
        while n < limit and other_keys[n] == keys[n]:
            n += 1
        if n > best:
            best, source = n, other.row
    if best < minimum:
        return 0
    for buf in (*cache.keys, *cache.values):
        buf[seq.row, :, :best] = buf[source, :, :best]
    cache.set_row_length(seq.row, best)
    return best
