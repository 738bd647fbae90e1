"""serving/serve_mode.py: the Serve mode qwen35-ray starts Ray in, and each call's transport."""

import logging

from serve_fixtures import readme_serve_run

from qwen35_ray.serving.serve_mode import (
    FAST_SERVE_ENV,
    GRPC_MAX_PAYLOAD,
    fast_serve_active,
    heavy,
    started_env,
    use_fast_serve,
    warn_if_slow_serve,
)


def test_it_fills_in_what_the_user_did_not_set_and_keeps_what_they_did():
    environ = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "PATH": "/bin"}
    assert started_env(environ)["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    added = use_fast_serve(environ)
    assert added == {k: v for k, v in FAST_SERVE_ENV.items() if k != "RAY_SERVE_ENABLE_HA_PROXY"}
    assert environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and environ["PATH"] == "/bin"
    assert not fast_serve_active(environ)
    assert fast_serve_active(dict(FAST_SERVE_ENV))


def test_a_cluster_without_the_mode_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="qwen35_ray.serving.serve_mode"):
        line = warn_if_slow_serve({})
        assert warn_if_slow_serve(dict(FAST_SERVE_ENV)) is None
    assert line is not None and "RAY_SERVE_ENABLE_HA_PROXY=1" in line
    assert [r.getMessage() for r in caplog.records] == [line]


def test_images_and_megabytes_go_by_reference_the_rest_over_grpc():
    params = {"max_tokens": 16, "structured": {"type": "json_object"}}
    assert not heavy(list(range(4096)), params, None)
    assert not heavy(list(range(4096)), params, [])
    assert heavy([1, 2], params, ["an image"])
    # a 262K-token prompt pickles to about 1.3 MB; a schema of a megabyte is heavy too
    assert heavy(list(range(262_144)), params, None)
    schema = {"type": "object", "description": "x" * GRPC_MAX_PAYLOAD}
    assert heavy([1, 2], {**params, "structured": {"type": "json_schema", "schema": schema}}, None)


def test_the_readme_starts_serve_in_its_high_throughput_mode():
    env, argv = readme_serve_run()
    assert argv == ["serve", "run", "deployments/qwen35.yaml"]
    assert env == FAST_SERVE_ENV
