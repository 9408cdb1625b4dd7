"""Draft adapters in PEFT LoRA format, switched on for draft passes (and denoise passes).

Reads ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT writes them (NLD ships
``linear_spec_lora``: r=128, alpha=512 on ``o_proj``; any of q/k/v/o/gate/up/down_proj is
supported). Each targeted Linear gets ``W x + (alpha / r) B A x`` on rows whose forward has
the adapter flag (docs/spec.md 5.3); the causal verify never sees it, so self-speculation stays
lossless. An adapter whose ``trimode_adapter.json`` lists ``"denoise"`` (``trimode train``
writes one) is also on for diffusion denoising passes; commit passes never see it.
A mismatched adapter is an error, never a silent no-op (docs/cases.md B18): a rank that differs from
``r``, a shape that does not fit the base model, a tensor naming no module, 0 modules matched, a targeted module without tensors, or an unsupported PEFT feature.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.config import CheckpointError
from ..model.model import Linear, TriModeModel

PREFIXES = ("base_model.model.",)
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class DraftAdapter:
    """What was loaded: the adapter directory, its rank, scale and the modules it patches."""

    path: Path
    rank: int
    scale: float
    modules: tuple[str, ...]
    denoise: bool = False  # also on for diffusion denoising passes (trimode_adapter.json)


def _module_name(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("model."):
        key = "encoder." + key[len("model."):]
    return key


def _read_config(path: Path) -> dict:
    config_file = path / "adapter_config.json"
    if not config_file.exists():
        raise CheckpointError(f"{path}: no adapter_config.json (expected a PEFT LoRA adapter)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{config_file}: peft_type {config.get('peft_type')!r} is not LORA")
    for feature in ("use_dora", "lora_bias"):
        if config.get(feature):
            raise CheckpointError(f"{config_file}: {feature}=true is not supported")
    if config.get("modules_to_save"):
        raise CheckpointError(f"{config_file}: modules_to_save is not supported for draft adapters")
    return config


def _targets(config: dict, model: TriModeModel) -> set[str]:
    """Names of the model's Linear modules the config targets (PEFT matching rules)."""
    target = config.get("target_modules") or []
    names = [n for n, m in model.named_modules() if isinstance(m, Linear) and n != "diffusion_head"]
    if isinstance(target, str):
        return {n for n in names if re.fullmatch(target, n)}
    return {n for n in names if any(n == t or n.endswith("." + t) for t in target)}


def load_draft_adapter(model: TriModeModel, path: str | os.PathLike) -> DraftAdapter:
    """Attach a PEFT LoRA adapter to ``model`` for draft passes; raises CheckpointError."""
    path = Path(path)
    config = _read_config(path)
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        raise CheckpointError(f"{path}: no adapter_model.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if not match:
            raise CheckpointError(f"{weights}: tensor {key!r} is not a LoRA A/B weight")
        name = _module_name(match["module"])
        if not isinstance(modules.get(name), Linear) or name == "diffusion_head":
            raise CheckpointError(f"{weights}: tensor {key!r} names no adapter-capable module of "
                                  f"the base model ({name!r})")
        pairs.setdefault(name, {})[match["part"]] = (key, tensor)
    if not pairs:
        raise CheckpointError(f"{weights}: 0 modules matched; the adapter has no LoRA tensors")
    targets = _targets(config, model)
    missing = sorted(targets - set(pairs))
    if missing:
        raise CheckpointError(f"{weights}: target module(s) without LoRA tensors: "
                              f"{', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
    staged = {name: _check_pair(weights, modules[name], parts, rank) for name, parts in pairs.items()}
    for name, (a, b) in staged.items():
        linear = modules[name]
        dtype = getattr(linear, "activation_dtype", None) or linear.weight.dtype  # QuantLinear
        linear.lora_A = a.to(device=model.device, dtype=dtype)
        linear.lora_B = b.to(device=model.device, dtype=dtype)
        linear.lora_scale = scale
    return DraftAdapter(path, rank, scale, tuple(sorted(staged)), _denoise(path))


def _denoise(path: Path) -> bool:
    """``trimode_adapter.json`` ``{"passes": ["draft", "denoise"]}`` marks an adapter trained
    for diffusion denoising too (``trimode train``); absent, it is a draft adapter only."""
    role = path / "trimode_adapter.json"
    if not role.exists():
        return False
    passes = json.loads(role.read_text()).get("passes", ["draft"])
    unknown = set(passes) - {"draft", "denoise"}
    if unknown:
        raise CheckpointError(f"{role}: unknown passes {sorted(unknown)}; allowed: draft, denoise")
    return "denoise" in passes


def _check_pair(weights: Path, linear: Linear, parts: dict, rank: int):
    for part in "AB":
        if part not in parts:
            other = next(iter(parts.values()))[0]
            raise CheckpointError(f"{weights}: {other!r} has no matching lora_{part} tensor")
    (key_a, a), (key_b, b) = parts["A"], parts["B"]
    want_a, want_b = (rank, linear.in_features), (linear.out_features, rank)
    if tuple(a.shape) != want_a:
        raise CheckpointError(f"{weights}: tensor {key_a!r} has shape {tuple(a.shape)}, expected "
                              f"{want_a} (r={rank} from adapter_config.json, in_features "
                              f"{linear.in_features} from the base model)")
    if tuple(b.shape) != want_b:
        raise CheckpointError(f"{weights}: tensor {key_b!r} has shape {tuple(b.shape)}, expected "
                              f"{want_b} (out_features {linear.out_features}, r={rank})")
    return a, b
