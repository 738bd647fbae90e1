"""CompiledDecode: a step of pure decodes on CPU as one torch.compile graph.

In eager PyTorch a decode step of a small model is hundreds of small ops, each costing more to
dispatch than to compute. The graph is the model's one forward path (`hidden_states`) in a
SlotDecode step (model/step.py), which reads states where they are and writes nothing, so
Inductor compiles the whole step, logits included, into one graph of fused C++ kernels and
matmuls; the eager engine runs the same code for the same batches. The graph reads the batch's
GDN states from their slots (the whole slot tensors are its inputs, so no gathered copy is made
before it); what it returns is stored as the eager step stores it (store_slot_decode): GDN
states into their slots, the new K/V into the paged blocks and DecodeKV.

Shapes are dynamic (sequences, slots, context length), traced size-obliviously: PyTorch would
otherwise specialise sizes of 1, and a batch of one sequence would need a graph of its own or
padding to two rows (which doubled the MoE's gathered work at one sequence). The graph
guards on its inputs only, so the MoE's CPU path chosen by batch size is fixed when a graph is
traced: an MoE model gets a second graph for batches above `gathers_experts`, and this class
picks the graph by batch size.

The step is made of the PyTorch paths (SlotDecode and the torch KernelBackend), so it exists
only for a model on the torch kernel backend (EngineConfig.kernels torch, or auto on CPU);
with triton the engine stays eager (compile_decode None) or refuses compile_decode=True.

Compiling takes seconds with Inductor's on-disk cache warm and tens of seconds cold (2 cores).
`warmup()` compiles before the first step; `start()` compiles on a background thread at low
priority while the engine's steps run eagerly, and the graphs take over once `ready`. Either
way the graphs are traced on small stand-in states, never the live cache, which the engine's
steps keep using meanwhile. The cache lives under the project's cache directory
(`inductor_cache_dir`), so the second start of a machine is the fast one.
"""

import itertools
import logging
import os
import threading
import time
import types

import torch
import torch._dynamo.config as dynamo_config
import torch.fx.experimental._config as fx_config
from qwen35_kernels.moe import gathers_experts
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from qwen35_ray.model.batch import ForwardBatch
from qwen35_ray.model.cache import HybridCache
from qwen35_ray.model.decode_kv import decode_rows
from qwen35_ray.model.source import cache_dir
from qwen35_ray.model.step import SlotDecode, slot_decode_inputs, store_slot_decode

log = logging.getLogger(__name__)

# the stand-in states the graphs are traced on: slots, and room per slot past the longest
# context, sizes unlike any fixed dimension of a model and unlike each other, so none is
# specialised or tied
WARMUP_SLOTS, WARMUP_SPARE = 5, 6
# the background compile's niceness: the serving threads come first
BACKGROUND_NICE = 10


