"""A long prompt shares the step: while others wait, its prefill chunks are capped
(long_prefill_token_threshold), so short prompts are admitted and decodes go on; alone, it takes
the whole budget. Pure scheduler, no model: each step is applied as the engine would."""

import pytest

from qwen35_ray.engine.block_manager import CacheManager
from qwen35_ray.engine.sampling_params import SamplingParams
from qwen35_ray.engine.scheduler import Scheduler
from qwen35_ray.engine.sequence import Sequence

BUDGET = 2048
LONG = 20_000


def scheduler(threshold=None, prefix_caching=False) -> Scheduler:
    """prefix_caching pauses a prefill at its snapshot boundaries, so it is off unless asked."""
    cache = CacheManager(4096, 16, num_slots=8, num_snapshots=8 if prefix_caching else 0)
    return Scheduler(cache, BUDGET, threshold)


def seq(rid: str, n: int) -> Sequence:
    params = SamplingParams(max_tokens=10_000, ignore_eos=True)
    return Sequence(rid, 0, list(range(n)), params, seed=0)


def step(s: Scheduler) -> dict[str, int]:
    """One step: {request id: tokens computed}; a sequence that completes samples a token."""
    plan = s.schedule()
    for x in plan:
        completes = x.completes
        x.seq.num_computed += x.num_new
        if completes:
            x.seq.output_token_ids.append(0)
    return {x.seq.request_id: x.num_new for x in plan}


def test_a_short_prompt_after_a_long_one_is_admitted_at_once_and_decodes_every_step():
    s = scheduler()
    s.add(seq("long", LONG))
    first = step(s)
    assert first == {"long": BUDGET}  # nobody waits: the whole budget
    s.add(seq("short", 40))
    second = step(s)
    assert second["short"] == 40
    cap = s.long_prefill
    assert cap == BUDGET // 8 and second["long"] == cap
    s.add(seq("later", 30))
    steps = []
    while s.waiting or s.running[0].num_computed < LONG:
        steps.append(step(s))
    assert steps[0]["later"] == 30
    # the short ones decode in every step of the long prefill
    assert all(p["short"] == 1 and p["later"] == 1 for p in steps[1:])
    # and once nothing waits the long prompt takes the rest of the budget
    assert all(p["long"] == BUDGET - 2 for p in steps[1:-1])


def test_arriving_together_the_short_one_shares_the_first_step():
    s = scheduler()
    s.add(seq("long", LONG))
    s.add(seq("short", 40))
    assert step(s) == {"long": BUDGET // 8, "short": 40}
    assert step(s) == {"short": 1, "long": BUDGET - 1}


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_lone_long_prompt_uses_the_whole_budget(prefix_caching):
    s = scheduler(prefix_caching=prefix_caching)
    s.add(seq("long", LONG))
    sizes = []
    while s.running or s.waiting:
        sizes.append(step(s)["long"])
        if s.running[0].output_token_ids:
            break
    assert sum(sizes) == LONG
    # only the prompt's snapshot boundary may split a chunk short of the budget
    assert len(sizes) <= -(-LONG // BUDGET) + prefix_caching


def test_threshold_zero_turns_the_cap_off_and_a_set_one_is_used():
    s = scheduler(threshold=0)
    s.add(seq("long", LONG))
    s.add(seq("short", 40))
    assert step(s) == {"long": BUDGET}
    s = scheduler(threshold=100)
    s.add(seq("long", LONG))
    s.add(seq("short", 40))
    assert step(s) == {"long": 100, "short": 40}
    with pytest.raises(ValueError, match="long_prefill_token_threshold=-1"):
        scheduler(threshold=-1)


def test_a_decode_scheduled_first_can_still_be_preempted_for_an_earlier_prefill():
    """Decodes run first, yet the victim is still the latest arrival: it leaves the step."""
    s = Scheduler(CacheManager(5, 16, num_slots=4), 64)
    s.add(seq("early", 100))
    s.add(seq("late", 10))
    assert step(s) == {"early": 16, "late": 10}
    plan = s.schedule()
    assert [(x.seq.request_id, x.num_new) for x in plan] == [("early", 63)]
    assert [q.request_id for q in s.waiting] == ["late"] and s.num_preemptions == 1
