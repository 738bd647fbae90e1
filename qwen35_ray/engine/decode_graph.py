"""CompiledDecode: a step of pure decodes on CPU as one torch.compile graph.

In eager PyTorch a decode step of a small model is hundreds of small ops, each costing more to
dispatch than to compute. `Qwen35ForCausalLM.decode_step` runs the same layers on states passed
in and returned, writing nothing, so Inductor compiles the whole step, logits included, into
one graph of fused C++ kernels and matmuls. The graph reads the batch's GDN states from their
slots (the whole slot tensors are its inputs, so no gathered copy is made before it); this
class stores what it returns: GDN states into their slots, the new K/V into the paged blocks
and DecodeKV.

Shapes are dynamic (sequences, slots, context length), traced size-obliviously: PyTorch would
otherwise specialise sizes of 1, and a batch of one sequence would need a graph of its own or
padding to two rows (which doubled the MoE's gathered work at one sequence). The graph
guards on its inputs only, so the MoE's CPU path chosen by batch size is fixed when a graph is
traced: an MoE model gets a second graph for batches above `gathers_experts`, and this class
picks the graph by batch size.
"""

import itertools
import logging
import time
import types

import torch
import torch._dynamo.config as dynamo_config
import torch.fx.experimental._config as fx_config
from qwen35_kernels.attention import write_kv
from qwen35_kernels.moe import gathers_experts

from qwen35_ray.model.attention import decode_rows
from qwen35_ray.model.batch import ForwardBatch
from qwen35_ray.model.cache import HybridCache

log = logging.getLogger(__name__)


class CompiledDecode:
    def __init__(self, model, cache: HybridCache):
        if not cache.decode_kv:
            raise ValueError("the compiled decode step runs on CPU caches (with DecodeKV)")
        self.cache = cache
        self.n_attn = len(model.config.attention_layers)
        config = model.config
        moe = any(config.moe_layers)
        k, E = config.num_experts_per_tok, config.num_experts
        # batch sizes of the graph traced with gathered experts; larger ones use the other
        self.max_gathered = 0
        while moe and gathers_experts(self.max_gathered + 1, k, E):
            self.max_gathered += 1
        # the large-batch graph only where the slots allow such a batch
        n_graphs = 2 if moe and cache.num_slots > self.max_gathered else 1
        self.fns = [_compile(model.decode_step) for _ in range(n_graphs)]
        self.steps = [0] * n_graphs  # decode steps run through each graph

    def __call__(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B, vocab] fp32 of a batch of decodes (ForwardBatch.is_decode); the cache is
        updated as the eager forward would."""
        cache = self.cache
        slots, positions = batch.state_indices.tolist(), batch.positions.tolist()
        kv = cache.decode_kv[: self.n_attn]
        for j, d in enumerate(kv):
            d.refill(slots, positions, batch.block_tables, cache.key[j], cache.value[j])
        idx = batch.state_indices
        logits, conv, rec, k, v = self._graph(input_ids, idx, batch.positions, slots, positions)
        cache.conv[:, idx] = conv
        cache.recurrent[:, idx] = rec
        for j, d in enumerate(kv):
            write_kv(k[j], v[j], cache.key[j], cache.value[j], batch.slot_mapping)
            d.append(k[j], v[j], slots, positions)
        return logits

    def _graph(self, input_ids, idx, pos, slots, positions):
        cache = self.cache
        kv = cache.decode_kv[: self.n_attn]
        rows, lengths, n = decode_rows(slots, positions)
        for d in kv:
            d.reserve(n)
        g = len(self.fns) - 1 if len(input_ids) > self.max_gathered else 0
        self.steps[g] += 1
        return self.fns[g](
            input_ids,
            pos,
            idx,
            lengths,
            cache.conv,
            cache.recurrent,
            [d.key[:rows, :, :n] for d in kv],
            [d.value[:rows, :, :n] for d in kv],
        )

    def warmup(self) -> float:
        """Compile now rather than at the first request: one dummy step per graph, writing
        nothing. Returns the seconds it took."""
        start = time.perf_counter()
        log.info("compiling the decode step (torch.compile, CPU) ...")
        S = self.cache.num_slots
        # sizes unlike each other and any fixed dimension, so none is specialised or tied
        # (slots repeat when there are fewer than 5: nothing is written); the large-batch
        # graph traces a batch of every slot
        small = min(3, self.max_gathered) if self.max_gathered else 3
        batches = [([s % S for s in (0, 2, 4)][:small], [37, 20, 11][:small])]
        if len(self.fns) == 2:
            batches.append((list(range(S)), [13 + 7 * i for i in range(S)]))
        # inference tensors like the engine's; duck shaping would give equal sizes one symbol,
        # tying the batch to fixed dimensions. Float attributes (norm eps, attention scale)
        # become constants: unspecialised, each would be a 0-d tensor built on every call
        # and passed in, about a third of the time Dynamo spends around the graph.
        shapes = fx_config.patch(use_duck_shape=False, backed_size_oblivious=True)
        floats = dynamo_config.patch(specialize_float=True)
        with torch.inference_mode(), shapes, floats:
            for slots, positions in batches:
                t = torch.tensor(slots)
                self._graph(torch.zeros_like(t), t, torch.tensor(positions), slots, positions)
        self.steps = [0] * len(self.fns)  # the dummy steps do not count
        seconds = time.perf_counter() - start
        log.info("decode step compiled in %.1f s", seconds)
        return seconds


def _compile(method):
    # guards on the inputs only: checking each weight on every call costs more than a small
    # model's step, and the weights of a loaded model do not change
    return torch.compile(
        _own_copy(method),
        dynamic=True,
        fullgraph=True,
        options={"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe},
    )


def _own_copy(method):
    """The bound method with a code object of its own. Dynamo keeps compiled graphs per code
    object, and with guards on the inputs only, a second model (another engine in the process)
    would otherwise run the first one's graph."""
    func = method.__func__
    code = func.__code__.replace(co_name=f"{func.__name__}_{next(_copies)}")
    copy = types.FunctionType(code, func.__globals__, code.co_name, func.__defaults__,
                              func.__closure__)  # fmt: skip
    return types.MethodType(copy, method.__self__)


_copies = itertools.count()
