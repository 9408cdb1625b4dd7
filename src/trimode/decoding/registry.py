"""The registry of decoding modes: mode name -> strategy class (one file per mode).

Everything outside ``decoding/`` asks this registry (or the strategy class it returns)
instead of comparing mode names: sizing, admission, the live view, the CLI and the server.
"""

from __future__ import annotations

from .ar import ARStrategy
from .diffusion import DiffusionStrategy
from .linear_spec import LinearSpecStrategy
from .quadratic_spec import QuadraticSpecStrategy
from .strategy import Strategy

STRATEGIES: dict[str, type[Strategy]] = {
    s.mode: s for s in (ARStrategy, DiffusionStrategy, LinearSpecStrategy, QuadraticSpecStrategy)}
PARALLEL_MODES = tuple(m for m, s in STRATEGIES.items() if s.parallel)


def strategy_class(mode: str) -> type[Strategy]:
    """The strategy class of a resolved mode (not ``auto``). Raises ValueError otherwise."""
    try:
        return STRATEGIES[mode]
    except KeyError:
        raise ValueError(f"mode must be one of {', '.join(STRATEGIES)}; got {mode!r}") from None


def scratch_slots(mode: str, block_length: int, max_tokens: int,
                  draft_segments: int | None = None) -> int:
    """Cache slots a request may write beyond its committed text in one forward."""
    return strategy_class(mode).scratch_slots(block_length, max_tokens, draft_segments)
