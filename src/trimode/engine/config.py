"""The limits of one engine (``EngineConfig``), validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import defaults
from .auto import AdaptivePolicy, AutoPolicy


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one engine.

    max_num_seqs: requests decoded concurrently (page-table rows of the KV pool), >= 1.
    max_model_len: positions one request may hold: prompt + generation (diffusion rounds
        it up to whole blocks). None: the checkpoint's context limit, capped at 4096.
    scratch_tokens: extra positions per row for what a forward writes beyond the committed
        text (drafts, denoised blocks: ``decoding.registry.scratch_slots``, 2 * block_length + 1
        for diffusion and linear_spec); a request needing more is rejected (smaller
        block_length or draft_segments).
    kv_cache_memory: bytes for the KV pool's pages (``kv_cache_memory // (page_size *
        bytes per position)`` pages, one of them the null page); a request that could never
        fit is rejected, one that runs out mid-decode is preempted and recomputed later.
        None: enough pages for max_num_seqs requests of max_model_len + scratch_tokens
        (memory is touched only as pages are first used).
    page_size: positions per KV page (>= 1). Smaller pages waste less memory at the end
        of each request and cache shorter prefixes; larger ones gather faster.
    max_num_batched_tokens: query tokens per step: the prompts prefilled in one step plus
        the widest step of every running request must fit; a prompt longer than this is
        rejected.
    min_shared_prefix: the prefix cache: a new request whose text starts with at least this
        many tokens of full cached pages (KV committed by any earlier or running request,
        kept until evicted) reads them instead of prefilling them; 0 turns the cache off.
    auto: the policy for ``mode="auto"``: ``AdaptivePolicy`` (per step, the default) or
        ``AutoPolicy`` (once, at admission, from the load).
    cuda_graphs: on CUDA, replay captured graphs of the decode forward (``cuda_graphs.py``);
        False runs every forward eagerly. No effect on CPU.
    """

    max_num_seqs: int = 16
    max_model_len: int | None = None
    kv_cache_memory: int | None = None
    max_num_batched_tokens: int = 8192
    scratch_tokens: int = 256
    page_size: int = field(default_factory=lambda: defaults.PAGE_SIZE)
    min_shared_prefix: int = defaults.MIN_SHARED_PREFIX
    auto: AdaptivePolicy | AutoPolicy = field(default_factory=AdaptivePolicy)
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "scratch_tokens", "page_size"):
            check_int(name, getattr(self, name), 1)
        if self.max_model_len is not None:
            check_int("max_model_len", self.max_model_len, 1)
        if self.kv_cache_memory is not None:
            check_int("kv_cache_memory", self.kv_cache_memory, 1)
        check_int("min_shared_prefix", self.min_shared_prefix, 0)
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False; got {self.cuda_graphs!r}")
        if not isinstance(self.auto, (AdaptivePolicy, AutoPolicy)):
            raise ValueError(f"auto must be an AdaptivePolicy or an AutoPolicy; got {self.auto!r}")


def check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
