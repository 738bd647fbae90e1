"""`qwen35-ray serve` end to end, as subprocesses running the real command line: the issue's
vLLM and SGLang seed lines (model qwen35-tiny, sizes for 2 cores) start a server the `openai`
client talks to; Ctrl-C and SIGTERM stop it with exit code 0 and leave none of its Ray
processes behind; `--print-config` run with `serve run` gives the same greedy answer; a flag
we do not take fails at once, naming it, without starting Ray."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import requests
import yaml
from http_helpers import parse, total
from serve_fixtures import free_port

from qwen35_ray.serving.launch import summary

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key-1234"
READY_S = 150
STOP_S = 40
# the vLLM seed line of issue 23 at a size for 2 cores, without the MTP flag (issue 22)
VLLM_LINE = [
    "qwen35-tiny",
    "--tensor-parallel-size",
    "2",
    "--max-model-len",
    "4096",
    "--reasoning-parser",
    "qwen3",
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "qwen3_coder",
]
SGLANG_LINE = ["--model-path", "qwen35-tiny", "--context-length", "4096", "--reasoning-parser"]
LONG = "Write a short poem about the sea, the wind and the gulls, in four lines. " * 3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A Ray of each command's own (no RAY_ADDRESS), no API key from this environment, and
    one tiny-checkpoint cache for the module."""
    drop = ("RAY_ADDRESS", "VLLM_API_KEY", "QWEN35_RAY_API_KEY")
    out = {k: v for k, v in os.environ.items() if k not in drop}
    out["QWEN35_RAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return out


def processes_under(root: int) -> set[tuple[int, str]]:
    """(pid, start time) of root's descendants (Ray's GCS, raylet, agents and workers)."""
    parent, start = {}, {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        parent[pid], start[pid] = int(fields[1]), fields[19].decode()
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        for child in (c for c, p in parent.items() if p == pid):
            found.add((child, start[child]))
            todo.append(child)
    return found


def alive(procs: set[tuple[int, str]]) -> set[tuple[int, str]]:
    out = set()
    for pid, started in procs:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[19].decode() == started and fields[0] != b"Z":
            out.add((pid, started))
    return out


class Command:
    """One server command in its own session (as a terminal would run it); its output is kept
    in a log file and scanned for the URL line."""

    def __init__(self, argv: list[str], env: dict, log: Path):
        self.log = log
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=log.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        with open(self.log, "w") as f:
            for line in self.proc.stdout:
                self.lines.append(line)
                f.write(line)
                f.flush()

    def tail(self) -> str:
        return "".join(self.lines[-40:])

    def url(self) -> str:
        """The URL the command prints once it serves."""
        deadline = time.time() + READY_S
        while time.time() < deadline and self.proc.poll() is None:
            for line in self.lines:
                if m := re.match(r"qwen35-ray serving (\S+) at (\S+)$", line.strip()):
                    return m.group(2)
            time.sleep(0.5)
        raise AssertionError(f"no URL line in {READY_S} s; output tail:\n{self.tail()}")

    def stop(self, sig: int, group: bool) -> tuple[int, float, set]:
        """Send sig (to the whole session, as Ctrl-C in a terminal does, or to the process);
        (exit code, seconds to exit, its processes still alive 3 s after it exited)."""
        procs = processes_under(self.proc.pid)
        start = time.time()
        (os.killpg if group else os.kill)(self.proc.pid, sig)
        try:
            rc = self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"still running {STOP_S} s after {sig!r}:\n{self.tail()}"
            ) from None
        took = time.time() - start
        deadline = time.time() + 3
        while alive(procs) and time.time() < deadline:
            time.sleep(0.5)
        left = alive(procs)
        for pid, _ in left:
            os.kill(pid, signal.SIGKILL)
        return rc, took, left

    def kill(self):
        if self.proc.poll() is None:
            procs = processes_under(self.proc.pid)
            os.killpg(self.proc.pid, signal.SIGKILL)
            for pid, _ in alive(procs):
                os.kill(pid, signal.SIGKILL)
            self.proc.wait()


def greedy(base: str, key: str = "none", prompt: str = "Hi!") -> tuple[str, str]:
    c = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)
    msg = (
        c.chat.completions.create(
            model="qwen35-tiny",
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=12,
        )
        .choices[0]
        .message
    )
    return msg.content, msg.model_extra.get("reasoning_content")


