"""EngineConfig: the size of one replica's batch and cache."""

from dataclasses import dataclass

from qwen35_ray.engine.speculative import SpeculativeConfig
from qwen35_ray.model.kernel_backend import KERNELS


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 32  # GDN state slots: the most sequences running at once
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    max_model_len: int | None = None  # None: the model's (ModelConfig.context_len)
    block_size: int = 16  # tokens per KV block of the full-attention layers
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 256 * 2**20
    # prefix caching keeps GDN state snapshots at prompt block boundaries in this many slots
    enable_prefix_caching: bool = True
    num_snapshot_slots: int | None = None  # None: as many as max_num_seqs
    # GDN state memory (running slots + snapshots); None: max_num_seqs (+ snapshots) slots
    state_memory_bytes: int | None = None
    # CPU: run steps of pure decodes as one torch.compile graph (engine/decode_graph.py).
    # None (auto): on for a CPU engine in one process, compiled in the background while the
    # first steps run eagerly (QWEN35_RAY_COMPILE_DECODE=0 turns it off); True: compiled at
    # start-up, before the first step; False: never. The graph is made of the PyTorch paths:
    # with kernels='triton' None stays off and True is an error. With speculative, the step
    # compiled is the verify step that replaces decoding (engine/verify_graph.py)
    compile_decode: bool | None = None
    # the model's ops, chosen once when it is built (model/kernel_backend.py): auto (Triton
    # kernels on CUDA, PyTorch paths on CPU), torch (the PyTorch paths on any device, a
    # reference on GPU), triton (the Triton kernels; on CPU only under TRITON_INTERPRET=1,
    # slow, for tests)
    kernels: str = "auto"
    # GPU: decode steps replayed from CUDA graphs captured at start-up, one per batch-size
    # bucket (engine/cuda_graph.py). None (auto): on for a CUDA engine on the Triton kernels
    # in one process, off otherwise; True where that does not hold is an error
    cuda_graphs: bool | None = None
    # while others wait to be admitted, one prefill chunk takes at most this many tokens of a
    # step; None: max(block_size, max_num_batched_tokens // 8); 0: no limit
    long_prefill_token_threshold: int | None = None
    # the vision tower's outputs kept per image digest (engine/images.py), so a conversation
    # that resends its images does not re-encode them; 0: none kept
    encoder_cache_bytes: int = 64 * 2**20
    # speculative decoding with the checkpoint's MTP head (engine/speculative.py): a
    # SpeculativeConfig, or its dict {"method": "mtp", "num_speculative_tokens": k}; None: off
    speculative: SpeculativeConfig | None = None

    def __post_init__(self):
        object.__setattr__(self, "speculative", SpeculativeConfig.parse(self.speculative))
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels={self.kernels!r} is not one of {', '.join(KERNELS)}")
        if self.kernels == "triton" and self.compile_decode:
            raise ValueError(
                "compile_decode=True compiles the PyTorch paths of the decode step, and "
                "kernels='triton' runs the Triton kernels instead; set compile_decode=False "
                "(or leave it None) or use kernels='torch'"
            )
        if self.speculative is not None and self.cuda_graphs:
            raise ValueError(
                "cuda_graphs=True captures the one-token decode step, and with speculative "
                "every decode is a verify step of k + 1 tokens; leave cuda_graphs unset"
            )
        if (self.long_prefill_token_threshold or 0) < 0:
            raise ValueError(
                f"long_prefill_token_threshold={self.long_prefill_token_threshold} must be >= 0 "
                "(0: no limit, None: an eighth of max_num_batched_tokens)"
            )
        if self.encoder_cache_bytes < 0:
            raise ValueError(
                f"encoder_cache_bytes={self.encoder_cache_bytes} must be >= 0 (0: keep none)"
            )
