"""cluster/ without starting anything: the image is built from the Ray and torch this project runs
with, local.sh parses and refuses bad use readably, the Serve config rewrite of the local cluster
(qwen35_ray/deploy/local_config.py) pins pools and reports mistakes naming the setting, and the
commands cluster/README.md gives name files and subcommands that exist."""

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from ray.serve.schema import ServeDeploySchema

from qwen35_ray.deploy import local_config
from qwen35_ray.deploy.local_config import ConfigError, parse_pins, rewrite
from qwen35_ray.deploy.rayservice import HUB_CACHE_PATH

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
DOCKERFILE = (CLUSTER / "Dockerfile").read_text()
SCRIPT = CLUSTER / "local.sh"
README = (CLUSTER / "README.md").read_text()
PD = yaml.safe_load((ROOT / "deployments" / "qwen35-pd.yaml").read_text())
CO = yaml.safe_load((ROOT / "deployments" / "qwen35.yaml").read_text())


def arg_default(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S*)$", DOCKERFILE, re.M).group(1)


def test_image_is_built_on_the_installed_ray_and_python():
    assert arg_default("RAY_VERSION") == importlib.metadata.version("ray")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    base = re.findall(r"^FROM (\S+)", DOCKERFILE, re.M)
    # rayproject/ray:{version}-{python}-{platform}, platform cpu or cuXYZ (Ray's tag scheme)
    assert base == [f"rayproject/ray:${{RAY_VERSION}}-{py}-${{VARIANT}}"]
    assert arg_default("VARIANT") == "cpu"
    cuda = re.findall(r"--build-arg VARIANT=(\S+)", DOCKERFILE + README)
    assert cuda and all(re.fullmatch(r"cu\d{3}", v) for v in cuda), cuda


def test_image_torch_is_the_pinned_one_and_cpu_wheel_for_cpu():
    torch_version = arg_default("TORCH_VERSION")
    assert importlib.metadata.version("torch").split("+")[0] == torch_version
    requirement = next(
        Requirement(r)
        for r in importlib.metadata.requires("qwen35-ray")
        if Requirement(r).name == "torch"
    )
    assert requirement.specifier.contains(torch_version)
    assert "https://download.pytorch.org/whl/cpu" in DOCKERFILE
    assert '"ray[serve]==${RAY_VERSION}"' in DOCKERFILE


def test_image_keeps_downloads_out_of_run_time():
    # the hub cache where k8s/ mounts its volume; the tiny checkpoints written at build time
    assert re.search(rf"HF_HOME={re.escape(HUB_CACHE_PATH)}\b", DOCKERFILE)
    assert "QWEN35_RAY_CACHE=" in DOCKERFILE
    assert "resolve_model(m)" in DOCKERFILE and "in EMBEDDED" in DOCKERFILE


def test_image_copies_only_what_exists_and_the_context_lets_through():
    copied = []
    for line in re.findall(r"^COPY (.+)$", DOCKERFILE, re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        copied += parts[:-1]
    assert {"pyproject.toml", "README.md", "kernels", "qwen35_ray", "deployments"} <= set(copied)
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[[i for i, x in enumerate(ignore) if not x.startswith("#")][0]] == "*"
    for path in copied:
        assert (ROOT / path).exists(), path
        assert f"!{path}" in ignore, f"{path} is copied but the .dockerignore keeps it out"


def run_script(*args, state, **env):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "QWEN35_CLUSTER_DIR": str(state), **env},
    )


def test_local_sh_parses_and_refuses_bad_use(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)], timeout=30).returncode == 0
    assert os.access(SCRIPT, os.X_OK)
    usage = run_script(state=tmp_path)
    assert usage.returncode == 2 and "up N" in usage.stdout and "down" in usage.stdout
    bad = run_script("up", "two", state=tmp_path)
    assert bad.returncode == 1 and "usage: cluster/local.sh up N" in bad.stderr
    for cmd in (["status"], ["env"], ["deploy", "deployments/qwen35.yaml"]):
        r = run_script(*cmd, state=tmp_path)
        assert r.returncode == 1, cmd
    assert "no cluster in" in run_script("status", state=tmp_path).stderr
    missing = run_script("deploy", "no-such.yaml", state=tmp_path)
    assert missing.returncode == 1 and "no such config file: no-such.yaml" in missing.stderr


def test_down_without_a_cluster_is_a_no_op(tmp_path):
    for _ in range(2):
        r = run_script("down", state=tmp_path)
        assert r.returncode == 0 and "nothing to stop" in r.stdout


def test_every_setting_of_local_sh_is_documented():
    read = set(re.findall(r"QWEN35_CLUSTER_[A-Z_]+", SCRIPT.read_text()))
    read = {v for v in read if not v.startswith("QWEN35_CLUSTER_WORKER") or "_WORKER_" in v}
    for var in sorted(read - {"QWEN35_CLUSTER_ID"}):
        assert var in README, f"{var} is not in cluster/README.md"
    for var in ("QWEN35_CLUSTER_WORKER<i>_CPUS", "QWEN35_CLUSTER_WORKER<i>_RESOURCES"):
        assert var in README