class CompiledDecode:
    def __init__(self, model, cache: HybridCache, max_batch: int | None = None):
        """max_batch: the most sequences a step can decode (the engine's running slots; None:
        every slot of the cache)."""
        kernels = getattr(model, "kernels", None)
        if kernels is not None and not kernels.is_torch:
            raise ValueError(
                f"the compiled decode step is made of the PyTorch paths, and this model runs "
                f"the {kernels.name} kernels; build it with kernels='torch' or 'auto' on CPU"
            )
        if not cache.decode_kv:
            raise ValueError("the compiled decode step runs on CPU caches (with DecodeKV)")
        self.cache = cache
        self.max_batch = cache.num_slots if max_batch is None else max_batch
        self.n_attn = len(model.config.attention_layers)
        config = model.config
        moe = any(config.moe_layers)
        k, E = config.num_experts_per_tok, config.num_experts
        # batch sizes of the graph traced with gathered experts; larger ones use the other
        self.max_gathered = 0
        while moe and gathers_experts(self.max_gathered + 1, k, E, compiled=True):
            self.max_gathered += 1
        # the large-batch graph only where the slots allow such a batch
        n_graphs = 2 if moe and self.max_batch > self.max_gathered else 1
        self.fns = [_compile(decode_logits, model) for _ in range(n_graphs)]
        self.steps = [0] * n_graphs  # decode steps run through each graph
        # the graphs are compiled: the runner sends decode steps here
        self.ready = False
        self.error: BaseException | None = None  # why a background compile failed
        self._done = threading.Event()

    def __call__(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B, vocab] fp32 of a batch of decodes (ForwardBatch.is_decode); the cache is
        updated as the eager forward would."""
        inputs = slot_decode_inputs(batch, self.cache, self.n_attn)
        g = self._pick(len(input_ids))
        self.steps[g] += 1
        logits, *outputs = self.fns[g](input_ids, *inputs)
        store_slot_decode(batch, self.cache, outputs)
        return logits

    def _pick(self, batch: int) -> int:
        return len(self.fns) - 1 if batch > self.max_gathered else 0

    def warmup(self) -> float:
        """Compile now rather than at the first request: one step per graph on stand-in
        states. Returns the seconds it took; afterwards the graphs are `ready`."""
        start = time.perf_counter()
        use_inductor_cache_dir()
        log.info("compiling the decode step (torch.compile, CPU) ...")
        # the large-batch graph traces a batch just past the gathered one's
        small = min(3, self.max_gathered) if self.max_gathered else 3
        batches = [((0, 2, 4)[:small], (37, 20, 11)[:small])]
        if len(self.fns) == 2:
            B = self.max_gathered + 3
            batches.append(([i % WARMUP_SLOTS for i in range(B)], [13 + i for i in range(B)]))
        # inference tensors like the engine's; duck shaping would give equal sizes one symbol,
        # tying the batch to fixed dimensions. Float attributes (norm eps, attention scale)
        # become constants: unspecialised, each would be a 0-d tensor built on every call
        # and passed in, about a third of the time Dynamo spends around the graph.
        shapes = fx_config.patch(use_duck_shape=False, backed_size_oblivious=True)
        floats = dynamo_config.patch(specialize_float=True)
        with torch.inference_mode(), shapes, floats:
            states = self._stand_in_states()
            for slots, positions in batches:
                self.fns[self._pick(len(slots))](*_stand_in_step(states, slots, positions))
        self.ready = True
        self._done.set()
        seconds = time.perf_counter() - start
        log.info("decode step compiled in %.1f s", seconds)
        return seconds

    def start(self) -> None:
        """Compile on a background thread; until it is done, decode steps run eagerly. A
        compile that fails is logged and leaves the engine eager."""
        threading.Thread(target=self._background, name="compile-decode", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the compile (background or not); True once the graphs are ready."""
        self._done.wait(timeout)
        return self.ready

    def _background(self) -> None:
        try:
            # this thread only (Linux niceness is per thread); the compiler it starts inherits it
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
            self.warmup()
        except BaseException as e:
            self.error = e
            log.warning("compiling the decode step failed; decode steps stay eager", exc_info=e)
        finally:
            self._done.set()

    def _stand_in_states(self):
        """Zeroed GDN slot tensors shaped like the cache's, WARMUP_SLOTS slots of them, and
        a K/V tensor like each attention layer's DecodeKV, to be sized per step."""
        cache = self.cache
        n_gdn, _, *conv = cache.conv.shape
        rec = cache.recurrent.shape[2:]
        # normal tensors like the cache's (the graph guards on their dispatch keys)
        with torch.inference_mode(False):
            return (
                cache.conv.new_zeros(n_gdn, WARMUP_SLOTS, *conv),
                cache.recurrent.new_zeros(n_gdn, WARMUP_SLOTS, *rec),
                [d.key for d in cache.decode_kv[: self.n_attn]],
            )


def inductor_cache_dir():
    """Where compiled graphs are kept between runs, unless TORCHINDUCTOR_CACHE_DIR says."""
    return cache_dir() / "inductor"


def use_inductor_cache_dir() -> None:
    """Point Inductor at inductor_cache_dir() unless the user chose a directory. Inductor
    reads TORCHINDUCTOR_CACHE_DIR on every use, and sets it to its default (under /tmp, gone
    after a reboot) when it first imports, so that value counts as not chosen."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or current == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())


def _stand_in_step(states, slots, positions):
    """A graph's arguments for a decode step of the given slots and positions on stand-in
    states (slots may repeat: the graph writes nothing). K and V are views of rooms longer
    than the context, as the engine's are of DecodeKV."""
    conv, recurrent, like = states
    rows, lengths, n = decode_rows(list(slots), list(positions))
    idx = torch.tensor(slots)
    with torch.inference_mode(False):
        K, V = (
            [t.new_zeros(WARMUP_SLOTS, t.shape[1], n + WARMUP_SPARE, t.shape[3]) for t in like]
            for _ in range(2)
        )
    K, V = ([t[:rows, :, :n] for t in kv] for kv in (K, V))
    return torch.zeros_like(idx), torch.tensor(positions), idx, lengths, conv, recurrent, K, V


def decode_logits(model, input_ids, positions, rows, lengths, conv, recurrent, keys, values):
    """What a graph computes: the model's one forward path (hidden_states) over a SlotDecode
    step, and the logits [B, vocab] fp32, followed by the step's new states (SlotDecode.outputs)."""
    step = SlotDecode(positions, rows, lengths, conv, recurrent, keys, values)
    logits = model.compute_logits(model.hidden_states(input_ids, step))
    return logits, *step.outputs()


def _compile(fn, model):
    # guards on the inputs only: checking each weight on every call costs more than a small
    # model's step, and the weights of a loaded model do not change. Inductor's own checks of
    # the inputs' sizes, strides and alignment repeat what the guards establish (about 130
    # per call): without them one sequence's step took 1.2-1.3 ms instead of 1.3-1.5.
    return torch.compile(
        _own_copy(fn, model),
        dynamic=True,
        fullgraph=True,
        options={
            "guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe,
            "size_asserts": False,
            "scalar_asserts": False,
            "alignment_asserts": False,
        },
    )


def _own_copy(fn, model):
    """fn bound to the model, with a code object of its own. Dynamo keeps compiled graphs per
    code object, and with guards on the inputs only, a second model (another engine in the
    process) would otherwise run the first one's graph."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_copies)}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                              fn.__closure__)  # fmt: skip
    return types.MethodType(copy, model)


_copies = itertools.count()
