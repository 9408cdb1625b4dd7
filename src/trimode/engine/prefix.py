"""The prefix cache: full pages of committed KV, found again by their token content.

A request's cache position i holds the causal KV of token i of its prompt + generated text
(prefill, AR steps, diffusion commit passes and verify passes write causally with the
adapter off; read-only passes never advance the length; a crop drops what a verify rejected).
So once a page lies wholly below a row's length, its content is a function of the tokens up
to its end, and any request whose text starts the same way may read it instead of
recomputing it: running or finished (vLLM's automatic prefix caching). Image pad tokens are
compared as (pad, image digest, feature index) (``multimodal.requests.share_keys``), so
different images never share KV. Equal keys give the prefill's own result up to fp32
summation order.
"""

from __future__ import annotations

from ..decoding.sequence import Sequence
from ..multimodal.requests import share_keys
from .kv_pool import KVPool
from .pages import ROOT


def page_tokens(seq: Sequence, i: int, page_size: int) -> tuple:
    """The keys of page ``i`` of ``seq``'s text (prompt keys, then generated ids)."""
    prompt = share_keys(seq)
    start, stop = i * page_size, (i + 1) * page_size
    if stop <= len(prompt):
        return tuple(prompt[start:stop])
    return tuple(prompt[start:]) + tuple(seq.generated[max(start - len(prompt), 0) : stop - len(prompt)])


class PrefixCache:
    """Lookups and registrations over a pool's ``PageAllocator``. Matches shorter than
    ``minimum`` tokens are not used; ``minimum`` 0 turns the cache off."""

    def __init__(self, pool: KVPool, minimum: int):
        self.pool = pool
        self.minimum = minimum
        self.queried = 0  # prompt tokens of admitted new requests
        self.hits = 0  # of those, tokens read from cached pages

    def match(self, seq: Sequence, positions: int) -> tuple[list[int], list[int]]:
        """(pages, chain ids) of the longest cached run of ``seq``'s first full pages within
        its first ``positions`` tokens; ([], []) when shorter than ``minimum`` or off."""
        if not self.minimum:
            return [], []
        p, allocator = self.pool.page_size, self.pool.allocator
        pages, chain, parent = [], [], ROOT
        for i in range(positions // p):
            hit = allocator.lookup(parent, page_tokens(seq, i, p))
            if hit is None:
                break
            parent, page = hit
            pages.append(page)
            chain.append(parent)
        if len(pages) * p < self.minimum:
            return [], []
        return pages, chain

    def register(self, seq: Sequence) -> None:
        """Key every full page of ``seq``'s row that now lies below its committed length."""
        if not self.minimum or seq.row < 0:
            return
        p = self.pool.page_size
        text = len(seq.prompt_ids) + len(seq.generated)
        full = min(self.pool.length(seq.row), text) // p
        pages = self.pool.row_pages[seq.row]
        for i in range(len(seq.chain), full):
            parent = seq.chain[-1] if seq.chain else ROOT
            seq.chain.append(self.pool.allocator.register(parent, page_tokens(seq, i, p), pages[i]))

    def hit_rate(self) -> float:
        return self.hits / self.queried if self.queried else 0.0
