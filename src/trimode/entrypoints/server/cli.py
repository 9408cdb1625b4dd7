"""``trimode serve``: its flags, and the start-up (load the model, start the engine, run
uvicorn). Imports nothing from the server's dependencies until the command runs, so the
other subcommands work without them. Bad flags fail before the model loads, in one line.
"""

from __future__ import annotations

import argparse

from ..cli.common import add_model_args, threshold_arg
from ...defaults import CONTEXT_CAP, MAX_TOKENS, MODES, PAGE_SIZE, PARALLEL_MODES, THRESHOLD

FLAGS = ("mode", "max_tokens", "temperature", "top_k", "top_p", "block_length", "threshold",
         "max_thinking_tokens")


def add_serve_parser(sub) -> None:
    """The ``serve`` subparser (--threshold parsed as the CLI does)."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server",
                       description="Serve the model over HTTP: /v1/completions, "
                       "/v1/chat/completions, /v1/models, /health, /metrics, and a playground "
                       "page at / (--no-ui: off). Requests choose "
                       "mode, block_length, threshold and top_k in the body (extra_body in "
                       "OpenAI clients); these flags set the defaults for fields they omit.")
    m = p.add_argument_group("model")
    add_model_args(m, "checkpoint directory, .gguf file or cached hub id (default: the "
                   "embedded SmolLM2-135M-Instruct)",
                   "PEFT LoRA directory for draft passes (and diffusion denoising when the "
                   "adapter is marked for it); default: the shipped adapter for the embedded model")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    s.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send (default: the checkpoint's directory name)")
    s.add_argument("--max-batch-size", type=int, default=16, metavar="N",
                   help="requests decoded together, integer >= 1 (default: 16)")
    s.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="context limit in tokens, prompt + generation (default: the "
                   f"checkpoint's max_position_embeddings, capped at {CONTEXT_CAP})")
    s.add_argument("--kv-cache-memory", type=int, default=None, metavar="BYTES",
                   help="bytes for the KV pages (default: room for --max-batch-size requests "
                   "of --max-model-len, touched only as used)")
    s.add_argument("--page-size", type=int, default=None, metavar="N",
                   help=f"positions per KV page, integer >= 1 (default: {PAGE_SIZE})")
    s.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not keep committed KV pages for later requests with the same "
                   "leading text (default: kept until evicted)")
    s.add_argument("--auto-parallel-mode", choices=PARALLEL_MODES,
                   default=None, help="mode 'auto' uses this parallel mode at low load "
                   "(default: the model's measured policy, see README 'mode auto')")
    s.add_argument("--auto-max-parallel-batch", type=int, default=None, metavar="N",
                   help="mode 'auto' uses the parallel mode while running + queued requests "
                   "<= N, ar beyond; 0: always ar")
    s.add_argument("--auto-crossover", default=None, metavar="PATH",
                   help="mode 'auto' picks once, at admission, by the crossover.json written "
                   "by `trimode bench`")
    s.add_argument("--auto-cost", default=None, metavar="PATH",
                   help="mode 'auto' (the per-step controller, the default) plans with this "
                   "forward-cost curve: the forward_cost.json `trimode bench --out DIR` writes, "
                   "or DIR (default: the model's shipped curve, else a built-in one)")
    s.add_argument("--reasoning-parser", choices=["think"], default=None,
                   help="think: chat replies carry the <think> ... </think> part as "
                   "reasoning_content (message and stream deltas), the rest as content")
    s.add_argument("--no-ui", dest="ui", action="store_false",
                   help="do not serve the playground page at / (default: served)")
    s.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    x = p.add_argument_group("scaling out (README 'Scaling out')")
    x.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N",
                   help="shard the model over N ranks (one GPU each on cuda, gloo on cpu); "
                   "N must divide the attention heads (default: 1)")
    x.add_argument("--nnodes", type=int, default=1, metavar="N",
                   help="machines the tensor-parallel ranks span; run the same command on "
                   "each with its --node-rank (default: 1)")
    x.add_argument("--node-rank", type=int, default=0, metavar="K",
                   help="this machine's index in [0, nnodes); only node 0 serves HTTP")
    x.add_argument("--master-addr", default=None, metavar="HOST",
                   help="node 0's address, reachable from every node (needed with --nnodes > 1)")
    x.add_argument("--master-port", type=int, default=None, metavar="PORT",
                   help="a free TCP port on node 0 for the rendezvous")
    x.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve: --replicas engines behind one endpoint "
                   "(needs pip install 'trimode[ray]')")
    x.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="with --ray: engine replicas, each holding the whole model (default: 1)")
    x.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --ray: an existing Ray cluster (default: RAY_ADDRESS, else a "
                   "local one)")
    d = p.add_argument_group("request defaults (used when a request omits the field)")
    d.add_argument("--mode", choices=MODES, default="auto",
                   help="auto switches each request among the exact modes every step, for "
                   "the best expected tokens/s (default: auto)")
    d.add_argument("--max-tokens", type=int, default=MAX_TOKENS, metavar="N",
                   help=f"generated-token limit, integer >= 1 (default: {MAX_TOKENS})")
    d.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help=">= 0; 0 is greedy (default: 1, as OpenAI)")
    d.add_argument("--top-p", type=float, default=1.0, metavar="P", help="in (0, 1] (default: 1)")
    d.add_argument("--top-k", type=int, default=0, metavar="K", help=">= 0; 0 is off (default: 0)")
    d.add_argument("--block-length", type=int, default=None, metavar="N",
                   help="diffusion block / draft window, integer >= 1 (default: the "
                   "checkpoint's block_size)")
    d.add_argument("--threshold", type=threshold_arg, default=None, metavar="X",
                   help=f"in [0, 1] (default: {THRESHOLD['diffusion']} for diffusion, "
                   f"{THRESHOLD['linear_spec']:g} for the speculative modes)")
    d.add_argument("--max-thinking-tokens", type=int, default=None, metavar="N",
                   help="at most N tokens inside <think>, then </think> is forced, in every "
                   "mode (default: no budget)")


def serve(args: argparse.Namespace) -> int:
    """Load, start the engine, serve until interrupted. Raises UsageError for bad flags.
    (``--ray`` goes to ``entrypoints/ray.py`` instead.)"""
    check_flags(args)
    import uvicorn

    llm, engine, app = build_server(args)
    try:
        # Open streams are cancelled (and their engine requests aborted) after 5 s of a
        # graceful shutdown instead of keeping the process alive until they finish.
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        engine.shutdown()
        llm.close()
    return 0


def serve_args(options: dict) -> argparse.Namespace:
    """``trimode serve`` args from ``{flag without dashes: value}`` (a Ray Serve config's
    ``args``); raises UsageError for an unknown flag or a bad value."""
    from ..cli.common import Parser

    parser = Parser(prog="trimode")
    sub = parser.add_subparsers(dest="command")
    add_serve_parser(sub)
    switches = {o for a in sub.choices["serve"]._actions if isinstance(a, argparse._StoreTrueAction)
                for o in a.option_strings}
    argv = ["serve"]
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if flag in switches:
            argv += [flag] if str(value).lower() in ("1", "true", "yes") else []
        else:
            argv += [flag, str(value)]
    return parser.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Raise UsageError naming the flag for a bad value, before anything loads."""
    from ..cli.common import UsageError

    server_config(args, None)  # bad defaults fail before the model loads
    for flag, low in (("max_batch_size", 1), ("tensor_parallel_size", 1), ("nnodes", 1),
                      ("replicas", 1)):
        if getattr(args, flag) < low:
            raise UsageError(f"--{flag.replace('_', '-')} must be an integer >= {low}; "
                             f"got {getattr(args, flag)}")
    for flag in ("max_model_len", "kv_cache_memory", "page_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be an integer >= 1; got {value}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535]; got {args.port}")
    if args.replicas > 1 and not args.ray:
        raise UsageError("--replicas needs --ray (replicas are Ray Serve's)")
    if args.ray and args.nnodes > 1:
        raise UsageError("--ray places replicas on the Ray cluster's nodes; --nnodes is for "
                         "one tensor-parallel engine across machines without Ray")
    if not 0 <= args.node_rank < args.nnodes:
        raise UsageError(f"--node-rank must be in [0, {args.nnodes - 1}] (--nnodes "
                         f"{args.nnodes}); got {args.node_rank}")
    if args.nnodes > 1 and (args.master_addr is None or args.master_port is None):
        raise UsageError(f"--nnodes {args.nnodes} needs --master-addr and --master-port "
                         "(node 0's address and a free port there)")
    if args.master_port is not None and not 0 < args.master_port < 65536:
        raise UsageError(f"--master-port must be in [1, 65535]; got {args.master_port}")
    if args.tensor_parallel_size % args.nnodes:
        raise UsageError(f"--tensor-parallel-size {args.tensor_parallel_size} must be a "
                         f"multiple of --nnodes {args.nnodes}")


