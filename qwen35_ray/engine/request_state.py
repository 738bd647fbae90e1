"""RequestState: a request in flight, moved between engines (prefill pool -> decode pool).

Wire format: one safetensors blob. Its metadata holds a JSON header (format version, model
fingerprint, request fields, sampling params, the sequence's sampling seed, the logprobs of the
tokens generated so far, the rope delta of a prompt with images); its tensors are the request's
GDN conv and recurrent states for every GDN layer and the K and V of its computed tokens for
every full-attention layer (real tokens only, no block padding). The sampler's randomness is a
function of the seed and the output position (engine/sampler.py), so the seed is all of it that
travels. Import checks version, fingerprint (architecture, cache dtype and weights), token
counts, vocabulary, logprobs, seed, shapes and dtypes, and refuses any mismatch.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load, save

from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.model.config import ModelConfig

# 3: the seed replaced the torch.Generator state (rng_state); 4: rope_delta
VERSION = 4
SEED_LIMIT = 2**64  # a sequence's seed is an unsigned 64-bit integer


def model_fingerprint(config: ModelConfig, dtype: torch.dtype, weights: str) -> str:
    """`<architecture>-<weights>`: a hash of everything that shapes or interprets the cached
    states, then the checkpoint's weights fingerprint (model/weights.py)."""
    facts = dataclasses.asdict(config) | {"cache_dtype": str(dtype)}
    facts.pop("dtype"), facts.pop("weight_prefix")
    arch = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{arch}-{weights}"


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
    # conv, recurrent, key, value; mtp_key, mtp_value from an engine with the MTP layer
    tensors: dict[str, torch.Tensor]
    seed: int  # the sequence's sampling seed, in [0, 2**64)
    prompt: str | None = None
    # one {token id: logprob} per output token when params.logprobs is set, else empty
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    # a prompt with images: the rotary position offset of every later token (model/mrope.py)
    rope_delta: int = 0
    # the MTP head's drafts after the last token (a greedy request of a speculative engine)
    drafts: list[int] = field(default_factory=list)

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
            "seed": self.seed,
            "prompt": self.prompt,
            "output_logprobs": self.output_logprobs,
            "rope_delta": self.rope_delta,
            "drafts": self.drafts,
        }
        tensors = {k: v.contiguous().cpu() for k, v in self.tensors.items()}
        return save(tensors, metadata={"qwen35_ray_request_state": json.dumps(header)})

    @classmethod
    def from_bytes(cls, blob: bytes) -> "RequestState":
        """Parse a wire blob; anything malformed is a ValueError saying what."""
        try:
            tensors = load(blob)
            header = json.loads(_metadata(blob)["qwen35_ray_request_state"])
        except Exception as e:
            raise ValueError(f"not a RequestState blob ({type(e).__name__}: {e})") from e
        if header.get("version") != VERSION:
            raise ValueError(
                f"RequestState version {header.get('version')} is not {VERSION}; "
                "prefill and decode replicas must run the same qwen35-ray"
            )
        rid = header.get("request_id")
        params = _params(rid, header.get("params"))
        try:
            logprobs = [{int(t): float(v) for t, v in d.items()} for d in header["output_logprobs"]]
            state = cls(
                str(rid),
                str(header["fingerprint"]),
                _token_ids("prompt_token_ids", header["prompt_token_ids"]),
                _token_ids("output_token_ids", header["output_token_ids"]),
                _integer("num_computed", header["num_computed"]),
                params,
                tensors,
                _integer("seed", header["seed"]),
                header["prompt"],
                logprobs,
                _integer("rope_delta", header["rope_delta"]),
                _token_ids("drafts", header.get("drafts", [])),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"RequestState of request {rid!r} has a malformed header: {e}") from e
        return state

    def check(self, config: ModelConfig, dtype: torch.dtype, fingerprint: str) -> None:
        """Refuse a state this engine cannot continue, naming what differs. `fingerprint` is
        this engine's model_fingerprint."""
        self._check_fingerprint(fingerprint)
        rid, p, out = self.request_id, self.prompt_token_ids, self.output_token_ids
        if self.params.n != 1:
            raise ValueError(f"RequestState of request {rid!r} has n={self.params.n}; must be 1")
        if not p or not out:
            raise ValueError(
                f"RequestState of request {rid!r} has {len(p)} prompt and {len(out)} output "
                "tokens; a moved request has at least one of each"
            )
        # every token is computed but the last sampled one, which the next step feeds
        if self.num_computed != len(p) + len(out) - 1:
            raise ValueError(
                f"RequestState of request {rid!r} has num_computed={self.num_computed}; with "
                f"{len(p)} prompt and {len(out)} output tokens it must be {len(p) + len(out) - 1}"
            )
        for name, ids in (("prompt_token_ids", p), ("output_token_ids", out)):
            if bad := [t for t in ids if not 0 <= t < config.vocab_size]:
                raise ValueError(
                    f"RequestState of request {rid!r}: {name} holds token id {bad[0]}, outside "
                    f"this model's vocabulary of {config.vocab_size}"
                )
        want = len(out) if self.params.logprobs is not None else 0
        if len(self.output_logprobs) != want:
            raise ValueError(
                f"RequestState of request {rid!r} has {len(self.output_logprobs)} logprobs "
                f"entries for {len(out)} output tokens with logprobs={self.params.logprobs}; "
                f"expected {want}"
            )
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(
                f"RequestState of request {rid!r} has seed={self.seed}; a sequence's seed is in "
                "[0, 2**64)"
            )
        self._check_tensors(config, dtype)

    def _check_fingerprint(self, want: str) -> None:
        if self.fingerprint == want:
            return
        got_arch, _, _ = self.fingerprint.partition("-")
        if got_arch == want.partition("-")[0]:
            what, fix = "another checkpoint of this architecture", "load the same weights"
        else:
            what, fix = "another model or cache dtype", "serve the same model and dtype"
        raise ValueError(
            f"RequestState of request {self.request_id!r} comes from {what} (fingerprint "
            f"{self.fingerprint}, here {want}); prefill and decode replicas must {fix}"
        )

    def _check_tensors(self, config: ModelConfig, dtype: torch.dtype) -> None:
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
        if "mtp_key" in self.tensors or "mtp_value" in self.tensors:
            # the MTP layer's K/V, from an engine that decodes speculatively (optional)
            mtp = (c.mtp_num_hidden_layers, L, c.num_key_value_heads, c.head_dim)
            shapes.update(mtp_key=mtp, mtp_value=mtp)
            dtypes.update(mtp_key=dtype, mtp_value=dtype)
        if unknown := sorted(set(self.tensors) - set(shapes)):
            raise ValueError(f"RequestState has unknown tensors {unknown}")
        for name, shape in shapes.items():
            t = self.tensors.get(name)
            if t is None or tuple(t.shape) != shape or t.dtype != dtypes[name]:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise ValueError(
                    f"RequestState tensor {name}: expected {shape} {dtypes[name]}, got {got}"
                )


def _params(request_id, fields) -> SamplingParams:
    where = f"RequestState of request {request_id!r}"
    if not isinstance(fields, dict):
        raise ValueError(f"{where} has no params object")
    if unknown := sorted(set(fields) - {f.name for f in dataclasses.fields(SamplingParams)}):
        raise ValueError(
            f"{where}: params has unknown field {unknown[0]!r}; prefill and decode replicas "
            "must run the same qwen35-ray"
        )
    try:
        return SamplingParams(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: params: {e}") from e


def _integer(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _token_ids(name: str, value) -> list[int]:
    if not isinstance(value, list):
        raise ValueError(f"{name} must be a list of token ids")
    return [_integer(name, t) for t in value]


def _metadata(blob: bytes) -> dict:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {})
