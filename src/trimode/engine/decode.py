"""``decode``: run a fixed set of pre-built Sequences to completion on an Engine sized for
exactly them (training evaluation, benchmarks and tests; the Python API is ``LLM``)."""

from __future__ import annotations

from typing import Callable

from ..decoding.registry import scratch_slots
from ..decoding.sequence import Sequence
from .config import EngineConfig
from .engine import Engine


def decode(model, seqs: list[Sequence], on_step: Callable[[Sequence], None] | None = None) -> None:
    """Decode pre-built ``seqs`` to completion in place, all admitted together (one prefill
    forward, then one packed forward per step) on an :class:`~trimode.engine.engine.Engine`
    sized for exactly them. ``on_step(seq)`` is called after every forward a request took
    part in.
    """
    if not seqs:
        return
    need = max(len(s.prompt_ids) + -(-s.params.max_tokens // s.block_length) * s.block_length
               + scratch_slots(s.params.mode, s.block_length, s.params.max_tokens,
                               s.params.draft_segments) for s in seqs)
    # every row may be padded to the widest row (stub models check this strictly)
    engine = Engine(model, EngineConfig(max_num_seqs=len(seqs), max_model_len=2 * need,
                                        scratch_tokens=need,
                                        max_num_batched_tokens=10**9))
    for s in seqs:
        s.on_step = on_step
        engine.add_sequence(s)
    while engine.has_unfinished():
        engine.step()
