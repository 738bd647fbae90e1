"""KubeRay manifests as YAML text: a RayService (a Serve config on a Ray cluster) or a RayCluster,
from a ClusterSpec. Written for the ray.io/v1 CRDs of KubeRay v1.7.0; the facts they rely on are
KubeRay's own (ray-operator/controllers/ray/common/pod.go and utils/constant.go at v1.7.0):

- a worker group's `resources` map is how a group advertises custom Ray resources (KubeRay turns
  it into `ray start --resources='{...}'`, and the Ray autoscaler reads it to pick a group for a
  pending replica); a group may not also set num-cpus/num-gpus/memory/resources in rayStartParams.
  num-cpus, num-gpus and memory come from the container's limits (cpu, nvidia.com/gpu, memory).
- probes: for Ray >= 2.53 KubeRay probes GET /api/healthz on the dashboard agent (port 52365);
  a RayService worker is ready only while its Serve proxy answers /-/healthz on the serve port
  too, so that the `<name>-serve-svc` Service sends traffic to ready proxies only.
- /dev/shm: KubeRay mounts an in-memory emptyDir there for the object store unless the container
  already mounts one; it is written out here so that its size is visible (and settable).

Layering: no Ray import; the Ray version comes from the installed package's metadata.
"""

import importlib.metadata
from dataclasses import dataclass, field

import yaml

from qwen35_ray.serving.serve_mode import FAST_SERVE_ENV

KUBERAY_VERSION = "v1.7.0"
IMAGE_PULL_POLICY = "IfNotPresent"  # an image loaded into kind has no registry to pull from
HEAD_PORTS = (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001))
SERVE_PORT, METRICS_PORT, AGENT_PORT = 8000, 8080, 52365
HUB_CACHE_PATH = "/hub-cache"  # HF_HOME: the model download survives pod restarts on a PVC
HF_TOKEN_KEY = "HF_TOKEN"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA GPU feature discovery
# the autoscaler sidecar's container (KubeRay's defaults, written out)
AUTOSCALER_RESOURCES = {"cpu": "500m", "memory": "512Mi"}
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
# the first Ray release with the dashboard agent's single /api/healthz (KubeRay's
# supportsUnifiedHealthCheck); older ones are probed with wget on two endpoints
UNIFIED_HEALTH_RAY = (2, 53)


@dataclass(frozen=True)
class WorkerGroup:
    """One worker group: `replicas` pods alike, each a Ray node."""

    name: str  # groupName, e.g. "cpu", "prefill-gpu", "decode-gpu"
    replicas: int  # pods (Ray nodes) of this group at start
    min_replicas: int
    max_replicas: int
    cpus: int  # container cpu requests and limits, and so the node's Ray CPUs
    memory: str  # e.g. "8Gi"
    gpus: int = 0  # nvidia.com/gpu limit per pod, and so the node's Ray GPUs
    ray_resources: dict[str, float] = field(default_factory=dict)  # custom resources advertised
    gpu_product: str | None = None  # nodeSelector nvidia.com/gpu.product, if set
    shm: str | None = None  # /dev/shm sizeLimit (object store, NCCL); None: the pod's memory
    image: str | None = None  # this group's image (e.g. the CUDA build); None: the cluster's

    def __post_init__(self):
        if not 0 <= self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(
                f"worker group {self.name!r}: needs 0 <= min_replicas ({self.min_replicas}) <= "
                f"replicas ({self.replicas}) <= max_replicas ({self.max_replicas})"
            )
        for name in self.ray_resources:
            if name in ("CPU", "GPU", "memory") or name.lower() in ("cpu", "gpu", "memory"):
                raise ValueError(
                    f"worker group {self.name!r}: ray_resources {name!r} is set by cpus, gpus "
                    "and memory; list custom resources only"
                )


@dataclass(frozen=True)
class ClusterSpec:
    """The Ray cluster of a RayService or RayCluster."""

    name: str  # metadata.name
    image: str  # e.g. "qwen35-ray:latest" (built from cluster/Dockerfile)
    head_cpus: int
    head_memory: str
    workers: tuple[WorkerGroup, ...]
    hub_cache: str | None = None  # PVC claimName for HF_HOME (None: an emptyDir)
    hf_token_secret: str | None = None  # Secret name holding the key HF_TOKEN
    autoscaling: bool = True  # enableInTreeAutoscaling
    idle_timeout_s: int = 60  # the autoscaler removes a worker pod idle this long
    upgrade_strategy: str = "NewCluster"  # RayService only

    def __post_init__(self):
        # KubeRay appends 6 characters for the cluster and "-serve-svc" for the Service; both
        # must stay a 63-character DNS label (utils.MaxRayServiceNameLength = 47)
        if len(self.name) > 47:
            raise ValueError(f"name {self.name!r} is longer than KubeRay's 47 characters")
        names = [g.name for g in self.workers]
        if len(set(names)) != len(names):
            raise ValueError(f"worker group names repeat: {names}")
        if self.upgrade_strategy not in UPGRADE_TYPES:
            raise ValueError(
                f"upgrade_strategy={self.upgrade_strategy!r} is not one of {UPGRADE_TYPES}"
            )


