"""Where a bench serve run's time goes: the engines' step counters from /metrics (busy time and
steps per pool); the CPU seconds of every process of a cluster the bench started (its Ray
processes are its descendants) and the seconds their threads waited for a CPU; with --py-spy
a sampled profile of the engine, ingress and proxy processes (py-spy record, raw stacks),
summarised as the functions with most samples. Also the wait for the served engines'
compiled decode step (LLMServer.wait_compiled)."""

import os
import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

# /metrics counters of each engine replica, summed per pool
STEP_COUNTERS = {
    "qwen35_ray_steps": "steps",
    "qwen35_ray_step_seconds": "step_s",
    "qwen35_ray_decode_steps": "decode_steps",
    "qwen35_ray_decode_step_seconds": "decode_step_s",
    "qwen35_ray_step_cpu_seconds": "step_cpu_s",
}
# a process of the cluster, named by its command line
_NAMES = (
    (re.compile(r"^ray::ServeReplica:[^:]+:(\w+)"), None),
    (re.compile(r"^ray::(ProxyActor)"), None),
    # Serve's high-throughput mode: HAProxy in place of the proxy, and the actor that runs it
    (re.compile(r"^ray::(HAProxyManager)"), None),
    (re.compile(r"^\S*/(haproxy) "), None),
    (re.compile(r"^ray::(ServeController)"), None),
    (re.compile(r"(raylet|gcs_server)"), "ray core"),
)


async def engine_steps(http, metrics_url: str) -> dict[str, dict[str, float]] | None:
    """pool -> {steps, step_s, decode_steps, decode_step_s} summed over the pool's replicas,
    from the app's /metrics; None when it has none of them (another server)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with http.get(metrics_url) as r:
            if r.status != 200:
                return None
            text = await r.text()
    except Exception:
        return None
    out: dict[str, dict[str, float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            key = STEP_COUNTERS.get(family.name)
            if key is None:
                continue
            for s in family.samples:
                if s.name.endswith("_total"):
                    zero = dict.fromkeys(STEP_COUNTERS.values(), 0.0)
                    out.setdefault(s.labels.get("pool", "?"), zero)[key] += s.value
    except ValueError:  # not Prometheus text: a server without our metrics
        return None
    return out or None


def steps_between(before: dict | None, after: dict | None, seconds: float) -> dict | None:
    """Per pool: the counters' increase over a run, the busy fraction of its wall time and
    the mean step times (ms)."""
    if not before or not after:
        return None
    out = {}
    for pool, a in after.items():
        b = before.get(pool, {})
        d = {k: a[k] - b.get(k, 0.0) for k in a}
        out[pool] = step_summary(d, seconds)
    return out


def step_summary(d: dict, seconds: float) -> dict:
    return {
        "steps": int(d["steps"]),
        "busy_s": d["step_s"],
        "busy_fraction": d["step_s"] / seconds if seconds else None,
        # the stepping thread's CPU time over its steps' wall time (1: it never waited)
        "step_cpu_fraction": d.get("step_cpu_s", 0.0) / d["step_s"] if d["step_s"] else None,
        "mean_step_ms": 1e3 * d["step_s"] / d["steps"] if d["steps"] else None,
        "decode_steps": int(d["decode_steps"]),
        "mean_decode_step_ms": 1e3 * d["decode_step_s"] / d["decode_steps"]
        if d["decode_steps"]
        else None,
    }


def engine_counters(stats: dict) -> dict:
    """An in-process engine's load_stats() as the counters engine_steps() reads."""
    return {
        "steps": stats["steps_total"],
        "step_s": stats["step_seconds_total"],
        "decode_steps": stats["decode_steps_total"],
        "decode_step_s": stats["decode_step_seconds_total"],
        "step_cpu_s": stats.get("step_cpu_seconds_total", 0.0),
    }


def _proc_table() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, CPU seconds, command line) of every readable process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields follow the last ')'
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, cmd)
    return out


