"""The dual-stream attention mask and the noising of the joint AR + diffusion objective.

Follows spec section 2.3 (a): the input is ``[x_t | x_0]`` (noisy stream first, clean
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
