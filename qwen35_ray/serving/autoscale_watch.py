"""What `bench autoscale` watches and runs: each pool's replica count over time (serve.status()
from a process connected to the cluster, else the app's /metrics), and a Serve config started
on a local Ray cluster the way `serve run CONFIG` does."""

import glob
import re
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import requests

# a /metrics sample: name, labels, value
_SAMPLE = re.compile(r"^qwen35_ray_(\w+)\{([^}]*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')
# a policy's log line when it changes a pool's target (serving/autoscaling.py, _choose)
_DECISION = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*? -- (\w+) \w+_policy: \d+ -> \d+: .*"
)


def parse_metrics(text: str) -> dict:
    """From /metrics: {"running": {pool: n}, "starting": {pool: n}} from serve_replicas when the
    app publishes it, and the policies' {"desired": {pool: n}, "decision": {pool: code}}."""
    out: dict[str, dict] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(_LABEL.findall(m.group(2))), float(m.group(3))
        pool = labels.get("pool")
        if pool is None:
            continue
        if name == "serve_replicas":
            key = {"RUNNING": "running", "STARTING": "starting"}.get(labels.get("state"))
            if key:
                out.setdefault(key, {})[pool] = int(value)
        elif name == "autoscaling_desired_replicas":
            out.setdefault("desired", {})[pool] = int(value)
        elif name == "autoscaling_decision" and value == 1:
            out.setdefault("decision", {})[pool] = f"{labels['direction']}:{labels['code']}"
    return out


class NoReplicaCounts(RuntimeError):
    """Neither serve.status() nor /metrics gives the app's replica counts."""


def engine_pools(deployments) -> list[str]:
    """The app's deployments but its ingress (the pools that autoscale on engine load)."""
    return sorted(d for d in deployments if "Ingress" not in d)


class ReplicaWatch:
    """A sample of every pool's replica count each `period` seconds, on a thread, from
    serve.status() (connected) or /metrics (not). Connected, a second thread reads the
    policies' decisions from /metrics, so a slow /metrics under load does not delay the
    counts; it stops once /metrics answered without them (an app that does not publish them)."""

    def __init__(self, url: str, app: str, connected: bool, period: float = 1.0):
        self.url, self.app, self.connected, self.period = url, app, connected, period
        self.source = "serve.status" if connected else "/metrics"
        # the bench's clock starts here; t0_unix places log lines (wall clock) on it
        self.t0, self.t0_unix = time.monotonic(), time.time()
        self.samples: list[dict] = []
        self._decisions: dict = {}
        self._stopped = threading.Event()
        self._take()
        if not self.samples[-1]["running"]:
            raise NoReplicaCounts(
                f"no replica counts for app {app!r}: "
                + (
                    "serve.status() does not list it (check --app)"
                    if connected
                    else f"{url}/metrics has no qwen35_ray_serve_replicas; pass --ray-address "
                    "(e.g. auto) to read serve.status() from the cluster"
                )
            )
        self._threads = [threading.Thread(target=self._run, daemon=True)]
        if connected:
            self._threads.append(threading.Thread(target=self._poll_decisions, daemon=True))
        for thread in self._threads:
            thread.start()

    def latest(self) -> dict[str, int]:
        return dict(self.samples[-1]["running"])

    def stop(self) -> list[dict]:
        if not self._stopped.is_set():
            self._stopped.set()
            for thread in self._threads:
                thread.join()
        return self.samples

    def _run(self):
        while not self._stopped.wait(self.period):
            try:
                self._take()
            except Exception as e:  # a missed sample leaves a gap, the bench goes on
                print(f"[bench autoscale] replica sample failed: {e}", flush=True)

    def _metrics(self, timeout: float) -> dict | None:
        """/metrics parsed (parse_metrics), but for the ingress; None when it did not answer."""
        try:
            text = requests.get(self.url + "/metrics", timeout=timeout).text
        except requests.RequestException:
            return None
        found = parse_metrics(text)
        return {k: {p: n for p, n in v.items() if "Ingress" not in p} for k, v in found.items()}

    def _poll_decisions(self):
        while not self._stopped.is_set():
            found = self._metrics(timeout=10)
            if found is not None:
                if not {"desired", "decision"} & set(found):
                    return
                self._decisions = {k: found[k] for k in ("desired", "decision") if k in found}
            self._stopped.wait(self.period)

    def _take(self):
        sample: dict = {"t": time.monotonic() - self.t0, "running": {}, "starting": {}}
        if self.connected:
            from ray import serve

            app = serve.status().applications.get(self.app)
            for pool in engine_pools(app.deployments if app else {}):
                states = {getattr(s, "value", s): n for s, n in app.deployments[pool]
                          .replica_states.items()}  # fmt: skip
                sample["running"][pool] = states.get("RUNNING", 0)
                sample["starting"][pool] = states.get("STARTING", 0)
            sample.update(self._decisions)
        else:
            sample.update(self._metrics(timeout=5) or {})
        self.samples.append(sample)

    def decision_log(self) -> list[dict]:
        """The policies' scaling decisions from the Serve controller's log, when this process
        is on the cluster's head node (the policies log there: serving/autoscaling.py), from
        the bench's start on: [{"t": seconds on the bench's clock, "pool", "line"}]."""
        import ray

        try:
            logs = ray._private.worker._global_node.get_logs_dir_path()
        except AttributeError:  # connected as a client, or to a remote head
            return []
        lines = []
        for path in sorted(glob.glob(f"{logs}/serve/controller_*.log")):
            lines += Path(path).read_text(errors="replace").splitlines()
        return [d for d in map(lambda x: parse_decision(x, self.t0_unix), lines) if d]


