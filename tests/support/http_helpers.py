"""What HTTP tests of a running app share: an `openai` client, seeded prompts, /metrics."""

import openai
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families


def client(base: str, timeout: float = 120) -> openai.OpenAI:
    """No retries: a test sees every error the server sends."""
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=timeout)


def prompt_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 1100, (n,), generator=g).tolist()


Sample = tuple[str, dict[str, str], float]


def metrics(base: str) -> list[Sample]:
    """/metrics as (sample name, labels, value), read with prometheus_client's parser."""
    return parse(requests.get(base + "/metrics", timeout=30).text)


def parse(text: str) -> list[Sample]:
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def total(found: list[Sample], name: str, **labels: str) -> float:
    """The sum of a sample's series whose labels include `labels` (every replica's, every
    pool's unless a label picks them)."""
    return sum(
        v for n, la, v in found if n == name and all(la.get(k) == w for k, w in labels.items())
    )


def series(found: list[Sample], name: str, **labels: str) -> dict[tuple, float]:
    """A sample's series whose labels include `labels`, by their labels."""
    return {
        tuple(sorted(la.items())): v
        for n, la, v in found
        if n == name and all(la.get(k) == w for k, w in labels.items())
    }


def delta(before: list[Sample], after: list[Sample], name: str, **labels: str) -> float:
    """How much total(name, labels) grew between two readings."""
    return total(after, name, **labels) - total(before, name, **labels)


def by_label(found: list[Sample], name: str, label: str, **labels: str) -> dict[str, float]:
    """A sample's values summed per value of one label (e.g. per replica)."""
    out: dict[str, float] = {}
    for n, la, v in found:
        if n == name and label in la and all(la.get(k) == w for k, w in labels.items()):
            out[la[label]] = out.get(la[label], 0) + v
    return out


def growth(before: list[Sample], after: list[Sample]) -> dict[str, float]:
    """How much each sample grew between two readings, summed over its series."""
    names = {n for n, _, _ in after}
    return {n: delta(before, after, n) for n in names}


def totals(base: str) -> dict[str, float]:
    """/metrics as {sample name: its series summed} (every replica's, every pool's)."""
    out: dict[str, float] = {}
    for n, _, v in metrics(base):
        out[n] = out.get(n, 0) + v
    return out
