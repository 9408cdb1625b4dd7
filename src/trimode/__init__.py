"""trimode: an inference engine for tri-mode diffusion language models.

One set of weights decodes in three modes switched by the attention pattern: ``ar``
(causal), ``diffusion`` (block diffusion) and ``linear_spec`` (self-speculation).
"""

from .model.config import CheckpointError, ModelConfig
from .engine.engine import AsyncEngine, AutoPolicy
from .entrypoints.llm import LLM, StreamChunk
from .outputs import ForwardTrace, RequestMetrics, RequestOutput
from .params import MODES, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestMetrics", "ForwardTrace",
           "StreamChunk", "AutoPolicy", "AsyncEngine", "ModelConfig", "CheckpointError", "MODES"]
__version__ = "0.1.0"
