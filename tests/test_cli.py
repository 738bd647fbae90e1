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
