"""RequestState: a request in flight, moved between engines (prefill pool -> decode pool).

Wire format: one safetensors blob. Its metadata holds a JSON header (format version, model
fingerprint, request fields, sampling params); its tensors are the request's GDN conv and
recurrent states for every GDN layer, the K and V of its computed tokens for every
full-attention layer (real tokens only, no block padding), and the sampler's RNG state.
Import checks version, fingerprint, shapes and dtypes, and refuses any mismatch.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors.torch import load, save

from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.config import ModelConfig

VERSION = 1


def model_fingerprint(config: ModelConfig, dtype: torch.dtype) -> str:
    """Hash of everything that shapes or interprets the cached states."""
    facts = dataclasses.asdict(config) | {"cache_dtype": str(dtype)}
    facts.pop("dtype"), facts.pop("weight_prefix")
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def state_nbytes(config: ModelConfig, dtype: torch.dtype, num_tokens: int) -> int:
    """Bytes of the tensors a RequestState carries for num_tokens computed tokens:
    GDN:       n_gdn  x (C x (W-1) x dtype  +  HV x K x V x 4)
    attention: n_attn x 2 x num_tokens x Hkv x D x dtype
    """
    c = config
    gdn = c.conv_dim * (c.linear_conv_kernel_dim - 1) * dtype.itemsize
    gdn += c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4
    attn = 2 * num_tokens * c.num_key_value_heads * c.head_dim * dtype.itemsize
    return len(c.gdn_layers) * gdn + len(c.attention_layers) * attn


@dataclass
class RequestState:
    request_id: str
    fingerprint: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    num_computed: int
    params: SamplingParams
    tensors: dict[str, torch.Tensor]  # conv, recurrent, key, value
    rng_state: torch.Tensor  # the sequence's torch.Generator state
    prompt: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_bytes(self) -> bytes:
        header = {
            "version": VERSION,
            "request_id": self.request_id,
            "fingerprint": self.fingerprint,
            "prompt_token_ids": self.prompt_token_ids,
            "output_token_ids": self.output_token_ids,
            "num_computed": self.num_computed,
            "params": dataclasses.asdict(self.params),
            "prompt": self.prompt,
        }
        tensors = {
            **{k: v.contiguous().cpu() for k, v in self.tensors.items()},
            "rng_state": self.rng_state,
        }
        return save(tensors, metadata={"qwen35_ray_request_state": json.dumps(header)})

    @classmethod
    def from_bytes(cls, blob: bytes) -> "RequestState":
        tensors = load(blob)
        header = json.loads(_metadata(blob)["qwen35_ray_request_state"])
        if header["version"] != VERSION:
            raise ValueError(
                f"RequestState version {header['version']} is not {VERSION}; "
                "prefill and decode replicas must run the same qwen35-ray"
            )
        rng = tensors.pop("rng_state")
        return cls(
            header["request_id"],
            header["fingerprint"],
            header["prompt_token_ids"],
            header["output_token_ids"],
            header["num_computed"],
            SamplingParams(**header["params"]),
            tensors,
            rng,
            header["prompt"],
        )

    def check(self, config: ModelConfig, dtype: torch.dtype) -> None:
        """Refuse a state this engine cannot continue, naming what differs."""
        want = model_fingerprint(config, dtype)
        if self.fingerprint != want:
            raise ValueError(
                f"RequestState of request {self.request_id!r} comes from another "
                f"model or cache dtype (fingerprint {self.fingerprint}, here {want})"
            )
        c, L = config, self.num_computed
        shapes = {
            "conv": (len(c.gdn_layers), c.conv_dim, c.linear_conv_kernel_dim - 1),
            "recurrent": (
                len(c.gdn_layers),
                c.linear_num_value_heads,
                c.linear_key_head_dim,
                c.linear_value_head_dim,
            ),
            "key": (len(c.attention_layers), L, c.num_key_value_heads, c.head_dim),
            "value": (len(c.attention_layers), L, c.num_key_value_heads, c.head_dim),
        }
        dtypes = {"conv": dtype, "recurrent": torch.float32, "key": dtype, "value": dtype}
        for name, shape in shapes.items():
            t = self.tensors.get(name)
            if t is None or tuple(t.shape) != shape or t.dtype != dtypes[name]:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise ValueError(
                    f"RequestState tensor {name}: expected {shape} {dtypes[name]}, got {got}"
                )


def _metadata(blob: bytes) -> dict:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {})
