"""The command line a user runs."""

# run from tmp_path: the repo root on sys.path would expose kernels/ under its bare name

import json
import subprocess
import sys


def test_generate_prints_json_with_a_finish_reason(tmp_path):
    tiny = tmp_path / "tiny"
    subprocess.run(
        [sys.executable, "-m", "qwen35_ray.cli", "make-tiny", str(tiny)], check=True, cwd=tmp_path
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen35_ray.cli",
            "generate",
            "--model",
            str(tiny),
            "--prompt",
            "Hello",
            "--max-tokens",
            "5",
            "--temperature",
            "0",
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["prompt"] == "Hello"
    (completion,) = out["outputs"]
    assert len(completion["token_ids"]) == 5 and completion["finish_reason"] == "length"


def test_chat_answers_two_turns_and_exits(tmp_path):
    tiny = tmp_path / "tiny"
    subprocess.run(
        [sys.executable, "-m", "qwen35_ray.cli", "make-tiny", str(tiny)], check=True, cwd=tmp_path
    )
    result = subprocess.run(
        [sys.executable, "-m", "qwen35_ray.cli", "chat", "--model", str(tiny), "--max-tokens", "6"],
        input="Hello!\n/reset\nHow are you?\n/exit\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
        timeout=120,
    )
    assert result.stdout.count("> ") >= 3


def test_plan_and_k8s_are_reached_through_the_command(tmp_path):
    """`qwen35-ray plan` and `qwen35-ray k8s` hand their arguments to their own parsers."""
    from pathlib import Path

    from qwen35_ray.cli import main

    root = Path(__file__).resolve().parents[1]
    config = root.parent / "shared" / "data" / "qwen35" / "configs" / "Qwen3.5-35B-A3B.config.json"
    out = tmp_path / "plan"
    args = ["plan", "--model", str(config), "--nodes", "1", "--gpus-per-node", "8"]
    assert main([*args, "--gpu-memory", "80GiB", "--out", str(out)]) == 0
    assert (out / "serve.yaml").is_file() and (out / "rayservice.yaml").is_file()
    assert main(["k8s", "render", "--check", "--root", str(root)]) == 0
