"""Where DPEngine sends a request: the least loaded rank, unless a rank within NEAR_TIE of it
holds more of the prompt's prefix in its cache. Pure Python: ranks are stand-ins."""

from types import SimpleNamespace

import pytest

from qwen35_ray.distributed.dp_engine import NEAR_TIE, DPEngine
from qwen35_ray.engine.block_manager import CacheManager, block_hashes
from qwen35_ray.engine.errors import RequestError
from qwen35_ray.engine.sampling_params import SamplingParams

BLOCK = 16
PROMPT = list(range(100))  # 6 full blocks before its last token


class Rank:
    def __init__(self, load: int, cached_blocks: int = 0):
        self.scheduler = SimpleNamespace(running=[object()] * load, waiting=[])
        self.cache_manager = CacheManager(64, BLOCK, 4, num_snapshots=4)
        for i, h in enumerate(block_hashes(PROMPT, BLOCK, cached_blocks)):
            self.cache_manager.blocks.register(i, h)
        self.config = self.tokenizer = self.dtype = self.max_model_len = None
        self.fingerprint = self.generation_defaults = self.eos_token_ids = None

    def add_request(self, request_id, ids, params, *rest):
        self.scheduler.waiting.append(request_id)


def route(ranks: list[Rank]) -> int:
    engine = DPEngine(ranks, group=None)
    engine.add_request("x", PROMPT, SamplingParams())
    return engine.rank_of("x")


@pytest.mark.parametrize(
    "ranks, expected",
    [
        ([Rank(0), Rank(0), Rank(0)], 0),
        ([Rank(1), Rank(0), Rank(1)], 1),
        # a cached prefix outweighs a load up to NEAR_TIE higher
        ([Rank(0), Rank(NEAR_TIE, cached_blocks=3), Rank(0)], 1),
        ([Rank(0), Rank(NEAR_TIE + 1, cached_blocks=6), Rank(0)], 0),
        # the longer hit wins, then the lighter load
        ([Rank(1, cached_blocks=2), Rank(2, cached_blocks=5), Rank(0, cached_blocks=5)], 2),
    ],
)
def test_least_loaded_then_longest_prefix(ranks, expected):
    assert route(ranks) == expected


def test_a_request_id_is_unique_across_ranks():
    engine = DPEngine([Rank(0), Rank(0)], group=None)
    engine.add_request("x", PROMPT, SamplingParams())
    with pytest.raises(RequestError, match="'x' is already in use"):
        engine.add_request("x", PROMPT, SamplingParams())
