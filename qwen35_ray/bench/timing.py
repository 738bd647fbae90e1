"""Wall-clock timing of one call and a description of the machine it ran on."""

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_call(fn: Callable[[], object], device: str, min_time: float = 1.0, max_reps: int = 100):
    """Best (minimum) seconds per call after one warm-up call, over at least 3 calls and until
    min_time or max_reps: the minimum is the least disturbed by other work on a shared machine."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str | None:
    """The checkout's commit, so a result says what it measured (None outside a git clone)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine_info(device: str) -> dict:
    import triton

    info = {
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": device,
        "device_name": _cpu_model(),
        "commit": _commit(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device_name=props.name, device_memory_gib=round(props.total_memory / 2**30))
        info.update(peak=gpu_peak(props.name))
    return info


# Dense bf16 tensor-core FLOP/s and HBM bytes/s of the GPUs the project runs on (vendor sheets).
_PEAKS = {
    "H200": {"flops_bf16": 989e12, "hbm_bytes_per_s": 4.8e12},
    "H100": {"flops_bf16": 989e12, "hbm_bytes_per_s": 3.35e12},
    "A100": {"flops_bf16": 312e12, "hbm_bytes_per_s": 2.0e12},
}


def gpu_peak(name: str) -> dict | None:
    for key, peak in _PEAKS.items():
        if key in name:
            return peak
    return None


def write_report(path: Path | None, report: dict) -> None:
    """A benchmark's results as JSON at path (its folder made), if a path was given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
