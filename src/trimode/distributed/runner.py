"""Rank 0's model handle and the other ranks' loop: one packed forward, replayed everywhere.

Rank 0 owns the engine (scheduler, strategies, sampler) and sees a
:class:`TensorParallelModel`: the interface of a TriModeModel (``config``, ``new_cache``,
``__call__``, ``logits``). Each call first broadcasts the step plan (the forward's input
tensors, which rows of which cache it runs on, their lengths, and the KV-row copies the
engine made since the last call) to the other ranks, which run ``worker_loop``; then every
rank runs its shard of the same forward (``layers.py``: two all-reduces per layer) and the
logits are gathered to rank 0 alone. Decisions (commits, accept lengths, sampling) never
leave rank 0: the other ranks only ever hear token ids and lengths.
A rank that dies or a collective that times out fails the call with a RuntimeError naming
the cause; the handle is then down (``failure``) and later calls fail at once. While the
engine idles, a heartbeat on the step-plan channel keeps the other ranks' waits inside the
collective timeout and notices a lost rank before the next request does.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

import torch
import torch.distributed as dist

from ..model.kv_cache import KVCache
from ..model.paged_cache import PagedKVCache
from .layers import Shard, new_local_cache, new_local_paged_cache

log = logging.getLogger("trimode.distributed")
FORWARD_ARGS = ("n_valid", "bidirectional", "write", "adapter", "attention", "offsets", "embeds")


class ShardedKVCache(KVCache):
    """Rank 0's KV cache (its own KV heads); row copies are recorded for the other ranks."""

    owner: "TensorParallelModel"
    cache_id: int

    def copy_positions(self, src: int, dst: int, n: int) -> None:
        self.owner._pending.append(("copy", self.cache_id, src, dst, n))
        super().copy_positions(src, dst, n)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.owner._pending.append(("select", self.cache_id, rows.cpu()))
        super().select_rows(rows)


class ShardedPagedKVCache(PagedKVCache):
    """Rank 0's paged KV cache (its own KV heads); each forward sends its page table."""

    owner: "TensorParallelModel"
    cache_id: int


def _send(message, group) -> None:
    dist.broadcast_object_list([message], group=group, group_src=0)


def _receive(group):
    box = [None]
    dist.broadcast_object_list(box, group=group, group_src=0)
    return box[0]


def _cpu(value):
    """Tensors (also inside tuples, e.g. a VLM prefill's ``embeds``) moved to the host for
    pickling; other ranks move them to their own device."""
    if isinstance(value, tuple):
        return tuple(_cpu(v) for v in value)
    return value.cpu() if isinstance(value, torch.Tensor) else value


