"""The registry of decoding modes: mode name -> strategy class."""

from .quadratic_spec import QuadraticSpecStrategy
from .strategies import ARStrategy, DiffusionStrategy, LinearSpecStrategy

STRATEGIES = {"ar": ARStrategy, "diffusion": DiffusionStrategy, "linear_spec": LinearSpecStrategy,
              "quadratic_spec": QuadraticSpecStrategy}


def scratch_slots(mode: str, block_length: int, max_tokens: int,
                  draft_segments: int | None = None) -> int:
    """Cache slots a request may write beyond its committed text in one forward."""
    if mode == "ar":
        return 2
    if mode != "diffusion":  # speculative blocks shrink to the tokens still needed
        block_length = min(block_length, max_tokens)
    if mode == "quadratic_spec":
        segments = block_length if draft_segments is None else min(draft_segments, block_length)
        return block_length + segments * block_length + 1
    return 2 * block_length + 1
