"""The vision half of an NLD-VLM ``config.json``: ``vision_config`` (Pixtral), the projector
fields and the image token scheme.

Text fields stay at the root and are read by ``ModelConfig`` as for the text models; this
module reads only what the vision side needs and builds transformers' configs from it.
Image token ids 18-21 (start, pad, break, end) are constants of the remote model class,
not config fields (spec vlm-tp-quant 1.2, 1.4). Knows nothing about weights or pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

VLM_MODEL_TYPES = ("nemotron_labs_diffusion_vlm",)
IMAGE_TOKENS = ("<|image_start|>", "<|image_pad|>", "<|image_break|>", "<|image_end|>")


@dataclass(frozen=True)
class VisionSpec:
    """What the vision side of a VLM checkpoint needs.

    ``vision_config``: the raw Pixtral dict (hidden_size, num_hidden_layers, patch_size, ...),
    kept as JSON text so the config stays hashable. ``spatial_merge_size``: patches merged per
    side (2 -> one feature per 28-px cell with patch 14). ``longest_edge``: images larger than
    this are scaled down (1400, the remote processor's default). Token ids: start, pad (one
    per cell, replaced by a feature), break (between rows), end (after the last row).
    """

    vision_json: str
    text_hidden_size: int
    rms_norm_eps: float = 1e-5
    spatial_merge_size: int = 2
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = False
    vision_feature_layer: int | tuple[int, ...] = -1
    longest_edge: int = 1400
    image_start_id: int = 18
    image_pad_id: int = 19
    image_break_id: int = 20
    image_end_id: int = 21

    @property
    def vision_config(self) -> dict[str, Any]:
        return json.loads(self.vision_json)

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.get("patch_size", 14))

    @property
    def cell(self) -> int:
        """Pixels per side of one image token (patch_size x spatial_merge_size)."""
        return self.patch_size * self.spatial_merge_size

    @property
    def token_ids(self) -> tuple[int, int, int, int]:
        return (self.image_start_id, self.image_pad_id, self.image_break_id, self.image_end_id)

    def pixtral_config(self):
        from transformers import PixtralVisionConfig

        raw = {k: v for k, v in self.vision_config.items() if k != "model_type"}
        return PixtralVisionConfig(**raw, attn_implementation="sdpa")

    def mistral3_config(self):
        """A minimal ``Mistral3Config`` for ``Mistral3MultiModalProjector`` (only the text
        width and norm eps of ``text_config`` are read)."""
        from transformers import Mistral3Config

        layer = self.vision_feature_layer
        return Mistral3Config(
            vision_config=self.vision_config,
            text_config={"model_type": "ministral3", "hidden_size": self.text_hidden_size,
                         "rms_norm_eps": self.rms_norm_eps},
            spatial_merge_size=self.spatial_merge_size,
            projector_hidden_act=self.projector_hidden_act,
            multimodal_projector_bias=self.multimodal_projector_bias,
            vision_feature_layer=list(layer) if isinstance(layer, tuple) else layer)


def vision_spec_from_dict(raw: dict[str, Any]) -> VisionSpec:
    """Read the vision fields of a VLM ``config.json``; ValueError names the field."""
    vision = raw.get("vision_config")
    if not isinstance(vision, dict):
        raise ValueError(f"vision_config must be an object (the Pixtral tower's "
                         f"config); got {vision!r}")
    kind = vision.get("model_type", "pixtral")
    if kind != "pixtral":
        raise ValueError(f"vision_config.model_type must be 'pixtral'; got {kind!r}")
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        value = vision.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"vision_config.{name} must be an integer >= 1; got {value!r}")
    merge = raw.get("spatial_merge_size", 2)
    if isinstance(merge, bool) or not isinstance(merge, int) or merge < 1:
        raise ValueError(f"spatial_merge_size must be an integer >= 1; got {merge!r}")
    layer = raw.get("vision_feature_layer", -1)
    if isinstance(layer, list):
        layer = tuple(int(x) for x in layer)
    elif isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer must be an integer or a list of "
                         f"integers; got {layer!r}")
    return VisionSpec(
        vision_json=json.dumps(vision, sort_keys=True),
        text_hidden_size=int(raw["hidden_size"]),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        spatial_merge_size=merge,
        projector_hidden_act=str(raw.get("projector_hidden_act", "gelu")),
        multimodal_projector_bias=bool(raw.get("multimodal_projector_bias", False)),
        vision_feature_layer=layer,
    )
