"""One step's selection for every row at once: what rows need (``Need``), what they get
(``Result``), and ``select_rows``, which computes it on the logits' device and brings back
only token ids and a few integers per row (one host transfer, plus one more when a row asked
for logprobs).

A strategy describes its row's needs on the host (which query slots need a token, whether
diffusion unmasks by confidence, whether a verify segment is checked by speculative
sampling, whether draft log-probs stay on the device for the next verify); the model runner
stacks the logits of those slots of every row into one ``[M, V]`` batch and calls
``select_rows``. Nothing vocabulary-sized ever reaches the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..outputs import TokenLogprob
from ..params import SamplingParams
from . import rng, select, unmask

SITE_BITS = 16  # a draw site is (request forward counter << SITE_BITS) | slot


@dataclass
class Need:
    """What one row needs from its logits.

    slots: query slots (indices into the row's Step tokens) whose token is chosen, in order.
    seed / draw: the request's seed and forward counter (random draws are keyed by them).
    choose / threshold / quota / offset: choose among ``slots`` (the masked slots of a block,
        each slot its block index): diffusion's rule (``quota`` slots in the order of the
        request's ``unmask`` policy plus every one reaching ``threshold``; ``offset``: the
        generated position of block slot 0, the random policy's key) or, with
        ``draft=True``, linear_spec's multi-pass draft rule (by confidence).
    verify / drafts / q: a verify segment: slots ``0 .. verify-1`` of ``slots`` check
        ``drafts`` (``verify - 1`` tokens); with ``q`` (draft float64 log-probs on the
        device, ``[verify - 1, V]``) by speculative sampling, else on the host by matching.
    keep: indices into ``slots`` whose target log-probs stay on the device (``Result.q``).
    forced: per slot, the only token it may take (-1: free), e.g. ``</think>`` once the
        thinking budget is spent (``thinking.py``); None: nothing forced.
    """

    params: SamplingParams
    seed: int
    draw: int
    slots: list[int]
    choose: bool = False
    threshold: float | None = None
    quota: int = 1
    offset: int = 0
    draft: bool = False
    verify: int = 0
    drafts: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None
    keep: list[int] = field(default_factory=list)
    forced: list[int] | None = None


@dataclass
class Result:
    """What one row got: ``tokens`` (one per ``Need.slots``), ``chosen`` (indices into
    ``slots`` to unmask / draft, sorted), ``accepted`` / ``final`` (speculative sampling),
    ``q`` (kept log-probs on the device), ``bad`` (NaN or +inf logits) and ``logprobs``
    ((slot index, token) -> TokenLogprob, when the request asked for them)."""

    tokens: list[int]
    chosen: list[int] = field(default_factory=list)
    accepted: int | None = None
    final: int | None = None
    q: torch.Tensor | None = None
    bad: bool = False
    logprobs: dict = field(default_factory=dict)

    def logprob(self, index: int, token: int) -> TokenLogprob | None:
        return self.logprobs.get((index, token))


@torch.inference_mode()
def select_rows(logits: torch.Tensor, needs: list[Need], mask_token_id: int | None) -> list[Result]:
    """Selections of every row: ``logits`` ``[M, V]`` holds row 0's slots, then row 1's...
    (``M = sum(len(n.slots))``). One ``tolist`` of int32 results; one more of float64
    logprobs when any request asked for them."""
    device = logits.device
    sizes = [len(n.slots) for n in needs]
    starts = [sum(sizes[:i]) for i in range(len(needs))]
    sampling = None
    bad = _bad_rows(logits, sizes)
    saved = _force(logits, needs)
    tokens = _greedy(logits, mask_token_id)
    if any(n.params.temperature > 0 for n in needs):
        sampling = select.RowSampling.of(
            [(n.params, n.seed, (n.draw << SITE_BITS) | slot, rng.PICK)
             for n in needs for slot in n.slots], device)
        tokens = select.pick(logits, sampling, mask_token_id, greedy=tokens)
    shown = _chosen(logits, tokens, needs, starts, mask_token_id)  # unchosen slots of choosing rows: -1
    packed = [shown, bad]
    spec_at = _speculative(logits, needs, starts, sampling, mask_token_id, packed)
    kept = _kept(logits, needs, starts, sampling, mask_token_id)
    # the one transfer: int32 (token ids < 2**31), about 4 bytes per reported slot
    flat = torch.cat([p.reshape(-1).to(torch.int32) for p in packed]).tolist()
    results = [Result(flat[s : s + n]) for s, n in zip(starts, sizes)]
    for r, n in enumerate(needs):
        if n.choose:
            results[r].chosen = [i for i, t in enumerate(results[r].tokens) if t >= 0]
    m = len(tokens)
    for r, b in enumerate(flat[m : m + len(needs)]):
        results[r].bad = bool(b)
    offset = m + len(needs)
    for r in spec_at:
        results[r].accepted, results[r].final = flat[offset], flat[offset + 1]
        offset += 2
    for r, q in kept.items():
        results[r].q = q
    if saved is not None:  # logprobs report the model's own distribution
        logits[saved[0]] = saved[1]
    _logprobs(logits, needs, starts, results)
    return results


def _force(logits: torch.Tensor, needs: list[Need]):
    """Make each forced slot's token its only candidate (logit 0, every other -inf), so
    greedy picks, sampling, confidences and speculative verification all see the forced
    token with probability 1. Returns (slot index, saved logits) to restore, or None."""
    if all(n.forced is None for n in needs):
        return None
    flat = [f for n in needs for f in (n.forced or [-1] * len(n.slots))]
    index = [i for i, f in enumerate(flat) if f >= 0]
    if not index:
        return None
    at = torch.tensor(index, device=logits.device)
    saved = logits[at]  # advanced indexing copies
    logits[at] = select.NEG_INF
    logits[at, torch.tensor([flat[i] for i in index], device=logits.device)] = 0.0
    return at, saved


def _greedy(logits: torch.Tensor, mask_token_id: int | None) -> torch.Tensor:
    """``argmax`` without the mask id, without copying the logits: the mask column is set to
    -inf for the argmax and restored (confidence needs it)."""
    if mask_token_id is None:
        return logits.argmax(dim=-1)
    saved = logits[:, mask_token_id].clone()
    logits[:, mask_token_id] = select.NEG_INF
    tokens = logits.argmax(dim=-1)
    logits[:, mask_token_id] = saved
    return tokens


def _bad_rows(logits: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """bool ``[rows]``: a row has NaN or +inf logits (one pass: a row sum is NaN or +inf
    then; -inf logits alone are allowed)."""
    total = logits.sum(-1)
    bad = torch.isnan(total) | torch.isposinf(total)
    if len(sizes) == len(bad):  # one slot per row
        return bad
    owner = torch.repeat_interleave(torch.arange(len(sizes), device=logits.device),
                                    torch.tensor(sizes, device=logits.device))
    return torch.zeros(len(sizes), dtype=torch.long, device=logits.device).index_add_(
        0, owner, bad.long()) > 0


def _chosen(logits, tokens, needs, starts, mask_token_id) -> torch.Tensor:
    """``tokens`` with -1 at the slots that choosing rows (diffusion unmasking, multi-pass
    drafts) did not choose, batched over those rows: confidences sit at their block index in
    an ``[R, L]`` matrix (-inf elsewhere), as the reference lays them out."""
    rows = [r for r, n in enumerate(needs) if n.choose and n.slots]
    if not rows:
        return tokens
    device = logits.device
    width = max(max(needs[r].slots) + 1 for r in rows)
    index = [starts[r] + i for r in rows for i in range(len(needs[r].slots))]
    at = torch.tensor(index, device=device)
    where = (torch.tensor([k for k, r in enumerate(rows) for _ in needs[r].slots], device=device),
             torch.tensor([c for r in rows for c in needs[r].slots], device=device))
    conf = torch.full((len(rows), width), select.NEG_INF, device=device)
    whole = len(index) == len(logits)  # every slot of the step: no gather copy
    conf[where] = select.confidence(logits if whole else logits[at], tokens if whole else tokens[at])
    masked = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    masked[where] = True
    chosen = torch.zeros_like(masked)
    diffusion = [k for k, r in enumerate(rows) if not needs[r].draft]
    if diffusion:
        ii = torch.tensor(diffusion, device=device)
        score = _priority(logits, at, whole, conf, where, rows, needs, mask_token_id)
        chosen[ii] = select.unmask(conf[ii], masked[ii], [len(needs[rows[k]].slots) for k in diffusion],
                                   [needs[rows[k]].threshold for k in diffusion],
                                   [needs[rows[k]].quota for k in diffusion],
                                   None if score is None else score[ii])
    drafts = [k for k, r in enumerate(rows) if needs[r].draft]
    if drafts:
        ii = torch.tensor(drafts, device=device)
        thr = torch.tensor([needs[rows[k]].threshold or 0.0 for k in drafts],
                           dtype=torch.float64, device=device)
        chosen[ii] = select.draft_choice(conf[ii], masked[ii], thr)
    shown = tokens.clone()
    shown[at] = torch.where(chosen[where], tokens[at], -1)
    return shown


def _priority(logits, at, whole, conf, where, rows, needs, mask_token_id) -> torch.Tensor | None:
    """The unmasking policies' priorities of the choosing rows (``unmask.priority``), or None
    when every diffusion row unmasks by confidence (draft rows always do)."""
    policies = [needs[r].params.unmask if not needs[r].draft else "confidence" for r in rows]
    if all(p == "confidence" for p in policies):
        return None
    return unmask.priority(logits if whole else logits[at], conf, where, policies,
                           [needs[r].seed for r in rows], [needs[r].offset for r in rows],
                           mask_token_id)


def _speculative(logits, needs, starts, sampling, mask_token_id, packed) -> list[int]:
    """Speculative sampling of the verify segments that carry draft log-probs."""
    rows = [r for r, n in enumerate(needs) if n.verify and n.q is not None]
    by_width: dict[int, list[int]] = {}
    for r in rows:
        by_width.setdefault(needs[r].verify, []).append(r)
    order = []
    for width, group in sorted(by_width.items()):
        device = logits.device
        flat = [starts[r] + i for r in group for i in range(width)]
        p = select.target_log_probs(logits[torch.tensor(flat, device=device)],
                                    sampling.subset(flat), mask_token_id)
        p = p.view(len(group), width, -1)
        q = torch.stack([needs[r].q for r in group]) if width > 1 else p[:, :0]
        drafts = torch.tensor([needs[r].drafts for r in group], dtype=torch.long,
                              device=device).view(len(group), width - 1)
        c, token = select.speculative(
            p, q, drafts, torch.full((len(group),), width - 1, device=device),
            torch.tensor([needs[r].seed for r in group], device=device),
            torch.tensor([needs[r].draw << SITE_BITS for r in group], device=device))
        packed.append(torch.stack([c, token], dim=-1))
        order += group
    return order


def _kept(logits, needs, starts, sampling, mask_token_id) -> dict[int, torch.Tensor]:
    """Target log-probs kept on the device (sampled drafts, for the next verify)."""
    rows = [r for r, n in enumerate(needs) if n.keep]
    if not rows:
        return {}
    index = [starts[r] + i for r in rows for i in needs[r].keep]
    logp = select.target_log_probs(logits[torch.tensor(index, device=logits.device)],
                                   sampling.subset(index), mask_token_id)
    out, at = {}, 0
    for r in rows:
        out[r] = logp[at : at + len(needs[r].keep)]
        at += len(needs[r].keep)
    return out


def _logprobs(logits, needs, starts, results) -> None:
    """Raw fp32 log-softmax at each slot of rows asking for logprobs: the chosen token, the
    next Step token (a verified draft), the speculative final token, and the top ones."""
    rows = [r for r, n in enumerate(needs) if n.params.logprobs is not None]
    if not rows:
        return
    device = logits.device
    top = max(needs[r].params.logprobs for r in rows)
    index, probe = [], []
    for r in rows:
        n, res = needs[r], results[r]
        for i in range(len(n.slots)):
            index.append(starts[r] + i)
            nxt = n.drafts[i] if i < len(n.drafts) else res.tokens[i]
            final = res.final if res.final is not None and i == res.accepted else res.tokens[i]
            probe.append([max(res.tokens[i], 0), max(nxt, 0), max(final, 0)])
    logp = torch.log_softmax(logits[torch.tensor(index, device=device)].float(), dim=-1)
    probe_t = torch.tensor(probe, dtype=torch.long, device=device)
    values = logp.gather(-1, probe_t).double()
    k = min(top, logp.shape[-1])
    tv, ti = torch.topk(logp, k) if k else (logp[:, :0], logp[:, :0].long())
    flat = torch.cat([values, tv.double(), ti.double()], dim=-1).tolist()  # second transfer
    at = 0
    for r in rows:
        n, res = needs[r], results[r]
        for i in range(len(n.slots)):
            row = flat[at]
            at += 1
            want = n.params.logprobs
            alts = tuple(zip((int(x) for x in row[3 + k : 3 + k + want]), row[3 : 3 + want]))
            for j, tok in enumerate(probe[at - 1]):
                res.logprobs[(i, tok)] = TokenLogprob(int(tok), row[j], alts if want else ())

