"""Images from OpenAI chat content parts, decoded safely and bounded, each with a content hash.

A part `{"type": "image_url", "image_url": {"url": ...}}` carries a `data:` URI (base64 PNG,
JPEG, WebP or GIF, whose first frame is taken) or, only where the operator lists the URL's host
in `allowed_media_domains`, an http(s) URL fetched by media_fetch.py. Every refusal is an
OpenAIError 400 naming the limit and the way out, which the ingress renders in OpenAI's format.

Everything here blocks (base64, Pillow's decode, the fetch, the hash): the ingress calls it in a
worker thread (STYLE habit 15), as it renders templates, never on the event loop.
"""

import base64
import binascii
import hashlib
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from qwen35_ray.model.image_processor import MAX_ASPECT_RATIO, QWEN35_PREPROCESSOR, to_rgb
from qwen35_ray.serving.errors import OpenAIError
from qwen35_ray.serving.media_fetch import fetch, is_public_address

# Pillow names of the formats we decode; Image.open tries only these, so no other parser (EPS
# would start Ghostscript) ever reads a client's bytes
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
MEDIA_TYPES = {*FORMATS.values(), "image/jpg"}
# a type that says nothing about the bytes, which are then sniffed (S3 serves objects stored
# without a type as binary/octet-stream)
UNTYPED = {"", "application/octet-stream", "binary/octet-stream"}
_DATA_URI = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on the images of one request (STYLE habit 16); the ingress builds it from the
    app config. Defaults and why:

    - limit_mm_per_prompt 8: vLLM's default (999) leaves the count to the context length, but
      each image here is decoded whole before any token is counted: 8 images at max_pixels are
      at most 8 x 16.8 MP x 3 bytes = 400 MB of RGB per request, and 8 x 16,384 = 131,072
      tokens, half the 262,144-token context, so it binds only on abuse.
    - max_pixels 16,777,216: the processor's own maximum (Qwen3.5's preprocessor_config
      longest_edge); a larger image is resized down to it anyway, so more only costs decode
      memory. Checked from the header, before the pixels are decoded.
    - max_image_bytes 20 MiB: OpenAI's documented per-image limit (a data URI is also inside
      the request body, which max_request_bytes bounds first).
    - fetch_timeout_s 5: vLLM's VLLM_IMAGE_FETCH_TIMEOUT; for the whole fetch, redirects too.
    - max_redirects 3: an image CDN needs one or two (http -> https, a signed URL); each hop
      is checked again (scheme, host, addresses).
    - allowed_media_domains empty: no URL is fetched unless the operator lists its host (exact,
      case-insensitive match; a subdomain must be listed itself).
    """

    limit_mm_per_prompt: int = 8
    max_pixels: int = QWEN35_PREPROCESSOR["size"]["longest_edge"]
    max_image_bytes: int = 20 * 2**20
    allowed_media_domains: tuple[str, ...] = ()
    fetch_timeout_s: float = 5.0
    max_redirects: int = 3


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB
    # sha256 of the size and RGB pixels: the key of prefix-cache blocks and the encoder cache
    digest: str


def image_digest(rgb: Image.Image) -> str:
    """sha256 over 'WxH:' and the RGB bytes: the same picture in PNG or WebP (lossless) hashes
    the same, a different picture of the same size does not."""
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def image_parts(messages: Sequence[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(where, part) of each image_url part of OpenAI chat messages, in prompt order."""
    found = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    found.append((f"messages[{i}].content[{j}]", part))
    return found


def load_images(
    messages: Sequence[dict[str, Any]],
    limits: MediaLimits,
    address_ok: Callable = is_public_address,
) -> list[LoadedImage]:
    """The images of a chat request in prompt order; the count is checked before any is read.
    address_ok is for tests only (a local server); the default refuses non-public addresses."""
    parts = image_parts(messages)
    check_count(len(parts), limits)
    return [load_image(part, limits, where, address_ok) for where, part in parts]


def check_count(n: int, limits: MediaLimits) -> None:
    if n > limits.limit_mm_per_prompt:
        raise OpenAIError(
            f"the request has {n} images; limit_mm_per_prompt allows "
            f"{limits.limit_mm_per_prompt} per request; send fewer images or raise "
            "limit_mm_per_prompt in the app config",
            param="messages",
        )