def ray_version() -> str:
    """The installed Ray's version: the image is built from the same (cluster/Dockerfile)."""
    return importlib.metadata.version("ray")


def rayservice_yaml(serve_config_text: str, spec: ClusterSpec, header: str = "") -> str:
    """A RayService whose serveConfigV2 is `serve_config_text` verbatim (comments kept)."""
    body = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": spec.name},
        "spec": {
            "upgradeStrategy": {"type": spec.upgrade_strategy},
            "serveConfigV2": _literal(serve_config_text),
            "rayClusterConfig": _cluster(spec, serve=True),
        },
    }
    text = _dump(body, header)
    # a literal block, and the very text: comments and all
    if "serveConfigV2: |" not in text or (
        yaml.safe_load(text)["spec"]["serveConfigV2"] != serve_config_text
    ):
        raise ValueError("the Serve config cannot be carried verbatim as a YAML literal block")
    return text


def raycluster_yaml(spec: ClusterSpec, header: str = "") -> str:
    """A RayCluster for interactive work (ray job submit, serve deploy, ray attach)."""
    body = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": spec.name},
        "spec": _cluster(spec, serve=False),
    }
    return _dump(body, header)


def _cluster(spec: ClusterSpec, serve: bool) -> dict:
    out = {"rayVersion": ray_version(), "enableInTreeAutoscaling": spec.autoscaling}
    if spec.autoscaling:
        out["autoscalerOptions"] = {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": spec.idle_timeout_s,
            "resources": {"requests": AUTOSCALER_RESOURCES, "limits": AUTOSCALER_RESOURCES},
        }
    out["headGroupSpec"] = {
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": {
            "spec": _pod(
                spec,
                container="ray-head",
                image=spec.image,
                cpus=spec.head_cpus,
                memory=spec.head_memory,
                ports=(*HEAD_PORTS, ("serve", SERVE_PORT), ("metrics", METRICS_PORT)),
                probes=_probes(head=True, serve_worker=False),
            )
        },
    }
    out["workerGroupSpecs"] = [_group(spec, g, serve) for g in spec.workers]
    return out


def _group(spec: ClusterSpec, g: WorkerGroup, serve: bool) -> dict:
    out = {
        "groupName": g.name,
        "replicas": g.replicas,
        "minReplicas": g.min_replicas,
        "maxReplicas": g.max_replicas,
    }
    if g.ray_resources:
        out["resources"] = {k: _amount(v) for k, v in g.ray_resources.items()}
    out["template"] = {
        "spec": _pod(
            spec,
            container="ray-worker",
            image=g.image or spec.image,
            cpus=g.cpus,
            memory=g.memory,
            ports=(("serve", SERVE_PORT), ("metrics", METRICS_PORT)),
            probes=_probes(head=False, serve_worker=serve),
            gpus=g.gpus,
            gpu_product=g.gpu_product,
            shm=g.shm,
        )
    }
    return out


def _pod(
    spec: ClusterSpec,
    container: str,
    image: str,
    cpus: int,
    memory: str,
    ports: tuple,
    probes: dict,
    gpus: int = 0,
    gpu_product: str | None = None,
    shm: str | None = None,
) -> dict:
    env = [{"name": "HF_HOME", "value": HUB_CACHE_PATH}]
    # Serve's high-throughput mode (HAProxy, replicas on one event loop: serving/serve_mode.py),
    # read by Ray's processes when they start: on every Ray container, as Ray's KubeRay guide
    # sets it
    env += [{"name": k, "value": v} for k, v in FAST_SERVE_ENV.items()]
    if spec.hf_token_secret is not None:
        # optional: the embedded tiny model and public checkpoints need no token
        ref = {"name": spec.hf_token_secret, "key": HF_TOKEN_KEY, "optional": True}
        env.append({"name": HF_TOKEN_KEY, "valueFrom": {"secretKeyRef": ref}})
    requests = {"cpu": str(cpus), "memory": memory}
    limits = dict(requests)
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    hub = (
        {"persistentVolumeClaim": {"claimName": spec.hub_cache}}
        if spec.hub_cache is not None
        else {"emptyDir": {}}
    )
    pod = {}
    if gpu_product is not None:
        pod["nodeSelector"] = {GPU_PRODUCT_LABEL: gpu_product}
    if gpus:
        # GPU nodes are commonly tainted so that only pods asking for GPUs land there
        pod["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    pod["containers"] = [
        {
            "name": container,
            "image": image,
            "imagePullPolicy": IMAGE_PULL_POLICY,
            "ports": [{"name": n, "containerPort": p} for n, p in ports],
            "env": env,
            "resources": {"requests": requests, "limits": limits},
            "volumeMounts": [
                {"name": "shared-mem", "mountPath": "/dev/shm"},
                {"name": "hub-cache", "mountPath": HUB_CACHE_PATH},
            ],
            **probes,
        }
    ]
    pod["volumes"] = [
        {"name": "shared-mem", "emptyDir": {"medium": "Memory", "sizeLimit": shm or memory}},
        {"name": "hub-cache", **hub},
    ]
    return pod


