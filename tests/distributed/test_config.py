"""EPConfig and build_engine refuse what an expert-parallel group cannot run, naming the
setting, before any Ray actor starts."""

import pytest

from qwen35_ray.distributed.build import build_engine
from qwen35_ray.distributed.config import EPConfig
from qwen35_ray.engine.llm_engine import LLMEngine


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        ({"size": 0}, "expert_parallel_size=0"),
        ({"size": 2.0}, "expert_parallel_size=2.0"),
        ({"size": 2, "num_cpus": 0}, "rank_num_cpus=0"),
        ({"size": 2, "num_gpus": -1}, "rank_num_gpus=-1"),
        ({"size": 2, "placement_strategy": "ANYWHERE"}, "placement_strategy='ANYWHERE'"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        EPConfig(**kwargs)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        EPConfig().size = 2


@pytest.mark.parametrize(
    "ep, device, experts, setting",
    [
        (EPConfig(2), "cuda", 16, "needs rank_num_gpus >= 1"),
        (EPConfig(2, num_gpus=1), "cpu", 16, "rank_num_gpus=1 reserves GPUs"),
        (EPConfig(2), "cpu", 0, "this model is dense"),
        (EPConfig(17), "cpu", 16, "expert_parallel_size=17 exceeds the model's 16"),
    ],
)
def test_group_checks_name_the_setting(ep, device, experts, setting):
    with pytest.raises(ValueError, match=setting):
        ep.check(device, experts)


def test_size_one_is_the_in_process_engine_whatever_the_rank_resources():
    EPConfig(1, num_gpus=1).check("cpu", 0)
    engine = build_engine("qwen35-tiny", "float32", ep=EPConfig(1), max_model_len=256)
    assert type(engine) is LLMEngine


@pytest.mark.parametrize(
    "model, ep, kwargs, setting",
    [
        ("qwen35-tiny", EPConfig(17), {}, "expert_parallel_size=17"),
        ("qwen35-tiny-dense", EPConfig(2), {}, "dense"),
        ("qwen35-tiny", EPConfig(2), {"compile_decode": True}, "compile_decode=False"),
        (
            "qwen35-tiny",
            EPConfig(2),
            {"speculative": {"method": "mtp", "num_speculative_tokens": 2}},
            "MTP layer's experts are not sharded across ranks",
        ),
    ],
)
def test_build_engine_refuses_before_starting_ranks(model, ep, kwargs, setting, monkeypatch):
    import qwen35_ray.distributed.build as build

    def no_ray(ep):
        raise AssertionError("Ray was started for a configuration that cannot run")

    monkeypatch.setattr(build, "ensure_ray", no_ray)
    with pytest.raises(ValueError, match=setting):
        build_engine(model, "float32", ep=ep, max_model_len=256, **kwargs)
