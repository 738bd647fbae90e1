"""DecodeGraphs: decode-only steps replayed from CUDA graphs, one graph per batch-size bucket.

On a GPU a decode step of a few sequences is hundreds of small kernel launches, and the host
issuing them sets the step's time (docs/gpu.md: 11.7 ms at 1 and at 16 sequences, 35B-A3B
widths). A CUDA graph records one step's launches once and replays them in one call. A graph
replays fixed shapes at fixed addresses, so:
- one graph per bucket of batch sizes (`batch_buckets`: 1, 2, 4, 8, then every 8th up to the
  running slots, as vLLM and SGLang do), captured at start-up; a decode step of B sequences
  replays the smallest bucket N >= B, rows B..N-1 padding;
- the inputs live in one static buffer that each step fills with one host-to-device copy: per
  row the token, its position, its state slot and its block table (room for the most blocks a
  sequence can hold); the graph derives the sequence lengths and KV slots on the device;
- padding rows decode token 0 at position 0 in a scratch GDN state slot and a scratch KV block
  that the cache holds past the engine's own (`build`), so they never touch a live sequence;
- the GDN state slots and the paged KV are the cache's tensors, read and written in place.

What a graph records is the model's forward and compute_logits, the code an eager step runs,
so that code makes no host sync and no tensor of a data-dependent size (ForwardBatch.is_decode,
the MoE alignment). Steps the graphs do not cover (a prefill chunk in the step, more sequences
than the largest bucket) run eagerly.

With capture=False (CPU tests) the same function runs eagerly on the static buffers instead of
being replayed, so the padding, the scratch slots and the buffers are tested without a GPU.

Legend: B = sequences in the step, N = its bucket, M = blocks per table, V = vocabulary.
"""

import logging
import time
from contextlib import contextmanager

import torch

from qwen35_ray.model.batch import ForwardBatch, SeqChunk
from qwen35_ray.model.cache import HybridCache

log = logging.getLogger(__name__)

