"""Counting host syncs: calls that, on a CUDA device, make the host wait for the device.

``SyncCounter`` is a ``torch.overrides.TorchFunctionMode``: inside ``with SyncCounter() as c``
every ``Tensor.item``, ``tolist``, ``cpu``, ``numpy``, ``nonzero``, ``bool()``, ``int()``,
``float()`` and index use (``__index__``) of a tensor, and every ``.to`` of a device tensor
to the CPU, adds one to ``c.syncs`` and the bytes it reads to ``c.bytes``. The count is by
call, whatever the tensor's device, so a CPU run counts what a CUDA run would wait for.
Used by ``benchmarks/bench_overhead.py`` and the step-sync test.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

SCALAR = {"item", "__bool__", "__int__", "__float__", "__index__"}
WHOLE = {"tolist", "cpu", "numpy"}


class SyncCounter(TorchFunctionMode):
    """Counts host syncs (``syncs``), bytes read (``bytes``) and calls by name (``by_call``)."""

    def __init__(self):
        super().__init__()
        self.syncs = 0
        self.bytes = 0
        self.by_call: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name in SCALAR and source is not None:
            self._count(name, source.element_size())
        elif name in WHOLE and source is not None:
            self._count(name, source.nbytes)
        elif name == "nonzero" and isinstance(result, torch.Tensor) or (name == "to" and source is not None and source.device.type != "cpu"
              and isinstance(result, torch.Tensor) and result.device.type == "cpu"):
            self._count(name, result.nbytes)
        return result

    def _count(self, name: str, nbytes: int) -> None:
        self.syncs += 1
        self.bytes += int(nbytes)
        self.by_call[name] += 1