def process_name(cmd: str, own: bool) -> str:
    if own:
        return "bench client"
    for pattern, fixed in _NAMES:
        m = pattern.search(cmd)
        if m:
            return fixed or m.group(1)
    return "ray other"


class ClusterCPU:
    """CPU seconds of this process and its descendants (a cluster it started), by name."""

    def __init__(self, root: int | None = None):
        self.root = root or os.getpid()

    def pids(self) -> dict[int, str]:
        """Descendant pid -> its name (process_name)."""
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        out, todo = {}, [self.root]
        while todo:
            pid = todo.pop()
            if pid in table:
                out[pid] = process_name(table[pid][2], pid == self.root)
            todo += children.get(pid, [])
        return out

    def sample(self) -> dict[int, tuple[str, float, float]]:
        """pid -> (name, CPU seconds, run-queue seconds)."""
        table, names = _proc_table(), self.pids()
        return {
            pid: (name, table[pid][1], runqueue_s(pid))
            for pid, name in names.items()
            if pid in table
        }

    @staticmethod
    def between(before: dict, after: dict, what: int = 1) -> dict[str, float]:
        """Seconds per name over an interval (processes alive at its end): CPU (what=1) or
        waiting for a CPU (what=2)."""
        out: Counter = Counter()
        for pid, now in after.items():
            out[now[0]] += now[what] - before.get(pid, (now[0], 0.0, 0.0))[what]
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def runqueue_s(pid: int) -> float:
    """Seconds the threads of a process (those alive now) spent runnable but waiting for a
    CPU (/proc/PID/task/TID/schedstat, second field): what other busy processes cost it."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total * 1e-9


# py-spy's frame: "name (path/to/file.py:12)"
_FRAME = re.compile(r"^(.*) \((?:.*/)?([^/]*?)(?::\d+)?\)$")


def _function(frame: str) -> str:
    """A function, not its lines: "f (path/to/file.py:12)" -> "f (file.py)"."""
    m = _FRAME.match(frame)
    return f"{m.group(1)} ({m.group(2)})" if m else frame


class PySpy:
    """py-spy record of some processes for the length of a block (raw collapsed stacks), each
    summarised as the functions with most samples, on top of the stack (self) and anywhere in
    it (total)."""

    def __init__(self, out_dir: Path, pids: dict[int, str], tag: str, rate: int = 50):
        exe = shutil.which("py-spy")
        if exe is None:
            raise SystemExit("bench serve --py-spy: py-spy is not installed (pip install py-spy)")
        self.out_dir, self.pids, self.tag, self.rate, self.exe = out_dir, pids, tag, rate, exe
        self.procs: list[tuple[str, Path, subprocess.Popen]] = []

    def __enter__(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for pid, name in self.pids.items():
            path = self.out_dir / f"{self.tag}-{name}-{pid}.txt"
            cmd = [self.exe, "record", "--pid", str(pid), "--rate", str(self.rate), "--format",
                   "raw", "--nonblocking", "--threads", "--output", str(path)]  # fmt: skip
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append((name, path, p))
        return self

    def __exit__(self, *exc):
        for _, _, p in self.procs:
            p.send_signal(signal.SIGINT)
        for _, _, p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        self.summary = {
            name: summarize_raw(path.read_text()) if path.exists() else None
            for name, path, _ in self.procs
        }


def summarize_raw(text: str, top: int = 15) -> dict:
    """py-spy's raw output (`frame;frame;... count` per stack, outermost first; with
    --threads the first frame names the thread) -> samples, per thread, and the functions
    with the most samples on top of the stack (self) and anywhere in it (total)."""
    samples = 0
    own, total, threads = Counter(), Counter(), Counter()
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        samples += count
        if frames and frames[0].startswith("thread ("):
            threads[frames[0]] += count
            frames = frames[1:]
        frames = [_function(f) for f in frames]
        if frames:
            own[frames[-1]] += count
        for f in set(frames):
            total[f] += count
    return {
        "samples": samples,
        "threads": dict(threads.most_common(8)),
        "self": dict(own.most_common(top)),
        "total": dict(total.most_common(top)),
    }
