#!/usr/bin/env bash
# A multi-node Ray cluster on this one machine, for development and tests (cluster/README.md).
#
#   cluster/local.sh up N                         a head and N worker nodes (ray start)
#   cluster/local.sh deploy CONFIG [POOL=RESOURCE ...]
#                                                 serve deploy CONFIG, wait until it answers
#   cluster/local.sh status                       addresses, nodes, apps
#   cluster/local.sh url                          the app's URL, http://127.0.0.1:PORT (+ /v1)
#   cluster/local.sh env                          exports for Ray's CLIs: eval "$(... env)"
#   cluster/local.sh down                         stop this cluster's processes, and only those
#
# Every node gets ports of its own, from one block of free ports chosen at `up`, and all share
# one short Ray temp dir (Unix socket paths are limited to 107 bytes). The cluster has a token
# of its own (Ray's token authentication) in the state dir. `down` stops exactly the processes
# that name that temp dir or carry this cluster's id, and their descendants; it never runs
# `ray stop`, which would stop every Ray instance on the machine.
#
# Node resources (what pools are pinned to; see cluster/README.md):
#   head       no CPUs or GPUs (the Serve controller and proxy need none): runs no replica
#   worker i   {"prefill_node": 100} for odd i, {"decode_node": 100} for even i, and
#              {"worker<i>": 100} to pin to that one node
# Environment:
#   QWEN35_CLUSTER_DIR                 state dir (default /tmp/qwen35-cluster)
#   QWEN35_CLUSTER_HTTP_PORT           Serve's HTTP port (default: a free port chosen at `up`)
#   QWEN35_CLUSTER_HEAD_CPUS           CPUs of the head (default 0)
#   QWEN35_CLUSTER_WORKER_CPUS         CPUs of each worker (default 2; logical, may exceed cores)
#   QWEN35_CLUSTER_WORKER<i>_CPUS      CPUs of worker i, over the above
#   QWEN35_CLUSTER_WORKER<i>_GPUS      GPU ids of worker i, e.g. "0,1" (CUDA_VISIBLE_DEVICES)
#   QWEN35_CLUSTER_WORKER<i>_RESOURCES custom resources of worker i, JSON, instead of the above
#   QWEN35_CLUSTER_OBJECT_STORE_BYTES  object store of each node (default 268435456)
#   QWEN35_CLUSTER_WORKER_PORTS        worker ports per node (default 100)
#   QWEN35_CLUSTER_UP_TIMEOUT, QWEN35_CLUSTER_DEPLOY_TIMEOUT   seconds (default 120, 600)
#   QWEN35_CLUSTER_PYTHON              the Python with ray and qwen35_ray (default: python on PATH)
set -euo pipefail

# absolute: Ray processes started elsewhere read the token from it
STATE=$(realpath -m "${QWEN35_CLUSTER_DIR:-/tmp/qwen35-cluster}")
STATE_FILE=$STATE/cluster.env
PY=${QWEN35_CLUSTER_PYTHON:-$(command -v python || command -v python3 || echo python3)}
# a node's ports within the block: node manager, object manager, metrics export, runtime env
# agent, dashboard agent http, dashboard agent grpc, then its worker ports
NODE_PORTS=8
HEAD_PORTS=10
# Ray's own and the kernel's default ranges are avoided: 10002-19999 are the worker ports of
# every other Ray instance here, 32768-60999 the ephemeral ports of outgoing connections
PORT_LOW=20000
PORT_HIGH=32767

die() {
	echo "cluster/local.sh: $*" >&2
	exit 1
}

usage() {
	sed -n '4,10p' "$0" | sed 's/^# \{0,1\}//'
	exit 2
}

need_tools() {
	if ! command -v ray >/dev/null || ! command -v serve >/dev/null; then
		die "ray and serve are not on PATH; activate the project's virtualenv (. .venv/bin/activate)"
	fi
	"$PY" -c 'import ray, yaml, qwen35_ray' 2>/dev/null ||
		die "$PY cannot import ray and qwen35_ray; activate the project's virtualenv (pip install -e .)"
}

load_state() {
	[[ -f $STATE_FILE ]] || die "no cluster in $STATE; start one with: cluster/local.sh up N"
	# shellcheck source=/dev/null
	source "$STATE_FILE"
}

