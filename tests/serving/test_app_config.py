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
    assert cfg.model == "qwen35-tiny" and cfg.llm_server.options()["num_replicas"] == 1


def test_shipped_pd_yaml_args_are_valid():
    (app,) = yaml.safe_load((ROOT / "deployments" / "qwen35-pd.yaml").read_text())["applications"]
    assert app["import_path"] == "qwen35_ray.serving.builder:build_pd_app"
    cfg = parse_args(app["args"])
    assert cfg.disaggregation.transfer == "object_store"
    assert cfg.prefill_server.options()["num_replicas"] == 1
    assert cfg.decode_server.options()["num_replicas"] == 1


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
    options = cfg.llm_server.options()
    assert "num_replicas" not in options and options["autoscaling_config"]["max_replicas"] == 3
