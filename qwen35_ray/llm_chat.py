"""OpenAI-format chat messages for the offline LLM.chat: the prompt text the chat template
renders and the images of the conversation in order.

Image parts: `{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}` (decoded
under serving/media.py's default limits; http(s) URLs are fetched only from hosts given in
`allowed_media_domains`), or a PIL image as `{"type": "image_pil", "image_pil": image}` (vLLM's
spelling) or `{"type": "image", "image": image}` (transformers'). Each becomes the one
`<|vision_start|><|image_pad|><|vision_end|>` the template writes; the engine expands it.
"""

from dataclasses import replace
from typing import Any

from PIL import Image

from qwen35_ray.serving.errors import OpenAIError
from qwen35_ray.serving.media import MediaLimits, image_from_pil, load_image

PIL_PARTS = ("image_pil", "image")


def chat_images(
    messages: list[dict[str, Any]], allowed_media_domains: tuple[str, ...] = ()
) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """(messages with every image part as the template reads it, the images in order).
    ValueError for a part that is not an image the engine can take."""
    limits = replace(MediaLimits(), allowed_media_domains=tuple(allowed_media_domains))
    out, images = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"messages[{i}].content[{j}]"
            try:
                if kind == "image_url":
                    images.append(load_image(part, limits, where).image)
                elif kind in PIL_PARTS and isinstance(part.get(kind), Image.Image):
                    images.append(image_from_pil(part[kind], limits, where).image)
                elif kind == "text":
                    parts.append(part)
                    continue
                else:
                    raise ValueError(
                        f"{where} has type {kind!r}: content parts are text, image_url "
                        "(data: URIs), image_pil or image (PIL images); no video or audio"
                    )
            except OpenAIError as e:
                raise ValueError(e.message) from None
            parts.append({"type": "image"})
        out.append({**m, "content": parts})
    return out, images