# per row of the static buffer: token, position, state slot, rotary position, then the block
# table
FIELDS = 4


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes graphs are captured for: 1, 2, 4, 8, 16, 24, ... and max_batch."""
    small = [b for b in (1, 2, 4) if b < max_batch]
    return small + list(range(8, max_batch, 8)) + [max_batch]


def uses_cuda_graphs(setting: bool | None, device, model) -> bool:
    """EngineConfig.cuda_graphs resolved. None (auto): on for a CUDA engine on the Triton
    kernels in one process (an H200 run gave the eager tokens and 1.1 ms against 9.4 ms per
    decode step at one sequence, docs/gpu.md), off otherwise; True needs such an engine and is
    an error naming what to change otherwise; False: off."""
    if setting is False:
        return False
    kind = torch.device(device).type
    if setting is None:
        kernels = getattr(model, "kernels", None)
        return (
            kind == "cuda"
            and not (kernels is not None and kernels.is_torch)
            and getattr(model, "expert_parallel", None) is None
        )
    if kind != "cuda":
        raise ValueError(
            f"cuda_graphs=True captures decode steps on a GPU, and this engine runs on "
            f"device={kind!r}; set cuda_graphs=False (or None) or device='cuda'"
        )
    kernels = getattr(model, "kernels", None)
    if kernels is not None and kernels.is_torch:
        raise ValueError(
            "cuda_graphs=True captures the Triton kernels' decode step, and this model runs "
            "the PyTorch paths (kernels='torch'), whose paged decode reads sequence lengths on "
            "the host; use kernels='auto' or 'triton', or set cuda_graphs=False"
        )
    if getattr(model, "expert_parallel", None) is not None:
        raise ValueError(
            "cuda_graphs=True cannot capture an expert-parallel rank (its MoE exchange sizes "
            "its messages on the host); set cuda_graphs=False"
        )
    return True


def build(model, config, size, block_size: int, max_model_len: int, dtype, device,
          capture: bool = True) -> tuple[HybridCache, "DecodeGraphs"]:  # fmt: skip
    """The cache for an engine of `size` (engine.cache_sizing.CacheSize) with one GDN state
    slot and one KV block past those the engine hands out, for the padding rows, and the
    graphs over it (captured now unless capture=False). The graphs read K/V from the paged
    blocks, so the cache keeps no DecodeKV copies."""
    slots = size.num_slots + size.num_snapshots
    cache = HybridCache.allocate(config, slots + 1, size.num_blocks + 1, block_size, dtype,
                                 device, decode_kv=False)  # fmt: skip
    max_blocks = min(-(-max_model_len // block_size), size.num_blocks)
    graphs = DecodeGraphs(model, cache, size.num_slots, max_blocks, slots, size.num_blocks)
    if capture:
        graphs.capture()
    return cache, graphs


class DecodeGraphs:
    def __init__(
        self,
        model,
        cache: HybridCache,
        max_batch: int,
        max_blocks: int,
        scratch_slot: int,
        scratch_block: int,
    ):
        """max_batch: the most sequences a step decodes (the running slots); max_blocks: the
        most KV blocks one sequence holds; scratch_slot / scratch_block: a GDN state slot and a
        KV block of `cache` that no sequence is ever given."""
        if not (scratch_slot < cache.num_slots and scratch_block < cache.num_blocks):
            raise ValueError(
                f"the scratch slot {scratch_slot} and block {scratch_block} must be in the "
                f"cache ({cache.num_slots} slots, {cache.num_blocks} blocks)"
            )
        self.model, self.cache = model, cache
        self.expert_load = getattr(model, "expert_load", None)
        self.buckets = batch_buckets(max_batch)
        self.max_blocks = max_blocks
        self.scratch_slot, self.scratch_block = scratch_slot, scratch_block
        dev = cache.key.device
        self.cuda = dev.type == "cuda"
        N, V = self.buckets[-1], model.config.vocab_size
        size = N * (FIELDS + max_blocks)
        self._device = torch.zeros(size, dtype=torch.int64, device=dev)
        self._host = torch.zeros(size, dtype=torch.int64, pin_memory=self.cuda)
        self._host_np = self._host.numpy()
        # the last copy out of the pinned buffer, which the next fill waits for
        self._copied = torch.cuda.Event() if self.cuda else None
        self._arange = torch.arange(N + 1, device=dev)
        self._cu_seqlens = self._arange.to(torch.int32)
        self._true = torch.ones(N, dtype=torch.bool, device=dev)
        # every bucket writes its logits here, so their memory is held once, not per graph
        self._logits = torch.zeros(N, V, dtype=torch.float32, device=dev)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # decode steps run per bucket (replayed, or run eagerly with capture=False), and the
        # padding rows they ran (the expert load counts their routed experts too)
        self.steps = dict.fromkeys(self.buckets, 0)
        self.padding_rows = 0

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def bucket(self, chunks: list[SeqChunk]) -> int | None:
        """The bucket of a step whose every sequence decodes one token and fits the static
        block tables; None for a step that runs eagerly."""
        B = len(chunks)
        if B == 0 or B > self.buckets[-1]:
            return None
        for c in chunks:
            if c.num_new != 1 or c.num_computed == 0 or len(c.block_table) > self.max_blocks:
                return None
        return next(n for n in self.buckets if n >= B)

    def __call__(self, chunks: list[SeqChunk], input_ids: list[int], N: int) -> torch.Tensor:
        """Logits [B, V] fp32 (a view of a buffer the next step overwrites) of a decode step in
        bucket N (`bucket`); the cache is updated as an eager step updates it."""
        self._fill(N, chunks, input_ids)
        if self.captured:
            self._graphs[N].replay()
        else:
            with torch.inference_mode(), _without_expert_load(self.model):
                self._forward(N)
        # the graph records the routed experts' counts; closing the step is the host's part
        if self.expert_load is not None:
            self.expert_load.end_step()
        self.steps[N] += 1
        self.padding_rows += N - len(chunks)
        return self._logits[: len(chunks)]

    def capture(self) -> float:
        """Capture every bucket's graph, largest first so the smaller ones reuse its memory
        pool; returns the seconds it took. Each bucket runs once eagerly first (Triton compiles
        its kernels then, outside the capture). Only padding rows run: live slots and blocks
        are never touched."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        with torch.inference_mode(), _without_expert_load(self.model):
            for N in reversed(self.buckets):
                self._fill(N, [], [])
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self._forward(N)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._forward(N)
                self._graphs[N] = graph
        torch.cuda.synchronize()
        # the warm-up steps counted the padding rows' experts
        if self.expert_load is not None:
            self.expert_load.reset()
        seconds = time.perf_counter() - start
        log.info("captured %d decode graphs (batch %s) in %.1f s", len(self._graphs),
                 ", ".join(map(str, self.buckets)), seconds)  # fmt: skip
        return seconds

    def _fill(self, N: int, chunks: list[SeqChunk], input_ids: list[int]) -> None:
        """The rows of bucket N into the static buffer, with one copy. Its layout for N:
        tokens [N], positions [N], state slots [N], rotary positions [N] (position + the
        sequence's rope delta), then the block tables column by column
        ([M, N]), so the first W columns of every row are one prefix and only the widest table
        of the step (W blocks) is copied. A row's columns past its own table hold the scratch
        block up to W; past W, whatever earlier steps left, which nothing reads (no kernel
        reads a block past a row's length)."""
        B = len(chunks)
        W = max((len(c.block_table) for c in chunks), default=1)
        if self._copied is not None:
            self._copied.synchronize()
        h = self._host_np
        h[:B] = input_ids
        h[B:N] = 0
        h[N : N + B] = [c.num_computed for c in chunks]
        h[N + B : 2 * N] = 0
        h[2 * N : 2 * N + B] = [c.state_slot for c in chunks]
        h[2 * N + B : 3 * N] = self.scratch_slot
        h[3 * N : 3 * N + B] = [c.num_computed + c.rope_delta for c in chunks]
        h[3 * N + B : 4 * N] = 0
        tables = h[FIELDS * N : (FIELDS + W) * N].reshape(W, N)
        for j, c in enumerate(chunks):
            k = len(c.block_table)
            tables[:k, j] = c.block_table
            tables[k:, j] = self.scratch_block
        tables[:, B:] = self.scratch_block
        n = (FIELDS + W) * N
        self._device[:n].copy_(self._host[:n], non_blocking=self.cuda)
        if self._copied is not None:
            self._copied.record()

    def _inputs(self, N: int) -> tuple[torch.Tensor, ForwardBatch]:
        """input ids [N] and the ForwardBatch of bucket N, views of the static buffer and what
        the device derives from it (a decode's length is its position + 1)."""
        d, M, P = self._device, self.max_blocks, self.cache.block_size
        positions = d[N : 2 * N]
        # row-major once per step, not in every attention layer's kernel call
        tables = d[FIELDS * N : (FIELDS + M) * N].view(M, N).T.contiguous()  # [N, M]
        slot_mapping = tables.gather(1, (positions // P)[:, None])[:, 0] * P + positions % P
        return d[:N], ForwardBatch(
            positions=positions,
            cu_seqlens=self._cu_seqlens[: N + 1],
            seq_lens=(positions + 1).to(torch.int32),
            state_indices=d[2 * N : 3 * N],
            has_initial_state=self._true[:N],
            block_tables=tables,
            slot_mapping=slot_mapping,
            last_token_indices=self._arange[:N],
            max_q_len=1,
            num_decodes=N,
            block_size=P,
            rope_positions=d[3 * N : 4 * N],
        )

    def _forward(self, N: int) -> None:
        """The step a graph records: the model's forward and the logits of its rows (one per
        sequence, so every row) into the shared logits buffer."""
        input_ids, batch = self._inputs(N)
        hidden = self.model(input_ids, batch, self.cache)
        self._logits[:N].copy_(self.model.compute_logits(hidden))


@contextmanager
def _without_expert_load(model):
    """The model's ExpertLoad taken off while a step is captured (at start-up) or stands in
    for a replay (capture=False): forward() would close the step inside the graph, and every
    replay would then add its counts to the bucket of the capture. The MoE layers still count
    their experts; DecodeGraphs closes each step on the host. Replays change nothing."""
    load = getattr(model, "expert_load", None)
    if load is not None:
        model.expert_load = None
    try:
        yield
    finally:
        if load is not None:
            model.expert_load = load
