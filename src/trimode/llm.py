"""The offline Python API: ``LLM(model).generate(prompts, params)`` and ``LLM.chat``.

Turns text into token ids (tokenizer.py), groups requests that share a mode and block
length into one batch, runs the decoding loop, and turns ids back into text. Every request
gets exactly what it gets alone (batched equals single, B09).
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Callable
from typing import Sequence as Seq

import torch

from .decoding.loop import decode
from .decoding.sequence import Sequence
from .loader import load_model
from .outputs import RequestOutput
from .params import SamplingParams
from .tokenizer import Tokenizer

Prompt = str | list[int]


class LLM:
    """A loaded checkpoint ready to decode in every mode.

    model: a checkpoint directory, a ``.gguf`` file, a hub id in the local cache, or None
        for the embedded SmolLM2-135M-Instruct (converted on first use).
    dtype / device: default fp32 on CPU, bf16 on CUDA.
    draft_adapter: a PEFT adapter directory, switched on for draft passes (linear_spec,
        quadratic_spec draft tokens) and, if it is marked so, diffusion denoising passes.
        None: the model's default (the shipped tri-mode adapter for the embedded model,
        none otherwise); False or "none": no adapter.
    max_batch_size: requests decoded together in one batch.
    Raises CheckpointError (a ValueError) for unreadable or inconsistent checkpoints.
    """

    def __init__(self, model: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
                 device: str | None = None,
                 draft_adapter: str | os.PathLike | bool | None = None,
                 max_batch_size: int = 16, progress: bool = True):
        if model is None:
            from .embedded import default_model_dir, shipped_adapter

            model = default_model_dir(progress=progress)
            if draft_adapter is None:
                draft_adapter = shipped_adapter()
        if draft_adapter is False or (isinstance(draft_adapter, str) and draft_adapter == "none"):
            draft_adapter = None
        if isinstance(dtype, str):
            dtype = _parse_dtype(dtype)
        self.model, ckpt = load_model(model, dtype=dtype, device=device)
        self.config = self.model.config
        self.tokenizer = Tokenizer.load(ckpt.directory, ckpt.gguf_file, self.config.mask_token_id,
                                        self.config.bos_token_id)
        self.draft_adapter = None
        if draft_adapter is not None:
            from .adapter import load_draft_adapter

            self.draft_adapter = load_draft_adapter(self.model, draft_adapter)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}")
        self.max_batch_size = max_batch_size

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
        if not isinstance(prompts, (str, list, tuple)):
            raise ValueError(f"prompts must be a string, a list of token ids, or a list of "
                             f"those; got {prompts!r}")
        batch = [prompts] if _is_single(prompts) else list(prompts)
        ids = [self._prompt_ids(p) for p in batch]
        texts = [p if isinstance(p, str) else None for p in batch]
        return self._run(ids, texts, params, on_step)

    def chat(self, conversations: list[dict] | Seq[list[dict]],
             params: SamplingParams | Seq[SamplingParams] | None = None,
             on_step: Callable[[int, Sequence], None] | None = None) -> list[RequestOutput]:
        """Apply the checkpoint's chat template to each conversation and decode."""
        batch = [conversations] if conversations and isinstance(conversations[0], dict) \
            else list(conversations)
        ids = [self.tokenizer.apply_chat_template(list(c)) for c in batch]
        return self._run(ids, [None] * len(ids), params, on_step)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if not isinstance(prompt, (str, list, tuple)):
            raise ValueError(f"prompt must be a string or a list of token ids; got {prompt!r}")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return self.tokenizer.encode(prompt)
        return self.tokenizer.check_ids(list(prompt), self.config.vocab_size)

    def _run(self, ids: list[list[int]], texts: list[str | None],
             params: SamplingParams | Seq[SamplingParams] | None,
             on_step: Callable[[int, Sequence], None] | None = None) -> list[RequestOutput]:
        per = _per_prompt(params, len(ids))
        seqs = [self._sequence(i, p) for i, p in zip(ids, per)]
        index = {id(s): k for k, s in enumerate(seqs)}
        hook = (lambda seq: on_step(index[id(seq)], seq)) if on_step else None
        groups: dict[tuple, list[Sequence]] = defaultdict(list)
        for s in seqs:
            groups[(s.params.mode, s.block_length)].append(s)
        for group in groups.values():
            for k in range(0, len(group), self.max_batch_size):
                decode(self.model, group[k : k + self.max_batch_size], hook)
        return [RequestOutput(t, s.prompt_ids, self.tokenizer.decode(s.generated), s.generated,
                              s.finish_reason, s.metrics) for t, s in zip(texts, seqs)]

    def _sequence(self, ids: list[int], params: SamplingParams) -> Sequence:
        config = self.config
        if params.mode != "ar" and config.mask_token_id is None:
            raise ValueError(f"mode {params.mode!r} needs a mask_token_id in the checkpoint config")
        block = params.block_length or config.block_size
        generated = params.max_tokens
        if params.mode == "diffusion":  # the last block is denoised at full length (B04, B27)
            generated = -(-params.max_tokens // block) * block
        limit = config.max_position_embeddings
        if len(ids) + generated > limit:
            raise ValueError(f"prompt ({len(ids)} tokens) + generation ({generated} positions"
                             f"{' after block rounding' if generated != params.max_tokens else ''}) "
                             f"= {len(ids) + generated} exceeds the context limit {limit}")
        stop = set(config.eos_token_ids) | set(params.stop_token_ids)
        denoise = self.draft_adapter is not None and self.draft_adapter.denoise
        return Sequence(ids, params, stop, config.mask_token_id, block, denoise)


def _is_single(prompts) -> bool:
    return isinstance(prompts, str) or (isinstance(prompts, list) and prompts != []
                                        and all(isinstance(x, int) for x in prompts))


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
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {', '.join(table)}; got {name!r}")
    return table[name]
