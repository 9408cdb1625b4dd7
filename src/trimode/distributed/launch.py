"""Starting a tensor-parallel group: checks, process spawning, rendezvous, sharding.

Three ways to run N ranks, all on torch.distributed (NCCL on CUDA, gloo on CPU):

- one machine: the process that builds the ``LLM`` is rank 0 and spawns ranks 1 .. N-1
  with ``torch.multiprocessing`` (spawn start method);
- several machines (``Launch(nnodes, node_rank, master_addr, master_port)``, the ``torchrun``
  flags): every node runs the same command; node k spawns its N/nnodes local ranks, its own
  process being local rank 0; only global rank 0 serves, the others run ``worker_loop``;
- under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` set): nothing is spawned.

Every rank loads the full checkpoint (and draft adapter), keeps its shard and frees the rest.
A process that is not global rank 0 never returns from ``start``: it serves rank 0's
forwards and exits when rank 0 closes the group. Timeout of each collective in a forward:
``TRIMODE_TP_TIMEOUT_S`` (default 300 s); start-up may take 10 minutes.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .layers import Shard, check_divisible, shard_model
from .runner import TensorParallelModel, worker_loop

log = logging.getLogger("trimode.distributed")
START = timedelta(minutes=10)  # rendezvous and loading


@dataclass(frozen=True)
class Launch:
    """Where the ranks run: ``nnodes`` machines, this one ``node_rank``; rank 0's machine
    at ``master_addr:master_port`` (None on one machine: loopback and a free port)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.nnodes, bool) or not isinstance(self.nnodes, int) or self.nnodes < 1:
            raise ValueError(f"nnodes must be an integer >= 1; got {self.nnodes!r}")
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, {self.nnodes - 1}]; got {self.node_rank!r}")
        if self.nnodes > 1 and (self.master_addr is None or self.master_port is None):
            raise ValueError("master_addr and master_port are needed when nnodes > 1")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"master_port must be in [1, 65535]; got {self.master_port!r}")


@dataclass(frozen=True)
class ModelSpec:
    """What every rank loads: checkpoint path, dtype name, device kind, adapter path."""

    model: str
    dtype: str | None
    device: str
    draft_adapter: str | None


def timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get("TRIMODE_TP_TIMEOUT_S", "300")))


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def check_devices(size: int, device: str, launch: Launch) -> int:
    """Ranks per machine; raises ValueError when this machine has fewer devices."""
    if size % launch.nnodes:
        raise ValueError(f"tensor_parallel_size {size} must be a multiple of nnodes {launch.nnodes}")
    local = size // launch.nnodes
    if torch.device(device).type == "cuda":
        base = torch.device(device).index or 0
        have = torch.cuda.device_count() - base
        if local > have:
            raise ValueError(f"tensor_parallel_size {size} needs {local} CUDA devices on this "
                             f"machine from cuda:{base}; {max(have, 0)} visible")
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if local > cores:
            raise ValueError(f"tensor_parallel_size {size} needs {local} CPU cores on this "
                             f"machine (one per rank); {cores} available")
    return local


def start(model, spec: ModelSpec, size: int, launch: Launch | None = None) -> TensorParallelModel:
    """Shard the loaded ``model`` (rank 0's full copy, adapter attached) over ``size`` ranks.

    Returns rank 0's TensorParallelModel. Raises ValueError for a geometry or device count
    that does not fit, RuntimeError when a rank fails to start (its error included).
    """
    launch = launch or Launch()
    check_divisible(model.config, size)
    torchrun = under_torchrun()
    if torchrun and int(os.environ["WORLD_SIZE"]) != size:
        raise ValueError(f"tensor_parallel_size {size} must equal torchrun's WORLD_SIZE "
                         f"{os.environ['WORLD_SIZE']}")
    local = int(os.environ["LOCAL_WORLD_SIZE"]) if torchrun else check_devices(size, spec.device, launch)
    rank = int(os.environ["RANK"]) if torchrun else launch.node_rank * local
    addr = launch.master_addr or "127.0.0.1"
    port = launch.master_port or _free_port()
    method = "env://" if torchrun else f"tcp://{addr}:{port}"
    workers = [] if torchrun else _spawn(spec, size, local, rank, method)
    try:
        shard, control = _join(method, rank, size, spec.device, local)
        model = _shard_on_device(model, shard, spec, rank % local if not torchrun else
                                 int(os.environ["LOCAL_RANK"]))
        _handshake(None)
    except BaseException:
        for p in workers:
            p.terminate()
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if rank != 0:  # a node > 0 under the torchrun-style flags, or torchrun's other ranks
        _serve_and_exit(model, shard, control, workers)
    return TensorParallelModel(model, shard, control, workers, lambda ok: _close(workers, ok),
                               heartbeat=min(60.0, timeout().total_seconds() / 3))


