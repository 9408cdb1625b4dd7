"""The serving engine: config, auto policy, scheduler, KV pool, model runner, async front end.

``engine.py`` steps requests (continuous batching); ``scheduler.py`` decides who runs;
``model_runner.py`` runs the packed forward; ``kv_pool.py`` hands out KV pages to rows
(``pages.py``: reference counts, free and cached pages); ``prefix.py`` is the prefix cache;
``auto.py`` holds the ``mode="auto"`` policies, ``controller.py`` the
per-step controller and ``cost.py`` its forward-cost curve; ``async_engine.py`` the
thread front end for servers; ``decode.py`` runs a fixed batch.
"""

from .async_engine import AsyncEngine
from .auto import AdaptivePolicy, AutoPolicy
from .cost import ForwardCost
from .config import EngineConfig
from .engine import Engine
from .request import RequestUpdate, to_output

__all__ = ["AdaptivePolicy", "AsyncEngine", "AutoPolicy", "ForwardCost", "Engine", "EngineConfig", "RequestUpdate", "to_output"]
