"""Pinning a pool to nodes: `resources` (Ray custom resources) and `accelerator_type` on any
deployment of the app, carried into Serve's options and, for expert-parallel pools, into every
placement-group bundle; mistakes named readably. The pins working on a real multi-node cluster
are tested in tests/cluster/test_local_cluster.py."""

import pytest

from qwen35_ray.serving.builder import parse_args


def test_a_pin_becomes_the_replicas_resources():
    cfg = parse_args(
        {
            "prefill_server": {"num_cpus": 0.5, "resources": {"prefill_node": 0.01}},
            "decode_server": {"resources": {"decode_node": 0.01}},
        }
    )
    prefill = cfg.serve_options("prefill_server")["ray_actor_options"]
    assert prefill == {"num_cpus": 0.5, "num_gpus": 0.0, "resources": {"prefill_node": 0.01}}
    assert cfg.serve_options("decode_server")["ray_actor_options"]["resources"] == {
        "decode_node": 0.01
    }
    # nothing pinned: no resources key at all, so Serve's defaults stand
    assert "resources" not in cfg.serve_options("ingress")["ray_actor_options"]


def test_an_expert_parallel_pool_pins_every_bundle():
    from ray import serve

    from qwen35_ray.serving.llm_server import LLMServer

    cfg = parse_args(
        {
            "device": "cuda",
            "llm_server": {
                "num_cpus": 1,
                "resources": {"decode_node": 0.01},
                "accelerator_type": "H100",
            },
            "engine": {
                "expert_parallel_size": 2,
                "rank_num_gpus": 1,
                "rank_num_cpus": 4,
                "placement_strategy": "PACK",
            },
        }
    )
    opts = cfg.serve_options("llm_server")
    pin = {"decode_node": 0.01, "accelerator_type:H100": 0.001}
    assert (
        opts["placement_group_bundles"] == [{"CPU": 1, **pin}] + [{"CPU": 4, "GPU": 1, **pin}] * 2
    )
    assert opts["ray_actor_options"]["accelerator_type"] == "H100"
    # Serve's own check: the replica's actor options fit bundle 0
    serve.deployment(LLMServer, name="pinned", **opts)

    cpu = parse_args(
        {"llm_server": {"resources": {"n": 0.5}}, "engine": {"expert_parallel_size": 2}}
    ).serve_options("llm_server")
    # CPU ranks carry the node pin, and no GPU type
    assert cpu["placement_group_bundles"] == [{"CPU": 1.0, "n": 0.5}] + [{"CPU": 1.0, "n": 0.5}] * 2


@pytest.mark.parametrize(
    "args, message",
    [
        ({"llm_server": {"resources": {"CPU": 1}}}, "use num_cpus, num_gpus or accelerator_type"),
        ({"llm_server": {"resources": {"GPU": 1}}}, "'GPU' is not a custom resource"),
        (
            {"decode_server": {"resources": {"accelerator_type:H100": 1}}},
            "decode_server.resources",
        ),
        ({"llm_server": {"resources": {"decode_node": 0}}}, "decode_node=0 must be > 0"),
        ({"llm_server": {"resources": {"decode_node": -1}}}, "must be > 0"),
        ({"llm_server": {"resources": {"x": 0.00001}}}, "steps of 0.0001"),
        ({"llm_server": {"resources": {" x": 1}}}, "surrounding spaces"),
        ({"llm_server": {"resources": {"my_bundle": 1}}}, "reserves names containing 'bundle'"),
        ({"llm_server": {"resources": "prefill_node"}}, "llm_server.resources"),
        (
            {"llm_server": {"accelerator_type": "H100"}},
            "llm_server.accelerator_type='H100' pins a pool that uses no GPU",
        ),
        ({"ingress": {"accelerator_type": "H100"}}, "ingress.accelerator_type"),
        ({"llm_server": {"accelerator_type": ""}}, "llm_server.accelerator_type"),
        ({"llm_server": {"resorces": {"x": 1}}}, "llm_server.resorces: Extra inputs"),
    ],
)
def test_placement_mistakes_are_named(args, message):
    with pytest.raises(ValueError) as err:
        parse_args(args)
    assert message in str(err.value)


def test_a_gpu_type_pin_on_a_gpu_pool_is_accepted():
    cfg = parse_args(
        {"device": "cuda", "decode_server": {"num_gpus": 1, "accelerator_type": "A100"}}
    )
    actor = cfg.serve_options("decode_server")["ray_actor_options"]
    assert actor == {"num_cpus": 1.0, "num_gpus": 1.0, "accelerator_type": "A100"}


def test_a_pin_no_node_offers_is_warned_at_deploy(monkeypatch, caplog):
    """Serve would leave such a replica pending without a word; the builder names the resource
    (the cluster's resources stubbed here; on a real cluster in tests/cluster)."""
    from qwen35_ray.serving import builder

    monkeypatch.setattr(builder.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(
        builder.ray, "cluster_resources", lambda: {"CPU": 4.0, "decode_node": 100.0}
    )
    cfg = parse_args(
        {
            "device": "cuda",
            "prefill_server": {"resources": {"prefill_node": 0.01}},
            "decode_server": {
                "resources": {"decode_node": 0.01},
                "num_gpus": 1,
                "accelerator_type": "H100",
            },
        }
    )
    warned = builder.warn_unplaceable(cfg, ("ingress", "prefill_server", "decode_server"))
    assert len(warned) == 2
    assert "prefill_server asks for resource 'prefill_node'" in warned[0]
    assert "ray start --resources='{\"prefill_node\": 100}'" in warned[0]
    assert "'accelerator_type:H100'" in warned[1] and "with that GPU type" in warned[1]
    assert "prefill_node" in caplog.text
    # pools the app does not run are not its business
    assert builder.warn_unplaceable(cfg, ("ingress", "decode_server"))[0].startswith("decode")
