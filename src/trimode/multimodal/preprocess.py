"""NLD-VLM image preprocessing and the image token block (spec vlm-tp-quant 1.4).

Not transformers' ``PixtralImageProcessor`` (it floors when downscaling and resizes with
PIL): the remote processor caps the longest edge at ``longest_edge`` with Python ``round``,
rounds each side *up* to a multiple of the cell (patch 14 x merge 2 = 28 px), resizes with
OpenCV ``INTER_CUBIC`` in float32, and normalises with the CLIP mean and std. Each image
becomes ``<|image_start|>``, then rows of ``cols`` ``<|image_pad|>`` separated by
``<|image_break|>``, with ``<|image_end|>`` in place of the last break: 1 + rows * (cols + 1)
tokens, rows * cols of them pads. Knows nothing about the model's weights.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .image import ImageInput

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def target_size(height: int, width: int, longest_edge: int = 1400, cell: int = 28) -> tuple[int, int]:
    """(H, W) in pixels an image of ``height`` x ``width`` is resized to."""
    longest = max(height, width)
    if longest > longest_edge:
        # one rounding of the exact ratio, half to even as Python's round
        height = max(1, round(height * longest_edge / longest))
        width = max(1, round(width * longest_edge / longest))
    return -(-height // cell) * cell, -(-width // cell) * cell


def grid_size(height: int, width: int, longest_edge: int = 1400, cell: int = 28) -> tuple[int, int]:
    """(rows, cols) of image tokens for an image of ``height`` x ``width`` pixels."""
    h, w = target_size(height, width, longest_edge, cell)
    return h // cell, w // cell


def image_token_ids(rows: int, cols: int, ids: tuple[int, int, int, int] = (18, 19, 20, 21)) -> list[int]:
    """The token block of one image: start, rows of pads joined by breaks, end."""
    start, pad, brk, end = ids
    out = [start]
    for r in range(rows):
        out += [pad] * cols + [end if r == rows - 1 else brk]
    return out


def require_cv2():
    """OpenCV (the remote processor's resize); ImportError naming the extra to install."""
    try:
        import cv2
    except ImportError:
        raise ImportError("image input needs OpenCV: pip install 'trimode[vlm]' "
                          "(opencv-python-headless)") from None
    return cv2


def preprocess(img, longest_edge: int = 1400, cell: int = 28) -> ImageInput:
    """A PIL RGB image -> :class:`ImageInput` (``pixel_values`` ``[3, H, W]`` float32)."""
    cv2 = require_cv2()

    pixels = np.asarray(img.convert("RGB"), dtype=np.float32)  # [h, w, 3], 0..255
    h, w = target_size(pixels.shape[0], pixels.shape[1], longest_edge, cell)
    if (h, w) != pixels.shape[:2]:
        pixels = cv2.resize(pixels, (w, h), interpolation=cv2.INTER_CUBIC)
    pixels = (pixels / 255.0 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32))
    digest = hashlib.sha256(tensor.numpy().tobytes() + f"{h}x{w}".encode()).hexdigest()
    return ImageInput(tensor, h // cell, w // cell, digest)
