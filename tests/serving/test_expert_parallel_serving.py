"""Expert-parallel replicas over real HTTP with the `openai` client, on one local Ray cluster.

Two apps on the embedded tiny MoE checkpoint (16 experts, float32): the collocated app at /co
whose replica is an EP group of 2 rank actors, and the disaggregated app at /pd whose prefill
pool runs EP=1 and whose decode pool runs EP=2 (a RequestState moves from one process to one
rank of a group). Both must give the offline EP=1 engine's tokens.
"""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from http_helpers import by_label, client, delta, metrics, prompt_ids, series, total
from serve_fixtures import running_apps

from qwen35_ray import LLM, SamplingParams
from qwen35_ray.model.expert_load import ExpertLoadSnapshot
from qwen35_ray.serving.builder import build_app, build_pd_app
from qwen35_ray.serving.metrics_ep import expert_samples

# slow tier (.ci/run): expert-parallel apps beside an offline engine
pytestmark = pytest.mark.slow

MODEL = "qwen35-tiny"
MIN_PREFILL = 16
LENGTHS = [3, 20, 64, 300, 1000]
ENGINE = {"max_num_seqs": 4, "max_model_len": 2048, "kv_cache_memory_bytes": 2**24}
# one torch thread per rank; the cluster's logical CPUs exceed the machine's (2 in CI)
EP2 = {"expert_parallel_size": 2, "rank_num_cpus": 1}


@pytest.fixture(scope="module")
def urls():
    common = {"model": MODEL, "dtype": "float32", "engine": ENGINE, "ingress": {"num_cpus": 0.1}}
    co = build_app({**common, "llm_server": {"num_cpus": 0.1, "engine": EP2}})
    pd = build_pd_app(
        {
            **common,
            "disaggregation": {"min_prefill_tokens": MIN_PREFILL},
            "prefill_server": {"num_cpus": 0.1},
            "decode_server": {"num_cpus": 0.1, "engine": EP2},
        }
    )
    with running_apps({"co": ("/co", co), "pd": ("/pd", pd)}, num_cpus=8) as url:
        yield url + "/co", url + "/pd"


@pytest.fixture(scope="module")
def offline():
    """The EP=1 reference, in this process."""
    return LLM(MODEL, dtype="float32", **ENGINE)


def reference(llm: LLM, ids: list[int], params: SamplingParams) -> tuple[str, list[str]]:
    (out,) = llm.generate({"prompt_token_ids": ids}, params)
    tok = llm.get_tokenizer()
    return out.outputs[0].text, [tok.decode([t]) for t in out.outputs[0].token_ids]


def complete(base: str, ids: list[int], stream: bool, **kw) -> tuple[str, list[str]]:
    c = client(base)
    if not stream:
        choice = c.completions.create(model=MODEL, prompt=ids, logprobs=0, **kw).choices[0]
        return choice.text, choice.logprobs.tokens
    text, tokens = "", []
    for ev in c.completions.create(model=MODEL, prompt=ids, logprobs=0, stream=True, **kw):
        for ch in ev.choices:
            text += ch.text
            tokens += ch.logprobs.tokens if ch.logprobs else []
    return text, tokens


GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True})


def test_completions_equal_the_offline_ep1_engine(urls, offline):
    """Greedy (streamed and not) and one seeded sample, prompts of 3 to 1,000 tokens, 8 at a
    time so that both ranks of a group run sequences in the same steps."""
    before = metrics(urls[1])
    jobs = [(prompt_ids(n, k), stream) for k, n in enumerate(LENGTHS) for stream in (False, True)]
    with ThreadPoolExecutor(8) as pool:
        got = [
            [pool.submit(complete, base, ids, stream, **GREEDY) for base in urls]
            for ids, stream in jobs
        ]
        got = [[f.result() for f in pair] for pair in got]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for (ids, stream), (co, pd) in zip(jobs, got):
        want = reference(offline, ids, greedy)
        assert co == want, f"collocated EP=2, {len(ids)}-token prompt, stream={stream}"
        assert pd == want, f"disaggregated, decode EP=2, {len(ids)}-token prompt, stream={stream}"
    after = metrics(urls[1])
    moved = sum(2 for n in LENGTHS if n >= MIN_PREFILL)
    assert delta(before, after, "qwen35_ray_requests_disaggregated_total") == moved

    ids = prompt_ids(50, 99)
    seeded = dict(temperature=1.0, top_p=0.9, seed=7, max_tokens=8)
    # what the ingress sends: the checkpoint's generation defaults under the request's values
    want = reference(offline, ids, offline.engine.default_sampling_params(**seeded))
    for base in urls:
        assert complete(base, ids, False, **seeded) == want


def chat(base: str, messages: list, stream: bool) -> list[str]:
    """The answer's tokens (from logprobs), thinking off."""
    kw = dict(
        model=MODEL,
        messages=messages,
        logprobs=True,
        temperature=0,
        max_tokens=10,
        extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}},
    )
    c = client(base)
    if not stream:
        return [t.token for t in c.chat.completions.create(**kw).choices[0].logprobs.content]
    tokens = []
    for ev in c.chat.completions.create(stream=True, **kw):
        for ch in ev.choices:
            tokens += [t.token for t in (ch.logprobs.content or [])] if ch.logprobs else []
    return tokens


