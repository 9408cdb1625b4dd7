"""The one home for the defaults the Python API, the CLI, the server and ``trimode bench``
share, so ``SamplingParams()`` and ``trimode generate`` / ``trimode serve`` agree.

Knows no modules of trimode (everything imports it). Per-mode values are keyed by the mode
names of ``decoding/registry.py`` (``tests`` check that the two agree).
"""

from __future__ import annotations

AUTO = "auto"  # the engine picks ar or its parallel mode per request (engine/auto.py)
DECODING_MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec")
MODES = DECODING_MODES + (AUTO,)
PARALLEL_MODES = ("diffusion", "linear_spec", "quadratic_spec")  # auto's candidates

MAX_TOKENS = 256  # generated-token limit
BLOCK_LENGTH = None  # None: the checkpoint's block_size
DRAFT_SEGMENTS = 1  # quadratic_spec: the fastest on CPU in benchmarks/RESULTS.md
# threshold when a request gives none: diffusion unmasks every slot whose confidence reaches
# 0.9 (the model card's value; None would be the even schedule, docs/spec.md 3.3); the
# speculative modes draft the whole block in one pass (0, the reference's default).
THRESHOLD = {"ar": None, "diffusion": 0.9, "linear_spec": 0.0, "quadratic_spec": 0.0}
CONTEXT_CAP = 4096  # max_model_len when not given: the checkpoint's limit, capped here
PAGE_SIZE = 16  # KV positions per page (engine/kv_pool.py); the tests run with 4
MIN_SHARED_PREFIX = 16  # prefix cache: shortest cached prefix worth reading (0: off)
MAX_LOGPROBS = 20
# diffusion's unmasking policies (decoding/unmask.py): which masked slots a denoising pass
# fills first. confidence is the reference's (docs/spec.md 3.3).
UNMASK_POLICIES = ("confidence", "margin", "entropy", "random", "leftmost")
UNMASK = "confidence"
