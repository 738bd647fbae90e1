"""The disaggregated app with `disaggregation.transfer: nixl` (Ray Direct Transport): the
state's tensors go replica to replica through NIXL (UCX on CPU) and the outputs equal the
collocated app's. Needs the optional `nixl` package (`pip install -e ".[nixl]"`)."""

import pytest
import torch
from http_helpers import total
from serve_fixtures import running_apps
from test_disaggregated import complete, metrics, prompt_ids

from qwen35_ray.engine.request_state import state_nbytes
from qwen35_ray.model.config import ModelConfig
from qwen35_ray.model.source import resolve_model
from qwen35_ray.serving.builder import build_app, build_pd_app

pytest.importorskip("nixl", reason="the nixl package is not installed (optional extra [nixl])")

MODEL = "qwen35-tiny"


def test_nixl_transfer_equals_collocated():
    common = {
        "model": MODEL,
        "dtype": "float32",
        "engine": {"max_num_seqs": 8, "max_model_len": 2048, "kv_cache_memory_bytes": 2**25},
        "ingress": {"num_cpus": 0.25},
    }
    co = build_app({**common, "llm_server": {"num_cpus": 0.25}})
    pd = build_pd_app(
        {
            **common,
            "disaggregation": {"min_prefill_tokens": 0, "transfer": "nixl"},
            "prefill_server": {"num_cpus": 0.25},
            "decode_server": {"num_cpus": 0.25},
        }
    )
    lengths = [1, 17, 100, 700]
    with running_apps({"co": ("/co", co), "pd": ("/pd", pd)}, num_cpus=4) as url:
        for k, n in enumerate(lengths):
            ids = prompt_ids(n, k)
            for stream, kw in [(False, {"temperature": 0}), (True, {"seed": k})]:
                want = complete(url + "/co", ids, stream, max_tokens=6, **kw)
                assert complete(url + "/pd", ids, stream, max_tokens=6, **kw) == want
        m = metrics(url + "/pd")
    config = ModelConfig.from_hf(resolve_model(MODEL))
    finished_early = 2 * len(lengths) - total(m, "qwen35_ray_transfers_total")
    assert finished_early == 0
    assert total(m, "qwen35_ray_transfer_bytes_total", pool="OpenAIIngress") == 2 * sum(
        state_nbytes(config, torch.float32, n) for n in lengths
    )
