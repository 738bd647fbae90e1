"""scripts/gpu_check.sh --dry-run: every step of the GPU check, on CPU at small widths, through
the same script a GPU machine runs, so the check is known to work before a GPU is at hand."""

import json
import os
import subprocess
from pathlib import Path

import pytest

# slow tier (.ci/run): every step of the GPU check, dry, with a served app
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_runs_every_step(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "GPU_CHECK_TMP": str(tmp_path), "QWEN35_RAY_COMPILE_DECODE": "0"}
    p = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out), "--timeout", "400",
         "--budget", "1500"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1600,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True
    steps = report["steps"]
    from qwen35_ray.bench.gpu_check import STEPS

    assert list(steps) == list(STEPS)
    failed = {n: s.get("tail", "")[-1500:] for n, s in steps.items() if s["rc"] != 0}
    assert not failed, failed
    assert steps["facts"]["result"]["torch"]
    assert steps["engine_parity"]["result"]["fp32_same"] is True
    speed = steps["engine_speed"]["result"]
    assert speed["decode_step_B1_ms"] > 0 and speed["prefill_64_ms"] > 0
    assert speed["profile_B16"], "the profile of a decode step is empty"
    kernels = steps["bench_kernels"]["result"]["rows"]["results"]
    assert kernels and not [r for r in kernels if "error" in r]
    serve = steps["serve"]["result"]
    assert serve["second_status"] == 200 and serve["usage"]["completion_tokens"] > 0
    # the GPU-only tests are collected and skipped here, not errors
    assert steps["pytest_gpu"]["result"]["counts"]["error"] == 0
