"""CompiledVerify: speculative decoding's verify step on CPU as one torch.compile graph.

The verify rows of a speculative step (engine/spec_step.py) run the main model over each
sequence's last token and its k drafts. Eagerly that is the many small ops of a decode step,
k + 1 times over for the GDN layers' token-by-token recurrence, and it would lose against the
compiled decode step it replaces (engine/decode_graph.py). So it is compiled the same way: the
model's one forward path (`hidden_states`) in a SlotVerify step (model/slot_verify.py), which
reads states where they are and writes nothing, with the logits, into one graph; what it
returns is stored once the kept counts are known (store_slot_verify). A step of greedy verify
rows only runs a third kind of graph, verify, acceptance and drafts in one
(model/greedy_spec.py, engine/spec_greedy.py).

The width (k + 1) is fixed per engine; sequences, slots and context length are dynamic, traced
size-obliviously as the decode graph's are, with a second graph for an MoE model's batches
above the gathered-experts size. Compiled at start-up (compile_decode True) or in the
background while the first steps run eagerly (None, the default), like the decode graph.
"""

import logging
import os
import threading
import time

import torch
import torch._dynamo.config as dynamo_config
import torch.fx.experimental._config as fx_config
from qwen35_kernels.moe import gathers_experts

from qwen35_ray.engine.decode_graph import (
    BACKGROUND_NICE,
    WARMUP_SLOTS,
    WARMUP_SPARE,
    _compile,
    use_inductor_cache_dir,
)
from qwen35_ray.model.cache import HybridCache
from qwen35_ray.model.decode_kv import decode_rows
from qwen35_ray.model.greedy_spec import greedy_spec
from qwen35_ray.model.slot_verify import mtp_logits, verify_logits

log = logging.getLogger(__name__)


class CompiledVerify:
    def __init__(self, model, cache: HybridCache, width: int, max_batch: int | None = None):
        if not cache.decode_kv:
            raise ValueError("the compiled verify step runs on CPU caches (with DecodeKV)")
        self.cache, self.width = cache, width
        self.max_batch = cache.num_slots if max_batch is None else max_batch
        self.n_attn = len(model.config.attention_layers)
        config = model.config
        moe = any(config.moe_layers)
        k, E = config.num_experts_per_tok, config.num_experts
        # the most sequences whose tokens the graph traced with gathered experts takes
        self.max_gathered = 0
        while moe and gathers_experts((self.max_gathered + 1) * width, k, E, compiled=True):
            self.max_gathered += 1
        n_graphs = 2 if moe and self.max_batch > self.max_gathered else 1
        self.fns = [_compile(verify_logits, model) for _ in range(n_graphs)]
        # a step of greedy verify rows only, acceptance and drafts included (spec_greedy.py)
        self.greedy_fns = [_compile(greedy_spec, model) for _ in range(n_graphs)]
        # the MTP head's steps (engine/spec_draft.py): over a verify row's positions, and one
        # position on for each further draft; by width
        self.hidden_size = config.hidden_size
        self._heads = {n: _compile(mtp_logits, model) for n in sorted({width, 1})}
        self.heads = {n: _bound(fn, n) for n, fn in self._heads.items()}
        self.steps = 0  # verify steps run through the graphs
        self.greedy_steps = 0  # greedy steps run through the one-forward graphs
        self.ready = False
        self.error: BaseException | None = None
        self._done = threading.Event()

    def __call__(self, input_ids: torch.Tensor, *inputs) -> tuple:
        """verify_logits' outputs for slot_verify_inputs' inputs."""
        B = len(input_ids) // self.width
        self.steps += 1
        return self.fns[self._pick(B)](self.width, input_ids, *inputs)

    def greedy(self, input_ids: torch.Tensor, *inputs) -> tuple:
        """greedy_spec's outputs for greedy_spec_inputs' inputs."""
        B = len(input_ids) // self.width
        self.greedy_steps += 1
        return self.greedy_fns[self._pick(B)](self.width, input_ids, *inputs)

    def _pick(self, batch: int) -> int:
        return len(self.fns) - 1 if batch > self.max_gathered else 0

    def warmup(self) -> float:
        start = time.perf_counter()
        use_inductor_cache_dir()
        log.info("compiling the verify step of width %d (torch.compile, CPU) ...", self.width)
        small = min(3, self.max_gathered) if self.max_gathered else 3
        batches = [((0, 2, 4)[:small], (37, 20, 11)[:small])]
        if len(self.fns) == 2:
            B = self.max_gathered + 3
            batches.append(([i % WARMUP_SLOTS for i in range(B)], [13 + i for i in range(B)]))
        shapes = fx_config.patch(use_duck_shape=False, backed_size_oblivious=True)
        floats = dynamo_config.patch(specialize_float=True)
        with torch.inference_mode(), shapes, floats:
            states = self._stand_in_states()
            head = self._stand_in_states(self.n_attn)
            for slots, starts in batches:
                args = _stand_in_step(states, slots, starts, self.width)
                self.fns[self._pick(len(slots))](self.width, *args)
                *_, K, V = _stand_in_step(head, slots, starts, self.width)
                self.greedy_fns[self._pick(len(slots))](self.width, *args, K, V)
            for n, fn in self._heads.items():
                ids, positions, idx, lengths, _, _, K, V = _stand_in_step(head, *batches[0], n)
                hidden = torch.zeros(len(ids), self.hidden_size, dtype=head[0].dtype)
                fn(n, ids, hidden, positions, idx, lengths, K, V)
        self.ready = True
        self._done.set()
        seconds = time.perf_counter() - start
        log.info("verify step compiled in %.1f s", seconds)
        return seconds

    def start(self) -> None:
        threading.Thread(target=self._background, name="compile-verify", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        self._done.wait(timeout)
        return self.ready

    def _background(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
            self.warmup()
        except BaseException as e:
            self.error = e
            log.warning("compiling the verify step failed; verify steps stay eager", exc_info=e)
        finally:
            self._done.set()

    def _stand_in_states(self, first: int = 0):
        """Stand-in GDN slots and the DecodeKV copies to shape K/V like: the main layers',
        or from cache layer `first` on (the head's)."""
        cache = self.cache
        n_gdn, _, *conv = cache.conv.shape
        rec = cache.recurrent.shape[2:]
        copies = cache.decode_kv[first:] if first else cache.decode_kv[: self.n_attn]
        with torch.inference_mode(False):
            return (
                cache.conv.new_zeros(n_gdn, WARMUP_SLOTS, *conv),
                cache.recurrent.new_zeros(n_gdn, WARMUP_SLOTS, *rec),
                [d.key for d in copies],
            )


def _bound(fn, width: int):
    return lambda *args: fn(width, *args)


def _stand_in_step(states, slots, starts, width: int):
    """A graph's arguments for a verify step of the given slots, each with `width` tokens from
    its start, on stand-in states."""
    conv, recurrent, like = states
    rows, lengths, n = decode_rows(list(slots), list(starts))
    idx = torch.tensor(slots)
    with torch.inference_mode(False):
        K, V = (
            [t.new_zeros(WARMUP_SLOTS, t.shape[1], n + WARMUP_SPARE, t.shape[3]) for t in like]
            for _ in range(2)
        )
    K, V = ([t[:rows, :, :n] for t in kv] for kv in (K, V))
    positions = torch.tensor([s + i for s in starts for i in range(width)])
    ids = torch.zeros(len(positions), dtype=torch.long)
    return ids, positions, idx, lengths, conv, recurrent, K, V
