"""deployments/qwen35-pd-autoscale.yaml: valid for Serve and for the app, both pools on their
own policies, small enough for a 2-core machine, quick enough for a test to see it scale."""

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from qwen35_ray.serving.autoscaling import check_autoscaling_config
from qwen35_ray.serving.builder import build_pd_app, parse_args

ROOT = Path(__file__).resolve().parents[2]
POLICIES = {"prefill_server": "prefill_policy", "decode_server": "decode_policy"}


def shipped() -> dict:
    return yaml.safe_load((ROOT / "deployments" / "qwen35-pd-autoscale.yaml").read_text())


def test_serve_and_the_app_accept_the_autoscale_yaml():
    doc = shipped()
    ServeDeploySchema.model_validate(doc)
    (app,) = doc["applications"]
    assert app["import_path"] == "qwen35_ray.serving.builder:build_pd_app"
    cfg = parse_args(app["args"])
    for pool, policy in POLICIES.items():
        options = cfg.serve_options(pool)
        assert "num_replicas" not in options
        autoscaling = options["autoscaling_config"]
        check_autoscaling_config(autoscaling, f"{pool}.autoscaling_config")
        assert (
            autoscaling["policy"]["policy_function"] == f"qwen35_ray.serving.autoscaling:{policy}"
        )
        assert autoscaling["min_replicas"] == 1 and autoscaling["max_replicas"] >= 2


def test_serve_builds_both_pools_with_their_policies():
    (app,) = shipped()["applications"]
    ingress = build_pd_app(app["args"])._bound_deployment
    # the ingress is bound to the pools' applications
    bound = [a._bound_deployment for a in ingress.init_args if hasattr(a, "_bound_deployment")]
    pools = {d.name: d for d in bound}
    for name, policy in (("PrefillServer", "prefill_policy"), ("DecodeServer", "decode_policy")):
        config = pools[name]._deployment_config.autoscaling_config
        # what the controller will run: the policy, deserialized from the config
        assert config.policy.get_policy().__name__ == policy


def test_it_fits_a_two_core_machine_at_its_largest():
    (app,) = shipped()["applications"]
    cfg = parse_args(app["args"])
    cpus = cfg.ingress.num_cpus * cfg.ingress.num_replicas
    for pool in POLICIES:
        deployment = getattr(cfg, pool)
        cpus += deployment.num_cpus * deployment.autoscaling_config["max_replicas"]
    assert cpus <= 2


def test_it_reacts_within_seconds():
    """Signals reach the controller every metrics_interval_s and average over
    look_back_period_s; a change waits upscale_delay_s, a step down quiet_period_s more."""
    (app,) = shipped()["applications"]
    for pool in POLICIES:
        a = app["args"][pool]["autoscaling_config"]
        assert a["metrics_interval_s"] + a["look_back_period_s"] + a["upscale_delay_s"] <= 10
        assert a["policy"]["policy_kwargs"]["quiet_period_s"] + a["downscale_delay_s"] <= 15
