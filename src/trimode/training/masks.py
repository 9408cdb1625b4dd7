"""The dual-stream attention mask and the noising of the joint AR + diffusion objective.

Follows docs/spec.md section 2.3 (a): the input is ``[x_t | x_0]`` (noisy stream first, clean
stream second, both at positions 0 .. L-1); a noisy query sees its own noisy block
bidirectionally and strictly earlier clean blocks; a clean query sees earlier-or-equal clean
tokens. Noising draws one t ~ U(0, 1) per sequence, p = (1 - eps) t + eps, and masks each
token with probability p, never outside the loss mask (the prompt in SFT). Knows nothing
about models or data files.
"""

from __future__ import annotations

import torch

EPS = 1e-3  # spec 2.3 noising epsilon


def dual_stream_mask(length: int, block_length: int,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``[2L, 2L]`` bool: ``allowed[q, k]`` for the sequence ``[x_t | x_0]`` of length 2L.

    Rows/columns ``0 .. L-1`` are the noisy stream, ``L .. 2L-1`` the clean stream; block of
    index i is ``(i mod L) // block_length``. Raises ValueError if ``block_length`` is not in
    [1, length]. Spec 2.3 (a), HF ``block_diff`` / Megatron ``sbd_block_diff``.
    """
    if not 1 <= block_length <= length:
        raise ValueError(f"block_length must be in [1, {length}] (the sequence length); "
                         f"got {block_length}")
    i = torch.arange(2 * length, device=device)
    clean = i >= length
    block = (i % length) // block_length
    cq, ck = clean[:, None], clean[None, :]
    bq, bk = block[:, None], block[None, :]
    same_noisy_block = ~cq & ~ck & (bq == bk)
    earlier_clean_block = ~cq & ck & (bq > bk)
    clean_causal = cq & ck & (i[:, None] >= i[None, :])
    return same_noisy_block | earlier_clean_block | clean_causal


def noise(tokens: torch.Tensor, loss_mask: torch.Tensor, mask_token_id: int,
          generator: torch.Generator, eps: float = EPS, draft_layout_rate: float = 0.0,
          block_length: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask ``tokens`` ``[B, L]`` -> (noisy ``[B, L]``, masked ``[B, L]`` bool, p ``[B]``).

    One t ~ U(0, 1) per row, p = (1 - eps) t + eps; a token is masked with probability p
    and only where ``loss_mask`` is true (spec 2.3). With probability ``draft_layout_rate`` a
    row instead gets the linear_spec draft layout: every loss position is masked except the
    first of each block (the seed), and p = 1. Random numbers come from ``generator`` only.
    """
    b, length = tokens.shape
    t = torch.rand(b, generator=generator, dtype=torch.float64)
    p = ((1 - eps) * t + eps).to(torch.float32)
    draws = torch.rand(b, length, generator=generator, dtype=torch.float64).to(torch.float32)
    masked = (draws < p[:, None]) & loss_mask
    draft_rows = torch.rand(b, generator=generator, dtype=torch.float64) < draft_layout_rate
    if bool(draft_rows.any()):
        seeds = (torch.arange(length) % block_length) == 0
        masked = torch.where(draft_rows[:, None], loss_mask & ~seeds[None, :], masked)
        p = torch.where(draft_rows, torch.ones_like(p), p)
    return torch.where(masked, torch.full_like(tokens, mask_token_id), tokens), masked, p


def chain_valid(tokens: torch.Tensor, teacher: torch.Tensor, masked: torch.Tensor,
                block_length: int) -> torch.Tensor:
    """``[B, L]`` bool: the teacher's argmax at j is an exact greedy-chain target for a draft.

    True at position j when every masked position k of j's block with k < j holds the
    teacher's own argmax (``tokens[k] == teacher[k]``): then the visible tokens plus the
    greedy chain determine ``teacher[j]`` (the draft-adapter experiment's chain-validity
    rule, generalised to partially unmasked blocks).
    """
    b, length = tokens.shape
    bad = (masked & (tokens != teacher)).float()
    pad = (-length) % block_length
    blocks = torch.nn.functional.pad(bad, (0, pad)).view(b, -1, block_length)
    before = blocks.cumsum(-1) - blocks  # bad positions strictly before j in the block
    return (before.view(b, -1)[:, :length] == 0)


LAYOUTS = ("draft", "denoise", "masked")


def block_layout_mask(starts: torch.Tensor, block_length: int,
                      valid: torch.Tensor) -> torch.Tensor:
    """``[B, 1, Q, L + Q]`` bool mask (Q = K x block_length) for ``model.run(mask=...)``.

    ``starts`` ``[B, K]``: block k of row b covers positions ``starts[b, k] ..`` and its
    queries see the row's cached clean keys before ``starts[b, k]`` that are ``valid``
    (``[B, L]``) plus every slot of their own block: a decoder's draft / denoise pass
    (spec 3, 5.1), many blocks in one forward.
    """
    b, k = starts.shape
    length = valid.shape[1]
    block_start = starts.repeat_interleave(block_length, 1)  # [B, Q]
    clean = (torch.arange(length)[None, None, :] < block_start[:, :, None]) & valid[:, None, :]
    block_id = torch.arange(k).repeat_interleave(block_length)
    own = (block_id[:, None] == block_id[None, :])[None].expand(b, -1, -1)
    return torch.cat([clean, own], 2)[:, None]


def sample_blocks(valid: torch.Tensor, loss_mask: torch.Tensor, block_length: int, blocks: int,
                  layout_rates: tuple[float, float, float], generator: torch.Generator,
                  eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``blocks`` decode-time blocks per row, as the decoders lay them out.

    Every block covers positions ``s .. s + block_length - 1`` of a row ``[L]`` and sees the
    clean keys ``< s`` (the causal KV cache of a decoder) plus its own slots bidirectionally.
    ``s`` is uniform over positions whose next token is a target (``valid & loss_mask``)
    and that leave room for the block. Each block takes one layout, drawn with
    ``layout_rates`` (draft, denoise, masked; they need not sum to 1):

    * draft: slot 0 (the seed) visible, slots 1.. masked (a linear_spec draft pass and a
      diffusion block's first denoising pass, spec 3 and 5.1);
    * denoise: slot 0 visible, each later slot masked with probability p = (1 - eps) t +
      eps, t ~ U(0, 1), at least one (a diffusion block after some passes, spec 2.3's rate);
    * masked: every slot masked (a quadratic_spec draft segment, whose slot 0 is the bonus
      position the verify has not decided yet).

    Returns ``starts`` ``[B, K]`` long, ``masked`` ``[B, K, block_length]`` bool and
    ``present`` ``[B, K]`` bool (false for every block of a row without an eligible start).
    Random numbers come from ``generator`` only.
    """
    b, length = valid.shape
    eligible = torch.zeros_like(valid)
    last = length - block_length  # the block must fit
    if last >= 0:
        eligible[:, : last + 1] = (valid & loss_mask)[:, 1 : last + 2]
    present = eligible.any(1)
    weights = eligible.float()
    weights[~present, : last + 1] = 1.0  # rows with no target: any start (nothing is scored)
    starts = torch.multinomial(weights, blocks, replacement=True, generator=generator)
    rates = torch.tensor(layout_rates, dtype=torch.float64)
    kind = torch.multinomial(rates.expand(b * blocks, 3), 1, replacement=True,
                             generator=generator).view(b, blocks)
    t = torch.rand(b, blocks, generator=generator, dtype=torch.float64)
    p = ((1 - eps) * t + eps)[..., None]
    draws = torch.rand(b, blocks, block_length, generator=generator, dtype=torch.float64)
    later = torch.arange(block_length) >= 1
    random = (draws < p) & later
    # at least one masked slot: the later slot with the lowest draw
    lowest = torch.where(later, draws, torch.full_like(draws, 2.0)).argmin(-1, keepdim=True)
    random = random | (torch.zeros_like(random).scatter_(-1, lowest, True) & ~random.any(-1,
                                                                                         keepdim=True))
    masked = torch.where((kind == 0)[..., None], later.expand_as(random), random)
    masked = torch.where((kind == 2)[..., None], torch.ones_like(random), masked)
    return starts, masked, present[:, None].expand(b, blocks)