def _wget(port: int, path: str) -> str:
    # KubeRay's exec health check: the endpoint answers "success" when healthy
    return f"wget --tries 1 -T 2 -q -O- http://localhost:{port}/{path} | grep success"


def _probes(head: bool, serve_worker: bool) -> dict:
    """KubeRay v1.7.0's default probes, written out: liveness waits out slow starts (120 x 5 s);
    a RayService worker leaves the serve Service on the first failed check of its proxy."""
    major, minor = (int(x) for x in ray_version().split(".")[:2])
    raylet = [_wget(AGENT_PORT, "api/local_raylet_healthz")]
    if (major, minor) >= UNIFIED_HEALTH_RAY:
        check = {"httpGet": {"path": "/api/healthz", "port": AGENT_PORT}}
    else:
        gcs = [_wget(8265, "api/gcs_healthz")] if head else []
        check = {"exec": {"command": ["bash", "-c", " && ".join(raylet + gcs)]}}
    timeout = 5 if head else 2
    liveness = {
        **check,
        "initialDelaySeconds": 30,
        "timeoutSeconds": timeout,
        "periodSeconds": 5,
        "successThreshold": 1,
        "failureThreshold": 120,
    }
    readiness = {
        **check,
        "initialDelaySeconds": 10,
        "timeoutSeconds": timeout,
        "periodSeconds": 5,
        "successThreshold": 1,
        "failureThreshold": 10,
    }
    if serve_worker:
        command = " && ".join([*raylet, _wget(SERVE_PORT, "-/healthz")])
        readiness = {
            "exec": {"command": ["bash", "-c", command]},
            "initialDelaySeconds": 10,
            "timeoutSeconds": 5,
            "periodSeconds": 5,
            "successThreshold": 1,
            "failureThreshold": 1,
        }
    return {"livenessProbe": liveness, "readinessProbe": readiness}


def _amount(v: float) -> str:
    # a Kubernetes quantity string, as the group `resources` map takes it
    return f"{v:g}"


class _Literal(str):
    """A string written as a YAML literal block (`|`), line breaks and comments kept."""


def _literal(text: str) -> _Literal:
    for n, line in enumerate(text.splitlines(), 1):
        # PyYAML falls back to a quoted string for these; the block must stay readable
        if line != line.rstrip() or "\t" in line:
            raise ValueError(
                f"line {n} of the Serve config has trailing whitespace or a tab, which a YAML "
                "literal block cannot carry; remove it"
            )
    return _Literal(text)


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow=False, indentless=False):
        # lists indented under their key, as kubectl and KubeRay's samples write them
        return super().increase_indent(flow, False)

    def ignore_aliases(self, data):
        # every value written out where it applies, no &anchors
        return True


def _represent_literal(dumper: yaml.SafeDumper, text: _Literal):
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(text), style="|")


_Dumper.add_representer(_Literal, _represent_literal)


# comments placed above the first line that reads (stripped) as the key; YAML loses comments,
# so they are added to the dumped text
NOTES = {
    "upgradeStrategy:": (
        "NewCluster: a change to rayClusterConfig starts a new cluster and moves traffic to it",
        "once its Serve apps are healthy (so it needs room for both clusters meanwhile). None",
        "would leave such changes unapplied; NewClusterWithIncrementalUpgrade (alpha) needs a",
        "Gateway API controller and its GatewayClass. A change to serveConfigV2 alone updates",
        "the apps in place.",
    ),
    "enableInTreeAutoscaling: true": (
        "the Ray autoscaler (a sidecar of the head) adds a worker pod of a group that fits when",
        "a replica waits for resources (Serve autoscaling, a pinned pool's custom resource) and",
        "removes a pod idle for idleTimeoutSeconds, within each group's min/maxReplicas",
    ),
    "num-cpus: '0'": (
        "the head runs Ray's control processes and the Serve controller, no replica: with no",
        "CPUs to offer, every replica lands on a worker",
    ),
}


def _annotate(text: str) -> str:
    lines, done = text.splitlines(), set()
    out = []
    for line in lines:
        key = line.strip()
        if key in NOTES and key not in done:
            done.add(key)
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(f"{indent}# {note}" for note in NOTES[key])
        out.append(line)
    return "\n".join(out) + "\n"


def _dump(body: dict, header: str) -> str:
    text = yaml.dump(body, Dumper=_Dumper, sort_keys=False, width=4096, allow_unicode=True)
    text = _annotate(text)
    lines = [f"# {line}".rstrip() for line in header.strip("\n").splitlines()] if header else []
    return "\n".join([*lines, text]) if lines else text
