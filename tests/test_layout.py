"""The project's structural rules, checked: package list, the kernels rename, import layering."""

import ast
import importlib.util
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _packages_on_disk() -> set[str]:
    found = set()
    for top, name in (("kernels", "qwen35_kernels"), ("qwen35_ray", "qwen35_ray")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_package_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    assert listed == _packages_on_disk()


def test_kernels_folder_is_not_importable_as_kernels():
    """transformers probes for PyPI's `kernels`; our folder must never answer to that name."""
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not str(spec.origin or "").startswith(str(ROOT))
    assert importlib.util.find_spec("qwen35_kernels") is not None


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(
                node.module.split(".")[0]
                if not node.module.startswith("qwen35_ray.")
                else ".".join(node.module.split(".")[:2])
            )
    return names


def test_imports_point_down_only():
    """kernels <- model <- engine <- distributed <- serving; only distributed and serving
    import ray."""
    above_engine = {"qwen35_ray.distributed", "qwen35_ray.serving", "ray"}
    forbidden = {
        "kernels": {"qwen35_ray", "qwen35_ray.model", "qwen35_ray.engine", *above_engine},
        "qwen35_ray/model": {"qwen35_ray.engine", *above_engine},
        "qwen35_ray/engine": above_engine,
        "qwen35_ray/distributed": {"qwen35_ray.serving"},
        # benchmarks drive the layers through their APIs; what talks to Ray lives in those
        "qwen35_ray/bench": {"ray"},
        # manifests and plans are text and arithmetic; they reach Ray's schemas only in tests
        "qwen35_ray/deploy": {"ray"},
    }
    for folder, names in forbidden.items():
        for py in (ROOT / folder).rglob("*.py"):
            bad = _imports(py) & names
            assert not bad, f"{py.relative_to(ROOT)} imports {bad}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```bash\n# run the tests\n(.+?)\n```", readme, re.S).group(1)
    last = command.strip().splitlines()[-1].split("&&")[-1].strip()
    assert last in (ROOT / ".ci" / "run").read_text().splitlines()
