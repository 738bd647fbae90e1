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
    import ray
    from ray import serve

    from qwen35_ray.serving.builder import build_app

    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, logging_level="warning")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=name, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if time.time() > deadline:
            raise TimeoutError("the Serve app did not become healthy in 120 s")
        time.sleep(0.5)
    try:
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
