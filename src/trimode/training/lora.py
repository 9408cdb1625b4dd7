"""Trainable LoRA adapters on trimode's own Linear layers, saved in PEFT format.

The dual-stream layout needs the adapter on per token (noisy stream on, clean stream off) in
one forward, which trimode's ``Linear`` supports (``adapter_rows``) and PEFT's per-module
wrappers do not; so training uses trimode's LoRA path (the very code inference runs), with
PEFT's initialisation (A Kaiming-uniform, B zero) and PEFT's ``LoraConfig`` and key names
for the saved files. The result loads with ``LLM(draft_adapter=...)`` / ``--draft-adapter``;
its keys follow NLD's ``linear_spec_lora`` naming (``encoder.layers.*``, docs/spec.md 5.3).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..model.model import Linear, TriModeModel

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROLE_FILE = "trimode_adapter.json"  # which passes use the adapter (absent: drafts only)


def targets(model: TriModeModel, names: tuple[str, ...] = TARGETS) -> dict[str, Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, Linear) and n != "diffusion_head" and n.split(".")[-1] in names}


def attach_lora(model: TriModeModel, rank: int, alpha: float, seed: int,
                names: tuple[str, ...] = TARGETS) -> list[nn.Parameter]:
    """Give every targeted Linear trainable ``lora_A`` ``[r, in]`` / ``lora_B`` ``[out, r]``
    (scale alpha / r); freeze the base weights. Returns the new parameters in a fixed order."""
    if rank < 1:
        raise ValueError(f"lora_rank must be >= 1; got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _, linear in sorted(targets(model, names).items()):
        a = torch.empty(rank, linear.in_features, dtype=linear.weight.dtype)
        bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform(a=sqrt(5)), as PEFT
        a.uniform_(-bound, bound, generator=gen)
        linear.lora_A = nn.Parameter(a.to(linear.weight.device))
        linear.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, dtype=a.dtype,
                                                 device=linear.weight.device))
        linear.lora_scale = alpha / rank
        params += [linear.lora_A, linear.lora_B]
    return params


def lora_state(model: TriModeModel) -> dict[str, torch.Tensor]:
    """PEFT-named tensors: ``base_model.model.<module>.lora_{A,B}.weight``."""
    out = {}
    for name, linear in sorted(targets(model).items()):
        if linear.lora_A is not None:
            out[f"base_model.model.{name}.lora_A.weight"] = linear.lora_A.detach().cpu().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = linear.lora_B.detach().cpu().contiguous()
    return out


def save_adapter(model: TriModeModel, directory: Path, rank: int, alpha: float,
                 denoise: bool, base: str = "") -> Path:
    """Write ``adapter_config.json`` (PEFT LoraConfig), ``adapter_model.safetensors`` and
    ``trimode_adapter.json`` (``{"passes": [...]}``) into ``directory``."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    names = sorted({n.split(".")[-1] for n, m in targets(model).items() if m.lora_A is not None})
    LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=names,
               base_model_name_or_path=base, inference_mode=True).save_pretrained(str(directory))
    save_file(lora_state(model), str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    passes = ["draft", "denoise"] if denoise else ["draft"]
    (directory / ROLE_FILE).write_text(json.dumps({"passes": passes}) + "\n")
    return directory


@torch.no_grad()
def init_from_adapter(model: TriModeModel, directory: Path, rank: int, alpha: float) -> None:
    """Warm start: copy a saved adapter's ``lora_A``/``lora_B`` (PEFT names, as
    ``save_adapter`` writes) into the attached ones. The directory's ``adapter_config.json``
    must agree with the run (``r`` = ``lora_rank``, ``lora_alpha``) and its tensors must be
    exactly the attached modules' with their shapes; anything else is a ValueError naming
    ``init_adapter`` (a silent partial or rescaled start would train something else)."""
    from safetensors.torch import load_file

    where = f"init_adapter (--init-adapter) {directory}"
    file = Path(directory) / "adapter_model.safetensors"
    config_file = Path(directory) / "adapter_config.json"
    if not file.is_file() or not config_file.is_file():
        raise ValueError(f"{where}: expected a saved adapter directory with "
                         "adapter_model.safetensors and adapter_config.json")
    try:
        config = json.loads(config_file.read_text())
        saved = load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{where}: unreadable ({type(exc).__name__}: {exc})") from None
    if config.get("r") != rank:
        raise ValueError(f"{where}: its r is {config.get('r')!r}, the run's lora_rank is {rank} "
                         f"(set --lora-rank {config.get('r')})")
    if config.get("lora_alpha") != alpha:
        raise ValueError(f"{where}: its lora_alpha is {config.get('lora_alpha')!r}, the run's "
                         f"is {alpha} (set --lora-alpha {config.get('lora_alpha')})")
    wanted = set()
    for name, linear in sorted(targets(model).items()):
        if linear.lora_A is None:
            continue
        for part, param in (("lora_A", linear.lora_A), ("lora_B", linear.lora_B)):
            key = f"base_model.model.{name}.{part}.weight"
            wanted.add(key)
            if key not in saved:
                raise ValueError(f"{where}: has no {key}")
            if saved[key].shape != param.shape:
                raise ValueError(f"{where}: {key} is {tuple(saved[key].shape)}, the run "
                                 f"needs {tuple(param.shape)}")
            param.copy_(saved[key])
    extra = sorted(set(saved) - wanted)
    if extra:
        raise ValueError(f"{where}: {len(extra)} tensors match no adapted module of this "
                         f"model, e.g. {extra[0]}")
