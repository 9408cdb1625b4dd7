"""Verification shared by the speculative modes (linear_spec, quadratic_spec).

At temperature 0 the reference's exact match: accept draft i+1 while it equals the AR
argmax at i, then the bonus token. At temperature > 0 with one-pass drafts (their draft
log-probabilities known), speculative sampling (Leviathan et al. 2023): accept with
probability min(1, p/q), else draw from the normalised max(p - q, 0), so the output is
exactly AR sampling. Otherwise the reference's sample-and-match rule.
"""

from __future__ import annotations

import torch

from .sampling import pick, sample_from, target_log_probs
from .sequence import Sequence


def accept(seq: Sequence, block: list[int], draft_log_probs: dict[int, torch.Tensor],
           verify_logits: torch.Tensor) -> list[int]:
    """Verify ``block`` = [seed, drafts...] against ``verify_logits`` ``[L, V]``, commit the
    accepted drafts plus the bonus token, and return them (the cache still holds all L
    slots). ``draft_log_probs[i]``: the draft distribution of block slot i, when known."""
    accepted = verified(seq, block[1:], draft_log_probs, verify_logits)
    start = len(seq.generated)
    for j, token in enumerate(accepted):
        seq.note(start + j, verify_logits[j], token)
    used = seq.commit(accepted)
    seq.record("verify", list(range(start, start + used)), accepted[:used])
    seq.verifies += 1
    return accepted


def verified(seq: Sequence, drafts: list[int], draft_log_probs: dict[int, torch.Tensor],
             verify_logits: torch.Tensor) -> list[int]:
    """The accepted drafts plus the bonus token (nothing committed)."""
    if seq.params.temperature > 0 and draft_log_probs:
        return speculative_sampling(seq, verify_logits, drafts, draft_log_probs)
    ar = pick(verify_logits, seq.params, seq.mask_token_id, seq.generator).tolist()
    c = 0
    while c < len(drafts) and ar[c] == drafts[c]:
        c += 1
    return ar[: c + 1]


def speculative_sampling(seq: Sequence, logits: torch.Tensor, drafts: list[int],
                         draft_log_probs: dict[int, torch.Tensor]) -> list[int]:
    target = target_log_probs(logits.cpu(), seq.params, seq.mask_token_id).exp()
    accepted: list[int] = []
    for j, token in enumerate(drafts):
        p, q = target[j], draft_log_probs[j + 1].exp()
        u = float(torch.rand((), generator=seq.generator, dtype=torch.float64))
        if u < min(1.0, float(p[token] / q[token])):
            accepted.append(token)
            continue
        residual = (p - q).clamp_min(0)
        total = float(residual.sum())
        accepted.append(sample_from(residual / total if total > 0 else p, seq.generator))
        return accepted
    accepted.append(sample_from(target[len(drafts)], seq.generator))
    return accepted
