"""The serving engine: continuous batching with a decoding mode per request.

Requests are admitted between steps and leave the moment they finish, are cancelled or fail.
Every live request keeps its own SamplingParams (mode, block_length, threshold, temperature,
seed...). One engine step is at most two forwards:

1. a causal prefill of the requests admitted this step (their rows are contiguous at the end
   of the pool, so the forward runs on a view of just those rows), then
2. one packed decode forward over every running request: each row is the Step its strategy
   named (an AR token, a diffusion denoise or commit block, a linear_spec draft or verify
   block, a quadratic_spec fused layout), with its own attention kind, cache-write flag and
   adapter flags, right-padded to the widest row.

Why one packed forward rather than one forward per kind: ``benchmarks/bench_engine.py``
measures both (see benchmarks/RESULTS.md, "Engine"); on a CPU a forward's cost grows far
slower than its token count at small widths, so packing wins while the widths are close, and
the admission budget (``max_num_batched_tokens``) bounds the padding.

The scheduler decides *who* runs and how many query tokens each may use (admission against
rows, the token budget and the KV reservation); strategies decide *what* the tokens are;
``decoding/loop.py``'s ``forward_rows`` builds the tensors. KV memory is a preallocated
:class:`~trimode.cache.KVPool`; a request reserves its whole row at admission, so a running
request never waits for memory, and its row is freed on finish, cancellation or error.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..model.kv_cache import KVPool
from .model_runner import forward_rows
from ..decoding.registry import STRATEGIES, scratch_slots
from ..decoding.sequence import Sequence, Step
from ..multimodal.requests import attach_features, check_images, prefill_step, share_keys
from ..outputs import RequestMetrics, RequestOutput, TokenLogprob
from ..params import ParamError, SamplingParams

log = logging.getLogger("trimode.engine")

PARALLEL_MODES = ("diffusion", "linear_spec", "quadratic_spec")


@dataclass(frozen=True)
class AutoPolicy:
    """How ``mode="auto"`` picks a mode when a request is admitted.

    The request runs ``parallel_mode`` while the load it joins (running requests plus the
    waiting queue, itself included, capped at the pool's rows) is at most
    ``max_parallel_batch``, and ``ar`` beyond that: parallel
    decoding pays while forwards are memory-bound and stops paying once the batch fills the
    device. The switch point is the crossover batch size measured by ``trimode bench`` /
    ``benchmarks/bench_engine.py`` on the target machine (0 = always ``ar``). The choice is
    made once; the output is exactly what the chosen mode gives alone.
    """

    parallel_mode: str = "linear_spec"
    max_parallel_batch: int = 4

    def __post_init__(self) -> None:
        if self.parallel_mode not in PARALLEL_MODES:
            raise ValueError(f"parallel_mode must be one of {', '.join(PARALLEL_MODES)}; "
                             f"got {self.parallel_mode!r}")
        if isinstance(self.max_parallel_batch, bool) or not isinstance(self.max_parallel_batch, int) \
                or self.max_parallel_batch < 0:
            raise ValueError(f"max_parallel_batch must be an integer >= 0; got {self.max_parallel_batch!r}")

    def choose(self, batch_size: int) -> str:
        return self.parallel_mode if batch_size <= self.max_parallel_batch else "ar"

    @classmethod
    def from_crossover(cls, path) -> "AutoPolicy":
        """The policy a ``crossover.json`` written by ``trimode bench`` measured: the parallel
        mode that stays faster than ar up to the largest batch (ties: linear_spec, whose
        output is ar's), up to that batch. Raises ValueError for a file without ``modes`` or
        one where every mode's ``max_parallel_batch`` is unknown (null: ar won at the
        smallest batch size measured, which was above 1)."""
        import json
        from pathlib import Path

        try:
            modes = json.loads(Path(path).read_text())["modes"]
            known = {m: v["max_parallel_batch"] for m, v in modes.items() if m in PARALLEL_MODES}
            ranked = sorted(((int(b), m == "linear_spec", m) for m, b in known.items()
                             if b is not None), reverse=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a crossover.json written by trimode bench ({exc})") from None
        if not ranked and known:
            raise ValueError(f"{path}: ar was already faster at the smallest batch size measured "
                             "and smaller ones were not measured; rerun trimode bench with "
                             "--batch-sizes starting at 1")
        if not ranked:
            raise ValueError(f"{path}: no parallel mode measured")
        batch, _, mode = ranked[0]
        return cls(parallel_mode=mode, max_parallel_batch=batch)


@dataclass(frozen=True)
class EngineConfig:
    """Limits of one engine.

    max_num_seqs: requests decoded concurrently (rows of the KV pool), >= 1.
    max_model_len: positions one request may hold: prompt + generation (diffusion rounds
        it up to whole blocks). None: the checkpoint's context limit, capped at 4096.
    scratch_tokens: extra positions per row for what a forward writes beyond the committed
        text (drafts, denoised blocks: ``decoding.modes.scratch_slots``, 2 * block_length + 1
        for diffusion and linear_spec); a request needing more is rejected (smaller
        block_length or draft_segments).
    kv_cache_memory: bytes for the KV pool; None: exactly max_num_seqs rows. When given,
        the pool holds ``min(max_num_seqs, kv_cache_memory // bytes_per_row)`` rows and
        raises ValueError if not even one row fits.
    max_num_batched_tokens: query tokens per step: the prompts prefilled in one step plus
        the widest step of every running request must fit; a prompt longer than this is
        rejected.
    min_shared_prefix: a new request whose prompt shares at least this many leading tokens
        with a running request's prompt copies their KV instead of recomputing it (prefix
        sharing); 0 turns it off.
    auto: the policy for ``mode="auto"``.
    """

    max_num_seqs: int = 16
    max_model_len: int | None = None
    kv_cache_memory: int | None = None
    max_num_batched_tokens: int = 8192
    scratch_tokens: int = 256
    min_shared_prefix: int = 16
    auto: AutoPolicy = field(default_factory=AutoPolicy)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "scratch_tokens"):
            _check_int(name, getattr(self, name), 1)
        if self.max_model_len is not None:
            _check_int("max_model_len", self.max_model_len, 1)
        if self.kv_cache_memory is not None:
            _check_int("kv_cache_memory", self.kv_cache_memory, 1)
        _check_int("min_shared_prefix", self.min_shared_prefix, 0)
        if not isinstance(self.auto, AutoPolicy):
            raise ValueError(f"auto must be an AutoPolicy; got {self.auto!r}")


@dataclass
class RequestUpdate:
    """What one engine step did for one request.

    new_token_ids: tokens committed in this step, in order; never revised (a stop token is
        not included). new_logprobs: aligned with them when logprobs were requested.
    token_ids: every token committed so far. finished / finish_reason: ``stop``, ``length``,
    ``abort`` or ``error`` (``error`` says why). mode: the mode that runs (auto resolved).
    metrics: running totals (nfe, generated_tokens, tokens_per_forward, acceptance_length).
    """

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    mode: str
    metrics: RequestMetrics
    error: str | None = None


class Engine:
    """Continuous-batching decoder over one model (not thread-safe; see AsyncEngine).

    ``model``: a TriModeModel (or any object with its ``config``, ``new_cache``, ``__call__``
    and ``logits``). ``eos_token_ids`` end every request. Raises ValueError for a config
    the pool cannot hold.
    """

    def __init__(self, model, config: EngineConfig | None = None, check_context: bool = True):
        self.model = model
        self.config = config or EngineConfig()
        mc = model.config
        limit = mc.max_position_embeddings
        self.max_model_len = self.config.max_model_len or min(limit, 4096)
        if check_context:
            self.max_model_len = min(self.max_model_len, limit)
        self.check_context = check_context
        rows = self.config.max_num_seqs
        per_token = kv_bytes_per_token(model)
        self.row_capacity = self.max_model_len + self.config.scratch_tokens + 1  # +1 spare slot
        if self.config.kv_cache_memory is not None:
            fit = self.config.kv_cache_memory // (per_token * self.row_capacity)
            if fit < 1:
                raise ValueError(f"kv_cache_memory {self.config.kv_cache_memory} bytes holds no "
                                 f"request of max_model_len {self.max_model_len} "
                                 f"({per_token * self.row_capacity} bytes per row)")
            rows = min(rows, int(fit))
        try:
            cache = model.new_cache(rows, self.row_capacity, zeroed=False)
        except TypeError:  # models (test stubs) without lazy caches
            cache = model.new_cache(rows, self.row_capacity)
        self.pool = KVPool(cache)
        self.kv_bytes = rows * self.row_capacity * per_token
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index = pool row
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.steps = 0
        self.forwards = 0
        self.shared_prefix_tokens = 0  # prompt tokens whose prefill prefix sharing saved
        self.denoise_adapter = False  # the draft adapter also denoises (LLM sets it)

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None,
                    on_step: Callable[[Sequence], None] | None = None,
                    images: list | None = None) -> str:
        """Queue a request; it joins the batch at the next step that has room.

        ``prompt_ids``: validated token ids (see ``Tokenizer.check_ids``). Returns the
        request id. Raises ValueError when the request can never run here: a mode the
        checkpoint cannot run, prompt + generation over the context limit or
        ``max_model_len``, a prompt over ``max_num_batched_tokens``, or a duplicate id.
        ``images``: preprocessed ``ImageInput``s whose features fill the prompt's image pad
        tokens in order (the vision tower runs here, once per image).
        """
        self.validate(prompt_ids, params, images)
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        seq = self._sequence(prompt_ids, params)
        attach_features(self.model, seq, images)
        seq.request_id = request_id
        seq.on_step = on_step
        self.requests[request_id] = seq
        self.waiting.append(seq)
        return request_id

    def add_sequence(self, seq: Sequence) -> str:
        """Queue a pre-built Sequence (``decoding.loop.decode``); checks it fits the pool."""
        if seq.params.mode == "auto":
            raise ValueError("add_sequence needs a resolved mode, not 'auto'")
        self._check_fits(seq.prompt_ids, seq.params, seq.block_length)
        seq.request_id = str(next(self._ids))
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)
        return seq.request_id

    def validate(self, prompt_ids: list[int], params: SamplingParams,
                 images: list | None = None) -> None:
        """Raise ValueError (naming the field and limit) if the request could never run."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams; got {params!r}")
        if not isinstance(prompt_ids, (list, tuple)) or not prompt_ids:
            raise ValueError("prompt must be a non-empty list of token ids")
        check_images(self.model, list(prompt_ids), images)
        modes = (params.mode,) if params.mode != "auto" else ("ar", self.config.auto.parallel_mode)
        for mode in modes:
            self._check_fits(prompt_ids, replace(params, mode=mode))

    def abort(self, request_id: str) -> bool:
        """Cancel a request: a waiting one leaves the queue, a running one is finished
        (``abort``) and its KV row freed at once. Returns False for unknown or finished ids."""
        seq = self.requests.get(request_id)
        if seq is None or seq.finished:
            return False
        seq.finish("abort")
        if seq in self.waiting:
            self.waiting.remove(seq)
            self._finalize(seq)
        else:
            self._release([seq])
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        """Queue and pool use: running, waiting, kv_rows_used/total, kv_tokens_used/total."""
        return {"running": len(self.running), "waiting": len(self.waiting),
                "kv_rows_used": self.pool.live, "kv_rows_total": self.pool.rows,
                "kv_tokens_used": self.pool.used_positions(),
                "kv_tokens_total": self.pool.rows * self.max_model_len,
                "shared_prefix_tokens": self.shared_prefix_tokens}

    def output(self, request_id: str) -> Sequence:
        return self.requests[request_id]

    def pop_finished(self, request_id: str) -> Sequence:
        """Forget a finished request (its id may then be reused)."""
        seq = self.requests[request_id]
        if not seq.finished:
            raise ValueError(f"request {request_id!r} is not finished")
        return self.requests.pop(request_id)

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestUpdate]:
        """Admit what fits, prefill it, run one decode forward; return the updates of every
        request that committed tokens or ended in this step."""
        touched: dict[str, Sequence] = {}
        admitted = self._admit()
        if admitted:
            start = admitted[0].row
            shared = [self._share_prefix(s) for s in admitted]
            self._run([prefill_step(s, n, self.model) for s, n in zip(admitted, shared)],
                      admitted, start, prefill=True)
            touched.update((s.request_id, s) for s in admitted)
        decoding = [s for s in self.running if not s.finished and s not in admitted]
        if decoding:
            # rows of decoding requests are 0 .. k-1 only if no admitted row sits in between;
            # admitted rows are the last ones, so the decode forward covers rows 0 .. k-1.
            self._run([s.strategy.next_step(s) for s in decoding], decoding, 0, prefill=False)
            touched.update((s.request_id, s) for s in decoding)
        self.steps += 1
        return [u for s in touched.values() if (u := self._update(s)) is not None]

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = self.config.max_num_batched_tokens - sum(_width(s) for s in self.running)
        while self.waiting and self.pool.live < self.pool.rows:
            seq = self.waiting[0]
            if seq.params.mode == "auto":
                # the load it joins: everyone running plus the queue (itself included), so
                # a burst of arrivals is seen as the batch it is about to become
                load = min(len(self.running) + len(self.waiting), self.pool.rows)
                mode = self.config.auto.choose(load)
                resolved = self._sequence(seq.prompt_ids, replace(seq.params, mode=mode), seq)
            else:
                resolved = seq
            need = len(seq.prompt_ids) + _width(resolved)
            if need > budget and (self.running or admitted):
                break
            self.waiting.popleft()
            if resolved is not seq:
                self.requests[seq.request_id] = resolved
                seq = resolved
            seq.row = self.pool.allocate()
            self.running.append(seq)
            admitted.append(seq)
            budget -= need
        return admitted

    def _share_prefix(self, seq: Sequence) -> int:
        """Prefix sharing: copy the KV of the longest prompt prefix (>= ``min_shared_prefix``
        tokens) that another live row already holds into ``seq``'s row; returns how many
        prompt tokens need no prefill. Keys depend only on the tokens before them (causal
        prefill and commit passes), so the copy is the prefill's own result up to fp32
        summation order."""
        if not self.config.min_shared_prefix:
            return 0
        prompt, keys, best, source = seq.prompt_ids, share_keys(seq), 0, -1
        for other in self.running:
            if other.metrics.nfe == 0:
                continue  # admitted in this step (seq itself included): no KV yet
            limit = min(len(prompt) - 1, int(self.pool.cache.lengths[other.row]),
                        len(other.prompt_ids))
            n, other_keys = 0, share_keys(other)
            while n < limit and other_keys[n] == keys[n]:
                n += 1
            if n > best:
                best, source = n, other.row
        if best < self.config.min_shared_prefix:
            return 0
        cache = self.pool.cache
        for buf in (*cache.keys, *cache.values):
            buf[seq.row, :, :best] = buf[source, :, :best]
        cache.lengths[seq.row] = best
        self.shared_prefix_tokens += best
        return best

    def _run(self, steps: list[Step], seqs: list[Sequence], start: int, prefill: bool) -> None:
        view = self.pool.view(start, start + len(seqs))
        assert [s.row for s in seqs] == list(range(start, start + len(seqs)))
        try:
            logits = forward_rows(self.model, view, steps, prefill)
            bad = [bool((torch.isnan(r) | torch.isposinf(r)).any()) for r in logits]
        except Exception as exc:  # a failed forward ends its requests, never the engine
            log.exception("forward failed")
            for s in seqs:
                s.finish("error", f"forward failed: {type(exc).__name__}: {exc}")
            self._release(seqs)
            return
        self.pool.sync(view, start)
        self.forwards += 1
        for i, (seq, step) in enumerate(zip(seqs, steps)):
            seq.metrics.nfe += 1
            if bad[i]:
                seq.finish("error", "the model produced NaN or +inf logits")
                continue
            try:
                if prefill:
                    seq.strategy = STRATEGIES[seq.params.mode]()
                    seq.strategy.start(seq, logits[i : i + 1])
                else:
                    seq.strategy.update(seq, logits[i])
            except Exception as exc:
                log.exception("request %s failed", seq.request_id)
                seq.finish("error", f"{type(exc).__name__}: {exc}")
            if seq.on_step:
                seq.on_step(seq)
        rollback = torch.tensor([s.rollback for s in seqs], device=view.lengths.device)
        if bool(rollback.any()):
            view.crop(view.lengths - rollback)
            self.pool.sync(view, start)
            for s in seqs:
                s.rollback = 0
        self._release([s for s in seqs if s.finished])

    def _release(self, done: list[Sequence]) -> None:
        """Free the rows of finished requests, keeping live rows contiguous."""
        for seq in sorted(done, key=lambda s: s.row, reverse=True):
            if seq.row < 0:
                continue
            moved = self.pool.free(seq.row)
            last = self.running.pop()
            if moved is not None:
                self.running[seq.row] = last
                last.row = seq.row
            seq.row = -1
            self._finalize(seq)

    def _finalize(self, seq: Sequence) -> None:
        seq.metrics.latency_s = time.perf_counter() - seq.arrival
        if seq.verifies:
            seq.metrics.acceptance_length = (seq.metrics.generated_tokens - 1) / seq.verifies

    def _update(self, seq: Sequence) -> RequestUpdate | None:
        new = seq.generated[seq.emitted:]
        if not new and not seq.finished:
            return None
        lps = None if seq.logprobs is None else seq.logprobs[seq.emitted:]
        seq.emitted = len(seq.generated)
        return RequestUpdate(seq.request_id, list(new), lps, list(seq.generated), seq.finished,
                             seq.finish_reason, seq.params.mode, seq.metrics, seq.error)

    # ------------------------------------------------------------------ requests -> sequences

    def _check_fits(self, prompt_ids: list[int], params: SamplingParams,
                    block: int | None = None) -> None:
        mc = self.model.config
        if params.mode != "ar" and mc.mask_token_id is None:
            raise ParamError(f"mode {params.mode!r} needs a mask_token_id in the checkpoint "
                             "config", "mode")
        block = block or params.block_length or mc.block_size
        generated = params.max_tokens
        if params.mode == "diffusion":  # the last block is denoised at full length (B04, B27)
            generated = -(-params.max_tokens // block) * block
        rounding = " after block rounding" if generated != params.max_tokens else ""
        limit = mc.max_position_embeddings
        total = len(prompt_ids) + generated
        # the field to change: max_tokens, unless the prompt alone leaves no room
        field = "prompt" if len(prompt_ids) >= min(self.max_model_len, limit) else "max_tokens"
        if params.mode == "diffusion" and field == "max_tokens" and rounding:
            field = "block_length" if len(prompt_ids) + params.max_tokens <= self.max_model_len \
                else field
        # the tighter limit is the one named (max_model_len <= the checkpoint's limit)
        if total > self.max_model_len and (not self.check_context or self.max_model_len < limit):
            raise ParamError(f"prompt ({len(prompt_ids)} tokens) + generation ({generated} positions"
                             f"{rounding}) = {total} exceeds max_model_len {self.max_model_len}",
                             field)
        if self.check_context and total > limit:
            raise ParamError(f"prompt ({len(prompt_ids)} tokens) + generation ({generated} positions"
                             f"{rounding}) = {total} exceeds the context limit {limit}", field)
        scratch = scratch_slots(params.mode, block, params.max_tokens, params.draft_segments)
        if scratch > self.config.scratch_tokens:
            raise ParamError(f"{params.mode} with block_length {block} needs {scratch} scratch "
                             f"positions per forward; the engine reserves scratch_tokens "
                             f"{self.config.scratch_tokens} (use a smaller block_length"
                             f"{' or draft_segments' if params.mode == 'quadratic_spec' else ''})",
                             "block_length")
        if len(prompt_ids) > self.config.max_num_batched_tokens:
            raise ParamError(f"prompt ({len(prompt_ids)} tokens) exceeds max_num_batched_tokens "
                             f"{self.config.max_num_batched_tokens}", "prompt")

    def _sequence(self, prompt_ids: list[int], params: SamplingParams,
                  like: Sequence | None = None) -> Sequence:
        mc = self.model.config
        block = params.block_length or mc.block_size
        stop = set(mc.eos_token_ids) | set(params.stop_token_ids)
        seq = Sequence(prompt_ids, params, stop, mc.mask_token_id, block, self.denoise_adapter)
        if like is not None:  # auto resolved at admission: keep identity, seed and arrival
            seq.request_id, seq.arrival, seq.on_step = like.request_id, like.arrival, like.on_step
            seq.generator = like.generator
            seq.images, seq.image_features = like.images, like.image_features
            seq.image_pad_id, seq.share_keys = like.image_pad_id, like.share_keys
        return seq


def _width(seq: Sequence) -> int:
    """The widest step a request can ask for (its share of the token budget)."""
    p = seq.params
    if p.mode == "ar":
        return 1
    if p.mode == "quadratic_spec":
        return scratch_slots(p.mode, seq.block_length, p.max_tokens, p.draft_segments) - 1
    return seq.block_length if p.mode == "diffusion" else min(seq.block_length, p.max_tokens)


def kv_bytes_per_token(model) -> int:
    """Bytes of keys + values one position takes in every layer."""
    c = model.config
    element = torch.tensor([], dtype=getattr(model, "dtype", torch.float32)).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * element


def to_output(seq: Sequence, prompt: str | None, text: str) -> RequestOutput:
    return RequestOutput(prompt, seq.prompt_ids, text, list(seq.generated), seq.finish_reason,
                         seq.metrics, seq.params.mode, seq.logprobs, seq.error)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")


class AsyncEngine:
    """An Engine stepped by a background thread, for servers and async callers.

    ``generate`` is an async iterator of RequestUpdates; requests submitted from any event
    loop join the running batch at the next step. ``abort`` is thread-safe and takes effect
    before the next step (the request's KV row is freed within one step). Leaving the
    ``async for`` early (client disconnect, task cancellation) aborts the request.
    A failure inside a step ends the requests of that step with ``error``; the thread
    keeps serving. Do not call ``LLM.generate`` on the same LLM while this runs.
    """

    def __init__(self, llm_or_engine):
        self.engine: Engine = getattr(llm_or_engine, "engine", llm_or_engine)
        self.llm = llm_or_engine if hasattr(llm_or_engine, "engine") else None
        self._inbox: deque = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self._stats = self.engine.stats()
        self._ids = itertools.count()
        if self.llm is not None:
            self.llm._async = self

    def validate(self, prompt_ids: list[int], params: SamplingParams,
                 images: list | None = None) -> None:
        """Raise ValueError (naming the field) if the request could never run here."""
        self.engine.validate(prompt_ids, params, images)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, images: list | None = None):
        """Yield this request's RequestUpdates until it finishes (the last has
        ``finished=True``). Raises ValueError for a request that can never run."""
        import asyncio

        self.validate(prompt_ids, params, images)
        request_id = f"async-{next(self._ids)}" if request_id is None else str(request_id)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._ensure_thread()
        with self._lock:
            self._inbox.append(("add", request_id, list(prompt_ids), params, loop, queue, images))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a request from any thread (no-op if it already ended)."""
        with self._lock:
            self._inbox.append(("abort", str(request_id)))
        self._wake.set()

    def stats(self) -> dict:
        """Engine stats as of the last step (see Engine.stats)."""
        return dict(self._stats)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.llm is not None and getattr(self.llm, "_async", None) is self:
            self.llm._async = None

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="trimode-engine", daemon=True)
            self._thread.start()

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is None:
            return
        loop, queue = target
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody listens any more
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)
        if isinstance(item, Exception) or item.finished:
            self._streams.pop(request_id, None)
            if request_id in self.engine.requests and self.engine.requests[request_id].finished:
                self.engine.pop_finished(request_id)

    def _drain(self) -> None:
        with self._lock:
            items, self._inbox = list(self._inbox), deque()
        for item in items:
            if item[0] == "add":
                _, request_id, prompt_ids, params, loop, queue, images = item
                if request_id in self._streams or request_id in self.engine.requests:
                    # a duplicate id: refuse it without touching the request that owns it
                    loop.call_soon_threadsafe(queue.put_nowait, ValueError(
                        f"request_id {request_id!r} is already in use"))
                    continue
                self._streams[request_id] = (loop, queue)
                try:
                    self.engine.add_request(prompt_ids, params, request_id, images=images)
                except Exception as exc:  # noqa: BLE001 - delivered to the caller
                    self._deliver(request_id, exc if isinstance(exc, ValueError) else
                                  RuntimeError(f"{type(exc).__name__}: {exc}"))
            else:
                request_id = item[1]
                if self.engine.abort(request_id):
                    update = self.engine._update(self.engine.requests[request_id])
                    if update is not None:
                        self._deliver(request_id, update)

    def _run(self) -> None:
        while not self._stop:
            self._drain()
            if not self.engine.has_unfinished():
                self._stats = self.engine.stats()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                updates = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - never let one bad step stop serving
                log.exception("engine step failed")
                victims = list(self.engine.running) + list(self.engine.waiting)
                for seq in victims:
                    seq.finish("error", f"engine step failed: {type(exc).__name__}: {exc}")
                for seq in self.engine.waiting:
                    self.engine._finalize(seq)
                self.engine.waiting.clear()
                self.engine._release(list(self.engine.running))
                updates = [u for seq in victims if (u := self.engine._update(seq)) is not None]
            self._stats = self.engine.stats()
            for update in updates:
                self._deliver(update.request_id, update)
