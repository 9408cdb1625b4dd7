"""Decoding metrics of a model under training: diffusion tokens_per_forward and
linear_spec acceptance_length on held-out prompts, through the real decoding loop."""

from __future__ import annotations

from ..engine.decode import decode
from ..decoding.sequence import Sequence
from ..model.model import TriModeModel
from ..params import SamplingParams


def decode_metrics(model: TriModeModel, prompts: list[list[int]], block_length: int,
                   max_tokens: int, denoise_adapter: bool, threshold: float = 0.9) -> dict:
    """Greedy decoding of ``prompts`` (token ids) in diffusion and linear_spec mode; returns
    mean ``diffusion_tokens_per_forward`` and ``linear_spec_acceptance_length``."""
    if not prompts:
        return {}
    config = model.config
    stop = set(config.eos_token_ids)
    out = {}
    for mode, key in (("diffusion", "diffusion_tokens_per_forward"),
                      ("linear_spec", "linear_spec_acceptance_length")):
        params = SamplingParams(mode=mode, max_tokens=max_tokens, block_length=block_length,
                                threshold=threshold if mode == "diffusion" else None)
        seqs = [Sequence(p, params, stop, config.mask_token_id, block_length, denoise_adapter)
                for p in prompts]
        decode(model, seqs)
        values = [s.metrics.tokens_per_forward if mode == "diffusion"
                  else s.metrics.acceptance_length for s in seqs]
        values = [v for v in values if v is not None]
        out[key] = sum(values) / len(values) if values else None
    return out