def parse_decision(line: str, t0_unix: float) -> dict | None:
    """A controller log line of a policy changing a pool's target ("PrefillServer
    prefill_policy: 1 -> 2: ..."), at its time relative to t0_unix; None for other lines
    and for those before t0_unix."""
    m = _DECISION.search(line)
    if not m:
        return None
    at = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - t0_unix
    if at < 0:
        return None
    return {"t": at, "pool": m.group(2), "line": m.group(0)[len(m.group(1)) :].strip()}


@contextmanager
def connect(url: str, address: str | None):
    """(url, connected): this process joined to the cluster at `address` for serve.status(),
    or not connected when no address is given."""
    if address is None:
        yield url, False
        return
    import ray

    ray.init(address=address, logging_level="warning", log_to_driver=False)
    try:
        yield url, True
    finally:
        ray.shutdown()


@contextmanager
def serve_yaml(path: Path, num_cpus: float, app: str, port: int | None = None, within_s=300):
    """A local Ray cluster of num_cpus CPUs running the Serve config at path as `serve run`
    does (its http_options, but for `port` when given, and proxy_location; its applications);
    yields (url, True) once the app answers /health, and shuts everything down after."""
    import ray
    import yaml
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve._private.constants import SERVE_NAMESPACE
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    from qwen35_ray.serving.serve_mode import fast_serve_env

    raw = yaml.safe_load(Path(path).read_text())
    if port is not None:
        raw.setdefault("http_options", {})["port"] = port
    config = ServeDeploySchema.model_validate(raw)
    names = [a.name for a in config.applications]
    if app not in names:
        raise SystemExit(f"--app {app!r} is not in {path}; its applications: {', '.join(names)}")
    route = next(a.route_prefix for a in config.applications if a.name == app) or "/"
    url = f"http://127.0.0.1:{config.http_options.port}{route.rstrip('/')}"
    # as `qwen35-ray serve` and the README's `serve run` start it (serving/serve_mode.py)
    with fast_serve_env():
        ray.init(num_cpus=num_cpus, namespace=SERVE_NAMESPACE, include_dashboard=False,
                 logging_level="warning", log_to_driver=False)  # fmt: skip
    try:
        client = serve_api.serve_start(
            http_options=config.http_options.model_dump(),
            proxy_location=config.proxy_location,
            grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
            controller_options=config.controller_options,
        )
        client.deploy_apps(config, _blocking=False)
        logs = ray._private.worker._global_node.get_logs_dir_path()
        print(f"[bench autoscale] deploying {path} on {num_cpus:g} CPUs; logs in {logs}")
        _wait_healthy(url, app, within_s, logs)
        yield url, True
    finally:
        try:
            serve.shutdown()
        except RuntimeError as e:
            # a handle whose router ran on an event loop that asyncio.run has since closed
            # (RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0, part of RAY_SERVE_THROUGHPUT_OPTIMIZED)
            # cannot shut down on it; ray.shutdown() below stops the cluster regardless
            print(f"[bench autoscale] serve.shutdown: {e}; shutting Ray down", flush=True)
        ray.shutdown()


def _wait_healthy(url: str, app: str, within_s: float, logs: str) -> None:
    from ray import serve

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"app {app!r} failed to deploy: {status.message} (logs: {logs})")
        running = status is not None and status.status == "RUNNING"
        try:
            # the app RUNNING: every pool at its starting replicas, the bench's baseline
            if running and requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}/health did not answer within {within_s:.0f} s (logs: {logs})")