def _spawn(spec: ModelSpec, size: int, local: int, first: int, method: str) -> list:
    ctx = torch.multiprocessing.get_context("spawn")
    procs = []
    for offset in range(1, local):
        p = ctx.Process(target=run_worker, args=(spec, size, local, first + offset, method, offset),
                        name=f"trimode-tp-rank{first + offset}", daemon=True)
        p.start()
        procs.append(p)
    return procs


def _join(method: str, rank: int, size: int, device: str, local: int) -> Shard:
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device((torch.device(device).index or 0) + rank % local)
    else:  # share the cores: one rank per core slice
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores // local))
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already initialised in this "
                           "process; close the other tensor-parallel LLM first (LLM.close())")
    backend = "nccl" if cuda else "gloo"
    # the rendezvous waits for ranks still importing torch; collectives get timeout()
    dist.init_process_group(backend, init_method=method, rank=rank, world_size=size,
                            timeout=max(START, timeout()))
    compute = dist.new_group(backend=backend, timeout=timeout())
    control = dist.new_group(backend="gloo", timeout=timeout())
    return Shard(rank, size, compute), control


def rank_device(spec: ModelSpec, local_rank: int) -> torch.device:
    """This rank's device: GPU ``index + local_rank`` on CUDA, the CPU otherwise."""
    device = torch.device(spec.device)
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + local_rank)
    return device


def _shard_on_device(model, shard: Shard, spec: ModelSpec, local_rank: int):
    """Shard the host-memory model first, then move only this rank's shard to its device, so
    a model larger than one GPU fits N GPUs."""
    model = shard_model(model, shard)
    device = rank_device(spec, local_rank)
    return model if model.device == device else model.to(device)


def _handshake(error: str | None) -> None:
    """Every rank says whether it loaded; raises RuntimeError with the first failure."""
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, error)  # the default group: start-up's long timeout
    failed = [f"rank {r}: {e}" for r, e in enumerate(states) if e]
    if failed:
        raise RuntimeError("tensor-parallel start failed: " + "; ".join(failed))


def run_worker(spec: ModelSpec, size: int, local: int, rank: int, method: str,
               local_rank: int) -> None:
    """Entry of a spawned rank: load, shard, replay rank 0's forwards, exit."""
    logging.basicConfig(level=logging.INFO, format=f"trimode rank {rank}: %(message)s")
    shard, control = _join(method, rank, size, spec.device, local)
    try:
        model = _shard_on_device(load_spec(spec), shard, spec, local_rank)
        error = None
    except Exception as exc:  # noqa: BLE001 - reported to rank 0 by the handshake
        model, error = None, f"{type(exc).__name__}: {exc}"
    _handshake(error)
    _serve_and_exit(model, shard, control, [])


def load_spec(spec: ModelSpec):
    """Load the full model (and adapter) in host memory, as rank 0 did; sharding and the move
    to this rank's device follow (``_shard_on_device``)."""
    from ..checkpoint.adapter import load_draft_adapter
    from ..checkpoint.loader import load_model

    dtype = getattr(torch, spec.dtype) if spec.dtype else None
    model, _ = load_model(spec.model, dtype=dtype, device="cpu")
    if spec.draft_adapter:
        load_draft_adapter(model, spec.draft_adapter)
    return model


def _serve_and_exit(model, shard: Shard, control, workers: list) -> None:
    code = 0
    try:
        worker_loop(model, shard, control)
    except Exception as exc:  # noqa: BLE001 - rank 0 is gone: say so and leave
        log.error("rank %d: lost rank 0 (%s: %s); exiting", shard.rank, type(exc).__name__, exc)
        code = 1
    _close(workers, code == 0)
    sys.exit(code)


def _close(workers: list, clean: bool) -> None:
    for p in workers:  # processes this rank spawned: stopped cleanly, or killed (hung ones too)
        p.join(timeout=10 if clean else 0)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group may not tear down cleanly
            log.warning("process group teardown failed", exc_info=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
