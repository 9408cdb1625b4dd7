"""Counter-based random numbers on any device: the same (seed, position, stream) gives the
same number whatever the batch, the row order or the device.

A request's random draws are not a generator's running stream (that would depend on how
many draws earlier steps made and on which rows shared the step) but a hash of a key:
``key(seed, position, stream)`` names one draw site (a generated-token position and what the
draw is for), and ``uniform(key, n)`` expands it into ``n`` float64 uniforms in (0, 1), one
per vocabulary id or draft slot. The hash is splitmix64's finaliser in int64 torch ops
(wrap-around multiplication, logical shifts by masking), so it runs unchanged on CPU and
CUDA and inside a CUDA graph. Quality: splitmix64 passes BigCrush; 53 bits per uniform.
"""

from __future__ import annotations

import torch

# stream ids: what a draw is for (a position may need several independent draws)
PICK, ACCEPT, RESIDUAL, BONUS = 1, 2, 3, 4
UNMASK = 5  # diffusion's random unmasking order: one uniform per generated position

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _s64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


GOLDEN, M1, M2 = _s64(_GOLDEN), _s64(_M1), _s64(_M2)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 ``x`` (a bijection of 64-bit words)."""
    x = (x ^ _shr(x, 30)) * M1
    x = (x ^ _shr(x, 27)) * M2
    return x ^ _shr(x, 31)


def key(seed: torch.Tensor, position: torch.Tensor, stream: int | torch.Tensor) -> torch.Tensor:
    """int64 keys of draw sites: one per element of the broadcast ``seed`` x ``position``."""
    h = mix64(seed.long() * GOLDEN + 1)
    h = mix64(h ^ (position.long() * GOLDEN))
    return mix64(h ^ (torch.as_tensor(stream, device=h.device).long() * M2))


def uniform(keys: torch.Tensor, n: int) -> torch.Tensor:
    """float64 uniforms in (0, 1): ``[*keys.shape, n]``, element i hashing (key, i)."""
    i = torch.arange(n, device=keys.device, dtype=torch.long)
    h = mix64(keys[..., None] + (i + 1) * GOLDEN)
    return (_shr(h, 11).double() + 0.5) * (1.0 / (1 << 53))


def gumbel(keys: torch.Tensor, n: int) -> torch.Tensor:
    """float64 Gumbel(0, 1) noise ``-log(-log U)`` of shape ``[*keys.shape, n]``."""
    return -torch.log(-torch.log(uniform(keys, n)))