class TensorParallelModel:
    """Rank 0's shard of a model plus the broadcast of every forward to the other ranks.

    ``model``: this rank's shard (``layers.shard_model``); ``shard``: the compute group;
    ``control``: a gloo group for the step plan; ``workers``: the processes trimode spawned
    (checked before each call; empty under torchrun); ``heartbeat``: seconds of silence
    after which an idle rank 0 sends a no-op (well under the collective timeout).
    """

    def __init__(self, model, shard: Shard, control, workers=(), on_close=None,
                 heartbeat: float = 60.0):
        self.model, self.shard, self.control = model, shard, control
        self.workers = list(workers)
        self.config = model.config
        self.failure: str | None = None
        self._pending: list[tuple] = []
        self._roots: dict[int, weakref.ref] = {}
        self._ids = 0
        self._on_close = on_close
        self._lock = threading.Lock()  # one message on the channel at a time
        self._sent = time.monotonic()
        threading.Thread(target=self._beat, args=(heartbeat,), daemon=True,
                         name="trimode-tp-heartbeat").start()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tensor_parallel_size(self) -> int:
        return self.shard.world

    def new_cache(self, rows: int, capacity: int, zeroed: bool = True) -> ShardedKVCache:
        """A cache of this rank's KV heads; the other ranks allocate theirs (zeroed) with the
        next forward."""
        cache = new_local_cache(self.model, rows, capacity, zeroed, ShardedKVCache)
        return self._own(cache, ("new", rows, capacity))

    def new_paged_cache(self, pages: int, page_size: int, rows: int, max_pages: int,
                        zeroed: bool = True) -> ShardedPagedKVCache:
        """A paged cache of this rank's KV heads; the other ranks allocate theirs (zeroed)
        with the next forward, which also carries the rows' page table."""
        geometry = (pages, page_size, rows, max_pages)
        cache = new_local_paged_cache(self.model, *geometry, zeroed, ShardedPagedKVCache)
        return self._own(cache, ("new_paged", *geometry))

    def _own(self, cache, op: tuple):
        cache.owner, cache.cache_id = self, self._ids
        self._ids += 1
        self._roots[cache.cache_id] = weakref.ref(cache)
        self._pending.append((op[0], cache.cache_id, *op[1:]))
        weakref.finalize(cache, self._pending.append, ("drop", cache.cache_id))
        return cache

    def __call__(self, tokens: torch.Tensor, cache: KVCache, *args, **kwargs) -> torch.Tensor:
        """``TriModeModel.forward`` on every rank; returns hidden ``[B, T, d]`` (replicated)."""
        bound = dict(zip(FORWARD_ARGS, args), **kwargs)
        cache_id, start = self._locate(cache)
        plan = {"ops": self._take_ops(), "cache": cache_id, "start": start, "rows": cache.rows,
                "lengths": cache.lengths.cpu(), "tokens": tokens.cpu(),
                "table": cache.table.cpu() if isinstance(cache, PagedKVCache) else None,
                **{k: _cpu(v) for k, v in bound.items()}}
        return self._collective(lambda: self._forward(plan, tokens, cache, bound))

    def _forward(self, plan, tokens, cache, bound):
        self._send(("forward", plan))
        return self.model(tokens, cache, **bound)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` -> fp32 logits ``[..., vocab]`` on rank 0 (vocabulary-parallel head)."""
        hidden = hidden.contiguous()

        def run():
            self._send(("logits", {"shape": tuple(hidden.shape), "dtype": hidden.dtype}))
            dist.broadcast(hidden, group=self.shard.group, group_src=0)
            return self.model.logits(hidden)

        return self._collective(run)

    def close(self) -> None:
        """Stop the other ranks and leave the process group (idempotent)."""
        with self._lock:
            if self._on_close is None:
                return
            if self.failure is None:
                try:
                    self._send(("stop", None))
                except Exception:  # noqa: BLE001 - a dead group cannot be told to stop
                    log.warning("tensor-parallel stop message not delivered", exc_info=True)
            on_close, self._on_close = self._on_close, None
        on_close(self.failure is None)

    # ------------------------------------------------------------------ internals

    def _send(self, message) -> None:
        _send(message, self.control)
        self._sent = time.monotonic()

    def _beat(self, interval: float) -> None:
        while True:
            time.sleep(interval / 4)
            with self._lock:
                if self._on_close is None:
                    return  # closed or failed
                if time.monotonic() - self._sent < interval:
                    continue
                try:
                    self._send(("noop", None))
                except Exception as exc:  # noqa: BLE001 - reported like a failed forward
                    self._mark_failed(self._why(exc))

    def _take_ops(self) -> list[tuple]:
        ops, self._pending = self._pending, []
        return ops

    def _locate(self, cache: KVCache) -> tuple[int, int]:
        """(cache id, first row) of ``cache``: one of ours, or a row-slice view of one."""
        key = cache.keys[0]
        for cache_id, ref in self._roots.items():
            root = ref()
            if root is None:
                continue
            base = root.keys[0]
            if base.untyped_storage().data_ptr() == key.untyped_storage().data_ptr():
                start = (key.storage_offset() - base.storage_offset()) // base.stride(0)
                if key.stride() == base.stride() and 0 <= start <= root.rows - cache.rows:
                    return cache_id, start
        raise ValueError("this cache was not made by the tensor-parallel model's new_cache")

    def _collective(self, run):
        with self._lock:
            if self.failure is not None:
                raise RuntimeError(f"tensor-parallel group is down: {self.failure}")
            dead = self._dead()
            if dead:
                self._fail(dead)
            try:
                return run()
            except ValueError:
                raise  # a bad request fails identically on every rank, before any collective
            except Exception as exc:  # noqa: BLE001 - a dead peer or a timeout: the group is lost
                self._fail(self._why(exc))

    def _why(self, exc: Exception) -> str:
        cause = f"{type(exc).__name__}: {str(exc).split('. This is typically')[0]}"
        return "; ".join(filter(None, (self._dead(wait=1.0), cause)))

    def _dead(self, wait: float = 0.0) -> str:
        """Which spawned ranks have exited ('' when all live); waits up to ``wait`` s for
        a dying one to be reaped."""
        for p in self.workers:
            p.join(timeout=wait / max(len(self.workers), 1))
        return "; ".join(f"rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
                         for rank, p in enumerate(self.workers, start=1) if not p.is_alive())

    def _fail(self, why: str):
        self._mark_failed(why)
        raise RuntimeError(f"tensor-parallel group failed: {why}")

    def _mark_failed(self, why: str) -> None:
        self.failure = why
        log.error("tensor-parallel group failed (%d ranks): %s; this engine stops serving "
                  "and its requests end with an error", self.shard.world, why)
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close(False)


def worker_loop(model, shard: Shard, control) -> None:
    """Rank > 0: replay rank 0's cache operations and forwards until it says stop.

    Raises RuntimeError (from torch.distributed) when rank 0 goes away."""
    caches: dict[int, KVCache] = {}
    while True:
        kind, body = _receive(control)
        if kind == "stop":
            return
        if kind == "noop":
            continue
        if kind == "logits":
            hidden = torch.empty(body["shape"], dtype=body["dtype"], device=model.device)
            dist.broadcast(hidden, group=shard.group, group_src=0)
            model.logits(hidden)
            continue
        _apply(caches, model, body.pop("ops"))
        view = _view(caches[body.pop("cache")], body.pop("start"), body.pop("rows"),
                     body.pop("lengths"), body.pop("table"))
        tokens = body.pop("tokens").to(model.device)
        args = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                for k, v in body.items()}
        try:
            model(tokens, view, **args)
        except ValueError:
            pass  # rank 0 raised the same before any collective (bad request)


def _apply(caches: dict, model, ops: list[tuple]) -> None:
    for op, cache_id, *rest in ops:
        if op == "new":
            caches[cache_id] = new_local_cache(model, *rest)  # zeroed: no NaN garbage
        elif op == "new_paged":
            caches[cache_id] = new_local_paged_cache(model, *rest)
        elif op == "drop":
            caches.pop(cache_id, None)
        elif op == "copy":
            caches[cache_id].copy_positions(*rest)
        elif op == "select":
            caches[cache_id].select_rows(rest[0].to(model.device))


def _view(root: KVCache, start: int, rows: int, lengths: torch.Tensor,
          table: torch.Tensor | None = None) -> KVCache:
    if table is not None:  # paged: rank 0's page table for these rows
        view = root.view(0, 0)
        view.table = table.to(root.lengths.device)
        view.lengths = lengths.to(root.lengths.device)
        return view
    view = KVCache.__new__(KVCache)
    view.keys = [k[start: start + rows] for k in root.keys]
    view.values = [v[start: start + rows] for v in root.values]
    view.lengths = lengths.to(root.lengths.device)
    view.capacity = root.capacity
    return view