# this cluster's processes, as "pid starttime name" lines: those whose command line names the temp
# dir or whose environment carries the cluster id (GCS, raylets, dashboard, monitors), their
# descendants (agents and workers retitle themselves, `ray::IDLE`, overwriting both), and those
# of the "pid starttime" lines in file $1 still running (orphans of a raylet already stopped)
own_pids() {
	_TMP=$TEMP_DIR _ID=$CLUSTER_ID _SEEN=${1:-} "$PY" - <<'EOF'
import os
tmp, marker = os.environ["_TMP"].encode(), b"QWEN35_CLUSTER_ID=" + os.environ["_ID"].encode()
procs, roots = {}, set()
for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
    try:
        stat = open(f"/proc/{pid}/stat", "rb").read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
        procs[pid] = (int(fields[1]), fields[19].decode(), name.replace(" ", "_"))
        cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except (OSError, ValueError, IndexError):
        continue
    if tmp in cmd or marker in env:
        roots.add(pid)
seen = os.environ["_SEEN"]
if seen and os.path.exists(seen):
    for line in open(seen):
        pid, start = line.split()[:2]
        if procs.get(int(pid), (0, ""))[1] == start:
            roots.add(int(pid))
children = {}
for pid, (ppid, *_) in procs.items():
    children.setdefault(ppid, []).append(pid)
found, todo = set(), list(roots)
while todo:
    pid = todo.pop()
    if pid not in found:
        found.add(pid)
        todo += children.get(pid, [])
for pid in sorted(found - {os.getpid(), os.getppid()}):
    print(pid, *procs[pid][1:])
EOF
}

# one block of free ports: echo its first port
port_block() {
	_N=$1 _LOW=$PORT_LOW _HIGH=$PORT_HIGH "$PY" - <<'EOF'
import os, random, socket, sys
n, low, high = int(os.environ["_N"]), int(os.environ["_LOW"]), int(os.environ["_HIGH"])
def free(p):
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", p))
            return True
        except OSError:
            return False
for _ in range(200):
    base = random.randrange(low, high - n)
    if all(free(p) for p in range(base, base + n)):
        print(base)
        sys.exit(0)
sys.exit(f"no {n} consecutive free ports in {low}-{high}")
EOF
}

# Ray's CLIs and processes, with this cluster's token (Ray >= 2.5x enables token auth as soon as
# ~/.ray/auth_token exists, which any local ray.init() writes; a worker then needs the token)
with_ray_env() {
	env -u RAY_ADDRESS -u RAY_AUTH_TOKEN RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE/auth_token" \
		RAY_USAGE_STATS_ENABLED=0 "$@"
}

# GET a URL, print the body; fails on an error status or after 10 s. With --auth, the cluster's
# token goes along (the dashboard's API wants it)
http_get() {
	_AUTH=$([[ $1 == --auth ]] && echo "$STATE/auth_header") "$PY" - "${@: -1}" <<'EOF'
import os, sys, urllib.request
req = urllib.request.Request(sys.argv[1])
if os.environ["_AUTH"]:
    name, value = open(os.environ["_AUTH"]).read().strip().split(": ", 1)
    req.add_header(name, value)
try:
    sys.stdout.write(urllib.request.urlopen(req, timeout=10).read().decode())
except Exception:
    sys.exit(1)
EOF
}

api() { http_get --auth "http://127.0.0.1:$DASHBOARD_PORT$1"; }

# alive nodes as "count" or, with --table, one line per node
nodes() {
	api "/api/v0/nodes?limit=1000&detail=true" | _FMT=${1:-} "$PY" -c '
import json, os, sys
rows = json.load(sys.stdin)["data"]["result"]["result"]
alive = [n for n in rows if n["state"] == "ALIVE"]
if os.environ["_FMT"] != "--table":
    print(len(alive)); sys.exit()
for n in sorted(alive, key=lambda n: (not n["is_head_node"], n["node_name"])):
    res = {k: v for k, v in n["resources_total"].items()
           if not k.startswith(("node:", "memory", "object_store_memory"))}
    kind = "head  " if n["is_head_node"] else "worker"
    print("  %s %s  %s" % (kind, n["node_id"][:12], json.dumps(res, sort_keys=True)))
'
}

