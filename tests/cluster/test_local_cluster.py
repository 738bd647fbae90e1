"""cluster/local.sh end to end: a head and 2 worker nodes on this machine, the disaggregated app
deployed with its prefill pool pinned to worker 1 (prefill_node) and its decode pool to worker 2
(decode_node). A long prompt's state crosses nodes through the object store and the answer is
the offline engine's; `down` leaves no process of the cluster behind, and runs even when a test
fails.

The cluster is reached only over HTTP and through subprocesses (this process may hold a local
Ray of its own from other tests), with RAY_ADDRESS unset.
"""

import os
import subprocess
import time
from pathlib import Path

import pytest
import requests
from http_helpers import client, metrics, prompt_ids, total

from qwen35_ray import LLM

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local.sh"
MODEL = "qwen35-tiny"
PINS = {"PrefillServer": "prefill_node", "DecodeServer": "decode_node"}
# past disaggregation.min_prefill_tokens (32) of qwen35-pd.yaml: prefilled on the prefill pool
PROMPT_LENGTHS = (40, 300)
MAX_TOKENS = 12


def processes_of(temp_dir: str) -> set[tuple[int, str]]:
    """(pid, start time) of every process naming temp_dir in its command line, and of their
    descendants (Ray's workers and agents retitle themselves, `ray::...`)."""
    parent, start, roots = {}, {}, set()
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        parent[pid], start[pid] = int(fields[1]), fields[19].decode()
        if temp_dir.encode() in cmd:
            roots.add(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += [c for c, p in parent.items() if p == pid]
    return {(pid, start[pid]) for pid in found}


def alive(procs: set[tuple[int, str]]) -> set[tuple[int, str]]:
    out = set()
    for pid, start in procs:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        if stat[stat.rindex(b")") + 2 :].split()[19].decode() == start:
            out.add((pid, start))
    return out


class Cluster:
    def __init__(self, state: Path):
        self.state = state
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env["QWEN35_CLUSTER_DIR"] = str(state)

    def run(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def check(self, *args: str, timeout: float) -> str:
        t0 = time.time()
        r = self.run(*args, timeout=timeout)
        assert r.returncode == 0, f"local.sh {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
        print(f"local.sh {args[0]}: {time.time() - t0:.0f} s")
        return r.stdout

    @property
    def info(self) -> dict[str, str]:
        lines = (self.state / "cluster.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.info['HTTP_PORT']}"

    def state_api(self, what: str) -> list[dict]:
        """Rows of the dashboard's state API (/api/v0/actors, /api/v0/nodes)."""
        header = (self.state / "auth_header").read_text().strip().split(": ", 1)
        r = requests.get(
            f"http://127.0.0.1:{self.info['DASHBOARD_PORT']}/api/v0/{what}",
            params={"detail": "true", "limit": 10000},
            headers={header[0]: header[1]},
            timeout=30,
        )
        r.raise_for_status()
        return r.json()["data"]["result"]["result"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.check("up", "2", timeout=300)
        c.check(
            "deploy",
            "deployments/qwen35-pd.yaml",
            "prefill_server=prefill_node",
            "decode_server=decode_node",
            timeout=660,
        )
        yield c
    finally:
        # idempotent: a no-op when test_down_leaves_no_process_behind already ran it
        down = c.run("down", timeout=120)
        assert down.returncode == 0, f"local.sh down:\n{down.stdout}\n{down.stderr}"


@pytest.fixture(scope="module")
def offline():
    """The offline engine's greedy text for each prompt length."""
    llm = LLM(MODEL, dtype="float32", max_model_len=4096, kv_cache_memory_bytes=2**26)
    params = llm.engine.default_sampling_params(temperature=0, max_tokens=MAX_TOKENS)
    outs = llm.generate([{"prompt_token_ids": prompt_ids(n, n)} for n in PROMPT_LENGTHS], params)
    return {
        n: (o.outputs[0].text, o.outputs[0].finish_reason) for n, o in zip(PROMPT_LENGTHS, outs)
    }


def test_long_prompts_cross_nodes_and_answer_as_offline(cluster, offline):
    before = total(metrics(cluster.url), "qwen35_ray_transfers_total")
    c = client(cluster.url)
    for n in PROMPT_LENGTHS:
        choice = c.completions.create(
            model=MODEL, prompt=prompt_ids(n, n), temperature=0, max_tokens=MAX_TOKENS
        ).choices[0]
        assert (choice.text, choice.finish_reason) == offline[n], f"{n}-token prompt"
    # each prompt's state went from the prefill replica to the decode replica
    after = total(metrics(cluster.url), "qwen35_ray_transfers_total")
    assert after - before == len(PROMPT_LENGTHS)


def test_chat_through_the_openai_client(cluster):
    answer = client(cluster.url).chat.completions.create(
        model=MODEL,
        max_tokens=8,
        messages=[{"role": "user", "content": "Name three colours of the sea at dusk. " * 4}],
    )
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens > 0


def test_pools_run_on_their_pinned_nodes(cluster):
    nodes = {n["node_id"]: n for n in cluster.state_api("nodes") if n["state"] == "ALIVE"}
    assert len(nodes) == 3
    where = {}
    for a in cluster.state_api("actors"):
        if a["state"] != "ALIVE":
            continue
        for cls in PINS:
            if a["class_name"].endswith(f":{cls}"):
                where.setdefault(cls, []).append(a["node_id"])
    assert sorted(where) == sorted(PINS), where
    for cls, resource in PINS.items():
        assert len(where[cls]) == 1, where
        assert resource in nodes[where[cls][0]]["resources_total"], (cls, nodes[where[cls][0]])
    assert where["PrefillServer"] != where["DecodeServer"]
    status = cluster.check("status", timeout=60)
    assert cluster.url in status and status.count("  worker ") == 2


def test_down_leaves_no_process_behind(cluster):
    temp_dir = cluster.info["TEMP_DIR"]
    before = processes_of(temp_dir)
    # GCS, dashboard, 3 raylets with their agents, the replicas...
    assert len(before) > 10
    cluster.check("down", timeout=120)
    assert not alive(before)
    assert not processes_of(temp_dir)
    assert not Path(temp_dir).exists()
    assert "nothing to stop" in cluster.check("down", timeout=60)
