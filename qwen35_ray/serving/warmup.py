"""Waiting for a running app's engines to finish their background decode compile (the bench
measures compiled engines, not ones still compiling)."""

import asyncio

from ray import serve


async def wait_compiled(app: str, timeout_s: float) -> dict[str, list[bool]]:
    """Each engine deployment of a Serve app (this process connected to its cluster): one
    wait_compiled call per running replica, concurrently (Serve spreads concurrent calls over
    a pool's replicas). Returns deployment -> the replicas' answers."""
    status = serve.status().applications[app]
    out = {}
    for name, d in status.deployments.items():
        if "Ingress" in name:
            continue
        replicas = max(1, d.replica_states.get("RUNNING", 0))
        handle = serve.get_deployment_handle(name, app)
        # by keyword: the prefill pool's router reads a positional first argument as a prompt
        calls = [handle.wait_compiled.remote(timeout_s=timeout_s) for _ in range(replicas)]
        out[name] = list(await asyncio.gather(*calls))
    return out
