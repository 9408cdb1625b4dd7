"""Helpers for the NLD-VLM tests: random test images, and the slow reference built from
transformers' Pixtral tower, Mistral3 projector and ``Ministral3ForCausalLM`` with the image
features spliced by hand at the ``<|image_pad|>`` positions (spec vlm-tp-quant 1.6).

``SplicedOracle`` makes the text reference decoders of ``reference.py`` (and
``test_quadratic.ref_quadratic``) image-aware: every full-sequence forward it runs gets the
image features at the prompt's pad positions, exactly as the remote ``_embed_with_vision``.
"""

from __future__ import annotations

import numpy as np
import torch

from trimode.multimodal.preprocess import preprocess

PAD = 19


def random_image(seed: int, height: int = 60, width: int = 90, mode: str = "RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), dtype=np.uint8), mode)


@torch.no_grad()
def reference_features(tower, projector, images) -> torch.Tensor:
    """All images' features ``[sum rows*cols, d]``: one packed tower run over the images
    zero-padded bottom-right to the largest (``image_sizes`` crops them), as the remote code."""
    inputs = [preprocess(im) for im in images]
    h = max(x.pixel_values.shape[1] for x in inputs)
    w = max(x.pixel_values.shape[2] for x in inputs)
    pixels = torch.zeros(len(inputs), 3, h, w)
    for i, x in enumerate(inputs):
        pixels[i, :, : x.pixel_values.shape[1], : x.pixel_values.shape[2]] = x.pixel_values
    sizes = torch.tensor([list(x.pixel_values.shape[1:]) for x in inputs])
    hidden = tower(pixels, image_sizes=sizes, output_hidden_states=True).hidden_states[-1]
    return projector(hidden.squeeze(0), sizes)


class SplicedOracle:
    """Calls ``lm`` on ``inputs_embeds`` with ``features`` at the pad positions of ``prompt``."""

    def __init__(self, lm, prompt: list[int], features: torch.Tensor):
        self.lm, self.prompt, self.features = lm, list(prompt), features
        self.positions = [i for i, t in enumerate(prompt) if t == PAD]
        assert len(self.positions) == features.shape[0]

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        assert input_ids[0, : len(self.prompt)].tolist() == self.prompt
        embeds = self.lm.model.embed_tokens(input_ids).clone()
        embeds[0, self.positions] = self.features
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask,
                       position_ids=position_ids)
