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

The scheduler (``scheduler.py``) decides *who* runs and how many query tokens each may use
(admission against rows, the token budget and the KV reservation); strategies decide *what*
the tokens are and what to select from their logits; the model runner (``model_runner.py``)
builds the tensors, runs the forward (a captured CUDA graph where one fits) and selects every
row's tokens on the device in one batch, so a step copies only token ids and a few integers
per row to the host. KV memory is a :class:`~trimode.engine.kv_pool.KVPool` of fixed-size
pages: a request holds the pages its tokens use, gets more before each step, and returns them
on finish, cancellation or error; when the pool runs out mid-decode the newest request is
preempted and later recomputes its KV (``scheduler.py``). Full pages of committed KV stay in
a prefix cache after their request ends (``prefix.py``): a later request with the same
leading text reads them instead of prefilling it.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace
from typing import Callable

import torch

from ..decoding.registry import STRATEGIES, scratch_slots
from ..decoding.sequence import Sequence, Step
from ..decoding.thinking import Thinking, ThinkTags
from ..multimodal.requests import attach_features, check_images, prefill_step
from ..defaults import AUTO, CONTEXT_CAP
from ..params import ParamError, SamplingParams
from . import model_runner
from .config import EngineConfig
from .kv_pool import KVPool, kv_bytes_per_token
from .model_runner import DecodingModel
from .prefix import PrefixCache
from .request import RequestUpdate
from .scheduler import Scheduler
from .auto import AdaptivePolicy
from .controller import Controller
from .step_stats import RunningAcceptance, StepRecord

log = logging.getLogger("trimode.engine")


