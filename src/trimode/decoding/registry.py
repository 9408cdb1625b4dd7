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
# defaults.DECODING_MODES / PARALLEL_MODES name the same modes without importing torch (for
# the CLI's flags); tests/test_layout.py checks that they agree.


def strategy_class(mode: str) -> type[Strategy]:
    """The strategy class of a resolved mode (not ``auto``). Raises ValueError otherwise."""
    try:
        return STRATEGIES[mode]
    except KeyError:
        raise ValueError(f"mode must be one of {', '.join(STRATEGIES)}; got {mode!r}") from None


def needs_mask(mode: str) -> bool:
    """Whether ``mode`` (``auto`` included: it may pick a parallel mode) needs the checkpoint's
    ``mask_token_id``."""
    strategy = STRATEGIES.get(mode)
    return strategy is None or strategy.needs_mask


def equals_ar(mode: str) -> bool:
    """Whether ``mode``'s output is ``ar``'s at temperature 0 (``auto``: not promised)."""
    strategy = STRATEGIES.get(mode)
    return strategy is not None and strategy.equals_ar


def scratch_slots(mode: str, block_length: int, max_tokens: int,
                  draft_segments: int | None = None) -> int:
    """Cache slots a request may write beyond its committed text in one forward."""
    return strategy_class(mode).scratch_slots(block_length, max_tokens, draft_segments)
