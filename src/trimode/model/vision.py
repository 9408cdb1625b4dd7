"""The NLD-VLM vision side: transformers' ``PixtralVisionModel`` and
``Mistral3MultiModalProjector`` (RMSNorm, 2x2 patch merger, linear-GELU-linear), attached to
the decoder as ``encoder.vision_tower`` and ``encoder.multi_modal_projector`` so their
parameter names are the checkpoint's (spec vlm-tp-quant 1.3, 1.6, 1.8).

``ImageEncoder.features`` runs the tower once per image (its own 2-D RoPE grid, so a packed
multi-image run gives the same rows) and keeps the last few results keyed by the image's
digest. Knows nothing about prompts or decoding.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..multimodal.config import VisionSpec
from ..multimodal.image import ImageInput


def attach_vision(net: nn.Module, spec: VisionSpec) -> None:
    """Add the tower and projector to ``net.encoder`` (built on the current device, e.g.
    ``meta`` inside the loader) and an :class:`ImageEncoder` as ``net.image_encoder``."""
    from transformers import PixtralVisionModel
    from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

    net.encoder.vision_tower = PixtralVisionModel(spec.pixtral_config())
    net.encoder.multi_modal_projector = Mistral3MultiModalProjector(spec.mistral3_config())
    net.image_encoder = ImageEncoder(net, spec)


def materialize_vision_buffers(net: nn.Module, spec: VisionSpec) -> None:
    """Recompute the tower's RoPE frequencies (non-persistent buffers, left on ``meta`` when
    the model was built there) on the CPU; ``net.to(device)`` moves them with the rest."""
    from transformers.models.pixtral.modeling_pixtral import PixtralVisionRotaryEmbedding

    with torch.device("cpu"):
        net.encoder.vision_tower.patch_positional_embedding = \
            PixtralVisionRotaryEmbedding(spec.pixtral_config())


class ImageEncoder:
    """Image -> projected features ``[rows * cols, hidden_size]`` in the model's dtype, rows
    in the order of the image's pad tokens (row-major over the 28-px cells)."""

    def __init__(self, net: nn.Module, spec: VisionSpec, keep: int = 16):
        self.net, self.spec, self.keep = net, spec, keep
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.inference_mode()
    def features(self, image: ImageInput) -> torch.Tensor:
        cached = self._cache.get(image.digest)
        if cached is not None:
            self._cache.move_to_end(image.digest)
            return cached
        out = self._encode(image)
        if out.shape[0] != image.num_features:
            raise RuntimeError(f"the vision tower gave {out.shape[0]} features for a "
                               f"{image.rows}x{image.cols} image")
        self._cache[image.digest] = out
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return out

    def _encode(self, image: ImageInput) -> torch.Tensor:
        encoder = self.net.encoder
        tower, projector = encoder.vision_tower, encoder.multi_modal_projector
        weight = tower.patch_conv.weight
        pixels = image.pixel_values[None].to(device=weight.device, dtype=weight.dtype)
        sizes = torch.tensor([list(pixels.shape[-2:])], device=weight.device)
        layer = self.spec.vision_feature_layer
        out = tower(pixels, image_sizes=sizes, output_hidden_states=True)
        if isinstance(layer, int):
            hidden = out.hidden_states[layer]
        else:
            hidden = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        return projector(hidden.squeeze(0), sizes).to(self.net.dtype)
