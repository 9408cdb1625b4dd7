"""The offline Python API: ``LLM(model).generate(prompts, params)``, ``chat``, ``stream``
and ``stream_chat`` (``chat`` and ``stream_chat`` apply the chat template; ``generate`` and
``stream`` take raw prompts).

Turns text into token ids (tokenizer.py), submits every request to the continuous-batching
engine (engine.py: requests of all modes share each step), and turns ids back into text.
Every request gets exactly what it gets alone (batched equals single, docs/cases.md B09).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Iterator
from typing import Sequence as Seq

import torch

from ..decoding.sequence import Sequence
from ..decoding.thinking import ThinkTags, split
from ..engine import AdaptivePolicy, AutoPolicy, Engine, EngineConfig, RequestUpdate, to_output
from ..checkpoint.loader import load_model
from ..multimodal.image import ImageLimits
from ..multimodal.prompt import chat_prompt, check_tokenizer
from ..outputs import RequestOutput
from ..params import SamplingParams
from ..checkpoint.tokenizer import Tokenizer

Prompt = str | list[int]


class LLM:
    """A loaded checkpoint ready to decode in every mode.

    model: a checkpoint directory, a ``.gguf`` file, a hub id in the local cache, or None
        for the embedded SmolLM2-135M-Instruct (converted on first use).
    dtype / device: default fp32 on CPU, bf16 on CUDA; dtype "auto": bf16 on CPUs with AMX or
        AVX512-BF16, else fp32 (detected at run time).
    draft_adapter: a PEFT adapter directory, switched on for draft passes (linear_spec,
        quadratic_spec draft tokens) and, if it is marked so, diffusion denoising passes.
        None: the model's default (the shipped tri-mode adapter for the embedded model,
        none otherwise); False or "none": no adapter.
    max_batch_size: requests decoded concurrently (rows of the KV pool's page table).
    max_model_len: positions one request may hold (prompt + generation + its mode's
        scratch); None: the checkpoint's context limit capped at 4096.
    kv_cache_memory: bytes for the KV pool's pages; None: room for max_batch_size requests
        of max_model_len (memory is touched only as pages are used). Requests that need
        more pages than are free wait, or are preempted and recomputed (README "Engine").
    page_size: positions per KV page; None: ``defaults.PAGE_SIZE`` (16).
    prefix_cache: keep full pages of committed KV after a request ends, for later requests
        that start with the same text (``EngineConfig.min_shared_prefix``); False: off.
    max_num_batched_tokens: query tokens per engine step (see ``engine.EngineConfig``).
    auto: the ``mode="auto"`` policy: ``AdaptivePolicy`` (per-step controller, the default)
        or ``AutoPolicy`` (at admission, from the load).
    quantization: None/"none", "int8", "int4", "w8a8" or "auto": weight-only int8/int4 linear
        layers on PyTorch's CPU kernels (``trimode.quant``); GGUF Q4_0/Q4_1/Q4_K blocks load
        exactly as int4 (the embedded model's own Q4_1 file included); "w8a8": int8 weights and
        per-token int8 activations on fbgemm (x86; fastest, +5% perplexity measured on the
        embedded model); "auto" follows the GGUF's type.
    cuda_graphs: on CUDA, replay captured graphs of the decode forward (``EngineConfig``).
    tensor_parallel_size: ranks the model is sharded over (torch.distributed: NCCL on CUDA,
        one GPU per rank; gloo on CPU); this process is rank 0 and spawns the others, or
        see ``distributed`` and README "Scaling out". Call ``close()`` to stop them.
    distributed: a ``trimode.distributed.Launch`` (nnodes, node_rank, master_addr,
        master_port) for ranks on several machines; on every machine but rank 0's the
        constructor serves rank 0's forwards and exits the process when rank 0 closes.
    Raises CheckpointError (a ValueError) for unreadable or inconsistent checkpoints and
    ValueError for out-of-range settings.
    """

    def __init__(self, model: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
                 device: str | None = None,
                 draft_adapter: str | os.PathLike | bool | None = None,
                 max_batch_size: int = 16, progress: bool = True, max_model_len: int | None = None,
                 kv_cache_memory: int | None = None, max_num_batched_tokens: int = 8192,
                 auto: AdaptivePolicy | AutoPolicy | None = None, cuda_graphs: bool = True,
                 quantization: str | None = None, tensor_parallel_size: int = 1,
                 distributed=None, page_size: int | None = None, prefix_cache: bool = True):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1; got {max_batch_size!r}")
        if model is None and auto is None:
            from ..checkpoint.embedded import default_auto_policy

            auto = default_auto_policy()
        if not isinstance(prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True or False; got {prefix_cache!r}")
        pages = {} if page_size is None else {"page_size": page_size}
        if not prefix_cache:
            pages["min_shared_prefix"] = 0
        engine_config = EngineConfig(max_num_seqs=max_batch_size, max_model_len=max_model_len,
                                     kv_cache_memory=kv_cache_memory, **pages,
                                     max_num_batched_tokens=max_num_batched_tokens,
                                     auto=auto or AdaptivePolicy(), cuda_graphs=cuda_graphs)
        from ..quant import check_scheme

        quantization = check_scheme(quantization)
        quant_source = None
        if model is None:
            from ..checkpoint.embedded import default_model_dir, gguf_path, shipped_adapter

            quant_source = gguf_path() if quantization != "none" else None

            model = default_model_dir(progress=progress)
            if draft_adapter is None:
                draft_adapter = shipped_adapter()
        if draft_adapter is False or (isinstance(draft_adapter, str) and draft_adapter == "none"):
            draft_adapter = None
        if isinstance(dtype, str):
            dtype = _parse_dtype(dtype)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype must be float32, bfloat16 or float16; got {dtype!r}")
        device = _check_device(device)
        tensor_parallel = tensor_parallel_size != 1 or distributed is not None
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if tensor_parallel:  # whole model in host memory; each rank's GPU gets its shard only
            dtype = dtype or (torch.bfloat16 if target.type == "cuda" else torch.float32)
        self.model, ckpt = load_model(model, dtype=dtype, device="cpu" if tensor_parallel else device)
        if quantization != "none":
            from ..quant import quantize_model

            quantization = quantize_model(self.model, quantization, quant_source or ckpt.gguf_file)
        self.quantization = quantization
        if self.model.device.type == "cpu" and self.model.dtype != torch.float32:
            from ..model.invariant import set_batch_invariant

            set_batch_invariant(self.model)  # bf16 rounding: see model.invariant
        self.config = self.model.config
        self.tokenizer = Tokenizer.load(ckpt.directory, ckpt.gguf_file, self.config.mask_token_id,
                                        self.config.bos_token_id)
        self.image_limits = ImageLimits()  # per-request image count and size limits
        if self.config.vision is not None:
            check_tokenizer(self.tokenizer, self.config.vision)
        self.draft_adapter = None
        if draft_adapter is not None:
            from ..checkpoint.adapter import load_draft_adapter

            self.draft_adapter = load_draft_adapter(self.model, draft_adapter)
        if tensor_parallel:
            if quantization != "none":
                raise ValueError("quantization is not supported with tensor_parallel_size > 1 yet")
            self.model = _tensor_parallel(self.model, model, draft_adapter, tensor_parallel_size,
                                          distributed, target)
            # graphs would capture the step-plan broadcast: the decode forward runs eagerly
            engine_config = dataclasses.replace(engine_config, cuda_graphs=False)
        else:
            from ..model.fused import fuse_projections

            fuse_projections(self.model)
        self.max_batch_size = max_batch_size
        self.engine = Engine(self.model, engine_config)
        # a tri-mode adapter (trimode train) is also on for diffusion denoising passes
        self.engine.denoise_adapter = bool(self.draft_adapter is not None and self.draft_adapter.denoise)
        # <think> / </think> as the tokenizer spells them: max_thinking_tokens, reasoning()
        self.think_tags = self.engine.think_tags = ThinkTags.of(self.tokenizer)
        self._async = None

    @property
    def tensor_parallel_size(self) -> int:
        return getattr(self.model, "tensor_parallel_size", 1)

    def close(self) -> None:
        """Stop the tensor-parallel ranks (no-op otherwise); the LLM is unusable after."""
        if self._async is not None:
            self._async.shutdown()
        close = getattr(self.model, "close", None)
        if close is not None:
            close()

    def generate(self, prompts: Prompt | Seq[Prompt],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 on_step: Callable[[int, Sequence], None] | None = None) -> list[RequestOutput]:
        """Decode raw prompts (strings, or token-id lists) -> one RequestOutput each, in order.

        ``params``: one SamplingParams for all prompts or one per prompt.
        ``on_step(index, seq)``: called after every forward request ``index`` took part in;
        ``seq.generated`` holds its committed tokens and ``seq.strategy.block`` (diffusion,
        linear_spec) the block being denoised or drafted, masks included.
        Raises ValueError for empty prompts, ids outside the vocabulary or equal to the mask
        id, a params list of the wrong length, or a mode the checkpoint cannot run.
        """
        prompts = _as_id_list(prompts)
        if not isinstance(prompts, (str, list, tuple)):
            raise ValueError(f"prompts must be a string, a list of token ids, or a list of "
                             f"those; got {prompts!r}")
        batch = [prompts] if _is_single(prompts) else list(prompts)
        ids = [self._prompt_ids(p) for p in batch]
        texts = [p if isinstance(p, str) else None for p in batch]
        return self._run(ids, texts, params, on_step)

    def chat(self, conversations: list[dict] | Seq[list[dict]],
             params: SamplingParams | Seq[SamplingParams] | None = None,
             on_step: Callable[[int, Sequence], None] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """Apply the checkpoint's chat template to each conversation and decode.

        A message's content is a string or a list of OpenAI-style parts: ``{"type": "text",
        "text": ...}``, ``{"type": "image_url", "image_url": {"url": ...}}`` (a ``data:`` URL
        or a local path) or ``{"type": "image", "image": PIL.Image}`` (NLD-VLM checkpoints;
        see ``trimode.multimodal.prompt``). ``chat_template_kwargs``: extra template
        variables, e.g. ``{"enable_thinking": False}`` (NLD's template then renders
        ``<think></think>``). Raises ValueError (ImageError for a bad image)."""
        batch = [conversations] if conversations and isinstance(conversations[0], dict) \
            else list(conversations)
        built = [chat_prompt(self.tokenizer, self.config.vision, list(c), self.image_limits,
                             chat_template_kwargs) for c in batch]
        return self._run([b[0] for b in built], [None] * len(built), params, on_step,
                         [b[1] or None for b in built])

    def reasoning(self, output: RequestOutput) -> Reasoning:
        """``output`` split at its ``<think> ... </think>`` tags (the prompt's open tag
        counts): the thinking, the answer, and how many tokens the thinking took. Without
        tags in the tokenizer, everything is the answer."""
        if self.think_tags is None:
            return Reasoning(None, output.text, 0)
        thought, answer, found = split(self.think_tags, output.prompt_token_ids, output.token_ids)
        return Reasoning(self.tokenizer.decode(thought) if found else None,
                         self.tokenizer.decode(answer), len(thought))

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        prompt = _as_id_list(prompt)
        if not isinstance(prompt, (str, list, tuple)):
            raise ValueError(f"prompt must be a string or a list of token ids; got {prompt!r}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return self.tokenizer.encode(prompt)
        return self.tokenizer.check_ids(list(prompt), self.config.vocab_size)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               on_step: Callable[[int, Sequence], None] | None = None) -> Iterator["StreamChunk"]:
        """Decode one raw prompt (no chat template: use ``stream_chat`` for a conversation)
        and yield its committed tokens as they are committed: several per step in the
        parallel modes, in order, never revised. Each StreamChunk has ``token_ids`` (new),
        ``text`` (new text; a multi-byte character is held back until complete),
        ``finished``, ``finish_reason``, the RequestUpdate and, on the last chunk, the
        RequestOutput. ``on_step`` as in ``generate`` (index 0). Stopping the iteration
        cancels the request. Other requests may be in flight through ``generate`` only from
        this same thread."""
        text = prompt if isinstance(prompt, str) else None
        return self._stream(self._prompt_ids(prompt), text, params, on_step)

    def stream_chat(self, messages: list[dict], params: SamplingParams | None = None,
                    on_step: Callable[[int, Sequence], None] | None = None,
                    chat_template_kwargs: dict | None = None) -> Iterator["StreamChunk"]:
        """``stream`` for one conversation: the checkpoint's chat template is applied (and
        image parts read) as in ``chat``."""
        ids, images = chat_prompt(self.tokenizer, self.config.vision, list(messages),
                                  self.image_limits, chat_template_kwargs)
        return self._stream(ids, None, params, on_step, images or None)

    def _stream(self, ids: list[int], text: str | None, params: SamplingParams | None,
                on_step, images: list | None = None) -> Iterator["StreamChunk"]:
        params = params or SamplingParams()
        self._check_idle()
        self.engine.validate(ids, params, images)  # bad input fails at the call, not at next()
        hook = (lambda seq: on_step(0, seq)) if on_step else None
        return self._updates(ids, params, hook, text, images)

    def _updates(self, ids, params, hook, prompt: str | None,
                 images: list | None) -> Iterator["StreamChunk"]:
        request_id = self.engine.add_request(ids, params, on_step=hook, images=images)
        shown = ""
        try:
            while True:
                for update in self.engine.step():
                    if update.request_id != request_id:
                        continue
                    text = self.tokenizer.decode(update.token_ids)
                    if not update.finished and text.endswith("\ufffd"):
                        text = text.rstrip("\ufffd")  # wait for the rest of the character
                    delta, shown = text[len(shown):], text
                    output = None
                    if update.finished:
                        output = to_output(self.engine.pop_finished(request_id), prompt, text)
                    yield StreamChunk(update.new_token_ids, delta, update.finished,
                                      update.finish_reason, update, output)
                    if update.finished:
                        return
        finally:
            seq = self.engine.requests.get(request_id)
            if seq is not None and not seq.finished:
                self.engine.abort(request_id)  # the caller stopped reading: cancel
            if request_id in self.engine.requests:
                self.engine.pop_finished(request_id)

    async def astream(self, prompt: Prompt, params: SamplingParams | None = None):
        """Async variant of ``stream`` over an AsyncEngine (created on first use): yields
        RequestUpdates. Leaving the loop early cancels the request."""
        from ..engine import AsyncEngine

        ids = self._prompt_ids(prompt)
        engine = self._async or AsyncEngine(self)
        async for update in engine.generate(ids, params or SamplingParams()):
            yield update

    def _check_idle(self) -> None:
        if self._async is not None:
            raise RuntimeError("an AsyncEngine is stepping this LLM; use it (or shut it down) "
                               "instead of generate/stream")

    def _run(self, ids: list[list[int]], texts: list[str | None],
             params: SamplingParams | Seq[SamplingParams] | None,
             on_step: Callable[[int, Sequence], None] | None = None,
             images: list | None = None) -> list[RequestOutput]:
        per = _per_prompt(params, len(ids))
        images = images or [None] * len(ids)
        self._check_idle()
        for i, p, im in zip(ids, per, images):  # validate everything before queueing anything
            self.engine.validate(i, p, im)
        request_ids = []
        try:
            for k, (i, p, im) in enumerate(zip(ids, per, images)):
                hook = (lambda seq, k=k: on_step(k, seq)) if on_step else None
                request_ids.append(self.engine.add_request(i, p, on_step=hook, images=im))
            pending = set(request_ids)
            while pending:
                for update in self.engine.step():
                    if update.finished:
                        pending.discard(update.request_id)
            seqs = [self.engine.pop_finished(r) for r in request_ids]
        except BaseException:
            for r in request_ids:
                if r in self.engine.requests:
                    self.engine.abort(r)
                    self.engine.pop_finished(r)
            raise
        return [to_output(s, t, self.tokenizer.decode(s.generated)) for t, s in zip(texts, seqs)]


@dataclass(frozen=True)
class Reasoning:
    """An output split by ``LLM.reasoning``: ``reasoning_content`` (None when the output has
    no thinking), ``content`` (the answer) and ``reasoning_tokens``."""

    reasoning_content: str | None
    content: str
    reasoning_tokens: int


@dataclass
class StreamChunk:
    """One piece of a streamed request (see ``LLM.stream``)."""

    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    update: RequestUpdate
    output: RequestOutput | None = None  # the whole result, on the last chunk


def _tensor_parallel(model, path, adapter, size, launch, device: torch.device):
    """Shard ``model`` (loaded in host memory) over ``size`` ranks on ``device``'s kind."""
    from ..distributed import ModelSpec, start

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1; got {size!r}")
    spec = ModelSpec(str(path), str(model.dtype).removeprefix("torch."), str(device),
                     None if adapter is None else str(adapter))
    return start(model, spec, size, launch)


