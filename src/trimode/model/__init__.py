"""The model: config, RoPE, layers (``model.py``), attention metadata (``attention.py``) and
the KV cache (``kv_cache.py``)."""

from .config import CheckpointError, ModelConfig, RopeConfig
from .kv_cache import KVCache
from .model import TriModeModel

__all__ = ["CheckpointError", "KVCache", "ModelConfig", "RopeConfig", "TriModeModel"]
