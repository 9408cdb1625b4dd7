"""Diffusion's unmasking policies: the priority of each masked slot in a denoising pass.

A denoising pass has a candidate token and its confidence (``softmax(z)[candidate]``) at every
masked slot (spec 3.3). The request's ``unmask`` policy orders the slots; the selection rule
(``select.unmask``) then takes the pass's quota of the highest-priority slots and, with a
threshold, every slot whose *confidence* reaches it. Priorities (higher first):

- ``confidence``: the candidate's probability (the reference's; Fast-dLLM, llama.cpp 4).
- ``margin``: top-1 minus top-2 probability (Dream's ``margin_confidence``, llama.cpp 2).
- ``entropy``: minus the entropy of the distribution, so the lowest entropy comes first
  (Dream's ``entropy``, llama.cpp 1).
- ``random``: a uniform keyed by (seed, generated position, ``rng.UNMASK``): a random
  unmasking order fixed per position, the same in any batch and on any device
  (llama.cpp 0 and 3).
- ``leftmost``: minus the slot index (left to right, semi-autoregressive).

Every score uses the model's raw distribution ``softmax(z)`` over the full vocabulary, the
one confidence uses, whatever the temperature (temperature only changes the candidate);
``margin``'s top two are taken among the ids that can be candidates (not the mask id).
Knows nothing about strategies; works on ``[R, L]`` matrices of block slots.
"""

from __future__ import annotations

import torch

from . import rng


def priority(logits: torch.Tensor, conf: torch.Tensor, where: tuple[torch.Tensor, torch.Tensor],
             policies: list[str], seeds: list[int], offsets: list[int],
             mask_token_id: int | None) -> torch.Tensor:
    """float64 ``[R, L]`` priority of each slot (higher unmasks first).

    ``logits`` ``[S, V]``: the logits of the S choosing slots, laid out at ``where`` (row,
    block index) of the ``[R, L]`` matrix ``conf`` (their confidences; -inf elsewhere).
    ``policies`` / ``seeds`` / ``offsets`` (host, per row): the row's policy, its seed and
    the generated position of its block's slot 0 (the ``random`` key)."""
    score = conf.double()
    if all(p == "confidence" for p in policies):
        return score
    device = conf.device
    owner = where[0]
    for policy in sorted(set(policies) - {"confidence"}):
        rows = torch.tensor([r for r, p in enumerate(policies) if p == policy], device=device)
        at = torch.isin(owner, rows).nonzero()[:, 0]
        r, c = owner[at], where[1][at]
        if policy == "margin":
            value = margin(logits[at], mask_token_id)
        elif policy == "entropy":
            value = -entropy(logits[at])
        elif policy == "random":
            s = torch.tensor(seeds, device=device)[r]
            o = torch.tensor(offsets, device=device)[r]
            value = rng.uniform(rng.key(s, o + c, rng.UNMASK), 1)[:, 0]
        else:  # leftmost
            value = -c.double()
        score[r, c] = value.double()
    return score


def margin(logits: torch.Tensor, mask_token_id: int | None) -> torch.Tensor:
    """fp32 ``[S]``: top-1 minus top-2 of softmax(z) (full vocabulary), the two taken among
    candidate ids (the mask id excluded)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if mask_token_id is not None:
        probs[:, mask_token_id] = -1.0
    top = torch.topk(probs, min(2, probs.shape[-1]), dim=-1).values
    return top[:, 0] - top[:, 1] if top.shape[-1] > 1 else top[:, 0]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """fp32 ``[S]``: the entropy of softmax(z) over the full vocabulary, in nats."""
    return torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(-1)