node_args() { # node index -> the ray start arguments of its ports
	local o=$((BASE + HEAD_PORTS + $1 * (NODE_PORTS + WORKER_PORTS)))
	echo "--node-manager-port=$o --object-manager-port=$((o + 1))" \
		"--metrics-export-port=$((o + 2)) --runtime-env-agent-port=$((o + 3))" \
		"--dashboard-agent-listen-port=$((o + 4)) --dashboard-agent-grpc-port=$((o + 5))" \
		"--min-worker-port=$((o + NODE_PORTS)) --max-worker-port=$((o + NODE_PORTS + WORKER_PORTS - 1))"
}

worker_resources() {
	local i=$1 var="QWEN35_CLUSTER_WORKER${1}_RESOURCES"
	if [[ -n ${!var:-} ]]; then
		echo "${!var}"
	elif ((i % 2)); then
		echo "{\"prefill_node\": 100, \"worker$i\": 100}"
	else
		echo "{\"decode_node\": 100, \"worker$i\": 100}"
	fi
}

ray_start() { # name, then ray start arguments; output goes to $STATE/logs/<name>.log
	local name=$1
	shift
	if ! with_ray_env QWEN35_CLUSTER_ID="$CLUSTER_ID" ray start \
		--temp-dir="$TEMP_DIR" --disable-usage-stats \
		--object-store-memory="$OBJECT_STORE" "$@" >"$STATE/logs/$name.log" 2>&1; then
		tail -n 30 "$STATE/logs/$name.log" >&2
		echo "cluster/local.sh: ray start of the $name failed (log above: $STATE/logs/$name.log)" >&2
		return 1
	fi
}

cmd_up() {
	[[ ${1:-} =~ ^[0-9]+$ ]] || die "usage: cluster/local.sh up N   (N: worker nodes, e.g. 2)"
	local workers=$1 t0=$SECONDS
	need_tools
	if [[ -f $STATE_FILE ]]; then
		load_state
		[[ -z $(own_pids) ]] || die "a cluster is already up in $STATE (status, or down first)"
		echo "removing the state of a stopped cluster in $STATE"
		rm -rf "$STATE_FILE" "$TEMP_DIR"
	fi
	mkdir -p "$STATE/logs"
	(
		umask 077
		"$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE/auth_token"
		echo "Authorization: Bearer $(cat "$STATE/auth_token")" >"$STATE/auth_header"
	)
	WORKER_PORTS=${QWEN35_CLUSTER_WORKER_PORTS:-100}
	OBJECT_STORE=${QWEN35_CLUSTER_OBJECT_STORE_BYTES:-268435456}
	BASE=$(port_block $((HEAD_PORTS + (workers + 1) * (NODE_PORTS + WORKER_PORTS))))
	GCS_PORT=$BASE
	DASHBOARD_PORT=$((BASE + 1))
	CLIENT_PORT=$((BASE + 2))
	HTTP_PORT=${QWEN35_CLUSTER_HTTP_PORT:-$((BASE + 3))}
	if [[ -n ${QWEN35_CLUSTER_HTTP_PORT:-} ]]; then
		"$PY" -c 'import socket, sys; socket.socket().bind(("0.0.0.0", int(sys.argv[1])))' \
			"$HTTP_PORT" 2>/dev/null || die "QWEN35_CLUSTER_HTTP_PORT=$HTTP_PORT is not a free port"
	fi
	TEMP_DIR=$(mktemp -d /tmp/q35r.XXXXXX)
	CLUSTER_ID=$(basename "$TEMP_DIR")-$$-$RANDOM
	cat >"$STATE_FILE" <<EOF
CLUSTER_ID=$CLUSTER_ID
TEMP_DIR=$TEMP_DIR
WORKERS=$workers
BASE=$BASE
WORKER_PORTS=$WORKER_PORTS
OBJECT_STORE=$OBJECT_STORE
GCS_PORT=$GCS_PORT
DASHBOARD_PORT=$DASHBOARD_PORT
CLIENT_PORT=$CLIENT_PORT
HTTP_PORT=$HTTP_PORT
EOF
	# a failed start leaves nothing running
	trap 'echo "cluster/local.sh: up failed; stopping what started" >&2; cmd_down >&2 || true' EXIT
	echo "starting the head (GCS 127.0.0.1:$GCS_PORT, dashboard :$DASHBOARD_PORT, temp dir $TEMP_DIR)"
	# shellcheck disable=SC2046
	ray_start head --head --port="$GCS_PORT" --include-dashboard=true \
		--dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
		--ray-client-server-port="$CLIENT_PORT" $(node_args 0) \
		--num-cpus="${QWEN35_CLUSTER_HEAD_CPUS:-0}" --num-gpus=0 --resources='{"head_node": 100}'
	local i cpus gpus var
	# one at a time: nodes starting together in one session dir pick the same socket and log
	# names (raylet.1), and the second raylet dies on "bind: Address already in use"
	for ((i = 1; i <= workers; i++)); do
		var="QWEN35_CLUSTER_WORKER${i}_CPUS"
		cpus=${!var:-${QWEN35_CLUSTER_WORKER_CPUS:-2}}
		var="QWEN35_CLUSTER_WORKER${i}_GPUS"
		gpus=${!var:-}
		echo "starting worker $i: $cpus CPUs${gpus:+, GPUs $gpus}, resources $(worker_resources "$i")"
		# shellcheck disable=SC2046
		CUDA_VISIBLE_DEVICES=${gpus:-${CUDA_VISIBLE_DEVICES:-}} ray_start "worker$i" \
			--address="127.0.0.1:$GCS_PORT" $(node_args "$i") --num-cpus="$cpus" \
			--num-gpus="$(awk -F, '{print NF}' <<<"$gpus")" \
			--resources="$(worker_resources "$i")"
	done
	local deadline=$((SECONDS + ${QWEN35_CLUSTER_UP_TIMEOUT:-120})) alive=0
	until alive=$(nodes 2>/dev/null) && ((alive == workers + 1)); do
		((SECONDS < deadline)) || die "only ${alive:-0} of $((workers + 1)) nodes alive after \
${QWEN35_CLUSTER_UP_TIMEOUT:-120} s; logs in $STATE/logs and $TEMP_DIR/session_latest/logs"
		sleep 1
	done
	trap - EXIT
	echo "up: head + $workers workers in $((SECONDS - t0)) s"
	cmd_status
}

