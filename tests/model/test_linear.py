"""Fused projections and the CPU weight layout (model/linear.py) after load_model."""

import torch
from hf_reference import hf_model, save

from qwen35_ray.model.attention import GatedAttention
from qwen35_ray.model.gdn import GatedDeltaNet
from qwen35_ray.model.linear import project
from qwen35_ray.model.loader import load_model
from qwen35_ray.model.mlp import Experts, SparseMoE


def test_loaded_projections_are_views_of_one_column_major_weight(tmp_path):
    path = save(hf_model("qwen3_5_moe"), tmp_path)
    model, _, _ = load_model(path, dtype="float32", progress=False)
    fused_kinds = {
        GatedDeltaNet: "in_proj_fused",
        GatedAttention: "qkv_fused",
        SparseMoE: "in_fused",
    }
    seen = set()
    for m in model.modules():
        name = fused_kinds.get(type(m))
        if name is None:
            continue
        seen.add(type(m))
        fused = getattr(m, name)
        assert fused.stride(0) == 1  # column-major
        modules = m._in_projs()
        start = 0
        for sub in modules:  # each weight is its rows of the fused one: nothing stored twice
            n = sub.weight.shape[0]
            assert sub.weight.data_ptr() == fused[start : start + n].data_ptr()
            start += n
        assert start == fused.shape[0]
        x = torch.randn(3, fused.shape[1])
        for got, sub in zip(project(x, fused, modules), modules):
            torch.testing.assert_close(got, x @ sub.weight.T)
    assert seen == set(fused_kinds)
    matrices = [p for p in model.parameters() if p.dim() == 2]
    assert all(p.stride(0) == 1 for p in matrices if p is not model.embed_tokens.weight)
    # the stacked routed experts stay as stored: row-major, one expert's rows after another
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts
    for m in experts:
        for p in (m.gate_up_proj, m.down_proj):
            assert p.is_contiguous()
