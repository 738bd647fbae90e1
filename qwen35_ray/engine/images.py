"""A prompt's images in the engine: pixels prepared, pad tokens expanded, positions computed once
at admission, and the vision tower's output held on the sequence while its prefill runs.

The chat template writes one `<|image_pad|>` per image (inside <|vision_start|> ...
<|vision_end|>); each becomes the image's `image_tokens(grid)` pads here. A prompt already
holding every image's pads is taken as it is.

Legend: P = prompt tokens, N = patches, n = image tokens of the prompt, H = hidden size.
"""

import contextlib
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from qwen35_ray.engine.errors import RequestError
from qwen35_ray.model.image_processor import ImageProcessorConfig, preprocess, to_rgb
from qwen35_ray.model.mrope import continuation_positions, mrope_positions


@dataclass
class PromptImages:
    pixel_values: torch.Tensor  # [N, C*T*P*P] fp32, the vision tower's input
    grid_thw: torch.Tensor  # [images, 3]
    digests: list[bytes]  # SHA-256 of each image's size and RGB bytes: its prefix-cache identity
    spans: list[tuple[int, int]]  # prompt rows [start, end) of each image's pad tokens
    mrope: torch.Tensor  # [3, P] the prompt's (t, h, w) positions
    rope_delta: int  # a token past the prompt sits at index + rope_delta on every axis
    embeds: torch.Tensor | None = None  # [n, H] the tower's output, while prefill runs

    @property
    def rows(self) -> torch.Tensor:  # [n] prompt rows of the image tokens, ascending
        return torch.cat([torch.arange(s, e) for s, e in self.spans])

    def rope(self, start: int, end: int) -> torch.Tensor:
        """Positions [3, end - start] of tokens start .. end-1 (past the prompt: index +
        delta)."""
        P = self.mrope.shape[1]
        head = self.mrope[:, start:end]
        if end <= P:
            return head
        tail = continuation_positions(max(start, P), end - max(start, P), self.rope_delta)
        return torch.cat([head, tail], dim=1)

    def overlaps(self, start: int, end: int) -> bool:
        """Tokens start .. end-1 hold image tokens."""
        return any(s < end and start < e for s, e in self.spans)

    def embeds_of(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows within the chunk [k] long, values [k, H]) of the image tokens among tokens
        start .. end-1; `embeds` must be set."""
        rows = self.rows
        lo, hi = (int(torch.searchsorted(rows, x)) for x in (start, end))
        return rows[lo:hi] - start, self.embeds[lo:hi]

    def block_keys(self, block_size: int, num_blocks: int) -> list[bytes]:
        """Per prompt block, the digests of the images whose tokens it holds (b"" for none):
        folded into the block's prefix-cache hash, so only the same pixels share a block."""
        keys = []
        for b in range(num_blocks):
            start, end = b * block_size, (b + 1) * block_size
            keys.append(b"".join(d for d, (s, e) in zip(self.digests, self.spans)
                                 if s < end and start < e))  # fmt: skip
        return keys


def prepare_images(
    prompt_token_ids: list[int],
    images: Sequence[Image.Image],
    processor: ImageProcessorConfig,
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[list[int], PromptImages]:
    """(the prompt with each image's pad tokens expanded, its PromptImages). RequestError when
    the prompt's `<|image_pad|>` tokens do not match the images."""
    inputs = preprocess(images, processor)
    pads = [i for i, t in enumerate(prompt_token_ids) if t == image_token_id]
    if len(pads) == len(images):
        ids = []
        for i, t in enumerate(prompt_token_ids):
            if t != image_token_id:
                ids.append(t)
                continue
            ids.extend([image_token_id] * inputs.tokens[pads.index(i)])
    elif len(pads) == sum(inputs.tokens):
        ids = list(prompt_token_ids)
    else:
        raise RequestError(
            f"the prompt has {len(pads)} <|image_pad|> tokens for {len(images)} images; give "
            "one per image (as the chat template writes them) or each image's full run of "
            f"{inputs.tokens} tokens"
        )
    try:
        mrope, delta = mrope_positions(ids, inputs.grid_thw, image_token_id, spatial_merge_size)
    except ValueError as e:
        raise RequestError(str(e)) from e
    spans, start = [], 0
    for n in inputs.tokens:
        start = ids.index(image_token_id, start)
        spans.append((start, start + n))
        start += n
    digests = [image_digest(image) for image in images]
    return ids, PromptImages(inputs.pixel_values, inputs.grid_thw, digests, spans, mrope, delta)


def image_digest(image: Image.Image) -> bytes:
    """SHA-256 of an image's size and RGB bytes: equal digests give equal pixels (the
    processor is a function of them) at a fraction of the cost of hashing the patches."""
    rgb = to_rgb(image)
    return hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).digest()


class PrepCounters:
    """Images prepared at admission (pixels, pad tokens, positions) and the seconds it took;
    prepare_images runs in worker threads (AsyncEngine), so the counts take a lock."""

    def __init__(self):
        self.images, self.seconds = 0, 0.0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def timing(self, n: int):
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self.images += n
                self.seconds += time.perf_counter() - start

    def stats(self) -> dict:
        with self._lock:
            return {
                "images_preprocessed_total": self.images,
                "image_preprocess_seconds_total": self.seconds,
            }


class EncoderCache:
    """The vision tower's output per image digest, least recently used first out, at most
    `max_bytes` in all: a conversation that resends its images does not re-encode them.
    It counts hits and misses (images the tower ran on) and the seconds spent in the tower
    (host wall time: on a GPU the tower's last kernels may still be queued when it returns)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0  # images
        self.tower_seconds = 0.0

    def encode(self, images: PromptImages, tower: Callable) -> torch.Tensor:
        """The output [n, H] for all of a prompt's images; `tower(pixel_values, grid_thw)`
        runs once, over the images not held."""
        grids = images.grid_thw.tolist()
        offsets = [0]
        for t, h, w in grids:
            offsets.append(offsets[-1] + t * h * w)
        parts: dict[int, torch.Tensor] = {}
        for i, d in enumerate(images.digests):
            if d in self.entries:
                self.entries.move_to_end(d)
                parts[i] = self.entries[d]
        missing = [i for i in range(len(grids)) if i not in parts]
        self.hits += len(parts)
        self.misses += len(missing)
        if missing:
            pixels = torch.cat([images.pixel_values[offsets[i] : offsets[i + 1]] for i in missing])
            start = time.perf_counter()
            try:
                out = tower(pixels, images.grid_thw[missing])
            finally:
                self.tower_seconds += time.perf_counter() - start
            tokens = [images.spans[i][1] - images.spans[i][0] for i in missing]
            for i, part in zip(missing, out.split(tokens)):
                parts[i] = part
                self._put(images.digests[i], part)
        return torch.cat([parts[i] for i in range(len(grids))])

    def stats(self) -> dict:
        return {
            "encoder_images_total": self.misses,
            "encoder_seconds_total": self.tower_seconds,
            "encoder_cache_hits_total": self.hits,
        }

    def _put(self, digest: bytes, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.entries[digest] = value
        self.bytes += size
