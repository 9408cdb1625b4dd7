"""Replicas on Ray Serve: the OpenAI server of ``trimode serve``, one engine per replica.

Each replica builds exactly what ``trimode serve`` builds (LLM, AsyncEngine, the FastAPI app
of ``server/app.py``; optionally tensor parallel inside the replica) and Ray Serve puts the
app behind its HTTP proxy: requests go to the replica with the shortest queue (Ray Serve's
power-of-two-choices router), server-sent-event streams pass through as they are, replicas
land on every node of the cluster that has room, and a replica that dies or fails its health
check (a tensor-parallel group that is down) is replaced while the others keep serving.

Two ways in:

- ``trimode serve --ray --replicas 2 [serve flags]`` (a local Ray, or ``--ray-address``);
- ``serve run trimode.entrypoints.ray:build replicas=2 model=/path max-batch-size=8`` or a
  Serve config file naming ``trimode.entrypoints.ray:build`` with those ``args``
  (keys are ``trimode serve`` flags without the dashes; see README "Scaling out");
  ``trimode.entrypoints.ray:app`` is the embedded model with defaults.

Needs ``pip install 'trimode[ray]'``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - depends on the optional extra
    raise ImportError("Ray Serve is not installed: pip install 'trimode[ray]' "
                      "(ray[serve])") from exc

log = logging.getLogger("trimode.ray")


@serve.deployment(name="trimode", health_check_period_s=5, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=5)
@serve.ingress()
class TrimodeServer:
    """One replica: one engine and the OpenAI app over it."""

    def __init__(self, args: argparse.Namespace):
        from .server.cli import build_server

        logging.basicConfig(level=args.log_level.upper())
        self.llm, self.engine, self._app = build_server(args)
        log.info("replica ready (pid %d, tensor_parallel_size %d)", os.getpid(),
                 self.llm.tensor_parallel_size)

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self) -> None:
        """Raises when this replica's tensor-parallel group is down: Ray replaces it."""
        failure = getattr(self.llm.model, "failure", None)
        if failure:
            raise RuntimeError(f"tensor-parallel group is down: {failure}")

    def pid(self) -> int:
        """This replica's process id (tests and operators kill or inspect replicas)."""
        return os.getpid()

    def __del__(self):
        engine, llm = getattr(self, "engine", None), getattr(self, "llm", None)
        if engine is not None:
            engine.shutdown()
        if llm is not None:
            llm.close()


def application(args: argparse.Namespace):
    """The Serve application for checked ``trimode serve`` args (``--replicas`` of them)."""
    cuda = args.device == "cuda" or (args.device is None and _cuda())
    tp = args.tensor_parallel_size
    resources = {"num_gpus": tp} if cuda else {"num_cpus": tp}
    return TrimodeServer.options(
        num_replicas=args.replicas, ray_actor_options=resources,
        max_ongoing_requests=max(2 * args.max_batch_size, 8)).bind(args)


def build(options: dict):
    """Application builder for ``serve run trimode.entrypoints.ray:build key=value ...``:
    keys are ``trimode serve`` flags without the dashes (``replicas=2``, ``model=PATH``)."""
    from .server.cli import check_flags, serve_args

    args = serve_args(options)
    check_flags(args)
    return application(args)


def run(args: argparse.Namespace) -> int:
    """``trimode serve --ray``: start (or join) Ray, deploy, serve until interrupted.
    Raises UsageError for bad flags."""
    import ray

    from .server.cli import check_flags

    check_flags(args)

    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address, include_dashboard=False, log_to_driver=True,
             logging_level=args.log_level.upper())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application(args), name="trimode", route_prefix="/")
        log.warning("trimode on Ray Serve: %d replica(s) at http://%s:%d (Ctrl-C stops)",
                    args.replicas, args.host, args.port)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 130
    finally:
        serve.shutdown()
        ray.shutdown()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


app = build({})  # `serve run trimode.entrypoints.ray:app`: the embedded model, defaults
