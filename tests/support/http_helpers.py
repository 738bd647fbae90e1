"""What HTTP tests of a running app share: an `openai` client, seeded prompts, /metrics."""

import openai
import requests
import torch


def client(base: str, timeout: float = 120) -> openai.OpenAI:
    """No retries: a test sees every error the server sends."""
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=timeout)


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 1100, (n,), generator=g).tolist()


def metrics(base: str) -> dict[str, float]:
    """/metrics as {sample with its labels: value}."""
    out = {}
    for line in requests.get(base + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
