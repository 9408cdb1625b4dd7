"""Model configuration read from a checkpoint's ``config.json``.

Knows the NLD layout (``model_type`` ``nemotron_labs_diffusion``) and the Llama / Mistral /
Ministral3 causal-LM layouts, and normalises both into one frozen :class:`ModelConfig`.
Knows nothing about weights or tokenizers (see ``loader.py`` and ``tokenizer.py``).
Follows docs/spec.md sections 1.2 and 1.4.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..multimodal.config import VisionSpec

NLD_MODEL_TYPES = ("nemotron_labs_diffusion", "nemotron_labs_diffusion_vlm")  # VLM: + vision_config
CAUSAL_LM_MODEL_TYPES = ("llama", "mistral", "ministral", "ministral3")
SUPPORTED_ROPE_TYPES = ("default", "yarn", "linear")


class CheckpointError(ValueError):
    """A checkpoint is incomplete, inconsistent or of an unknown architecture."""


@dataclass(frozen=True)
class RopeConfig:
    """RoPE settings (spec 1.4). ``rope_type`` is ``default``, ``linear`` or ``yarn``."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    llama_4_scaling_beta: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Geometry and special ids of a tri-mode decoder (spec 1.2).

    ``layout`` is ``"nld"`` (weights ``encoder.*`` + ``diffusion_head.weight``) or
    ``"causal_lm"`` (``model.*`` + ``lm_head.weight``).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    mask_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    block_size: int = 32
    layout: str = "nld"
    model_type: str = "nemotron_labs_diffusion"
    vision: "VisionSpec | None" = None  # NLD-VLM checkpoints (trimode.multimodal)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{name} must be an integer >= 1; got {value!r}")
        if not (self.rms_norm_eps > 0 and self.rms_norm_eps < 1):
            raise CheckpointError(f"rms_norm_eps must be in (0, 1); got {self.rms_norm_eps!r}")
        if self.mask_token_id is not None and self.mask_token_id in self.eos_token_ids:
            raise CheckpointError(f"mask_token_id {self.mask_token_id} must differ from the EOS "
                                  f"ids {list(self.eos_token_ids)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise CheckpointError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary [0, {self.vocab_size})")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a parsed ``config.json``; raises :class:`CheckpointError` naming ``source``."""
        model_type = raw.get("model_type")
        if model_type in NLD_MODEL_TYPES:
            layout = "nld"
        elif model_type in CAUSAL_LM_MODEL_TYPES:
            layout = "causal_lm"
        else:
            raise CheckpointError(
                f"{source}: unknown architecture model_type={model_type!r}; trimode reads "
                f"{NLD_MODEL_TYPES + CAUSAL_LM_MODEL_TYPES}")
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            return cls(
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                max_position_embeddings=_context_limit(raw),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                rope=_rope_from_dict(raw, source),
                mask_token_id=_optional_int(raw.get("mask_token_id")),
                bos_token_id=_optional_int(raw.get("bos_token_id")),
                eos_token_ids=_id_tuple(raw.get("eos_token_id")),
                block_size=int(32 if raw.get("block_size") is None else raw["block_size"]),
                layout=layout,
                model_type=model_type,
                vision=_vision(raw),
            )
        except KeyError as exc:
            raise CheckpointError(f"{source}: missing field {exc.args[0]!r}") from None
        except CheckpointError as exc:
            raise CheckpointError(f"{source}: {exc}") from None
        except (TypeError, ValueError, ZeroDivisionError) as exc:
            raise CheckpointError(f"{source}: {_bad_field(raw)}") from exc

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        config = cls.from_dict(raw, source=str(path))
        return config.with_generation_config(path.parent / "generation_config.json")

    def with_generation_config(self, path: Path) -> "ModelConfig":
        """Merge EOS ids from ``generation_config.json`` (spec 9.1), if present."""
        if not path.exists():
            return self
        try:
            extra = _id_tuple(json.loads(path.read_text()).get("eos_token_id"))
        except (ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: eos_token_id must be an integer or a list of "
                                  f"integers ({exc})") from None
        merged = tuple(dict.fromkeys(self.eos_token_ids + extra))
        return _replace(self, eos_token_ids=merged)


_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
               "mask_token_id", "bos_token_id", "block_size", "sliding_window")


def _bad_field(raw: dict[str, Any]) -> str:
    """Name the first config field whose value cannot be read."""
    for key in _INT_FIELDS:
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            return f"{key} must be an integer; got {value!r}"
    eos = raw.get("eos_token_id")
    if eos is not None and not all(isinstance(v, int) and not isinstance(v, bool)
                                   for v in (eos if isinstance(eos, list) else [eos])):
        return f"eos_token_id must be an integer or a list of integers; got {eos!r}"
    for key in ("rms_norm_eps", "rope_theta"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{key} must be a number; got {value!r}"
    return "a field has a value of the wrong type (rope_parameters / rope_scaling?)"


def _vision(raw: dict[str, Any]):
    from ..multimodal.config import VLM_MODEL_TYPES, vision_spec_from_dict

    if raw.get("model_type") not in VLM_MODEL_TYPES:
        return None
    try:
        return vision_spec_from_dict(raw)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def _replace(config: ModelConfig, **changes: Any) -> ModelConfig:
    from dataclasses import replace

    return replace(config, **changes)


def _context_limit(raw: dict[str, Any]) -> int:
    """max_position_embeddings, capped at a sliding window: trimode attends to the full
    context, so it only serves lengths where full and sliding-window attention agree."""
    limit = int(raw.get("max_position_embeddings", 4096))
    window = raw.get("sliding_window")
    if window and int(window) < limit and raw.get("use_sliding_window", True):
        import warnings

        warnings.warn(f"sliding_window={window}: context limited to {window} tokens, where full "
                      "attention equals sliding-window attention", stacklevel=3)
        limit = int(window)
    return limit


def _optional_int(value: Any) -> int | None:
    return None if value is None or value == -1 else int(value)


def _id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_from_dict(raw: dict[str, Any], source: str) -> RopeConfig:
    """Read ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (4.x)."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"{source}: rope_type {rope_type!r} is not supported "
                              f"(supported: {SUPPORTED_ROPE_TYPES})")
    orig = params.get("original_max_position_embeddings")
    if rope_type == "yarn":
        # As transformers' standardize_rope_params: a top-level value wins, then the dict's,
        # then max_position_embeddings (not rope.py's 4096 fallback).
        orig = raw.get("original_max_position_embeddings") or orig or raw.get("max_position_embeddings")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor") or 1.0),
        original_max_position_embeddings=int(orig) if orig is not None else None,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        llama_4_scaling_beta=params.get("llama_4_scaling_beta"),
    )
