"""Batched token selection on the model's device: every row of every mode in a few kernels.

The functions here replace per-row Python over host logits. Each works on a batch of logits
rows ``[M, V]`` (one per query position that needs a choice) with per-row settings as
tensors (:class:`RowSampling`), and never moves a tensor to the host, so the engine can copy
only the chosen token ids and a few integers per request after a step.

- ``pick``: greedy (argmax without the mask id) or sampled (Gumbel-max over float64
  ``target_log_probs``, noise from ``rng`` keyed by (seed, draw site)): the same seed gives
  the same tokens in any batch and on any device.
- ``confidence``, ``unmask``: diffusion's rule (spec 3.3): the pass's quota of masked slots
  in the unmasking policy's order (``unmask.py``; confidence by default) plus every one whose
  confidence reaches the threshold.
- ``accepted_greedy``, ``speculative``: linear_spec / quadratic_spec verification: exact
  match at temperature 0, speculative sampling (Leviathan et al. 2023) otherwise.

Ties follow ``torch.topk`` exactly as the reference uses it (rows grouped by their k, so a
row's result does not depend on its neighbours).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import rng

NEG_INF = float("-inf")


@dataclass
class RowSampling:
    """Sampling settings of ``M`` logits rows, on the device.

    temperature float64 ``[M]`` (0: greedy), top_k int64 ``[M]`` (0: off), top_p float64
    ``[M]``, keys int64 ``[M]`` (``rng.key`` of each row's draw site). ``sampled``: host list
    of the rows with temperature > 0; ``top_k_on`` / ``top_p_on``: whether any row uses them.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    keys: torch.Tensor
    sampled: list[int]
    top_k_on: bool
    top_p_on: bool

    @classmethod
    def of(cls, rows: list[tuple], device: torch.device) -> RowSampling:
        """``rows``: one ``(params, seed, site, stream)`` per logits row (SamplingParams,
        int seed, int draw-site counter, rng stream id)."""
        temps = [float(p.temperature) for p, *_ in rows]
        return cls(torch.tensor(temps, dtype=torch.float64, device=device),
                   torch.tensor([p.top_k for p, *_ in rows], dtype=torch.long, device=device),
                   torch.tensor([p.top_p for p, *_ in rows], dtype=torch.float64, device=device),
                   rng.key(torch.tensor([s for _, s, _, _ in rows], device=device),
                           torch.tensor([c for _, _, c, _ in rows], device=device),
                           torch.tensor([k for *_, k in rows], device=device)),
                   [i for i, t in enumerate(temps) if t > 0],
                   any(p.top_k for p, *_ in rows), any(p.top_p < 1.0 for p, *_ in rows))

    def subset(self, index: list[int]) -> RowSampling:
        """The settings of rows ``index`` (host list), in that order."""
        at = torch.tensor(index, dtype=torch.long, device=self.keys.device)
        sampled = set(self.sampled)
        return RowSampling(self.temperature[at], self.top_k[at], self.top_p[at], self.keys[at],
                           [j for j, i in enumerate(index) if i in sampled],
                           self.top_k_on, self.top_p_on)


def candidate_logits(logits: torch.Tensor, mask_token_id: int | None) -> torch.Tensor:
    """``[M, V]`` fp32 logits with the mask id removed from the candidates."""
    out = logits.float().clone()
    if mask_token_id is not None:
        out[..., mask_token_id] = NEG_INF
    return out


def target_log_probs(logits: torch.Tensor, s: RowSampling, mask_token_id: int | None) -> torch.Tensor:
    """float64 log-probabilities ``[M, V]`` of softmax(z / T) after each row's top-k and
    top-p (rows at temperature 0 use T = 1): the distribution ``pick`` samples from."""
    t = torch.where(s.temperature > 0, s.temperature, torch.ones_like(s.temperature))
    z = candidate_logits(logits, mask_token_id).double() / t[:, None]
    if s.top_k_on or s.top_p_on:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        vocab = z.shape[-1]
        k = torch.where(s.top_k > 0, s.top_k.clamp(max=vocab), torch.full_like(s.top_k, vocab))
        kth = sorted_z.gather(-1, (k - 1)[:, None])
        z = z.masked_fill(z < kth, NEG_INF)
        if s.top_p_on:
            sorted_z = sorted_z.masked_fill(sorted_z < kth, NEG_INF)
            probs = torch.softmax(sorted_z, dim=-1)
            before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
            drop = torch.zeros_like(z, dtype=torch.bool).scatter(
                -1, order, before >= s.top_p[:, None])
            z = z.masked_fill(drop, NEG_INF)
    return torch.log_softmax(z, dim=-1)


def pick(logits: torch.Tensor, s: RowSampling, mask_token_id: int | None,
         greedy: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of ``logits`` ``[M, V]`` -> int64 ``[M]`` on the logits' device.
    ``greedy``: the rows' argmax without the mask id, when the caller has it already."""
    tokens = candidate_logits(logits, mask_token_id).argmax(dim=-1) if greedy is None else greedy.clone()
    if s.sampled:
        sub = s.subset(s.sampled) if len(s.sampled) < len(tokens) else s
        at = torch.tensor(s.sampled, dtype=torch.long, device=tokens.device)
        logp = target_log_probs(logits[at], sub, mask_token_id)
        tokens[at] = (logp + rng.gumbel(sub.keys, logp.shape[-1])).argmax(dim=-1)
    return tokens


def confidence(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Reference confidence ``softmax(z)[token]`` over the full vocabulary: ``[M]`` fp32."""
    probs = torch.softmax(logits.float(), dim=-1)
    return probs.gather(-1, tokens[..., None])[..., 0]


def topk_rows(values: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """bool ``[R, L]``: row r's ``torch.topk(values[r], ks[r])`` indices (rows grouped by k,
    one call per distinct k; k = 0 chooses nothing)."""
    out = torch.zeros_like(values, dtype=torch.bool)
    for k in sorted(set(ks) - {0}):
        rows = torch.tensor([r for r, kr in enumerate(ks) if kr == k], device=values.device)
        picked = torch.topk(values[rows], k, dim=-1).indices
        out[rows] = out[rows].scatter(-1, picked, True)
    return out


def unmask(conf: torch.Tensor, masked: torch.Tensor, n_masked: list[int],
           thresholds: list[float | None], quotas: list[int],
           score: torch.Tensor | None = None) -> torch.Tensor:
    """Diffusion's choice of slots to unmask: bool ``[R, L]``.

    ``conf`` ``[R, L]``: each slot's candidate confidence; ``masked``: which slots are still
    masks (``n_masked`` per row, host ints); ``score``: the unmasking policy's priority
    (``unmask.priority``; default ``conf``). A row unmasks its ``quota`` highest-priority
    masked slots (at least one) and, with a threshold (not None), every masked slot whose
    confidence reaches it; threshold rows take their quota from the front of
    ``topk(score, n_masked)`` (the reference's order).
    """
    score = (conf if score is None else score).masked_fill(~masked, NEG_INF)
    ks = [min(max(q, 1), n) for q, n in zip(quotas, n_masked)]
    first = _first_of_topk(score, n_masked, thresholds, ks)
    thr = torch.tensor([2.0 if t is None else t for t in thresholds], dtype=torch.float64,
                       device=conf.device)
    return first | (masked & (conf >= thr[:, None]))


def _first_of_topk(score: torch.Tensor, n_masked: list[int], thresholds: list,
                   ks: list[int]) -> torch.Tensor:
    """Threshold rows: the first k indices of ``topk(score, n_masked)`` (the reference's
    order); quota rows: ``topk(score, k)``."""
    quota = topk_rows(score, [k if t is None else 0 for k, t in zip(ks, thresholds)])
    if all(t is None for t in thresholds):
        return quota
    groups = [(n, k) if t is not None else None for n, k, t in zip(n_masked, ks, thresholds)]
    out = quota
    for n, k in sorted(set(groups) - {None}):
        rows = torch.tensor([r for r, g in enumerate(groups) if g == (n, k)], device=score.device)
        top = torch.topk(score[rows], n, dim=-1).indices[:, :k]
        out[rows] = out[rows].scatter(-1, top, True)
    return out


def draft_choice(conf: torch.Tensor, masked: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """linear_spec's multi-pass draft rule: bool ``[R, L]``: the first most confident masked
    slot (stable order) plus every masked slot reaching the row's threshold (float64 ``[R]``)."""
    conf = conf.masked_fill(~masked, NEG_INF)
    first = torch.sort(conf, dim=-1, descending=True, stable=True).indices[:, :1]
    one = torch.zeros_like(masked).scatter(-1, first, True) & masked
    return one | (masked & (conf >= thresholds[:, None]))


def accepted_greedy(target: torch.Tensor, drafts: torch.Tensor, n_drafts: torch.Tensor) -> torch.Tensor:
    """Exact-match verification: int64 ``[R]`` count of leading drafts equal to the target's
    choice at the slot before. ``target`` ``[R, L]`` (chosen tokens at the verify slots),
    ``drafts`` ``[R, L - 1]``, ``n_drafts`` ``[R]`` (real drafts per row)."""
    j = torch.arange(drafts.shape[-1], device=drafts.device)
    match = (target[:, :-1] == drafts) & (j[None, :] < n_drafts[:, None])
    return torch.cumprod(match.long(), dim=-1).sum(-1)


def speculative(p_logp: torch.Tensor, q_logp: torch.Tensor, drafts: torch.Tensor,
                n_drafts: torch.Tensor, seeds: torch.Tensor, sites: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling of a batch of blocks -> (accepted drafts ``[R]``, the token after
    them ``[R]``: a residual draw at the first rejection, else a draw from the last target).

    ``p_logp`` ``[R, L, V]`` target float64 log-probs at the verify slots, ``q_logp``
    ``[R, L - 1, V]`` the drafts' own, ``drafts`` ``[R, L - 1]``, ``n_drafts`` ``[R]``;
    draft j is accepted with probability min(1, p/q) using the uniform keyed by
    (seed, site + j, ACCEPT); the final draw uses (seed, site + c, RESIDUAL).
    """
    p = p_logp.exp()
    rows, width = drafts.shape
    j = torch.arange(width, device=drafts.device)
    if width:
        q = q_logp.exp()
        pd = p[:, :-1].gather(-1, drafts[..., None])[..., 0]
        qd = q.gather(-1, drafts[..., None])[..., 0]
        u = rng.uniform(rng.key(seeds[:, None], sites[:, None] + j[None, :], rng.ACCEPT), 1)[..., 0]
        ok = (u < (pd / qd).clamp(max=1.0)) & (j[None, :] < n_drafts[:, None])
        c = torch.cumprod(ok.long(), dim=-1).sum(-1)
    else:
        c = torch.zeros(rows, dtype=torch.long, device=drafts.device)
    pc = p[torch.arange(rows, device=p.device), c]
    dist = pc
    if width:
        qc = q[torch.arange(rows, device=p.device), c.clamp(max=width - 1)]
        residual = (pc - qc).clamp_min(0)
        total = residual.sum(-1, keepdim=True)
        rejected = (c < n_drafts)[:, None] & (total > 0)
        dist = torch.where(rejected, residual / torch.where(total > 0, total, 1.0), pc)
    keys = rng.key(seeds, sites + c, rng.RESIDUAL)
    token = (torch.log(dist) + rng.gumbel(keys, dist.shape[-1])).argmax(dim=-1)
    return c, token
