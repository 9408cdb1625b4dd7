"""Token choice from logits: greedy, Gumbel-max sampling, confidence, and target distributions.

The mask token is never a candidate: its logit is set to -inf before argmax or sampling in
every mode (docs/cases.md B02). Sampling is Gumbel-max in float64 (``argmax(z / T - log E)``, E ~ Exp(1)),
which is the reference's ``argmax(exp(z) / E^T)`` (docs/spec.md 3.3) without overflow; each request
draws from its own generator, so a seed gives the same output in any batch. Confidence is
the reference's: the un-tempered softmax over the full vocabulary, mask id included
(spec 3.3, gotcha 9.8 d). All math here is fp32 or float64 whatever the model dtype (B31).
"""

from __future__ import annotations

import torch

from ..params import SamplingParams

NEG_INF = float("-inf")


def candidate_logits(logits: torch.Tensor, mask_token_id: int | None) -> torch.Tensor:
    """``[N, V]`` fp32 logits with the mask id removed from the candidates."""
    out = logits.float().clone()
    if mask_token_id is not None:
        out[..., mask_token_id] = NEG_INF
    return out


def target_log_probs(logits: torch.Tensor, params: SamplingParams,
                     mask_token_id: int | None) -> torch.Tensor:
    """float64 log-probabilities ``[N, V]`` of softmax(z / T) after top-k and top-p.

    This is the distribution ``pick`` samples from at temperature > 0; speculative
    verification uses it on both the draft and the target side (B16).
    """
    z = candidate_logits(logits, mask_token_id).double() / params.temperature
    if params.top_k:
        kth = torch.topk(z, min(params.top_k, z.shape[-1]), dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, NEG_INF)
    if params.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
        drop = torch.zeros_like(z, dtype=torch.bool).scatter(-1, order, before >= params.top_p)
        z = z.masked_fill(drop, NEG_INF)
    return torch.log_softmax(z, dim=-1)


def gumbel_noise(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """float64 Gumbel(0, 1) noise ``-log(E)``, E ~ Exp(1), drawn from ``generator``."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp_min(1e-300)))


def pick(logits: torch.Tensor, params: SamplingParams, mask_token_id: int | None,
         generator: torch.Generator | None) -> torch.Tensor:
    """Choose one token per row of ``logits`` ``[N, V]`` -> int64 ``[N]``."""
    if params.temperature == 0:
        return candidate_logits(logits, mask_token_id).argmax(dim=-1)
    logp = target_log_probs(logits.cpu(), params, mask_token_id)
    return (logp + gumbel_noise(logp.shape, generator)).argmax(dim=-1).to(logits.device)


def sample_from(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One draw from a float64 probability vector ``[V]``."""
    logp = torch.log(probs)
    return int((logp + gumbel_noise(logp.shape, generator)).argmax())


def confidence(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Reference confidence ``softmax(z)[token]`` over the full vocabulary: ``[N]`` fp32."""
    probs = torch.softmax(logits.float(), dim=-1)
    return probs.gather(-1, tokens[..., None].to(probs.device))[..., 0]