cmd_deploy() {
	[[ $# -ge 1 ]] || die "usage: cluster/local.sh deploy CONFIG [POOL=RESOURCE ...]"
	local config=$1 t0=$SECONDS pin pins=()
	shift
	[[ -f $config ]] || die "no such config file: $config"
	load_state
	need_tools
	for pin in "$@"; do pins+=(--pin "$pin"); done
	mkdir -p "$STATE/serve"
	local out
	out=$STATE/serve/$(basename "$config")
	"$PY" -m qwen35_ray.deploy.local_config "$config" --out "$out" --http-port "$HTTP_PORT" \
		${pins[@]+"${pins[@]}"} || exit 1
	local prefix
	prefix=$("$PY" -c 'import sys, yaml
app = yaml.safe_load(open(sys.argv[1]))["applications"][0]
print(app.get("route_prefix", "/").rstrip("/"))' "$out")
	echo "deploying $config (as $out)${*:+ with pins $*}"
	with_ray_env serve deploy --address "http://127.0.0.1:$DASHBOARD_PORT" "$out"
	local timeout=${QWEN35_CLUSTER_DEPLOY_TIMEOUT:-600} url="http://127.0.0.1:$HTTP_PORT$prefix"
	local deadline=$((SECONDS + timeout)) next=$((SECONDS + 10)) apps
	# ready: every app RUNNING (each deployment has its replicas; the ingress alone answers
	# /v1/models while a pool still waits for a node), and the route answers
	local ready='^[^,]+: RUNNING(, [^,]+: RUNNING)*$'
	while :; do
		apps=$(app_status)
		if [[ $apps =~ $ready ]] && http_get "$url/v1/models" >/dev/null; then
			break
		fi
		if [[ $apps == *DEPLOY_FAILED* ]] || ((SECONDS >= deadline)); then
			with_ray_env serve status --address "http://127.0.0.1:$DASHBOARD_PORT" >&2 || true
			die "$config did not come up within $((SECONDS - t0)) s ($apps); logs in \
$TEMP_DIR/session_latest/logs/serve"
		fi
		if ((SECONDS >= next)); then
			echo "  waiting for $url/v1/models: $((SECONDS - t0)) s, $apps"
			next=$((SECONDS + 10))
		fi
		sleep 1
	done
	echo "deployed in $((SECONDS - t0)) s: $url/v1"
}

# "app: STATUS, ..." from the dashboard's Serve API
app_status() {
	api "/api/serve/applications/" 2>/dev/null | "$PY" -c '
import json, sys
apps = json.load(sys.stdin).get("applications") or {}
print(", ".join("%s: %s" % (k, v["status"]) for k, v in apps.items()) or "no application yet")
' 2>/dev/null || echo "Serve not answering yet"
}

cmd_status() {
	load_state
	local n
	n=$(own_pids | wc -l)
	echo "state dir:   $STATE"
	echo "temp dir:    $TEMP_DIR   (logs: $TEMP_DIR/session_latest/logs)"
	echo "processes:   $n"
	echo "address:     127.0.0.1:$GCS_PORT   (RAY_ADDRESS for ray.init / ray list)"
	echo "dashboard:   http://127.0.0.1:$DASHBOARD_PORT   (serve deploy/status --address)"
	echo "http:        http://127.0.0.1:$HTTP_PORT/v1"
	# shellcheck disable=SC2153 # WORKERS comes from the state file
	echo "ports:       $BASE-$((BASE + HEAD_PORTS + (WORKERS + 1) * (NODE_PORTS + WORKER_PORTS) - 1))"
	echo "nodes:"
	nodes --table || echo "  (the dashboard does not answer)"
	echo "apps:        $(app_status)"
}

cmd_env() {
	load_state
	echo "export RAY_ADDRESS=127.0.0.1:$GCS_PORT"
	echo "export RAY_DASHBOARD_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT"
	echo "export RAY_AUTH_MODE=token"
	echo "export RAY_AUTH_TOKEN_PATH=$STATE/auth_token"
}

cmd_down() {
	if [[ ! -f $STATE_FILE ]]; then
		echo "no cluster in $STATE; nothing to stop"
		return 0
	fi
	load_state
	local seen=$STATE/pids i n
	own_pids >"$seen"
	n=$(wc -l <"$seen")
	# SIGTERM (Ray's processes clean up on it) to the raylets and all but the GCS first: a raylet
	# stopping unregisters from the GCS, and waits for it if it is gone; then to everything left
	# once the raylets are gone (or after 5 s), and SIGKILL after 10 s
	local phase=0
	for ((i = 0; i < 150; i++)); do
		# the processes seen so far, and any they started meanwhile
		own_pids "$seen" >"$seen.new"
		mv "$seen.new" "$seen"
		[[ -s $seen ]] || break
		# shellcheck disable=SC2046
		if ((phase == 0)); then
			kill -TERM $(awk '$3 != "gcs_server" {print $1}' "$seen") 2>/dev/null || true
			phase=1
		elif ((phase == 1)) && { ((i >= 50)) || ! grep -q ' raylet$' "$seen"; }; then
			kill -TERM $(cut -d' ' -f1 "$seen") 2>/dev/null || true
			phase=2
		elif ((i >= 100)); then
			kill -KILL $(cut -d' ' -f1 "$seen") 2>/dev/null || true
		fi
		sleep 0.1
	done
	if [[ -s $seen ]]; then
		# shellcheck disable=SC2046
		ps -o pid,args -p $(cut -d' ' -f1 "$seen" | paste -sd,) >&2 || true
		die "processes of the cluster in $STATE are still running (above)"
	fi
	# keep the logs beside the state, drop the rest of the temp dir
	if [[ -d $TEMP_DIR/session_latest/logs ]]; then
		rm -rf "$STATE/ray-logs"
		cp -rL "$TEMP_DIR/session_latest/logs" "$STATE/ray-logs" 2>/dev/null || true
	fi
	rm -rf "$TEMP_DIR"
	rm -f "$STATE_FILE" "$seen"
	echo "down: stopped $n processes; Ray's logs in $STATE/ray-logs"
}

case ${1:-} in
up) cmd_up "${@:2}" ;;
deploy) cmd_deploy "${@:2}" ;;
status) cmd_status ;;
env) cmd_env ;;
url) load_state && echo "http://127.0.0.1:$HTTP_PORT" ;;
down) cmd_down ;;
*) usage ;;
esac
