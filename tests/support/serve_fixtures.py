"""A real local Ray cluster running a qwen35-ray Serve app, for HTTP tests."""

import re
import shlex
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]


def readme_serve_run() -> tuple[dict[str, str], list[str]]:
    """The environment and argv of the last step of the README's install-and-run command."""
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```bash\n# install and run\n(.+?)\n```", readme, re.S).group(1)
    words = shlex.split(command.split("&&")[-1])
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    return env, [w for w in words if not re.match(r"^[A-Z_]+=", w)]


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
    """Run {name: (route_prefix, serve.Application)} on a fresh local cluster in Serve's
    high-throughput mode; yields the HTTP base URL once every app answers /health."""
    import ray
    from ray import serve

    from qwen35_ray.serving.serve_mode import fast_serve_env

    port = free_port()
    # Serve in the mode users get (HAProxy, gRPC between replicas: serving/serve_mode.py)
    with fast_serve_env():
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
