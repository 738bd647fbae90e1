"""Moving a RequestState from a prefill replica to a decode replica.

One interface, two backends:
- "object_store" (default, works everywhere): the prefill replica puts the state's wire bytes
  into the Ray object store and hands back an ObjectRef. The ref travels through the ingress
  inside a dict (so Ray passes it by reference, never resolving it there); the decode replica
  fetches the bytes from the prefill replica's node.
- "nixl" (Ray Direct Transport; needs the `nixl` package): the state's tensors stay where the
  prefill replica holds them (GPU memory, or host memory on CPU) and the decode replica pulls
  them directly (RDMA or UCX). Only the small header (ids, params, RNG state) goes through the
  object store.

A handoff is a plain dict: {"backend", "ref": [ObjectRef], "nbytes", "wire_bytes", "send_s"}.
`nbytes` is the state's tensor payload, the RequestState size formula; `wire_bytes` is what the
object store holds (payload plus header).
"""

import asyncio
import time

import ray

from qwen35_ray.engine.request_state import RequestState

BACKENDS = ("object_store", "nixl")


def send(state: RequestState, backend: str = "object_store") -> dict:
    """Called in the prefill replica: publish the state and return its handoff."""
    t0 = time.perf_counter()
    if backend == "object_store":
        blob = state.to_bytes()
        ref, wire = ray.put(blob), len(blob)
    elif backend == "nixl":
        tensors = {k: v.contiguous() for k, v in state.tensors.items()}
        state.tensors = {}
        header = state.to_bytes()
        ref = ray.put({"header": header, "tensors": ray.put(tensors, _tensor_transport="nixl")})
        wire = len(header)
    else:
        raise ValueError(f"unknown transfer backend {backend!r}; choose one of {BACKENDS}")
    return {
        "backend": backend,
        "ref": [ref],  # in a list: Ray must not resolve it on the way through the ingress
        "nbytes": state.nbytes if backend == "object_store" else _nbytes(tensors),
        "wire_bytes": wire,
        "send_s": time.perf_counter() - t0,
    }


async def receive(handoff: dict) -> tuple[RequestState, float]:
    """Called in the decode replica: fetch the state; returns it and the seconds it took."""
    t0 = time.perf_counter()
    value = await handoff["ref"][0]
    if handoff["backend"] == "object_store":
        state = RequestState.from_bytes(value)
    else:
        state = RequestState.from_bytes(value["header"])
        # an RDT object is fetched with ray.get (not awaitable); keep the event loop free
        state.tensors = await asyncio.to_thread(ray.get, value["tensors"])
    return state, time.perf_counter() - t0


def _nbytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
