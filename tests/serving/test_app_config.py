"""The Serve YAML `args`: the shipped file is valid, and mistakes are named readably."""

from pathlib import Path

import pytest
import yaml

from qwen35_ray.serving.builder import parse_args
from qwen35_ray.serving.config import ENGINE_POOLS, AppConfig
from qwen35_ray.serving.pool_config import MIN_BUNDLE_CPU

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_yaml_args_are_valid():
    (app,) = yaml.safe_load((ROOT / "deployments" / "qwen35.yaml").read_text())["applications"]
    assert app["import_path"] == "qwen35_ray.serving.builder:build_app"
    cfg = parse_args(app["args"])
    assert cfg.model == "qwen35-tiny" and cfg.serve_options("llm_server")["num_replicas"] == 1


def test_shipped_pd_yaml_args_are_valid():
    (app,) = yaml.safe_load((ROOT / "deployments" / "qwen35-pd.yaml").read_text())["applications"]
    assert app["import_path"] == "qwen35_ray.serving.builder:build_pd_app"
    cfg = parse_args(app["args"])
    assert cfg.disaggregation.transfer == "object_store"
    assert cfg.serve_options("prefill_server")["num_replicas"] == 1
    assert cfg.serve_options("decode_server")["num_replicas"] == 1


@pytest.mark.parametrize(
    "args,named",
    [
        ({"engine": {"max_num_seqs": 0}}, "engine.max_num_seqs"),
        ({"dtype": "float8"}, "dtype"),
        ({"llm_server": {"num_replicas": 2, "gpus": 1}}, "llm_server.gpus"),
        ({"llm_server": {"num_gpus": 1}}, "llm_server.num_gpus > 0 needs device: cuda"),
        ({"modle": "x"}, "modle"),
        ({"decode_server": {"num_gpus": 1}}, "decode_server.num_gpus > 0 needs device: cuda"),
        ({"disaggregation": {"transfer": "tcp"}}, "disaggregation.transfer"),
        ({"disaggregation": {"min_prefill_tokens": -1}}, "disaggregation.min_prefill_tokens"),
        ({"migration_limit": -1}, "migration_limit"),
        ({"decode_server": {"graceful_shutdown_timeout_s": -1}}, "graceful_shutdown_timeout_s"),
        ({"llm_server": {"graceful_shutdown_wait_loop_s": 0}}, "graceful_shutdown_wait_loop_s"),
    ],
)
def test_invalid_args_name_the_setting(args, named):
    with pytest.raises(ValueError, match="invalid qwen35-ray app args") as e:
        parse_args(args)
    assert named in str(e.value)


def test_autoscaling_replaces_a_fixed_replica_count():
    cfg = parse_args({"llm_server": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}})
    options = cfg.serve_options("llm_server")
    assert "num_replicas" not in options and options["autoscaling_config"]["max_replicas"] == 3


def test_each_pool_drains_within_its_graceful_shutdown_timeout():
    """Serve waits graceful_shutdown_timeout_s for a stopping replica's requests (checking
    every graceful_shutdown_wait_loop_s) before it kills the replica; the streams cut off then
    migrate, up to migration_limit times each."""
    cfg = parse_args(
        {
            "decode_server": {
                "graceful_shutdown_timeout_s": 5,
                "graceful_shutdown_wait_loop_s": 0.5,
            },
            "migration_limit": 0,
        }
    )
    decode = cfg.serve_options("decode_server")
    assert decode["graceful_shutdown_timeout_s"] == 5
    assert decode["graceful_shutdown_wait_loop_s"] == 0.5
    # Serve's own defaults elsewhere
    for pool in ("prefill_server", "llm_server", "ingress"):
        assert cfg.serve_options(pool)["graceful_shutdown_timeout_s"] == 20
        assert cfg.serve_options(pool)["graceful_shutdown_wait_loop_s"] == 2
    assert cfg.migration_limit == 0 and AppConfig().migration_limit == 3


def test_api_key_is_masked_and_kept_from_the_engine_replicas():
    from qwen35_ray.serving.builder import _without_key

    cfg = parse_args({"api_key": "sk-secret"})
    assert "sk-secret" not in repr(cfg) and "sk-secret" not in str(cfg.model_dump(mode="json"))
    assert cfg.resolve_api_key() == "sk-secret"
    assert "api_key" not in _without_key(cfg)


