"""The runner of `qwen35-ray serve`: Ray, Serve and the app, up until Ctrl-C.

qwen35_ray/deploy/serve_flags.py turns the command line into a Serve config (ServeCommand);
run() serves it:

- without --address it starts a Ray of its own on this machine (never joining one already
  running here), with as many logical CPUs as the app reserves if the machine has fewer;
- with --address it joins that cluster, and refuses to replace an application of the same name;
- it prints the deployments' states every few seconds while the model loads, then the URL once
  the app is RUNNING and /health answers through the proxy;
- SIGINT (Ctrl-C) or SIGTERM stops it with exit code 0: its own Ray is shut down entirely
  (serve.shutdown, ray.shutdown: no process of it is left); on a joined cluster only its
  application is deleted, Serve and the other applications keep running.

--api-key reaches the ingress as an environment variable (serve_flags.API_KEY_ENV) named by
`api_key_env` in the args, so the key never appears in the app's args, which Ray's dashboard
shows. A local Ray's processes inherit this process's environment; a joined cluster gets it in
the job's runtime_env (`env_vars`), which Serve applies to the app's replicas, and which the
cluster's dashboard does show: on a shared cluster prefer --api-key-file or --api-key-env.
"""

import contextlib
import logging
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request

import ray
from ray import serve

from qwen35_ray.serving import builder as builders
from qwen35_ray.serving.serve_mode import fast_serve_active, use_fast_serve

# seconds between progress lines while the app starts (loading a real model takes minutes)
PROGRESS_PERIOD_S = 5.0
POLL_S = 0.5
# how long the proxy may take to answer /health once Serve reports the app RUNNING
HTTP_READY_S = 60.0
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# how long a local Ray's processes get to exit after ray.shutdown() before they are killed
RAY_EXIT_S = 20.0


def say(text: str) -> None:
    print(f"qwen35-ray serve: {text}", flush=True)


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError:
            return False
    return True


def _client_host(http_host: str, address: str | None) -> str:
    """Where a client on this machine reaches the proxy."""
    if http_host not in WILDCARD_HOSTS:
        return http_host
    if address and address not in ("auto", "local") and "://" not in address:
        return address.rsplit(":", 1)[0]
    return "127.0.0.1"


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _name(status) -> str:
    return getattr(status, "value", status)


def summary(message: str) -> str:
    """A deployment's message in at most two lines: a replica's start-up failure carries the
    whole traceback (Ray's log above shows it); its first line and the exception are enough."""
    lines = [x.strip() for x in message.splitlines() if x.strip()]
    if len(lines) <= 2:
        return "\n".join(lines)
    errors = [x for x in lines if re.match(r"[\w.]+(Error|Exception|Exit|Interrupt)\b.*:", x)]
    return f"{lines[0]}\n  {(errors or lines)[-1]}"


def _progress(app) -> str:
    parts = [f"{name} {_name(d.status)}" for name, d in sorted(app.deployments.items())]
    return f"{_name(app.status)}: " + (", ".join(parts) or "no deployments yet")


def _wait_ready(name: str, health_url: str) -> bool:
    """Print the deployments' states until the app is RUNNING and /health answers; False if
    Serve gives up on the app (its message printed)."""
    start = last_print = time.monotonic()
    said: set[str] = set()
    running_since = None
    while True:
        app = serve.status().applications.get(name)
        now = time.monotonic()
        if app is not None:
            for d in app.deployments.values():
                # Serve's own explanation of a wait (resources no node has, a replica that
                # failed to start and is retried), once each
                if d.message and d.message not in said:
                    said.add(d.message)
                    say(summary(d.message))
            if app.status == "DEPLOY_FAILED":
                say(f"application {name!r} failed to deploy: {summary(app.message)}")
                return False
            if app.status == "RUNNING":
                running_since = running_since or now
                if _http_ok(health_url):
                    return True
                if now - running_since > HTTP_READY_S:
                    say(f"{health_url} does not answer from here; the app is RUNNING")
                    return True
        if now - last_print >= PROGRESS_PERIOD_S:
            last_print = now
            state = _progress(app) if app is not None else "waiting for Serve"
            say(f"starting ({now - start:.0f} s) {state}")
        time.sleep(POLL_S)


def _start_ray(cmd, num_cpus: int) -> None:
    env = cmd.args.get("api_key_env")
    if cmd.address is None:
        # a Ray of our own even if RAY_ADDRESS points elsewhere; its processes inherit os.environ
        os.environ.pop("RAY_ADDRESS", None)
        if cmd.api_key is not None:
            os.environ[env] = cmd.api_key
        # Serve's high-throughput mode, unless this environment says otherwise; this
        # process's own handles keep the mode it imported Serve in
        use_fast_serve()
        mode = "HAProxy" if fast_serve_active() else "Serve's proxy"
        say(f"starting a local Ray ({num_cpus} CPUs; {mode})")
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
        return
    runtime_env = {"env_vars": {env: cmd.api_key}} if cmd.api_key is not None else None
    say(f"joining the Ray cluster at {cmd.address}")
    ray.init(address=cmd.address, runtime_env=runtime_env, logging_level=logging.WARNING)