def test_readme_commands_name_files_and_subcommands_that_exist():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert blocks
    text = "\n".join(blocks)
    paths = set(re.findall(r"\b((?:cluster|deployments|k8s|tests)/[\w./-]+\w)", text))
    assert {"cluster/local.sh", "cluster/Dockerfile", "deployments/qwen35-pd.yaml"} <= paths
    for path in paths:
        assert (ROOT / path).exists(), f"cluster/README.md names {path}, which does not exist"
    used = set(re.findall(r"cluster/local\.sh (\w+)", text))
    assert used >= {"up", "deploy", "status", "down"}
    script = SCRIPT.read_text()
    for sub in used:
        assert re.search(rf"^{sub}\) ", script, re.M), sub
    for link in re.findall(r"\]\((\.\./[^)#]+)", README):
        assert (CLUSTER / link).resolve().exists(), link


def test_pd_config_pinned_for_the_local_cluster():
    out = rewrite(PD, 23456, {"prefill_server": "prefill_node", "decode_server": "decode_node"})
    assert out["proxy_location"] == "HeadOnly"
    assert out["http_options"] == {"host": "127.0.0.1", "port": 23456}
    args = out["applications"][0]["args"]
    assert args["prefill_server"]["resources"] == {"prefill_node": 0.01}
    assert args["decode_server"]["resources"] == {"decode_node": 0.01}
    # the rest of the pools as they were, and the input untouched
    assert (
        args["prefill_server"]["num_cpus"]
        == PD["applications"][0]["args"]["prefill_server"]["num_cpus"]
    )
    assert "resources" not in PD["applications"][0]["args"]["prefill_server"]
    assert PD["proxy_location"] == "EveryNode"
    ServeDeploySchema.model_validate(out)


@pytest.mark.parametrize("path", sorted((ROOT / "deployments").rglob("*.yaml")), ids=str)
def test_every_deployment_rewrites_to_a_valid_serve_config(path):
    out = rewrite(yaml.safe_load(path.read_text()), 20001, {"ingress": "head_node"})
    ServeDeploySchema.model_validate(out)
    for app in out["applications"]:
        assert app["args"]["ingress"]["resources"]["head_node"] == 0.01


def test_pin_merges_with_resources_the_pool_already_asks_for():
    config = {
        "applications": [
            {
                "name": "x",
                "import_path": "qwen35_ray.serving.builder:build_app",
                "args": {"llm_server": {"resources": {"big_memory": 1}}},
            }
        ]
    }
    out = rewrite(config, 20001, {"llm_server": "worker3"})
    assert out["applications"][0]["args"]["llm_server"]["resources"] == {
        "big_memory": 1,
        "worker3": 0.01,
    }


def test_pin_of_a_pool_the_app_lacks_names_the_pools_it_has():
    with pytest.raises(ConfigError) as e:
        rewrite(CO, 20001, {"prefill_server": "prefill_node"})
    msg = str(e.value)
    assert "has no pool 'prefill_server'" in msg and "ingress, llm_server" in msg
    assert "prefill_server=prefill_node" in msg


@pytest.mark.parametrize(
    "resource, says",
    [
        ("CPU", "'CPU' is not a custom resource; use num_cpus, num_gpus or accelerator_type"),
        ("accelerator_type:H100", "is not a custom resource"),
        ("my_bundle_x", "Ray reserves names containing 'bundle'"),
    ],
)
def test_pin_to_a_reserved_resource_is_refused_by_app_config(resource, says):
    with pytest.raises(ConfigError) as e:
        rewrite(PD, 20001, {"decode_server": resource})
    assert "decode_server.resources" in str(e.value) and says in str(e.value)


@pytest.mark.parametrize(
    "specs, says",
    [
        (["prefill_server"], "is not POOL=RESOURCE"),
        (["=prefill_node"], "is not POOL=RESOURCE"),
        (["prefill_server=a", "prefill_server=b"], "pinned twice"),
    ],
)
def test_malformed_pins(specs, says):
    with pytest.raises(ConfigError, match=says):
        parse_pins(specs)


def test_not_a_port_and_not_our_app_are_refused():
    with pytest.raises(ConfigError, match="not a TCP port"):
        rewrite(PD, 0, {})
    other = {"applications": [{"name": "a", "import_path": "mymod:app", "args": {}}]}
    with pytest.raises(ConfigError, match="import_path 'mymod:app' is not one of"):
        rewrite(other, 20001, {})
    with pytest.raises(ConfigError, match="no `applications` list"):
        rewrite({"proxy_location": "EveryNode"}, 20001, {})


def test_command_line_writes_the_config_or_says_what_is_wrong(tmp_path, capsys):
    out = tmp_path / "pd.yaml"
    src = str(ROOT / "deployments" / "qwen35-pd.yaml")
    argv = [src, "--out", str(out), "--http-port", "24000", "--pin", "decode_server=decode_node"]
    assert local_config.main(argv) == 0
    written = yaml.safe_load(out.read_text())
    assert written["http_options"]["port"] == 24000
    assert written["applications"][0]["args"]["decode_server"]["resources"] == {"decode_node": 0.01}
    argv = [src, "--out", str(tmp_path / "x.yaml"), "--http-port", "24000", "--pin", "llm_server=a"]
    assert local_config.main(argv) == 2
    assert "has no pool 'llm_server'" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()