def test_api_key_from_an_environment_variable(monkeypatch):
    monkeypatch.setenv("QWEN35_TEST_KEY", "sk-env")
    assert parse_args({"api_key_env": "QWEN35_TEST_KEY"}).resolve_api_key() == "sk-env"
    monkeypatch.delenv("QWEN35_TEST_KEY")
    with pytest.raises(ValueError, match="api_key_env='QWEN35_TEST_KEY'"):
        parse_args({"api_key_env": "QWEN35_TEST_KEY"}).resolve_api_key()


def test_api_key_from_a_file(tmp_path):
    secret = tmp_path / "key"
    secret.write_text("sk-file\n")
    assert parse_args({"api_key_file": str(secret)}).resolve_api_key() == "sk-file"
    with pytest.raises(ValueError, match="api_key_file"):
        parse_args({"api_key_file": str(tmp_path / "missing")}).resolve_api_key()


def test_one_source_of_api_key():
    with pytest.raises(ValueError, match="set one of api_key, api_key_env"):
        parse_args({"api_key": "a", "api_key_env": "B"})


def test_a_pool_engine_overrides_the_top_level_engine():
    cfg = parse_args(
        {
            "engine": {"max_num_seqs": 4, "block_size": 32},
            "decode_server": {"engine": {"expert_parallel_size": 2, "rank_num_cpus": 0.5}},
        }
    )
    decode, prefill = cfg.engine_for("decode_server"), cfg.engine_for("prefill_server")
    assert (decode.expert_parallel_size, decode.rank_num_cpus) == (2, 0.5)
    assert decode.max_num_seqs == 4 and decode.block_size == 32
    assert prefill.expert_parallel_size == 1 and prefill.max_num_seqs == 4
    # what a replica receives (the builder dumps the config) keeps only the keys given
    again = AppConfig.model_validate(cfg.model_dump())
    for pool in ENGINE_POOLS:
        assert again.engine_for(pool) == cfg.engine_for(pool)
    assert cfg.model_dump()["decode_server"]["engine"] == {
        "expert_parallel_size": 2,
        "rank_num_cpus": 0.5,
    }
    with pytest.raises(ValueError, match="runs no engine"):
        cfg.engine_for("ingress")


@pytest.mark.parametrize(
    "args,named",
    [
        (
            {"decode_server": {"engine": {"expert_parallel": 2}}},
            "decode_server.engine.expert_parallel",
        ),
        ({"ingress": {"engine": {"max_num_seqs": 2}}}, "ingress.engine"),
        ({"engine": {"expert_parallel_size": 0}}, "engine.expert_parallel_size"),
        ({"llm_server": {"engine": {"rank_num_cpus": 0}}}, "llm_server.engine.rank_num_cpus"),
        ({"engine": {"placement_strategy": "RANDOM"}}, "engine.placement_strategy"),
        (
            {"decode_server": {"engine": {"expert_parallel_size": 2, "rank_num_gpus": 1}}},
            "decode_server.engine.rank_num_gpus=1 needs device: cuda",
        ),
        (
            {"device": "cuda", "engine": {"expert_parallel_size": 2}},
            "engine.rank_num_gpus=0; set rank_num_gpus: 1",
        ),
        (
            {
                "device": "cuda",
                "engine": {"rank_num_gpus": 1},
                "prefill_server": {"engine": {"rank_num_gpus": 0.5, "expert_parallel_size": 4}},
            },
            "prefill_server.engine.expert_parallel_size=4 on device cuda",
        ),
    ],
)
def test_invalid_expert_parallel_args_name_the_setting(args, named):
    with pytest.raises(ValueError, match="invalid qwen35-ray app args") as e:
        parse_args(args)
    assert named in str(e.value)


