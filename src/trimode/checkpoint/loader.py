"""Checkpoint loading: local directories, hub ids, safetensors (single or sharded) and GGUF.

Every tensor the model needs must come from the checkpoint: a missing, unexpected or wrongly
shaped tensor, a missing or stale shard, or an unknown architecture raises
:class:`CheckpointError` naming the file and the tensor. No weight is ever left random.
docs/spec.md sections 1.5 and 9.1. Knows nothing about decoding.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.config import CheckpointError, ModelConfig
from ..model.model import TriModeModel

CAUSAL_LM_RENAMES = (("model.", "encoder."), ("lm_head.", "diffusion_head."))
# NLD-VLM vision weights sit under encoder. (most likely) or at the top level (spec vlm 1.3)
VISION_RENAMES = (("vision_tower.", "encoder.vision_tower."),
                  ("multi_modal_projector.", "encoder.multi_modal_projector."))


@dataclass(frozen=True)
class Checkpoint:
    """A resolved checkpoint: its directory and, for GGUF, the file inside it."""

    directory: Path
    gguf_file: Path | None = None


def resolve(model: str | os.PathLike) -> Checkpoint:
    """A local directory, a ``.gguf`` file, or a hub id looked up in the local HF cache.

    Raises CheckpointError when the path does not exist and the hub id is not cached
    (trimode never downloads at run time unless ``HF_HUB_OFFLINE`` is unset and the hub is
    reachable; the error says which).
    """
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return Checkpoint(path.parent, path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return Checkpoint(path, ggufs[0])
        return Checkpoint(path)
    if path.exists():
        raise CheckpointError(f"{path}: not a checkpoint directory or .gguf file")
    return Checkpoint(_from_hub(str(model)))


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except HFValidationError:
        raise CheckpointError(f"{repo_id!r} is neither a local path nor a valid hub id") from None
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        raise CheckpointError(f"model {repo_id!r} is not a local path and is not in the local Hugging "
                              "Face cache (HF_HUB_OFFLINE is set)")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise CheckpointError(f"model {repo_id!r} is not a local path, not in the local Hugging Face "
                              f"cache, and could not be downloaded ({type(exc).__name__})") from None


def load_model(model: str | os.PathLike, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None,
               quantization: str | None = None) -> tuple[TriModeModel, Checkpoint]:
    """Load weights into a :class:`TriModeModel`; fp32 on CPU, bf16 on CUDA unless ``dtype``.
    ``quantization`` ``"int8"`` / ``"int4"`` / ``"auto"``: weight-only linears (``trimode.quant``)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ckpt = resolve(model)
    if ckpt.gguf_file is not None:
        from .gguf import read_gguf

        config, tensors = read_gguf(ckpt.gguf_file)
        source = str(ckpt.gguf_file)
        tensors = {source_name: (t, source) for source_name, t in tensors.items()}
    else:
        config = ModelConfig.from_file(ckpt.directory / "config.json")
        tensors = read_safetensors(ckpt.directory)
    with torch.device("meta"):
        net = TriModeModel(config)
        if config.vision is not None:  # NLD-VLM: + Pixtral tower and Mistral3 projector
            from ..model.vision import attach_vision

            attach_vision(net, config.vision)
    assign_weights(net, tensors, config, dtype)
    net.rotary = type(net.rotary)(config.rope, config.head_dim)
    if config.vision is not None:
        from ..model.vision import materialize_vision_buffers

        materialize_vision_buffers(net, config.vision)
    net = net.to(device).eval()
    if quantization not in (None, "none"):
        from ..quant import quantize_model

        quantize_model(net, quantization, ckpt.gguf_file)
    return net, ckpt


def read_safetensors(directory: Path) -> dict[str, tuple[torch.Tensor, str]]:
    """All tensors of a single-file or sharded checkpoint, as ``name -> (tensor, file)``.

    With ``model.safetensors.index.json`` the index is authoritative: a missing shard or a
    tensor listed but absent raises; files not in the index are ignored (docs/cases.md B30).
    """
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({type(exc).__name__}: "
                                  f"{exc})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (directory / s).exists()]
        if missing:
            raise CheckpointError(f"{index}: shard file(s) missing: {', '.join(missing)}")
    else:
        single = directory / "model.safetensors"
        if not single.exists():
            raise CheckpointError(f"{directory}: no model.safetensors, "
                                  "model.safetensors.index.json or .gguf file")
        weight_map, shards = {}, ["model.safetensors"]
    tensors: dict[str, tuple[torch.Tensor, str]] = {}
    for shard in shards:
        try:
            with safe_open(str(directory / shard), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = (f.get_tensor(name), str(directory / shard))
        except Exception as exc:  # truncated or corrupt file (e.g. an interrupted download)
            raise CheckpointError(f"{directory / shard}: unreadable safetensors file "
                                  f"({type(exc).__name__}: {exc})") from None
    for name, shard in weight_map.items():
        if name not in tensors:
            raise CheckpointError(f"{directory / shard}: tensor {name!r} is listed in the index "
                                  "but not present in the shard")
        if tensors[name][1] != str(directory / shard):
            raise CheckpointError(f"{index}: stale index, tensor {name!r} is in {tensors[name][1]}, "
                                  f"not {shard}")
    return tensors


def canonical_name(name: str, layout: str) -> str:
    """Map a checkpoint tensor name to trimode's (the NLD names, spec 1.5)."""
    for old, new in CAUSAL_LM_RENAMES if layout == "causal_lm" else VISION_RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def assign_weights(net: TriModeModel, tensors: dict[str, tuple[torch.Tensor, str]],
                   config: ModelConfig, dtype: torch.dtype) -> None:
    """Copy every parameter from ``tensors``; raise CheckpointError on any mismatch."""
    expected = dict(net.named_parameters(remove_duplicate=False))
    if config.tie_word_embeddings:
        expected.pop("diffusion_head.weight")
    found: dict[str, tuple[torch.Tensor, str]] = {}
    for name, (tensor, source) in tensors.items():
        key = canonical_name(name, config.layout)
        if key == "diffusion_head.weight" and config.tie_word_embeddings:
            continue  # tied checkpoints may still store the head; the embedding wins
        if key.endswith(("rotary_emb.inv_freq", "patch_positional_embedding.inv_freq")):
            continue  # non-persistent buffers some exporters write
        if key not in expected:
            raise CheckpointError(f"{source}: unexpected tensor {name!r}")
        want = tuple(expected[key].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                  f"expected {want}")
        found[key] = (tensor, source)
    missing = sorted(set(expected) - set(found))
    if missing:
        where = ", ".join(sorted({s for _, s in tensors.values()})) or "checkpoint"
        raise CheckpointError(f"{where}: missing tensor(s) {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    state = {k: t.to(dtype) for k, (t, _) in found.items()}
    net.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        net.diffusion_head.weight = net.encoder.embed_tokens.weight
