"""trimode: an inference engine for tri-mode diffusion language models.

One set of weights decodes in several modes switched by the attention pattern: ``ar``
(causal), ``diffusion`` (block diffusion), ``linear_spec`` (self-speculation) and
``quadratic_spec`` (draft and verify fused). docs/ARCHITECTURE.md maps the code.
"""

from .engine import AdaptivePolicy, AsyncEngine, AutoPolicy, ForwardCost
from .entrypoints.llm import LLM, StreamChunk
from .model.config import CheckpointError, ModelConfig
from .outputs import ForwardTrace, RequestMetrics, RequestOutput
from .params import MODES, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestMetrics", "ForwardTrace",
           "StreamChunk", "AutoPolicy", "AdaptivePolicy", "ForwardCost", "AsyncEngine", "ModelConfig", "CheckpointError", "MODES"]
__version__ = "0.1.0"
