"""The two kinds of step the one forward path runs in (model/step.py) give the same answer: a
batch of decodes as a SlotDecode (CPU, over DecodeKV, writing nothing until stored: what the
compiled decode graph runs) and as a PagedStep (slots and paged blocks written in place: what
CUDA graphs capture on a GPU), from the same cache after a prefill, and leave the same cache."""

import pytest
import torch

from qwen35_ray.model.batch import ForwardBatch, SeqChunk
from qwen35_ray.model.cache import HybridCache
from qwen35_ray.model.loader import load_model
from qwen35_ray.model.step import PagedStep, SlotDecode, slot_decode_inputs, slot_decodes

BLOCK = 16


@pytest.mark.parametrize("name", ["qwen35-tiny", "qwen35-tiny-dense"])
def test_a_slot_decode_step_equals_the_paged_step(name):
    model, config, _ = load_model(name, dtype="float32", progress=False)
    g = torch.Generator().manual_seed(0)
    # three sequences in slots out of order, prompts crossing block boundaries
    lengths, slots = [5, 17, 33], [3, 0, 5]
    tables = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    caches = {
        kind: HybridCache.allocate(
            config,
            num_slots=6,
            num_blocks=12,
            block_size=BLOCK,
            dtype=torch.float32,
            decode_kv=kind == "slot",
        )  # fmt: skip
        for kind in ("slot", "paged")
    }
    prompt = torch.randint(0, config.vocab_size, (sum(lengths),), generator=g)
    prefill = [SeqChunk(0, n, s, t) for n, s, t in zip(lengths, slots, tables)]
    with torch.inference_mode():
        for cache in caches.values():
            model(prompt, ForwardBatch.build(prefill, BLOCK), cache)
        hidden = {}
        for step in range(2):  # the first step refills DecodeKV from the blocks, then appends
            chunks = [SeqChunk(n + step, 1, s, t) for n, s, t in zip(lengths, slots, tables)]
            batch = ForwardBatch.build(chunks, BLOCK)
            ids = torch.randint(0, config.vocab_size, (len(chunks),), generator=g)
            assert slot_decodes(batch, caches["slot"]) and not slot_decodes(batch, caches["paged"])
            for kind, cache in caches.items():
                hidden[kind] = model(ids, batch, cache)
            torch.testing.assert_close(hidden["slot"], hidden["paged"])
    a, b = caches["slot"], caches["paged"]
    for field in ("conv", "recurrent", "key", "value"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), msg=field)


def test_a_slot_decode_step_writes_nothing_until_stored():
    """What lets torch.compile take the step as one graph: the slots and copies it reads are
    unchanged by the forward; its new states come back from outputs()."""
    model, config, _ = load_model("qwen35-tiny", dtype="float32", progress=False)
    cache = HybridCache.allocate(config, num_slots=4, num_blocks=8, block_size=BLOCK,
                                 dtype=torch.float32)  # fmt: skip
    torch.manual_seed(0)
    cache.conv.normal_()
    cache.recurrent.normal_()
    cache.key.normal_()
    cache.value.normal_()
    batch = ForwardBatch.build([SeqChunk(9, 1, 2, [3]), SeqChunk(4, 1, 0, [5])], BLOCK)
    with torch.inference_mode():
        step = SlotDecode(*slot_decode_inputs(batch, cache, len(config.attention_layers)))
        before = [t.clone() for t in (cache.conv, cache.recurrent, cache.key, cache.value)]
        model.hidden_states(torch.tensor([1, 2]), step)
        after = (cache.conv, cache.recurrent, cache.key, cache.value)
        for x, y in zip(before, after):
            assert torch.equal(x, y)
        conv, recurrent, k, v = step.outputs()
    n_gdn, n_attn = len(config.gdn_layers), len(config.attention_layers)
    assert conv.shape[:2] == recurrent.shape[:2] == (n_gdn, 2)
    assert k.shape[:2] == v.shape[:2] == (n_attn, 2)
    # and the paged step of the same batch writes them in place, as stored
    assert not torch.equal(conv, before[0][:, batch.state_indices])
    with torch.inference_mode():
        model.hidden_states(torch.tensor([1, 2]), PagedStep(batch, cache, model.kernels))
    torch.testing.assert_close(cache.conv[:, batch.state_indices], conv)
    torch.testing.assert_close(cache.recurrent[:, batch.state_indices], recurrent)