def test_chat_equals_the_offline_ep1_engine(urls, offline):
    messages = [{"role": "user", "content": "Plan a three-day trip to Kyoto, day by day."}]
    r = requests.post(
        urls[0] + "/tokenize",
        json={"messages": messages, "chat_template_kwargs": {"enable_thinking": False}},
        timeout=30,
    )
    ids = r.json()["tokens"]
    assert len(ids) >= MIN_PREFILL  # the disaggregated app moves it
    _, want = reference(offline, ids, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for base in urls:
        for stream in (False, True):
            assert chat(base, messages, stream) == want, f"{base}, stream={stream}"


def test_state_moves_from_an_ep1_pool_to_an_ep2_pool(urls, offline):
    """A prompt prefilled by the EP=1 prefill replica continues on one rank of the decode
    replica's group: the import is counted there, and the tokens are the offline ones."""
    before = metrics(urls[1])
    ids = prompt_ids(200, 5)
    got = complete(urls[1], ids, True, **{**GREEDY, "max_tokens": 12})
    want = reference(offline, ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert got == want
    after = metrics(urls[1])
    assert delta(before, after, "qwen35_ray_transfers_total") == 1
    assert delta(before, after, "qwen35_ray_imports_total", pool="DecodeServer") == 1


def labelled(m: list, name: str, **labels) -> dict[tuple, float]:
    """Series of one metric whose labels include `labels`."""
    return series(m, f"qwen35_ray_{name}", **{k: str(v) for k, v in labels.items()})


def test_metrics_show_the_expert_parallel_group(urls):
    complete(urls[0], prompt_ids(40, 1), False, **GREEDY)

    # the collocated app's /metrics reads a replica's cached samples: poll for fresh ones
    def ready():
        m = metrics(urls[0])
        return m if sum(labelled(m, "all_to_all_bytes_total").values()) > 0 else None

    m = None
    for _ in range(60):
        if m := ready():
            break
        time.sleep(0.5)
    assert m, "no all-to-all traffic in /metrics"
    assert total(m, "qwen35_ray_expert_parallel_size") == 2
    whole = total(m, "qwen35_ray_expert_bytes_total")
    resident = labelled(m, "expert_bytes_resident")
    # 16 experts over 2 ranks: each holds exactly half
    assert sorted(resident.values()) == [whole / 2, whole / 2]
    assert len(labelled(m, "all_to_all_seconds_total")) == 2
    layers = labelled(m, "expert_load_max_over_mean")
    assert len(layers) == 8 and all(v >= 1 for v in layers.values())
    assert all(v >= 1 for v in labelled(m, "rank_load_max_over_mean").values())
    # 4 experts per token: each layer's counts add up to 4 x the tokens of the window
    per_layer = [sum(labelled(m, "expert_tokens", layer=i).values()) for i in range(8)]
    assert len(labelled(m, "expert_tokens")) == 8 * 16
    assert per_layer[0] > 0 and per_layer[0] % 4 == 0 and len(set(per_layer)) == 1

    pd = metrics(urls[1])
    assert by_label(pd, "qwen35_ray_expert_parallel_size", "pool") == {
        "PrefillServer": 1,
        "DecodeServer": 2,
    }
    prefill = labelled(pd, "expert_bytes_resident", pool="PrefillServer")
    decode = labelled(pd, "expert_bytes_resident", pool="DecodeServer")
    assert len(prefill) == 1 and len(decode) == 2
    assert sum(decode.values()) == sum(prefill.values())


def test_expert_samples_per_rank_and_layer():
    """Unit: 16 experts over 3 ranks (6, 5, 5); a large model keeps only layer gauges."""
    counts = torch.zeros(2, 16, dtype=torch.int64)
    counts[0, :6] = 10  # layer 0: rank 0's experts only
    counts[1] = 4  # layer 1: even
    infos = [
        {
            "rank": r,
            "expert_bytes": b,
            "expert_bytes_total": 160,
            "all_to_all_bytes": 7,
            "all_to_all_seconds": 0.5,
        }
        for r, b in enumerate((60, 50, 50))
    ]
    samples = expert_samples(3, infos, ExpertLoadSnapshot(counts, 12))
    got = {(n, tuple(sorted(lab.items()))): v for n, lab, v in samples}
    assert got[("expert_parallel_size", ())] == 3
    assert got[("expert_bytes_resident", (("rank", "1"),))] == 50
    assert got[("expert_bytes_total", ())] == 160
    assert got[("all_to_all_seconds_total", (("rank", "2"),))] == 0.5
    assert got[("expert_load_window_steps", ())] == 12
    assert got[("expert_load_max_over_mean", (("layer", "0"),))] == pytest.approx(16 / 6)
    assert got[("rank_load_max_over_mean", (("layer", "0"),))] == pytest.approx(3.0)
    assert got[("rank_load_max_over_mean", (("layer", "1"),))] == pytest.approx(24 / (64 / 3))
    assert got[("expert_tokens", (("expert", "5"), ("layer", "0")))] == 10
    big = ExpertLoadSnapshot(torch.ones(60, 512, dtype=torch.int64), 5)
    names = {n for n, _, _ in expert_samples(16, infos, big)}
    assert "expert_tokens" not in names and "expert_load_max_over_mean" in names
    assert {n for n, _, _ in expert_samples(1, [{"rank": 0}], None)} == {"expert_parallel_size"}
