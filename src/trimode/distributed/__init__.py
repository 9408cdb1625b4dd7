"""Tensor parallelism on torch.distributed: parallel layers (``layers``), rank 0's model
handle and the other ranks' forward loop (``runner``), and process start-up (``launch``).

Entry points: ``LLM(..., tensor_parallel_size=N)`` and ``trimode serve --tensor-parallel-size
N`` (README "Scaling out"). Replicas across machines are Ray Serve's job
(``trimode.entrypoints.ray``), not this package's.
"""

from .launch import Launch, ModelSpec, start
from .layers import check_divisible

__all__ = ["Launch", "ModelSpec", "check_divisible", "start"]