def launch(args: argparse.Namespace):
    """The ``distributed.Launch`` the --nnodes/--node-rank/--master-* flags ask for, or None."""
    if args.nnodes == 1 and args.master_addr is None and args.master_port is None:
        return None
    from ...distributed import Launch

    return Launch(args.nnodes, args.node_rank, args.master_addr, args.master_port)


def build_server(args: argparse.Namespace):
    """(LLM, AsyncEngine, FastAPI app) for checked ``args``; a tensor-parallel rank other
    than 0 never returns (it serves rank 0's forwards, then exits)."""
    from ... import LLM
    from ...engine import AsyncEngine
    from .app import build_app

    auto = auto_policy(args)
    model, adapter = args.model, args.draft_adapter
    if model is None:
        from ...checkpoint.embedded import default_model_dir, shipped_adapter

        model = default_model_dir(progress=False)
        if adapter is None:
            adapter = shipped_adapter()  # as LLM() does for the embedded model
        if auto is None:
            from ...checkpoint.embedded import default_auto_policy

            auto = default_auto_policy()
    llm = LLM(model, dtype=args.dtype, device=args.device, draft_adapter=adapter,
              quantization=getattr(args, "quantization", None),
              max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
              kv_cache_memory=args.kv_cache_memory, page_size=args.page_size,
              prefix_cache=args.prefix_cache, progress=False, auto=auto, cuda_graphs=args.cuda_graphs,
              tensor_parallel_size=args.tensor_parallel_size,
              distributed=launch(args))
    engine = AsyncEngine(llm)
    try:
        app = build_app(engine, llm.tokenizer, llm.config.vocab_size,
                        server_config(args, llm, model), vision=llm.config.vision)
    except BaseException:
        engine.shutdown()
        llm.close()
        raise
    return llm, engine, app


