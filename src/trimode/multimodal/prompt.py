"""Chat messages with image content parts -> prompt ids with image token blocks + images.

Accepted content: a string, or a list of OpenAI-style parts: ``{"type": "text", "text"}``,
``{"type": "image_url", "image_url": {"url": URL}}`` (``data:`` URLs, local paths,
``file://``; remote URLs are refused) and ``{"type": "image", "image": PIL.Image | path |
bytes}``. Parts are joined in order (text parts with nothing between them, as trimode's
server does); each image becomes the ``<|image_start|>`` token in the text the chat template
renders, and after tokenization each start token is expanded into the image's full block
(spec vlm-tp-quant 1.5: the template emits one start per image, the processor expands it).
Knows nothing about the engine.
"""

from __future__ import annotations

from ..model.config import CheckpointError
from .config import IMAGE_TOKENS, VisionSpec
from .image import ImageError, ImageInput, ImageLimits, load_image
from .preprocess import image_token_ids, preprocess, require_cv2


def split_messages(messages: list[dict]) -> tuple[list[dict], list[tuple[str, object]]]:
    """(messages with string contents and an image marker per image, [(name, source)]).
    Raises ValueError naming ``messages[i].content[j]`` for an unknown part."""
    if not isinstance(messages, list):
        raise ValueError("messages must be a list of {'role', 'content'} dicts")
    flat, sources = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            flat.append(m)
            continue
        text = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                text.append(part["text"])
            elif kind in ("image_url", "image"):
                sources.append((where, _source(part, kind, where)))
                text.append(IMAGE_TOKENS[0])
            else:
                raise ValueError(f"{where} must be a text, image_url or image part; got "
                                 f"{str(part)[:80]!r}")
        flat.append({**m, "content": "".join(text)})
    return flat, sources


def _source(part: dict, kind: str, where: str):
    value = part.get(kind)
    if kind == "image_url" and isinstance(value, dict):
        value = value.get("url")
    if value is None or (isinstance(value, str) and not value):
        raise ValueError(f"{where}.{kind} must hold the image ({'a url' if kind == 'image_url' else 'a PIL image or path'})")
    return value


def load_images(sources: list[tuple[str, object]], spec: VisionSpec,
                limits: ImageLimits = ImageLimits()) -> list[ImageInput]:
    """Decode and preprocess every image; raises ImageError naming the part at fault."""
    if len(sources) > limits.max_images:
        raise ImageError(f"{len(sources)} images in one request; at most {limits.max_images}")
    return [preprocess(load_image(src, limits, where), spec.longest_edge, spec.cell)
            for where, src in sources]


def expand_image_blocks(ids: list[int], images: list[ImageInput], spec: VisionSpec) -> list[int]:
    """Replace the k-th ``<|image_start|>`` id in ``ids`` by image k's full token block.
    Raises ValueError when the counts differ (e.g. a literal start token in user text)."""
    starts = [i for i, t in enumerate(ids) if t == spec.image_start_id]
    if len(starts) != len(images):
        raise ValueError(f"messages: the prompt has {len(starts)} image start tokens for "
                         f"{len(images)} images (is {IMAGE_TOKENS[0]} written in the text?)")
    out, last = [], 0
    for at, image in zip(starts, images):
        out += ids[last:at] + image_token_ids(image.rows, image.cols, spec.token_ids)
        last = at + 1
    return out + ids[last:]


def chat_prompt(tokenizer, spec: VisionSpec | None, messages: list[dict],
                limits: ImageLimits = ImageLimits(),
                template_kwargs: dict | None = None) -> tuple[list[int], list[ImageInput]]:
    """Prompt ids and images of a conversation (text-only conversations: no images);
    ``template_kwargs``: the chat template's extra variables (``chat_template_kwargs``)."""
    flat, sources = split_messages(messages)
    if sources and spec is None:
        raise ValueError("messages contain images, but this checkpoint reads text only "
                         "(images need an NLD-VLM checkpoint)")
    images = load_images(sources, spec, limits) if sources else []
    ids = tokenizer.apply_chat_template(flat, template_kwargs)
    return (expand_image_blocks(ids, images, spec) if spec is not None else ids), images


def check_tokenizer(tokenizer, spec: VisionSpec) -> None:
    """Fail fast when the tokenizer's image tokens are not the ids the model expects, or
    OpenCV (for preprocessing) is missing."""
    require_cv2()
    for name, want in zip(IMAGE_TOKENS, spec.token_ids):
        got = tokenizer.hf.convert_tokens_to_ids(name)
        if got != want:
            raise CheckpointError(f"tokenizer: {name} has id {got}; the NLD-VLM image scheme "
                             f"needs {want}")
