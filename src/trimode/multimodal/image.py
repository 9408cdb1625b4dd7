"""Turning what a caller sends (a ``data:`` URL, a local path, a PIL image, bytes) into a
checked RGB image, under size limits.

Rules (spec vlm-tp-quant 1.4 step 1): convert to RGB with transparent pixels composited onto
white; no EXIF rotation (the remote loader applies none). Every failure is an
:class:`ImageError` (a ValueError) naming the image and the limit, never a crash: a truncated
or undecodable file, a 0-pixel side, a side over ``max_side``, more pixels than
``max_pixels``, more bytes than ``max_bytes``, or a remote URL (trimode never fetches).
Knows nothing about the model.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch


class ImageError(ValueError):
    """An image that cannot be used; the message names which image and why."""


@dataclass(frozen=True)
class ImageLimits:
    """max_images per request; max_bytes of one encoded image; max_side and max_pixels of
    one decoded image (checked from the header, before decoding the pixels); local_files:
    whether paths and ``file://`` URLs are read (never for the server's clients)."""

    max_images: int = 8
    max_bytes: int = 20 * 2**20
    max_side: int = 10_000
    max_pixels: int = 40_000_000
    local_files: bool = True


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One preprocessed image: ``pixel_values`` ``[3, H, W]`` float32 (CLIP-normalised, H and
    W multiples of the cell), its (rows, cols) token grid and a sha256 ``digest`` of the
    pixels and grid (the key for prefix sharing and the feature cache)."""

    pixel_values: torch.Tensor
    rows: int
    cols: int
    digest: str

    @property
    def num_features(self) -> int:
        return self.rows * self.cols


def load_image(source, limits: ImageLimits = ImageLimits(), name: str = "image"):
    """A PIL RGB image from ``source``: a PIL image, raw bytes, a ``data:image/...;base64,``
    URL, a ``file://`` URL or a local path. Raises ImageError naming ``name``."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return _to_rgb(_check_size(source, limits, name))
    if isinstance(source, (bytes, bytearray)):
        return _decode(bytes(source), limits, name)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise ImageError(f"{name} must be a data: URL, a local path or a PIL image; "
                         f"got {type(source).__name__}")
    if source.startswith("data:"):
        return _decode(_data_url_bytes(source, name), limits, name)
    if source.startswith(("http://", "https://", "ftp://")):
        raise ImageError(f"{name}: remote URLs are not fetched; send the image as a "
                         "data:image/...;base64 URL")
    if not limits.local_files:
        raise ImageError(f"{name}: only data:image/...;base64 URLs are accepted here")
    path = Path(source[len("file://"):] if source.startswith("file://") else source).expanduser()
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"{name}: cannot read {str(path)!r} ({exc.strerror or exc})") from None
    if size > limits.max_bytes:
        raise ImageError(f"{name}: {size} bytes; at most {limits.max_bytes} bytes per image")
    return _decode(path.read_bytes(), limits, name)


def _data_url_bytes(url: str, name: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageError(f"{name}: a data URL must look like data:image/png;base64,<data>; "
                         f"got {url[:40]!r}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{name}: the data URL's base64 payload is invalid") from None


def _decode(data: bytes, limits: ImageLimits, name: str):
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise ImageError(f"{name}: {len(data)} bytes; at most {limits.max_bytes} bytes per image")
    try:
        img = Image.open(io.BytesIO(data))
        _check_size(img, limits, name)
        img.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: cannot decode the image ({type(exc).__name__}: {exc})") from None
    return _to_rgb(img)


def _check_size(img, limits: ImageLimits, name: str):
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"{name}: the image is {w}x{h} pixels; both sides must be >= 1")
    if max(w, h) > limits.max_side:
        raise ImageError(f"{name}: the image is {w}x{h} pixels; each side must be at most "
                         f"{limits.max_side}")
    if w * h > limits.max_pixels:
        raise ImageError(f"{name}: the image has {w * h} pixels; at most {limits.max_pixels}")
    return img


def _to_rgb(img):
    """RGB, with any transparency composited onto white (spec 1.4 step 1)."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
