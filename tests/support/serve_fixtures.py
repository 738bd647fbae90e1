"""A real local Ray cluster running a qwen35-ray Serve app, for HTTP tests."""

import socket
import time
from contextlib import contextmanager

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(args: dict, name: str = "qwen35"):
    from qwen35_ray.serving.builder import build_app

    with running_apps({name: ("/", build_app(args))}) as url:
        yield url


@contextmanager
def tiny_app(directory, served_model_name: str = "qwen35-tiny"):
    """The collocated app on a freshly written tiny checkpoint in `directory`, fp32, 8 slots."""
    from qwen35_ray.cli import main as cli

    cli(["make-tiny", str(directory)])
    args = {
        "model": str(directory),
        "served_model_name": served_model_name,
        "dtype": "float32",
        "engine": {"max_num_seqs": 8, "max_model_len": 2048, "kv_cache_memory_bytes": 2**26},
    }
    with running_app(args) as url:
        yield url


@contextmanager
def running_apps(apps: dict, num_cpus: int = 4):
    """Run {name: (route_prefix, serve.Application)} on a fresh local cluster; yields the
    HTTP base URL once every app answers /health."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        ignore_reinit_error=True,
        logging_level="warning",
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, (prefix, application) in apps.items():
        serve.run(application, name=name, route_prefix=prefix, blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    for prefix, _ in apps.values():
        health = url + prefix.rstrip("/") + "/health"
        while True:
            try:
                if requests.get(health, timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"{health} did not answer in 180 s")
            time.sleep(0.5)
    try:
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