def wait_health(base: str, cmd: Command):
    deadline = time.time() + READY_S
    while time.time() < deadline and cmd.proc.poll() is None:
        try:
            if requests.get(base + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{base}/health did not answer; output tail:\n{cmd.tail()}")


@pytest.mark.slow
def test_vllm_line_with_two_ranks_serves_with_its_key_and_stops_on_ctrl_c(env, tmp_path):
    port = free_port()
    argv = [str(BIN / "qwen35-ray"), "serve", *VLLM_LINE, "--port", str(port), "--api-key", KEY]
    cmd = Command(argv, env, tmp_path / "serve.log")
    try:
        url = cmd.url()
        assert url == f"http://127.0.0.1:{port}/v1"
        content, reasoning = greedy(url, KEY)
        assert reasoning  # thinking on: the qwen3 reasoning parser split it out
        with pytest.raises(openai.AuthenticationError):
            greedy(url, "wrong-key")
        rc, took, left = cmd.stop(signal.SIGINT, group=True)
    finally:
        cmd.kill()
    assert rc == 0, cmd.tail()
    assert not left, f"processes left behind: {left}"
    assert "qwen35-ray serve: shutting down" in cmd.tail()


@pytest.mark.slow
def test_sglang_line_disaggregated_stops_on_sigterm_and_its_config_serves_the_same(env, tmp_path):
    """The SGLang line, disaggregated, with replicas small enough that `serve run` of its
    printed config also fits 2 CPUs (ingress, prefill and decode at 0.5 each)."""
    port = free_port()
    argv = [str(BIN / "qwen35-ray"), "serve", *SGLANG_LINE, "qwen3", "--port", str(port)]
    argv += ["--host", "127.0.0.1", "--disaggregate", "--num-cpus", "0.5"]
    cmd = Command(argv, env, tmp_path / "serve.log")
    try:
        url = cmd.url()
        assert url == f"http://127.0.0.1:{port}/v1"
        answer = greedy(url, prompt=LONG)
        assert answer[1]
        # the prompt is past min_prefill_tokens: it went from the prefill to the decode pool
        metrics = requests.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
        assert total(parse(metrics), "qwen35_ray_transfers_total") == 1, metrics
        rc, took, left = cmd.stop(signal.SIGTERM, group=False)
    finally:
        cmd.kill()
    assert rc == 0, cmd.tail()
    assert not left, f"processes left behind: {left}"

    printed = subprocess.run(
        [*argv, "--print-config"], env=env, capture_output=True, text=True, check=True
    ).stdout
    config = yaml.safe_load(printed)
    config["http_options"]["port"] = port = free_port()
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    # a fresh local Ray for `serve run` too, never one already running on this machine
    run = Command(
        [str(BIN / "serve"), "run", str(path), "--address", "local"],
        env,
        tmp_path / "serve-run.log",
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_health(base, run)
        assert greedy(base + "/v1", prompt=LONG) == answer
        run.stop(signal.SIGINT, group=True)
    finally:
        run.kill()


@pytest.mark.slow
def test_on_a_running_cluster_it_adds_its_app_and_deletes_only_that(env, tmp_path):
    """--address: a cluster of cluster/local.sh already serving its own app; the command
    refuses to take that app's name, serves beside it (the key reaching the ingress through
    the job's runtime_env), and on Ctrl-C deletes its app only."""
    cluster_env = {
        **env,
        "QWEN35_CLUSTER_DIR": str(tmp_path / "cluster"),
        "QWEN35_CLUSTER_WORKER_CPUS": "4",
        "QWEN35_CLUSTER_PYTHON": sys.executable,
        "PATH": f"{BIN}:{env.get('PATH', '')}",
    }

    def local(*args: str) -> str:
        r = subprocess.run(
            [str(ROOT / "cluster" / "local.sh"), *args],
            env=cluster_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert r.returncode == 0, f"local.sh {args}:\n{r.stdout}\n{r.stderr}"
        return r.stdout

    local("up", "1")
    try:
        local("deploy", "deployments/qwen35.yaml")
        exports = dict(re.findall(r"export (\w+)=(\S+)", local("env")))
        theirs = local("url").strip()
        # the cluster's token; its address is given as --address only
        cmd_env = {**cluster_env, **exports}
        cmd_env.pop("RAY_ADDRESS")
        argv = [str(BIN / "qwen35-ray"), "serve", "qwen35-tiny", "--num-cpus", "0.5"]
        argv += ["--address", exports["RAY_ADDRESS"]]
        clash = subprocess.run(argv, env=cmd_env, capture_output=True, text=True, timeout=120)
        assert clash.returncode == 1 and "pass --app-name" in clash.stdout, clash.stdout
        argv += ["--app-name", "mine", "--route-prefix", "/mine", "--api-key", KEY]
        cmd = Command(argv, cmd_env, tmp_path / "serve.log")
        try:
            url = cmd.url()
            assert url == theirs + "/mine/v1"
            assert greedy(url, KEY)[1]
            with pytest.raises(openai.AuthenticationError):
                greedy(url, "wrong-key")
            rc, _, _ = cmd.stop(signal.SIGINT, group=True)
        finally:
            cmd.kill()
        assert rc == 0, cmd.tail()
        assert "deleting application 'mine'" in cmd.tail()
        assert requests.get(theirs + "/mine/health", timeout=10).status_code == 404
        assert greedy(theirs + "/v1")[1]  # the cluster's own app serves on
    finally:
        local("down")


def test_an_unsupported_flag_fails_fast_naming_it(env, tmp_path):
    start = time.time()
    out = subprocess.run(
        [str(BIN / "qwen35-ray"), "serve", "qwen35-tiny", "--swap-space", "4", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.time() - start
    assert out.returncode == 2
    assert out.stderr.startswith("qwen35-ray serve: error: unsupported flag --swap-space ")
    assert "starting a local Ray" not in out.stdout
    assert took < 5, f"{took:.1f} s to refuse a flag"


def test_a_port_in_use_is_refused_before_ray_starts(env, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run(
            [str(BIN / "qwen35-ray"), "serve", "qwen35-tiny", "--host", "127.0.0.1"]
            + ["--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use; pass another --port" in out.stdout
    assert "starting a local Ray" not in out.stdout


def test_a_replica_failure_is_summed_up_in_two_lines():
    """A replica that fails to start carries its traceback in Serve's status message; the
    command prints its first line and the exception (Ray's log above has the rest)."""
    message = (
        "A replica failed to start with exception. Retrying 2 more time(s). Error:\n"
        "ray::ServeReplica:qwen35:LLMServer.initialize_and_get_metadata() (pid=1)\n"
        '  File "replica.py", line 1928, in initialize\n'
        "RuntimeError: Traceback (most recent call last):\n"
        '  File "source.py", line 46, in resolve_model\n'
        "FileNotFoundError: could not get model 'no-such/model' from the hub\n"
    )
    assert summary(message) == (
        "A replica failed to start with exception. Retrying 2 more time(s). Error:\n"
        "  FileNotFoundError: could not get model 'no-such/model' from the hub"
    )
    assert summary("Deployment is waiting for resources.") == (
        "Deployment is waiting for resources."
    )