def _is_single(prompts) -> bool:
    return isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and len(prompts) > 0
                                        and all(isinstance(x, int) for x in prompts))


def _as_id_list(prompt):
    """numpy arrays and torch tensors of integer ids -> (nested) lists; others unchanged."""
    if isinstance(prompt, torch.Tensor) or type(prompt).__module__ == "numpy":
        if not hasattr(prompt, "tolist"):
            return prompt
        kind = str(getattr(prompt, "dtype", ""))
        if "int" not in kind:
            raise ValueError(f"token-id prompts must hold integers; got dtype {kind}")
        return prompt.tolist()
    return prompt


def _check_device(device):
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N'; got {device!r}") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use 'cpu'")
    return device


def _per_prompt(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if not isinstance(params, (list, tuple)):
        raise ValueError(f"params must be a SamplingParams or a list of them; got {params!r}")
    params = list(params)
    if len(params) != n:
        raise ValueError(f"params has {len(params)} entries for {n} prompts")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params entries must be SamplingParams; got {p!r}")
    return params


def _parse_dtype(name: str) -> torch.dtype:
    if name == "auto":  # per CPU, detected at run time (trimode.quant.cpu)
        from ..quant.cpu import preferred_dtype

        return preferred_dtype()
    table = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {', '.join(table)}; got {name!r}")
    return table[name]
