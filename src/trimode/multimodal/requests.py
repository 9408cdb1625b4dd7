"""Engine glue for image requests: checks, the prefill Step with image features, and the keys
prefix sharing compares.

An image request is an ordinary prompt whose ``<|image_pad|>`` ids get the image's features
as input embeddings during the causal prefill; every later forward (ar, diffusion,
linear_spec, quadratic_spec) runs on the cached prefix unchanged (spec vlm-tp-quant 1.7).
Pad ids are equal for every image, so prefix sharing compares (pad, image digest, index)
instead of the bare id: different images never share KV. Knows nothing about scheduling.
"""

from __future__ import annotations

import torch

from ..decoding.sequence import Sequence, Step
from .image import ImageInput


def check_images(model, prompt_ids: list[int], images: list[ImageInput] | None) -> None:
    """Raise ValueError unless ``images`` fit ``prompt_ids`` on ``model``: a vision tower is
    present, and the prompt's pad tokens number exactly the images' features."""
    encoder = getattr(model, "image_encoder", None)
    if not images:
        if encoder is not None:
            pads = prompt_ids.count(encoder.spec.image_pad_id)
            if pads:
                raise ValueError(f"prompt has {pads} image pad tokens (id "
                                 f"{encoder.spec.image_pad_id}) but no image")
        return
    if encoder is None:
        raise ValueError("images need a vision-language checkpoint (NLD-VLM); this model "
                         "reads text only")
    if not all(isinstance(im, ImageInput) for im in images):
        raise ValueError("images must be ImageInput objects (trimode.multimodal.preprocess)")
    pads = prompt_ids.count(encoder.spec.image_pad_id)
    need = sum(im.num_features for im in images)
    if pads != need:
        raise ValueError(f"prompt has {pads} image pad tokens (id {encoder.spec.image_pad_id}) "
                         f"but its {len(images)} image(s) give {need} features")


def attach_features(model, seq: Sequence, images: list[ImageInput] | None) -> None:
    """Run the vision tower (or reuse its cache) for ``seq``'s images: ``[n_pads, d]``."""
    seq.images = list(images) if images else None
    if seq.images:
        encoder = model.image_encoder
        seq.image_pad_id = encoder.spec.image_pad_id
        seq.image_features = torch.cat([encoder.features(im) for im in seq.images])


def prefill_step(seq: Sequence, shared: int, model, stop: int | None = None) -> Step:
    """The prefill of ``seq``'s prompt after its first ``shared`` (prefix-cached) tokens,
    with image features at the remaining pad positions; with ``stop``, of its prompt +
    generated text ``shared .. stop - 1`` (a preempted request's recompute)."""
    tokens = seq.prompt_ids[shared:] if stop is None else (seq.prompt_ids + seq.generated)[shared:stop]
    if seq.image_features is None:
        return Step(tokens, "prefill")
    pad = model.image_encoder.spec.image_pad_id
    done = seq.prompt_ids[:shared].count(pad)
    positions = tuple(i for i, t in enumerate(tokens) if t == pad)
    if not positions:
        return Step(tokens, "prefill")
    return Step(tokens, "prefill", embeds=seq.image_features[done:], embed_positions=positions)


def share_keys(seq: Sequence) -> list:
    """What prefix sharing compares: the prompt ids, with each image pad replaced by
    (id, image digest, feature index) so equal ids of different images never match."""
    keys = seq.share_keys
    if keys is not None:
        return keys
    if not seq.images:
        keys = seq.prompt_ids
    else:
        owners = [(im.digest, k) for im in seq.images for k in range(im.num_features)]
        it = iter(owners)
        pad = seq.image_pad_id
        keys = [(t, *next(it)) if t == pad else t for t in seq.prompt_ids]
    seq.share_keys = keys
    return keys
