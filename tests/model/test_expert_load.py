"""ExpertLoad: the routed pairs per layer and expert over a sliding window of steps, the sum of
several ranks' snapshots and the max/mean imbalance read from it."""

import pytest
import torch
from model_driver import Driver
from torch import nn

from qwen35_ray.model.expert_load import NUM_BUCKETS, ExpertLoad, ExpertLoadSnapshot
from qwen35_ray.model.loader import load_model


def route(load: ExpertLoad, ids_per_layer: list[list[int]]) -> None:
    """What SparseMoE.forward adds for one step, then the step's end."""
    for m, ids in zip(load.layers, ids_per_layer):
        m.expert_counts.index_add_(0, torch.tensor(ids), torch.ones(len(ids), dtype=torch.long))
    load.end_step()


def test_window_keeps_the_last_steps_in_bounded_memory():
    load = ExpertLoad([nn.Module(), nn.Module()], num_experts=4, window_steps=20)
    assert load.bucket_steps == 2
    history = []
    for step in range(57):
        ids = [[step % 4], [0, 1, 2, 3]]
        route(load, ids)
        history.append(ids)
        snap = load.snapshot()
        assert load._ring.shape == (NUM_BUCKETS, 2, 4)
        # whole buckets drop out: between window - bucket and window steps once full
        assert snap.steps == min(step + 1, 18 + (step + 1) % 2)
        expected = torch.zeros(2, 4, dtype=torch.long)
        for ids in history[len(history) - snap.steps :]:
            for layer, layer_ids in enumerate(ids):
                expected[layer, layer_ids] += 1
        assert torch.equal(snap.counts, expected), step


def test_reset_and_an_empty_window():
    load = ExpertLoad([nn.Module()], num_experts=3, window_steps=10)
    assert load.snapshot().steps == 0 and load.snapshot().counts.tolist() == [[0, 0, 0]]
    route(load, [[1, 1, 2]])
    assert load.snapshot().counts.tolist() == [[0, 2, 1]]
    load.reset()
    assert load.snapshot().steps == 0 and load.snapshot().counts.sum() == 0
    with pytest.raises(ValueError, match="window_steps=3"):
        ExpertLoad([nn.Module()], num_experts=3, window_steps=3)


def test_ranks_snapshots_add_up():
    a = ExpertLoadSnapshot(torch.tensor([[1, 0], [2, 2]]), steps=5)
    b = ExpertLoadSnapshot(torch.tensor([[0, 3], [1, 0]]), steps=4)
    merged = ExpertLoadSnapshot.merge([a, b])
    assert merged.counts.tolist() == [[1, 3], [3, 2]] and merged.steps == 5
    with pytest.raises(ValueError, match="at least one"):
        ExpertLoadSnapshot.merge([])


def test_imbalance_per_expert_and_per_rank():
    even = ExpertLoadSnapshot(torch.full((2, 4), 5), steps=1)
    assert even.imbalance(2) == {"expert_max_over_mean": 1.0, "rank_max_over_mean": 1.0}
    # layer 0 all on expert 0 (rank 0 of 2), layer 1 even, layer 2 routed nothing (ignored)
    skewed = ExpertLoadSnapshot(torch.tensor([[8, 0, 0, 0], [2, 2, 2, 2], [0, 0, 0, 0]]), 1)
    got = skewed.imbalance(2)
    assert got["expert_max_over_mean"] == pytest.approx((4 + 1) / 2)
    assert got["rank_max_over_mean"] == pytest.approx((2 + 1) / 2)
    # 8 experts over 3 ranks hold 3, 3, 2: even experts, uneven ranks
    uneven = ExpertLoadSnapshot(torch.ones(1, 8, dtype=torch.long), 1).imbalance(3)
    assert uneven["rank_max_over_mean"] == pytest.approx(3 / (8 / 3))
    idle = ExpertLoadSnapshot(torch.zeros(2, 4, dtype=torch.long), 0).imbalance(2)
    assert idle == {"expert_max_over_mean": 0.0, "rank_max_over_mean": 0.0}


def test_the_model_records_each_forward_as_a_step():
    model, config, _ = load_model("qwen35-tiny", dtype="float32", with_mtp=True, progress=False)
    driver = Driver(model, config, with_mtp=True)
    driver.step({0: list(range(11)), 1: list(range(5))})
    _, hidden, batch = driver.step({0: [3], 1: [4]})
    with torch.no_grad():
        model.mtp_forward(torch.tensor([5, 6]), hidden, batch, driver.cache)
    snap = model.expert_load.snapshot()
    k = config.num_experts_per_tok
    # the main MoE layers only: the MTP layer's drafts are not served tokens
    assert snap.counts.shape == (sum(config.moe_layers), config.num_experts)
    assert snap.steps == 2
    assert snap.counts.sum(1).tolist() == [18 * k] * sum(config.moe_layers)
    assert all(m.expert_counts.sum() == 0 for m in model.expert_load.layers)
    assert model.resident_expert_bytes() == model.total_expert_bytes() > 0


def test_a_dense_model_has_no_expert_load():
    model, _, _ = load_model("qwen35-tiny-dense", dtype="float32", progress=False)
    assert model.expert_load is None
    assert model.resident_expert_bytes() == model.total_expert_bytes() == 0
    model.idle_forward()