def test_an_expert_parallel_pool_reserves_its_ranks_with_the_replica():
    from ray import serve

    from qwen35_ray.serving.llm_server import LLMServer

    cfg = parse_args(
        {
            "engine": {"max_num_seqs": 8},
            "prefill_server": {"num_cpus": 0.5},
            "decode_server": {
                "num_cpus": 0,
                "engine": {"expert_parallel_size": 3, "placement_strategy": "PACK"},
            },
        }
    )
    prefill, decode = cfg.serve_options("prefill_server"), cfg.serve_options("decode_server")
    assert "placement_group_bundles" not in prefill and "health_check_period_s" not in prefill
    # bundle 0: the replica (no resources asked: Ray refuses an empty bundle); 1..3: the ranks
    assert decode["placement_group_bundles"] == [{"CPU": MIN_BUNDLE_CPU}] + [{"CPU": 1.0}] * 3
    assert decode["placement_group_strategy"] == "PACK"
    assert decode["health_check_period_s"] <= 2 and decode["health_check_timeout_s"] <= 5
    # three ranks of 8 slots each: three times the requests in flight and queued
    assert decode["max_ongoing_requests"] == 3 * prefill["max_ongoing_requests"]
    assert decode["max_queued_requests"] == 3 * prefill["max_queued_requests"]
    assert cfg.waiting_limits("decode_server") == (3 * 4 * 8, 3 * 8 * 2048)
    # Serve's own checks (bundle 0 holds the replica actor's resources, no empty bundle)
    serve.deployment(LLMServer, name="d", **decode)

    gpu = parse_args(
        {
            "device": "cuda",
            "llm_server": {"num_cpus": 2, "num_gpus": 0},
            "engine": {"expert_parallel_size": 2, "rank_num_gpus": 1, "rank_num_cpus": 4},
        }
    ).serve_options("llm_server")
    assert gpu["placement_group_bundles"] == [{"CPU": 2}] + [{"CPU": 4, "GPU": 1}] * 2
    assert gpu["placement_group_strategy"] == "STRICT_PACK"
    serve.deployment(LLMServer, name="g", **gpu)


def test_the_ingress_context_is_the_shortest_of_its_pools():
    """A pool's own max_model_len bounds what the ingress admits, not the top-level one."""
    pd = AppConfig.model_validate(
        {
            "engine": {"max_model_len": 4096},
            "prefill_server": {"engine": {"max_model_len": 2048}},
            "decode_server": {"engine": {"max_model_len": 1024}},
        }
    )
    assert pd.max_model_len(disaggregated=True) == 1024
    assert pd.max_model_len(disaggregated=False) == 4096
    one = AppConfig.model_validate({"llm_server": {"engine": {"max_model_len": 512}}})
    assert one.max_model_len(disaggregated=False) == 512
    assert AppConfig().max_model_len(disaggregated=True) is None


MTP2 = {"method": "qwen3_next_mtp", "num_speculative_tokens": 2}


def test_speculative_reaches_the_engine_of_every_pool_that_sets_it():
    from qwen35_ray.engine.config import EngineConfig

    cfg = parse_args({"engine": {"speculative": MTP2}})
    for pool in ENGINE_POOLS:
        kwargs = cfg.engine_for(pool).engine_kwargs
        assert kwargs["speculative"] == MTP2
        assert EngineConfig(**kwargs).speculative.num_speculative_tokens == 2
    # a replica re-validates the dumped config
    assert AppConfig.model_validate(cfg.model_dump()).engine.speculative == MTP2
    one = parse_args({"decode_server": {"engine": {"speculative": {"num_speculative_tokens": 1}}}})
    assert one.engine_for("decode_server").speculative == {
        "method": "mtp",
        "num_speculative_tokens": 1,
    }
    assert one.engine_for("prefill_server").speculative is None


@pytest.mark.parametrize(
    "args,named",
    [
        (
            {"engine": {"speculative": {"method": "ngram", "num_speculative_tokens": 2}}},
            "engine.speculative: Value error, speculative.method='ngram' is not supported",
        ),
        (
            {"engine": {"speculative": {"method": "mtp", "num_speculative_tokens": 5}}},
            "speculative.num_speculative_tokens=5 must be an integer from 1 to 4",
        ),
        ({"engine": {"speculative": {"method": "mtp"}}}, "num_speculative_tokens is required"),
        (
            {"engine": {"speculative": {**MTP2, "model": "x"}}},
            "speculative: model not supported",
        ),
        ({"engine": {"speculative": MTP2, "expert_parallel_size": 2}}, "engine: Value error"),
        (
            {"decode_server": {"engine": {"speculative": MTP2, "expert_parallel_size": 2}}},
            "decode_server.engine: Value error",
        ),
        (
            {
                "engine": {"speculative": MTP2},
                "decode_server": {"engine": {"expert_parallel_size": 2}},
            },
            "decode_server.engine over the top-level engine: speculative",
        ),
    ],
)
def test_invalid_speculative_args_name_the_setting(args, named):
    with pytest.raises(ValueError, match="invalid qwen35-ray app args") as e:
        parse_args(args)
    assert named in str(e.value)
    if "expert_parallel_size" in str(args):
        assert "MTP layer's experts are not sharded across ranks" in str(e.value)
