"""k8s/: every manifest is one the KubeRay v1.7.0 CRDs accept (defaults applied, no field the API
server would silently drop), passes the operator's own checks, and carries its deployments/ file
verbatim; the Serve configs validate with Ray's schema and our AppConfig, and every pool's
replica fits a node of a worker group that advertises what the pool is pinned to."""

import copy
import importlib
import re
from pathlib import Path

import pytest
import yaml
from crd_schema import apply_defaults, crd_errors, crd_schema
from ray.serve.schema import ServeDeploySchema

from qwen35_ray.deploy import k8s_samples
from qwen35_ray.deploy.rayservice import ClusterSpec, WorkerGroup, ray_version, rayservice_yaml
from qwen35_ray.serving.config import AppConfig
from qwen35_ray.serving.serve_mode import FAST_SERVE_ENV

ROOT = Path(__file__).resolve().parents[2]
K8S, DEPLOYMENTS = ROOT / "k8s", ROOT / "deployments"
CRDS = ROOT.parent / "shared" / "data" / "kuberay"
needs_crds = pytest.mark.skipif(
    not CRDS.is_dir(), reason=f"KubeRay CRDs {CRDS} absent: check out shared/ beside the repo"
)
RAY_KINDS = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
MANIFESTS = sorted(
    p.name for p in K8S.glob("*.yaml") if yaml.safe_load(p.read_text())["kind"] in RAY_KINDS
)
SERVICES = [m for m in MANIFESTS if m.startswith("rayservice-")]
GPU_SERVICES = ["rayservice-qwen35-35b-a3b-pd.yaml", "rayservice-qwen35-397b-a17b.yaml"]
SOURCES = {s.out: s.source for s in k8s_samples.SAMPLES if s.source is not None}
_schemas: dict[str, dict] = {}


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def schema(kind: str) -> dict:
    if kind not in _schemas:
        _schemas[kind] = crd_schema(CRDS / RAY_KINDS[kind])
    return _schemas[kind]


def cluster_of(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]


def containers(doc: dict):
    c = cluster_of(doc)
    yield "head", c["headGroupSpec"]["template"]["spec"]["containers"][0]
    for g in c["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"]["containers"][0]


def test_the_samples_are_all_there():
    assert MANIFESTS == sorted(
        [
            "raycluster-dev.yaml",
            "rayservice-qwen35.yaml",
            "rayservice-qwen35-pd.yaml",
            *GPU_SERVICES,
        ]
    )
    assert set(SERVICES) == set(SOURCES)


@needs_crds
def test_defaults_are_applied_through_objects_and_arrays():
    doc = load("rayservice-qwen35.yaml")
    group = cluster_of(doc)["workerGroupSpecs"][0]
    del group["minReplicas"]
    out = apply_defaults(schema("RayService"), doc)
    out_group = cluster_of(out)["workerGroupSpecs"][0]
    assert out_group["minReplicas"] == 0 and out_group["numOfHosts"] == 1
    ports = out_group["template"]["spec"]["containers"][0]["ports"]
    assert {p["protocol"] for p in ports} == {"TCP"}
    # the input is left alone
    assert "numOfHosts" not in group


@needs_crds
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_accepted_by_the_kuberay_crd(name):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd_errors(schema(doc["kind"]), doc) == []


def _corrupt(doc: dict, how: str) -> str:
    """Breaks `doc` in place one way; returns a fragment the error must contain."""
    c = cluster_of(doc)
    worker = c["workerGroupSpecs"][0]
    container = worker["template"]["spec"]["containers"][0]
    if how == "misspelt key":
        c["enableInTreeAutoscalling"] = True
        return "enableInTreeAutoscalling"
    if how == "unknown key deep in a pod":
        container["resource"] = container.pop("resources")
        return "'resource' was unexpected"
    if how == "wrong type":
        worker["replicas"] = "1"
        return "replicas: '1' is not of type 'integer'"
    if how == "missing required":
        del worker["groupName"]
        return "'groupName' is a required property"
    if how == "bad quantity":
        container["resources"]["limits"]["memory"] = "4 GB"
        return "limits/memory"
    if how == "out of int32":
        worker["maxReplicas"] = 2**31
        return "int32"
    if how == "bad enum":
        c["autoscalerOptions"]["upscalingMode"] = "Fast"
        return "'Fast' is not one of"
    if how == "duplicate env":
        container["env"].append(dict(container["env"][0]))
        return "duplicate items"
    if how == "unknown metadata":
        doc["metadata"]["labelz"] = {}
        return "labelz"
    raise AssertionError(how)


CORRUPTIONS = [
    "misspelt key",
    "unknown key deep in a pod",
    "wrong type",
    "missing required",
    "bad quantity",
    "out of int32",
    "bad enum",
    "duplicate env",
    "unknown metadata",
]


@needs_crds
@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("name", ["rayservice-qwen35-pd.yaml", "raycluster-dev.yaml"])
def test_each_check_fails_on_a_broken_manifest(name, how):
    doc = load(name)
    want = _corrupt(doc, how)
    errors = crd_errors(schema(doc["kind"]), doc)
    assert errors and any(want in e for e in errors), errors


DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_passes_the_operators_own_checks(name):
    """What KubeRay's controller refuses at reconcile time (utils/validation.go, v1.7.0)."""
    doc = load(name)
    limit = 47 if doc["kind"] == "RayService" else 53
    assert DNS_1035.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= limit
    c = cluster_of(doc)
    assert c["rayVersion"] == ray_version()
    groups = c["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    start_keys = {"num-cpus", "num-gpus", "memory", "resources"}
    for spec in (c["headGroupSpec"], *groups):
        params = spec.get("rayStartParams", {})
        # resources either in rayStartParams or in the group's map, never both
        assert not (start_keys & params.keys() and spec.get("resources"))
        assert "labels" not in params
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    if doc["kind"] == "RayService":
        strategy = doc["spec"]["upgradeStrategy"]["type"]
        assert strategy in ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
        # the fields v1.7.0 marks deprecated and ignores
        assert "serviceUnhealthySecondThreshold" not in doc["spec"]
        assert "deploymentUnhealthySecondThreshold" not in doc["spec"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_head_runs_no_replica_and_every_container_is_probed(name):
    doc = load(name)
    head = cluster_of(doc)["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    for group, container in containers(doc):
        assert {"livenessProbe", "readinessProbe"} <= container.keys(), group
        assert {p["name"]: p["containerPort"] for p in container["ports"]}["serve"] == 8000
        if doc["kind"] == "RayService" and group != "head":
            # a worker takes traffic from <name>-serve-svc only while its HTTP entry (HAProxy
            # in Serve's high-throughput mode, Serve's proxy otherwise) answers
            command = container["readinessProbe"]["exec"]["command"][-1]
            assert "localhost:8000/-/healthz" in command
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "/dev/shm" in mounts


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_ray_container_starts_serve_in_its_high_throughput_mode(name):
    """HAProxy and gRPC between replicas (serving/serve_mode.py): Ray's processes read the
    variables when they start, so each container's environment carries them."""
    for group, container in containers(load(name)):
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert {k: env.get(k) for k in FAST_SERVE_ENV} == FAST_SERVE_ENV, group


@pytest.mark.parametrize("name", SERVICES)
def test_serve_config_is_the_deployments_file_byte_for_byte(name):
    assert load(name)["spec"]["serveConfigV2"] == (DEPLOYMENTS / SOURCES[name]).read_text()


def app_args(serve_config: dict):
    ServeDeploySchema.model_validate(serve_config)
    for app in serve_config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), attr)
        yield app, builder, AppConfig.model_validate(app.get("args", {}))


SERVE_CONFIGS = [f"k8s/{n}" for n in SERVICES] + [
    str(p.relative_to(ROOT)) for p in sorted((DEPLOYMENTS / "gpu").glob("*.yaml"))
]


def serve_config(where: str) -> dict:
    text = (ROOT / where).read_text()
    doc = yaml.safe_load(text)
    return yaml.safe_load(doc["spec"]["serveConfigV2"]) if where.startswith("k8s/") else doc


@pytest.mark.parametrize("where", SERVE_CONFIGS)
def test_serve_config_validates_with_serve_and_the_app(where):
    config = serve_config(where)
    for app, builder, cfg in app_args(config):
        assert builder.__module__ == "qwen35_ray.serving.builder"
        # the builder Serve will call accepts the args (Ray is not started: nothing runs)
        assert builder(app["args"]).__class__.__name__ == "Application"
        assert cfg.model == app["args"]["model"]


def node_capacity(group: dict) -> dict[str, float]:
    container = group["template"]["spec"]["containers"][0]
    limits = container["resources"]["limits"]
    out = {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
    return out | {k: float(v) for k, v in group.get("resources", {}).items()}


def fits(demand: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0) >= v - 1e-9 for k, v in demand.items() if v > 0)


def replica_demand(options: dict) -> list[dict[str, float]]:
    """What one replica asks, per node: its actor, or (STRICT_PACK) its bundles summed; for
    PACK/SPREAD groups, each bundle on its own."""
    bundles = options.get("placement_group_bundles")
    if bundles is None:
        actor = options["ray_actor_options"]
        return [{"CPU": actor["num_cpus"], "GPU": actor["num_gpus"], **actor.get("resources", {})}]
    if options["placement_group_strategy"] == "STRICT_PACK":
        return [total(bundles)]
    return [dict(b) for b in bundles]


def total(demands) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in demands:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


@pytest.mark.parametrize("name", SERVICES)
def test_every_pool_fits_a_worker_group_that_advertises_its_pins(name):
    doc = load(name)
    groups = cluster_of(doc)["workerGroupSpecs"]
    nodes = [node_capacity(g) for g in groups]
    # every pod of every group at once: what the autoscaler can bring up
    room = total(
        {k: v * g["maxReplicas"] for k, v in node.items()} for g, node in zip(groups, nodes)
    )
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    cfg = AppConfig.model_validate(app["args"])
    disaggregated = app["import_path"].endswith("build_pd_app")
    pools = ("prefill_server", "decode_server") if disaggregated else ("llm_server",)
    for pool in (*pools, "ingress"):
        demands = replica_demand(cfg.serve_options(pool))
        for d in demands:
            # a custom resource counts only on a node that advertises it: the pin holds
            assert any(fits(d, node) for node in nodes), f"{name}: nothing fits {pool}: {d}"
        assert fits(total(demands), room), f"{name}: {pool} needs {total(demands)}, has {room}"
        if pool != "ingress":
            assert (total(demands).get("GPU", 0) > 0) == (name in GPU_SERVICES), pool


def test_gpu_pd_sample_has_a_worker_group_per_pool():
    doc = load("rayservice-qwen35-35b-a3b-pd.yaml")
    groups = {g["groupName"]: g for g in cluster_of(doc)["workerGroupSpecs"]}
    assert set(groups) == {"prefill-gpu", "decode-gpu"}
    assert groups["prefill-gpu"]["resources"] == {"prefill_node": "100"}
    assert groups["decode-gpu"]["resources"] == {"decode_node": "100"}
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["prefill_server"]["resources"] == {"prefill_node": 0.01}
    assert app["args"]["decode_server"]["resources"] == {"decode_node": 0.01}
    # each pool scales on its own policy
    for pool in ("prefill_server", "decode_server"):
        assert "policy" in app["args"][pool]["autoscaling_config"]


def test_397b_sample_is_one_expert_parallel_group_over_two_nodes():
    doc = load("rayservice-qwen35-397b-a17b.yaml")
    (group,) = cluster_of(doc)["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == 2
    assert node_capacity(group)["GPU"] == 8
    (app,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    engine = AppConfig.model_validate(app["args"]).engine_for("llm_server")
    assert engine.expert_parallel_size == 16 and engine.rank_num_gpus == 1
    assert engine.placement_strategy == "PACK"


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_sample_has_gpus_token_cache_autoscaling_and_upgrade(name):
    doc = load(name)
    c = cluster_of(doc)
    assert c["enableInTreeAutoscaling"] is True
    assert doc["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    for group, container in containers(doc):
        env = {e["name"]: e for e in container["env"]}
        ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "hf-token", "key": "HF_TOKEN", "optional": True}
        mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["hub-cache"]
        assert env["HF_HOME"]["value"] == mount
        if group != "head":
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    for g in c["workerGroupSpecs"]:
        volumes = {v["name"]: v for v in g["template"]["spec"]["volumes"]}
        claim = volumes["hub-cache"]["persistentVolumeClaim"]["claimName"]
        assert claim == yaml.safe_load((K8S / "hub-cache-pvc.yaml").read_text())["metadata"]["name"]
        assert g["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_render_check_passes_on_the_committed_files(capsys):
    assert k8s_samples.main(["render", "--check"]) == 0


def test_render_check_names_a_file_that_drifted(tmp_path, capsys):
    (tmp_path / "deployments").mkdir()
    for p in DEPLOYMENTS.rglob("*.yaml"):
        dest = tmp_path / "deployments" / p.relative_to(DEPLOYMENTS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(p.read_text())
    args = ["render", "--root", str(tmp_path)]
    assert k8s_samples.main(args) == 0
    assert k8s_samples.main([*args, "--check"]) == 0
    edited = tmp_path / "deployments" / "qwen35-pd.yaml"
    edited.write_text(edited.read_text() + "# an edit\n")
    capsys.readouterr()
    assert k8s_samples.main([*args, "--check"]) == 1
    err = capsys.readouterr().err
    assert "rayservice-qwen35-pd.yaml differs" in err and "rayservice-qwen35.yaml" not in err
    assert k8s_samples.main(args) == 0
    rendered = yaml.safe_load((tmp_path / "k8s" / "rayservice-qwen35-pd.yaml").read_text())
    assert rendered["spec"]["serveConfigV2"].endswith("# an edit\n")


def test_builder_refuses_what_kubernetes_or_yaml_cannot_carry():
    group = WorkerGroup("cpu", 1, 1, 2, cpus=2, memory="4Gi")
    spec = ClusterSpec("qwen35", "img", 1, "2Gi", (group,))
    with pytest.raises(ValueError, match="trailing whitespace"):
        rayservice_yaml("applications: []  \n", spec)
    with pytest.raises(ValueError, match="min_replicas"):
        WorkerGroup("cpu", 3, 1, 2, cpus=2, memory="4Gi")
    with pytest.raises(ValueError, match="custom resources only"):
        WorkerGroup("cpu", 1, 1, 2, cpus=2, memory="4Gi", ray_resources={"GPU": 1})
    with pytest.raises(ValueError, match="47"):
        ClusterSpec("q" * 48, "img", 1, "2Gi", (group,))
    with pytest.raises(ValueError, match="repeat"):
        ClusterSpec("qwen35", "img", 1, "2Gi", (group, copy.copy(group)))


def test_readme_names_every_manifest_and_the_serve_service():
    readme = (K8S / "README.md").read_text()
    for p in K8S.glob("*.yaml"):
        assert p.name in readme
    assert "qwen35-serve-svc" in readme
    assert "qwen35-ray k8s render" in readme
