"""Verification shared by the speculative modes (linear_spec, quadratic_spec), on the host
side of the batched selection (``batch.py`` does the tensor work on the device).

At temperature 0 the reference's exact match: accept draft i+1 while it equals the AR
argmax at i, then the bonus token. At temperature > 0 with one-pass drafts (their draft
log-probabilities kept on the device), speculative sampling (Leviathan et al. 2023), done on
the device: accept with probability min(1, p/q), else draw from the normalised max(p - q, 0),
so the output is exactly AR sampling. Otherwise the reference's sample-and-match rule.
"""

from __future__ import annotations

import torch

from .batch import Need, Result
from .sequence import Sequence


def verify_need(seq: Sequence, block: list[int], slots: list[int],
                draft_log_probs: torch.Tensor | None, **kw) -> Need:
    """The Need of a verify segment: ``slots`` start with the block's ``len(block)`` verify
    slots, which check ``block[1:]``; ``draft_log_probs`` (``[len(block) - 1, V]`` on the
    device) turn on speculative sampling at temperature > 0."""
    sampled = seq.params.temperature > 0 and len(block) > 1
    forced = seq.forced_ids(block[1:], len(block))  # what the verify commits under the budget
    forced = forced and forced + [-1] * (len(slots) - len(block))
    return seq.need(slots, verify=len(block), drafts=block[1:],
                    q=draft_log_probs if sampled else None, forced=forced, **kw)


def accept(seq: Sequence, block: list[int], result: Result) -> list[int]:
    """Commit the drafts of ``block`` = [seed, drafts...] the verify accepted plus the bonus
    token, and return them (the cache still holds all L slots)."""
    accepted = verified(seq, block[1:], result)
    start = len(seq.generated)
    for j, token in enumerate(accepted):
        seq.note(start + j, result.logprob(j, token))
    used = seq.commit(accepted)
    seq.record("verify", list(range(start, start + used)), accepted[:used])
    seq.verifies += 1
    seq.note_verify(len(block) - 1, len(accepted) - 1)
    return accepted


def verified(seq: Sequence, drafts: list[int], result: Result) -> list[int]:
    """The accepted drafts plus the bonus token (nothing committed)."""
    if result.accepted is not None:  # speculative sampling, done on the device
        c = seq.forced(result.accepted, len(drafts))
        return drafts[:c] + [result.final if c == result.accepted else result.tokens[c]]
    ar = result.tokens[: len(drafts) + 1]
    c = 0
    while c < len(drafts) and ar[c] == drafts[c]:
        c += 1
    c = seq.forced(c, len(drafts))
    return drafts[:c] + [ar[c]]