def auto_policy(args: argparse.Namespace):
    """The auto policy the --auto-* flags ask for, or None (the LLM's default). Raises
    UsageError for bad values."""
    from ..cli.common import UsageError
    from ...engine import AdaptivePolicy, AutoPolicy

    cost = getattr(args, "auto_cost", None)
    if cost is not None:
        if any(getattr(args, f) is not None for f in ("auto_crossover", "auto_parallel_mode",
                                                      "auto_max_parallel_batch")):
            raise UsageError("--auto-cost (the per-step controller) and --auto-crossover / "
                             "--auto-parallel-mode / --auto-max-parallel-batch (a mode picked "
                             "at admission) exclude each other; give one")
        try:
            return AdaptivePolicy.from_bench(cost)
        except ValueError as exc:
            raise UsageError(f"--auto-cost: {exc}") from None
    if args.auto_crossover is not None:
        if args.auto_parallel_mode is not None or args.auto_max_parallel_batch is not None:
            raise UsageError("--auto-crossover replaces --auto-parallel-mode and "
                             "--auto-max-parallel-batch; give one or the other")
        try:
            return AutoPolicy.from_crossover(args.auto_crossover)
        except ValueError as exc:
            raise UsageError(f"--auto-crossover: {exc}") from None
    if args.auto_parallel_mode is None and args.auto_max_parallel_batch is None:
        return None
    if args.auto_max_parallel_batch is not None and args.auto_max_parallel_batch < 0:
        raise UsageError("--auto-max-parallel-batch must be an integer >= 0; got "
                         f"{args.auto_max_parallel_batch}")
    default = AutoPolicy()
    return AutoPolicy(args.auto_parallel_mode or default.parallel_mode,
                      default.max_parallel_batch if args.auto_max_parallel_batch is None
                      else args.auto_max_parallel_batch)


def server_config(args: argparse.Namespace, llm, model=None):
    """The request defaults from the flags, checked through SamplingParams (UsageError
    naming the flag). With ``llm``, the full ServerConfig."""
    from ...params import SamplingParams
    from ..cli.common import flag_error

    # --threshold is the default of the requests that omit it, in whichever mode they ask
    # for: check it as a diffusion threshold (the widest range) unless it is the mode default
    threshold = {} if args.threshold is None else {"threshold": args.threshold}
    try:
        SamplingParams(mode=args.mode, max_tokens=args.max_tokens,
                       temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                       block_length=args.block_length,
                       max_thinking_tokens=getattr(args, "max_thinking_tokens", None))
        SamplingParams(mode="diffusion", **threshold)
    except ValueError as exc:
        raise flag_error(exc, FLAGS) from None
    if llm is None:
        return None
    from pathlib import Path

    from .app import ServerConfig

    from ..cli.common import UsageError

    for flag in ("reasoning_parser", "max_thinking_tokens"):
        if getattr(args, flag, None) is not None and llm.think_tags is None:
            raise UsageError(f"--{flag.replace('_', '-')} needs a tokenizer that spells <think> "
                             "and </think>; this checkpoint's does not")
    name = args.served_model_name or Path(str(model)).name
    limit = llm.engine.max_model_len
    if args.max_model_len is not None and limit < args.max_model_len:
        import sys

        print(f"warning: --max-model-len {args.max_model_len} is over the checkpoint's context "
              f"limit; serving with {limit}", file=sys.stderr)
    return ServerConfig(model_name=name, mode=args.mode, max_tokens=args.max_tokens,
                        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        block_length=args.block_length, threshold=args.threshold,
                        max_model_len=limit, ui=getattr(args, "ui", True),
                        max_thinking_tokens=getattr(args, "max_thinking_tokens", None),
                        reasoning_parser=getattr(args, "reasoning_parser", None))
