"""The Serve YAML `args`: the shipped file is valid, and mistakes are named readably."""

from pathlib import Path

import pytest
import yaml

from qwen35_ray.serving.builder import parse_args

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