def _http_address(cmd) -> tuple[str, int]:
    """The proxy's host and port: ours, or those of a Serve already running on the cluster
    (Serve keeps the HTTP options it started with)."""
    wanted = cmd.config["http_options"]
    try:
        http = serve.context._get_global_client().http_config
        host, port = http.host, http.port
    except Exception:  # private API: fall back to what was asked
        return wanted["host"], wanted["port"]
    if (host, port) != (wanted["host"], wanted["port"]):
        say(
            f"Serve already runs on this cluster at {host}:{port} and keeps that; "
            f"--host {wanted['host']} --port {wanted['port']} do not apply"
        )
    return host, port


def _serve(cmd, deployed: list) -> bool:
    """Deploy the app; True once it answers. Raises on a deploy Serve refuses. Appends the
    app's name to `deployed` once Serve has it (what a joined cluster's clean-up deletes)."""
    app_cfg = cmd.app
    name, prefix = app_cfg["name"], app_cfg["route_prefix"]
    serve.start(
        proxy_location=cmd.config["proxy_location"], http_options=cmd.config["http_options"]
    )
    if cmd.address is not None and name in serve.status().applications:
        raise RuntimeError(
            f"an application named {name!r} already runs on this cluster; qwen35-ray serve "
            "replaces no application it did not start: pass --app-name"
        )
    host, port = _http_address(cmd)
    application = getattr(builders, cmd.builder)(cmd.args)
    deployed.append(name)
    # run_many "connects to the existing Serve" started above and says, at INFO, that http
    # options it was never given are not applied; only that line is muted
    serve_log = logging.getLogger("ray.serve")
    level = serve_log.level
    serve_log.setLevel(logging.WARNING)
    try:
        serve.run_many(
            [serve.RunTarget(target=application, name=name, route_prefix=prefix)],
            wait_for_ingress_deployment_creation=False,
            wait_for_applications_running=False,
        )
    finally:
        serve_log.setLevel(level)
    base = f"http://{_client_host(host, cmd.address)}:{port}{prefix.rstrip('/')}"
    if not _wait_ready(name, base + "/health"):
        return False
    say(f"{cmd.builder} with args {cmd.args}")
    print(f"qwen35-ray serving {cmd.model_name} at {base}/v1", flush=True)
    return True


def _shutdown(cmd, deployed: list) -> None:
    # Ray's own dependency, vendored in ray/thirdparty_files: importable once ray is
    import psutil

    # a second Ctrl-C must not cut the clean-up short and leave Ray processes behind
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # our local Ray's processes: GCS and raylet, and under the raylet its agents and workers
    own = psutil.Process().children(recursive=True) if cmd.address is None else []
    try:
        if cmd.address is None:
            serve.shutdown()
        else:
            for name in deployed:
                say(f"deleting application {name!r}; Serve keeps running on the cluster")
                serve.delete(name)
    except Exception as e:
        say(f"stopping Serve failed: {e!r}")
    finally:
        ray.shutdown()
    # ray.shutdown() stops GCS and raylet; the agents and workers under the raylet notice and
    # exit on their own a few seconds later. Wait for them, so that nothing of ours outlives
    # the command, and end any that do not go.
    _, stuck = psutil.wait_procs(own, timeout=RAY_EXIT_S)
    for p in stuck:
        with contextlib.suppress(psutil.Error):
            p.kill()
    if stuck:
        say(f"killed {len(stuck)} Ray processes that had not exited {RAY_EXIT_S:g} s after")


def run(cmd, num_cpus: int) -> int:
    """Serve `cmd` (a serve_flags.ServeCommand) until SIGINT or SIGTERM; the exit code.
    num_cpus: the logical CPUs of a local Ray (unused with --address)."""
    http = cmd.config["http_options"]
    if cmd.address is None and not _port_free(http["host"], http["port"]):
        say(f"error: port {http['port']} on {http['host']} is in use; pass another --port")
        return 1
    deployed: list[str] = []
    try:
        _start_ray(cmd, num_cpus)
        # SIGTERM (kill, systemd, Kubernetes) stops it as Ctrl-C does; set after ray.init,
        # whose own handler would exit at once with 1. SIGINT too: Python leaves it ignored
        # when the command starts with it ignored (a `cmd &` of a script without job
        # control), and Ctrl-C / SIGINT must still stop it, as they stop uvicorn's servers
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not _serve(cmd, deployed):
            return 1
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("shutting down")
        return 0
    except Exception as e:
        say(f"error: {e}")
        return 1
    finally:
        if ray.is_initialized():
            _shutdown(cmd, deployed)
        say("stopped")