def load_image(
    part: dict[str, Any],
    limits: MediaLimits,
    where: str = "image_url",
    address_ok: Callable = is_public_address,
) -> LoadedImage:
    """One image_url part -> its RGB image and digest, or an OpenAIError 400."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    param = f"{where}.image_url"
    if not isinstance(url, str) or not url:
        raise OpenAIError(
            f"{param} must be {{'url': 'data:image/png;base64,...'}} or an http(s) URL",
            param=param,
        )
    if url[:5].lower() == "data:":
        media_type, data = _decode_data_uri(url, limits, param)
    elif url.split(":", 1)[0].lower() in ("http", "https"):
        media_type, data = fetch(url, limits, param, address_ok)
    else:
        raise OpenAIError(
            f"{param}.url must be a data: URI or an http(s) URL, got scheme "
            f"{url.split(':', 1)[0][:16]!r}",
            param=param,
        )
    return decode_image(data, media_type, limits, param)


def image_from_pil(image: Image.Image, limits: MediaLimits, where: str = "image") -> LoadedImage:
    """A PIL image given through the Python API, held to the same pixel limit."""
    _check_pixels(image.width, image.height, limits, where)
    rgb = to_rgb(image)
    return LoadedImage(rgb, image_digest(rgb))


def _decode_data_uri(url: str, limits: MediaLimits, param: str) -> tuple[str, bytes]:
    head = _DATA_URI.match(url[:256])
    if head is None:
        raise OpenAIError(f"{param}.url is not a data URI (data:<type>;base64,<data>)", param=param)
    params = [p.strip().lower() for p in head["params"].split(";") if p.strip()]
    if "base64" not in params:
        raise OpenAIError(
            f"{param}.url: only base64 data URIs are accepted (data:image/png;base64,...)",
            param=param,
        )
    payload = url[head.end() :]
    # 4 base64 characters per 3 bytes: refuse before decoding anything
    if (len(payload) // 4) * 3 > limits.max_image_bytes + 3:
        raise _too_many_bytes((len(payload) // 4) * 3, limits, param)
    try:
        data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as e:
        raise OpenAIError(
            f"{param}.url: the data URI is not valid base64 ({e})", param=param
        ) from None
    if len(data) > limits.max_image_bytes:
        raise _too_many_bytes(len(data), limits, param)
    return head["type"].strip().lower(), data


def _too_many_bytes(n: int, limits: MediaLimits, param: str) -> OpenAIError:
    return OpenAIError(
        f"{param}: the image is {n:,} bytes; max_image_bytes allows {limits.max_image_bytes:,}; "
        "send a smaller image or raise max_image_bytes in the app config",
        param=param,
    )


def check_media_type(media_type: str, param: str) -> None:
    """Refuse a declared type that is not one of ours. The bytes decide the format: clients
    commonly label every image image/jpeg, so a PNG so labelled is decoded as the PNG it is."""
    base = media_type.split(";", 1)[0].strip().lower()
    if base not in MEDIA_TYPES and base not in UNTYPED:
        raise OpenAIError(
            f"{param}: media type {base[:64]!r} is not supported; send PNG, JPEG, WebP or GIF "
            f"({', '.join(sorted(FORMATS.values()))})",
            param=param,
        )


def decode_image(data: bytes, media_type: str, limits: MediaLimits, param: str) -> LoadedImage:
    """Encoded bytes -> RGB (a GIF's or animated WebP's first frame) and its digest."""
    check_media_type(media_type, param)
    not_image = OpenAIError(f"{param}: the data is not a PNG, JPEG, WebP or GIF image", param=param)
    try:
        # reads the header only; Pillow's own bomb guard (Image.MAX_IMAGE_PIXELS) is process
        # wide, so our limit is checked here, from the header, before load() decodes pixels
        image = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError:
        raise _too_many_pixels(None, limits, param) from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise not_image from None
    _check_pixels(image.width, image.height, limits, param)
    try:
        image.load()
        rgb = to_rgb(image)
    except Image.DecompressionBombError:
        raise _too_many_pixels(None, limits, param) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise OpenAIError(
            f"{param}: the {image.format} image is damaged ({e})", param=param
        ) from None
    return LoadedImage(rgb, image_digest(rgb))


def _check_pixels(width: int, height: int, limits: MediaLimits, param: str) -> None:
    if width * height > limits.max_pixels:
        raise _too_many_pixels((width, height), limits, param)
    # the processor refuses these too (smart_resize), later and as a plain ValueError
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise OpenAIError(
            f"{param}: the image is {width}x{height} pixels, an aspect ratio past "
            f"{MAX_ASPECT_RATIO}; crop or pad it",
            param=param,
        )


def _too_many_pixels(size: tuple[int, int] | None, limits: MediaLimits, param: str):
    if size is not None:
        what = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"
    else:
        # Pillow's guard refused it while reading the header: past twice Image.MAX_IMAGE_PIXELS
        what = f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels"
    return OpenAIError(
        f"{param}: the image has {what}; max_pixels allows {limits.max_pixels:,} per image; "
        "downscale it (the model sees at most that many) or raise max_pixels in the app config",
        param=param,
    )