class Engine:
    """Continuous-batching decoder over one model (not thread-safe; see AsyncEngine).

    ``model``: anything that follows :class:`~trimode.engine.model_runner.DecodingModel`
    (a TriModeModel; the tests' stubs). The checkpoint's ``eos_token_ids`` end every request.
    Raises ValueError for a config the pool cannot hold.
    """

    def __init__(self, model: DecodingModel, config: EngineConfig | None = None):
        self.model = model
        self.config = config or EngineConfig()
        limit = model.config.max_position_embeddings
        self.max_model_len = min(self.config.max_model_len or CONTEXT_CAP, limit)
        rows, size = self.config.max_num_seqs, self.config.page_size
        per_token = kv_bytes_per_token(model)
        self.row_capacity = self.max_model_len + self.config.scratch_tokens
        row_pages = -(-self.row_capacity // size)
        pages = rows * row_pages + 1  # + the null page
        if self.config.kv_cache_memory is not None:
            pages = self.config.kv_cache_memory // (per_token * size)
            if pages < 2:
                raise ValueError(f"kv_cache_memory {self.config.kv_cache_memory} bytes holds "
                                 f"{pages} pages of page_size {size} ({per_token * size} bytes "
                                 f"each); at least 2 are needed (one is the null page)")
        self.pool = KVPool(model.new_paged_cache(pages, size, rows, row_pages, zeroed=False))
        self.prefix = PrefixCache(self.pool, self.config.min_shared_prefix)
        self.scheduler = Scheduler(self.config, self.pool, self.prefix)
        self.kv_bytes = pages * size * per_token
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.steps = 0
        self.forwards = 0
        self.recomputed_tokens = 0  # KV positions preempted requests computed again
        self.denoise_adapter = False  # the draft adapter also denoises (LLM sets it)
        self.think_tags: ThinkTags | None = None  # ids of <think> / </think> (LLM sets them)
        # benchmarks only (never set by LLM, the CLI or the server): verification accepts
        # exactly this many drafts, so random-weight runs see a realistic acceptance
        self.forced_acceptance: int | None = None
        self.graphs = None  # captured decode forwards (CUDA only; EngineConfig.cuda_graphs)
        adaptive = isinstance(self.config.auto, AdaptivePolicy)
        self.controller = Controller(self.config.auto) if adaptive else None
        self.step_observers: list[Callable[[StepRecord], None]] = []  # called after each step
        self.acceptance = RunningAcceptance()  # engine-wide, per mode
        self.last_step: StepRecord | None = None
        if self.config.cuda_graphs and torch.device(model.device).type == "cuda":
            from .cuda_graphs import GraphRunner

            self.graphs = GraphRunner(model)

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

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
        """Queue a pre-built Sequence (``engine.decode.decode``); checks it fits the pool."""
        if seq.params.mode == AUTO:
            raise ValueError(f"add_sequence needs a resolved mode, not {AUTO!r}")
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
        if params.max_thinking_tokens is not None and self.think_tags is None:
            raise ParamError("max_thinking_tokens needs a tokenizer that spells <think> and "
                             "</think> (this checkpoint's does not)", "max_thinking_tokens")
        if params.mode == AUTO and self.controller is not None:
            self._check_fits(prompt_ids, replace(params, mode="ar"))
            return  # options that do not fit are left out (auto_options)
        modes = self.config.auto.candidates if params.mode == AUTO else (params.mode,)
        for mode in modes:
            self._check_fits(prompt_ids, replace(params, mode=mode))

    def auto_options(self, prompt_ids: list[int], params: SamplingParams) -> list[tuple[str, int]]:
        """The (mode, block_length) pairs an adaptive auto request may run: the policy's,
        less those whose params or sizes this engine refuses (ar always fits: validate)."""
        options = []
        for mode, block in self.controller.policy.configs(params.block_length):
            try:
                resolved = replace(params, mode=mode, block_length=block if mode != "ar"
                                   else params.block_length)
                self._check_fits(prompt_ids, resolved, block)
            except ValueError:
                continue
            options.append((mode, block))
        return options or [("ar", params.block_length or self.model.config.block_size)]

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

    def fail_all(self, message: str) -> list[RequestUpdate]:
        """End every waiting and running request with ``error`` (``message``), free their
        rows and return their last updates (what a failed step leaves behind)."""
        victims = list(self.running) + list(self.waiting)
        for seq in victims:
            seq.finish("error", message)
        for seq in self.waiting:
            self._finalize(seq)
        self.waiting.clear()
        self._release(list(self.running))
        return [u for seq in victims if (u := self.take_update(seq)) is not None]

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        """Queue and pool use: running, waiting; kv_rows_used/total (page-table rows),
        kv_tokens_used (committed positions of live rows)/total (the pool's positions);
        kv_pages_total/used/cached (used: some running request reads it; cached: kept for
        the prefix cache, evictable); kv_page_evictions, preemptions, recomputed_tokens;
        prefix_cache_queries/hits (prompt tokens of new requests / of those read from
        cached pages) and prefix_cache_hit_rate."""
        a, p = self.pool.allocator, self.prefix
        return {"running": len(self.running), "waiting": len(self.waiting),
                "kv_rows_used": self.pool.live, "kv_rows_total": self.pool.rows,
                "kv_tokens_used": self.pool.used_positions(),
                "kv_tokens_total": a.usable * self.pool.page_size,
                "kv_page_size": self.pool.page_size, "kv_pages_total": a.usable,
                "kv_pages_used": a.used(), "kv_pages_cached": a.cached(),
                "kv_page_evictions": a.evictions, "preemptions": self.scheduler.preemptions,
                "recomputed_tokens": self.recomputed_tokens,
                "prefix_cache_queries": p.queried, "prefix_cache_hits": p.hits,
                "prefix_cache_hit_rate": p.hit_rate()}

    @property
    def shared_prefix_tokens(self) -> int:
        """Prompt tokens read from the prefix cache instead of prefilled."""
        return self.prefix.hits

    def output(self, request_id: str) -> Sequence:
        return self.requests[request_id]

    def pop_finished(self, request_id: str) -> Sequence:
        """Forget a finished request (its id may then be reused)."""
        seq = self.requests[request_id]
        if not seq.finished:
            raise ValueError(f"request {request_id!r} is not finished")
        return self.requests.pop(request_id)

    def take_update(self, seq: Sequence) -> RequestUpdate | None:
        """What ``seq`` committed since the last update (None if nothing and not finished)."""
        new = seq.generated[seq.emitted:]
        if not new and not seq.finished:
            return None
        lps = None if seq.logprobs is None else seq.logprobs[seq.emitted:]
        seq.emitted = len(seq.generated)
        return RequestUpdate(seq.request_id, list(new), lps, list(seq.generated), seq.finished,
                             seq.finish_reason, seq.mode_ran, seq.metrics, seq.error)

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestUpdate]:
        """Admit what fits, prefill it, run one decode forward; return the updates of every
        request that committed tokens or ended in this step."""
        began = time.perf_counter()
        record = StepRecord()
        touched: dict[str, Sequence] = {}
        preempted = self.scheduler.reserve()
        admitted = [] if preempted else self.scheduler.admit(self._resolve)
        for s in admitted:
            self.requests[s.request_id] = s  # an auto request is now its resolved Sequence
        resumed = [s for s in admitted if s.resume]  # first in the queue: the first rows
        fresh = admitted[len(resumed):]
        if resumed:
            self._recompute(resumed)
        if fresh:
            steps = [prefill_step(s, self.pool.length(s.row), self.model) for s in fresh]
            record.rows, record.query_tokens = len(steps), sum(len(s.tokens) for s in steps)
            self._run(steps, fresh, fresh[0].row, prefill=True)
            touched.update((s.request_id, s) for s in fresh)
        decoding = [s for s in self.running if not s.finished and s not in admitted]
        if decoding:
            if self.controller is not None:  # auto rows between cycles may switch mode
                self.controller.plan(decoding)
                record.switches = self.controller.switches
                self.scheduler.reserve()  # a new mode may write more scratch: its pages
                decoding = [s for s in decoding if s.row >= 0]  # minus those preempted
        if decoding:
            # rows of decoding requests are 0 .. k-1 only if no admitted row sits in between;
            # admitted rows are the last ones, so the decode forward covers rows 0 .. k-1.
            steps = [s.strategy.next_step(s) for s in decoding]
            record.rows += len(steps)
            record.query_tokens += sum(len(s.tokens) for s in steps)
            self._run(steps, decoding, 0, prefill=False)
            self._observe(decoding, record)
            touched.update((s.request_id, s) for s in decoding)
        self.steps += 1
        record.duration_s = time.perf_counter() - began
        self.last_step = record
        for observer in self.step_observers:
            observer(record)
        return [u for s in touched.values() if (u := self.take_update(s)) is not None]

    def _observe(self, seqs: list[Sequence], record: StepRecord) -> None:
        """Count this decode step's verifies (step record, running acceptance, controller)."""
        for s in seqs:
            if s.last_verify is not None:
                record.add_verify(*s.last_verify)
                self.acceptance.add(*s.last_verify)
        if self.controller is not None:
            self.controller.observe(seqs)
        for s in seqs:
            s.last_verify = None

    def _resolve(self, seq: Sequence, mode: str) -> Sequence:
        """An auto request as the Sequence of ``mode`` (same id, seed and arrival); under
        the adaptive policy it starts in ar and the controller takes it from there."""
        if self.controller is None:
            return self._sequence(seq.prompt_ids, replace(seq.params, mode=mode), seq)
        resolved = self._sequence(seq.prompt_ids, replace(seq.params, mode="ar"), seq)
        self.controller.attach(resolved, self.auto_options(seq.prompt_ids, seq.params),
                               seq.params)
        return resolved

    def _recompute(self, seqs: list[Sequence]) -> None:
        """Write the KV of preempted requests again: one causal prefill of their text from
        their cached prefix up to where their cache stood. Their strategies resume as if
        nothing happened: the cache is what it was, up to fp32 summation order."""
        start = seqs[0].row
        steps = [prefill_step(s, self.pool.length(s.row), self.model, stop=s.resume) for s in seqs]
        self.recomputed_tokens += sum(len(st.tokens) for st in steps)
        for s in seqs:
            s.resume = 0
        view = self.pool.view(start, start + len(seqs))
        try:
            model_runner.fill(self.model, view, steps)
        except Exception as exc:  # a failed forward ends its requests, never the engine
            self._forward_failed(seqs, exc, "recompute forward failed")
            return
        self.pool.sync(view, start)
        self.forwards += 1
        for s in seqs:
            self.prefix.register(s)

    def _forward_failed(self, seqs: list[Sequence], exc: Exception, what: str) -> None:
        """End the requests of a forward that raised, return their pages; the engine goes on."""
        log.exception(what)
        for s in seqs:
            s.finish("error", f"forward failed: {type(exc).__name__}: {exc}")
        self._release(seqs)

    def _run(self, steps: list[Step], seqs: list[Sequence], start: int, prefill: bool) -> None:
        view = self.pool.view(start, start + len(seqs))
        assert [s.row for s in seqs] == list(range(start, start + len(seqs)))
        for s, step in zip(seqs, steps):  # the scheduler reserved the pages of every write
            if self.pool.length(s.row) + len(step.tokens) > len(self.pool.row_pages[s.row]) * \
                    self.pool.page_size:
                raise RuntimeError(f"internal error: request {s.request_id} has no KV page "
                                   f"for its {step.kind} step")
        try:
            needs = [s.need_next(len(step.tokens) - 1) if prefill else s.strategy.need(s, step)
                     for s, step in zip(seqs, steps)]
            results = model_runner.forward_select(self.model, view, steps, needs,
                                                  None if prefill else self.graphs)
        except Exception as exc:  # a failed forward ends its requests, never the engine
            self._forward_failed(seqs, exc, "forward failed")
            return
        self.pool.sync(view, start)
        self.forwards += 1
        for seq, result in zip(seqs, results):
            seq.metrics.nfe += 1
            if result.bad:
                seq.finish("error", "the model produced NaN or +inf logits")
                continue
            try:
                if prefill:
                    seq.strategy = STRATEGIES[seq.params.mode]()
                    seq.strategy.begin(seq, result)
                else:
                    seq.strategy.apply(seq, result)
            except Exception as exc:
                log.exception("request %s failed", seq.request_id)
                seq.finish("error", f"{type(exc).__name__}: {exc}")
            if seq.on_step:
                seq.on_step(seq)
        if any(s.rollback for s in seqs):
            view.crop_host([n - s.rollback for n, s in zip(view.host_lengths(), seqs)])
            self.pool.sync(view, start)
            for s in seqs:
                s.rollback = 0
        for s in seqs:
            if s.finish_reason != "error":
                self.prefix.register(s)
        self._release([s for s in seqs if s.finished])

    def _release(self, done: list[Sequence]) -> None:
        """Free the rows of finished requests, keeping live rows contiguous."""
        for seq in self.scheduler.release(done):
            self._finalize(seq)

    def _finalize(self, seq: Sequence) -> None:
        seq.metrics.latency_s = time.perf_counter() - seq.arrival
        if seq.verifies:
            seq.metrics.acceptance_length = (seq.metrics.generated_tokens - 1) / seq.verifies

    # ------------------------------------------------------------------ requests -> sequences

    def _check_fits(self, prompt_ids: list[int], params: SamplingParams,
                    block: int | None = None) -> None:
        mc = self.model.config
        strategy = STRATEGIES[params.mode]
        if strategy.needs_mask and mc.mask_token_id is None:
            raise ParamError(f"mode {params.mode!r} needs a mask_token_id in the checkpoint "
                             "config", "mode")
        block = block or params.block_length or mc.block_size
        generated = strategy.generated_positions(block, params.max_tokens)
        rounding = " after block rounding" if generated != params.max_tokens else ""
        limit = mc.max_position_embeddings
        total = len(prompt_ids) + generated
        # the field to change: max_tokens, unless the prompt alone leaves no room
        field = "prompt" if len(prompt_ids) >= min(self.max_model_len, limit) else "max_tokens"
        if field == "max_tokens" and rounding:  # only the block rounding does not fit
            field = "block_length" if len(prompt_ids) + params.max_tokens <= self.max_model_len \
                else field
        # the tighter limit is the one named (max_model_len <= the checkpoint's limit)
        if total > self.max_model_len and self.max_model_len < limit:
            raise ParamError(f"prompt ({len(prompt_ids)} tokens) + generation ({generated} positions"
                             f"{rounding}) = {total} exceeds max_model_len {self.max_model_len}",
                             field)
        if total > limit:
            raise ParamError(f"prompt ({len(prompt_ids)} tokens) + generation ({generated} positions"
                             f"{rounding}) = {total} exceeds the context limit {limit}", field)
        scratch = scratch_slots(params.mode, block, params.max_tokens, params.draft_segments)
        if scratch > self.config.scratch_tokens:
            raise ParamError(f"{params.mode} with block_length {block} needs {scratch} scratch "
                             f"positions per forward; the engine reserves scratch_tokens "
                             f"{self.config.scratch_tokens} (use a smaller "
                             f"{strategy.shrink_hint})", "block_length")
        pages = self.pool.pages_for(total + scratch)
        if pages > self.pool.allocator.usable:
            raise ParamError(f"prompt ({len(prompt_ids)} tokens) + generation ({generated} "
                             f"positions) + scratch ({scratch}) needs {pages} KV pages of "
                             f"page_size {self.pool.page_size}; kv_cache_memory holds "
                             f"{self.pool.allocator.usable}", field)
        if len(prompt_ids) > self.config.max_num_batched_tokens:
            raise ParamError(f"prompt ({len(prompt_ids)} tokens) exceeds max_num_batched_tokens "
                             f"{self.config.max_num_batched_tokens}", "prompt")

    def _sequence(self, prompt_ids: list[int], params: SamplingParams,
                  like: Sequence | None = None) -> Sequence:
        mc = self.model.config
        block = params.block_length or mc.block_size
        stop = set(mc.eos_token_ids) | set(params.stop_token_ids)
        seq = Sequence(prompt_ids, params, stop, mc.mask_token_id, block, self.denoise_adapter)
        seq.forced_acceptance = self.forced_acceptance
        if params.max_thinking_tokens is not None:
            seq.thinking = Thinking(self.think_tags, params.max_thinking_tokens, prompt_ids)
        if like is not None:  # auto resolved at admission: keep identity, seed and arrival
            seq.request_id, seq.arrival, seq.on_step = like.request_id, like.arrival, like.on_step
            seq.seed = like.seed
            seq.images, seq.image_features = like.images, like.image_features
            seq.image_pad_id, seq.share_keys = like.image_pad_id, like.share_keys
        return seq
