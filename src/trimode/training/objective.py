"""The joint AR + diffusion loss on the dual-stream layout (docs/spec.md 2.3 (a)).

Two layouts, one objective:

* full parameters: one grad-enabled forward over ``[x_t | x_0]`` (length 2L) under
  ``dual_stream_mask``; AR cross-entropy on the clean stream (logits at j-1 score token j)
  plus alpha x the 1/p-weighted diffusion cross-entropy on the noisy stream's masked
  positions (logits at j score token j, spec 2.4), averaged over all scored tokens.
* draft adapter (LoRA on the noisy stream only, base frozen): the clean stream is a no-grad
  causal forward of the base model whose keys/values the noisy stream then attends to with
  the same mask rows; the base's AR behaviour cannot change, so only the diffusion term
  has gradients (NLD ``linear_spec_lora``, spec 5.3).

``targets="teacher"`` replaces the data labels of masked positions by the clean stream's
argmax (the model's own greedy chain), kept only where ``chain_valid`` says it is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.model import TriModeModel
from .masks import block_layout_mask, chain_valid, dual_stream_mask, noise, sample_blocks

HEAD_CHUNK = 1024  # rows per lm-head call: bounds the [rows, vocab] logits in memory


@dataclass
class LossParts:
    """Sums and counts of one micro-batch (tensors; ``total`` carries the gradient)."""

    total: torch.Tensor
    ar_sum: float
    ar_count: int
    diff_sum: float  # unweighted CE over scored masked positions (for reporting)
    diff_count: int


def _head(model: TriModeModel, hidden: torch.Tensor) -> torch.Tensor:
    return model.diffusion_head(hidden).float()


@torch.no_grad()
def _argmax(model: TriModeModel, hidden: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """``[B, L, d]`` -> ``[B, L]`` argmax with the mask id excluded, chunked over rows."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = []
    for k in range(0, flat.shape[0], HEAD_CHUNK):
        logits = _head(model, flat[k : k + HEAD_CHUNK])
        logits[:, mask_token_id] = float("-inf")
        out.append(logits.argmax(-1))
    return torch.cat(out).view(hidden.shape[:2])


def _blocks_with(masked: torch.Tensor, block_length: int) -> torch.Tensor:
    """Positions ``[K]`` of the blocks where any row has a masked token (at least one block)."""
    length = masked.shape[1]
    block = torch.arange(length) // block_length
    hit = torch.zeros(int(block[-1]) + 1, dtype=torch.bool).index_put_(
        (block[masked.any(0)],), torch.tensor(True))
    if not bool(hit.any()):
        hit[0] = True
    return torch.nonzero(hit[block]).flatten()


