"""Image input for NLD-VLM checkpoints (Nemotron-Labs-Diffusion-VLM): the vision config,
image loading and preprocessing, prompt building and the engine glue. The vision tower and
projector live in ``model/vision.py``; the tiny test checkpoint in ``checkpoint/tiny_vlm.py``.

The decoder is the text model unchanged; an image only changes the embeddings of its
``<|image_pad|>`` prompt positions during the causal prefill (docs: spec "vlm-tp-quant" 1).
"""

from .config import VisionSpec
from .image import ImageError, ImageInput

__all__ = ["VisionSpec", "ImageError", "ImageInput"]