def _ce(model: TriModeModel, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row CE ``[N]`` of hidden ``[N, d]`` against ``target`` ``[N]``."""
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0)
    return F.cross_entropy(_head(model, hidden), target, reduction="none")


def joint_loss(model: TriModeModel, tokens: torch.Tensor, valid: torch.Tensor,
               loss_mask: torch.Tensor, generator: torch.Generator, *, block_length: int,
               alpha: float, eps: float, draft_adapter: bool, targets: str = "data",
               draft_layout_rate: float = 0.0, compact: bool = True) -> LossParts:
    """Loss of one micro-batch ``tokens``/``valid``/``loss_mask`` ``[B, L]``.

    Noising draws from ``generator`` only (so a resumed run replays it exactly).
    ``compact``: the draft-adapter grad pass skips blocks without masked tokens.
    """
    b, length = tokens.shape
    mask_id = model.config.mask_token_id
    noisy, masked, p = noise(tokens, loss_mask, mask_id, generator, eps, draft_layout_rate,
                             block_length)
    dual = dual_stream_mask(length, block_length, tokens.device)
    cache = model.new_cache(b, 2 * length)
    positions = torch.arange(length, device=tokens.device)
    if draft_adapter:
        with torch.no_grad():
            h_clean = model.run(tokens, cache)  # causal, written: the clean stream's K/V
        # Noisy queries see only their own block's noisy keys, so blocks without a masked
        # token (no loss) can be left out of the grad pass without changing the loss.
        keep = _blocks_with(masked, block_length) if compact else positions
        rows = torch.cat([dual[:length, length:], dual[:length, :length][:, keep]], 1)[keep]
        keys_ok = torch.cat([valid, valid[:, keep]], 1)[:, None, :]
        h_kept = model.run(noisy[:, keep], cache, write=False, adapter=True,
                           offsets=(keep - length).expand(b, -1),
                           mask=(rows[None] & keys_ok)[:, None])
        h_noisy = h_kept.new_zeros(b, length, h_kept.shape[-1]).index_copy(1, keep, h_kept)
    else:
        keys_ok = torch.cat([valid, valid], 1)[:, None, :]
        both = torch.cat([noisy, tokens], 1)
        hidden = model.run(both, cache, write=False, attention=dual[None] & keys_ok,
                           offsets=torch.cat([positions, positions]).expand(b, -1))
        h_noisy, h_clean = hidden[:, :length], hidden[:, length:]
    ar_at = loss_mask.clone()
    ar_at[:, 0] = False  # token 0 has no AR prediction
    ar_ce = _ce(model, h_clean[:, :-1][ar_at[:, 1:]], tokens[ar_at])
    label = tokens
    scored = masked
    if targets == "teacher":
        teacher = torch.cat([tokens[:, :1], _argmax(model, h_clean[:, :-1].detach(), mask_id)], 1)
        label = teacher
        scored = masked & chain_valid(tokens, teacher, masked, block_length)
    diff_ce = _ce(model, h_noisy[scored], label[scored])
    weight = (1.0 / p)[:, None].expand(b, length)[scored]
    diff_sum = (diff_ce * weight).sum()
    if draft_adapter:
        total = diff_sum / max(int(scored.sum()), 1)
    else:
        total = (ar_ce.sum() + alpha * diff_sum) / max(int(ar_at.sum()) + int(scored.sum()), 1)
    return LossParts(total, float(ar_ce.detach().sum()), int(ar_at.sum()),
                     float(diff_ce.detach().sum()), int(scored.sum()))


def block_loss(model: TriModeModel, tokens: torch.Tensor, valid: torch.Tensor,
               loss_mask: torch.Tensor, generator: torch.Generator, *, block_length: int,
               blocks: int, layout_rates: tuple[float, float, float], eps: float,
               kl_weight: float = 0.5, certainty_weight: float = 0.0) -> LossParts:
    """Draft-adapter loss on ``blocks`` sampled decode-time blocks per row (``[B, L]`` in).

    One no-grad causal pass of the frozen base gives the clean K/V, its argmax (the targets)
    and its distribution; then one grad pass (adapter on) runs every sampled block at its
    own positions, each seeing only the clean keys before its start and its own slots
    (``masks.sample_blocks``). So each block is exactly what a linear_spec draft, a
    diffusion denoising pass or a quadratic_spec draft segment sees at inference, and one
    clean pass feeds ``blocks`` of them (the draft-adapter experiment's layout, with
    overlapping blocks at random starts instead of one aligned block per position).
    A masked slot j is scored when it is a target (``valid & loss_mask``) and every masked
    slot before it in the block holds the base's own argmax (an exact greedy chain,
    ``chain_valid``'s rule). Loss per scored slot: (1 - kl_weight) x CE(base argmax) +
    kl_weight x KL(base || adapter), averaged over scored slots (unweighted: the 1/p weight
    of spec 2.3 is for training the base, and here every target is exact).
    ``certainty_weight`` adds dParallel's certainty forcing: that weight x the entropy of the
    adapter's distribution at every scored slot whose argmax already equals the target, so
    correct predictions grow confident enough to pass a decoder's threshold (a diffusion
    pass then unmasks more slots) while wrong ones are left to the CE and KL terms.
    """
    b, length = tokens.shape
    mask_id = model.config.mask_token_id
    starts, masked, present = sample_blocks(valid, loss_mask, block_length, blocks,
                                            layout_rates, generator, eps)
    k = blocks
    slots = torch.arange(block_length)
    pos = (starts[..., None] + slots).view(b, k * block_length)  # [B, Q]
    block_tok = tokens.gather(1, pos)
    masked = masked.view(b, -1)
    noisy = torch.where(masked, torch.full_like(block_tok, mask_id), block_tok)
    cache = model.new_cache(b, length + k * block_length)
    with torch.no_grad():
        h_clean = model.run(tokens, cache)
    teacher = torch.cat([tokens[:, :1], _argmax(model, h_clean[:, :-1], mask_id)], 1)
    # exact chain: no masked slot before j in the block holds a non-argmax token
    bad = (masked & (block_tok != teacher.gather(1, pos))).view(b, k, block_length).float()
    chain = ((bad.cumsum(-1) - bad) == 0).view(b, -1)
    target = (valid & loss_mask).gather(1, pos)
    scored = masked & chain & target & present.repeat_interleave(block_length, 1)
    scored &= pos >= 1  # position 0 has no AR prediction
    attn = block_layout_mask(starts, block_length, valid)
    h = model.run(noisy, cache, write=False, adapter=True, offsets=pos - length, mask=attn)
    n = int(scored.sum())
    if n == 0:
        zero = h.sum() * 0.0
        return LossParts(zero, 0.0, 0, 0.0, 0)
    student = _head(model, h[scored])
    student[:, mask_id] = float("-inf")
    label = teacher.gather(1, pos)[scored]
    ce = F.cross_entropy(student, label, reduction="none")
    total = (1 - kl_weight) * ce.sum()
    if kl_weight > 0 or certainty_weight > 0:
        s_logp = student.masked_fill(torch.isinf(student), -1e4).log_softmax(-1)
    if kl_weight > 0:
        rows = torch.nonzero(scored)
        with torch.no_grad():
            prev = h_clean[rows[:, 0], pos[scored] - 1]
            t_logp = _head(model, prev)
            t_logp[:, mask_id] = -1e4
            t_logp = t_logp.log_softmax(-1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        total = total + kl_weight * kl.sum()
    if certainty_weight > 0:
        right = student.detach().argmax(-1) == label
        entropy = -(s_logp[right].exp() * s_logp[right]).sum(-1)
        total = total + certainty_weight * entropy.sum()
    return LossParts(total / n, 0.0, 0, float(ce.detach().sum()), n)
