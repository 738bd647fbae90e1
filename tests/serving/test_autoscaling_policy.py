"""The pools' autoscaling policies on hand-made AutoscalingContexts, and the replica side that
feeds them (SignalMeter, AutoscalingSignals): no Ray cluster."""

import logging

import pytest
from http_helpers import parse
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from qwen35_ray.serving.autoscaling import (
    PolicySettings,
    check_autoscaling_config,
    collocated_policy,
    decision_samples,
    decode_policy,
    prefill_policy,
    replica_signals,
)
from qwen35_ray.serving.autoscaling_signals import SIGNALS, AutoscalingSignals, SignalMeter
from qwen35_ray.serving.metrics import exposition
from qwen35_ray.serving.metrics_catalog import families

IDLE = {"queued_prompt_tokens": 0, "prefill_tokens_per_second": 4000.0}
DECODE_IDLE = {"kv_block_occupancy": 0.0, "slot_occupancy": 0.0, "itl_seconds": 0.0}


def context(
    policy="prefill_policy",
    signals=(IDLE,),
    current=1,
    target=None,
    lo=1,
    hi=3,
    now=1000.0,
    state=None,
    raw=None,
    **kwargs,
) -> AutoscalingContext:
    """A context as Serve's controller builds it: `signals` are what each reporting replica's
    record_autoscaling_stats() gave, aggregated over the look-back window; `raw`: {signal:
    [TimeStampedValue] of the first replica}, the readings themselves."""
    name = {"prefill_policy": "PrefillServer", "decode_policy": "DecodeServer"}.get(
        policy, "LLMServer"
    )
    deployment = DeploymentID(name=name, app_name="qwen35")
    replicas = [ReplicaID(f"r{i}", deployment) for i in range(max(current, len(signals)))]
    aggregated: dict = {}
    for replica, values in zip(replicas, signals):
        for key, value in values.items():
            aggregated.setdefault(key, {})[replica] = value
    config = AutoscalingConfig(
        min_replicas=lo,
        max_replicas=hi,
        upscale_delay_s=0,
        downscale_delay_s=0,
        policy={
            "policy_function": f"qwen35_ray.serving.autoscaling:{policy}",
            "policy_kwargs": {"quiet_period_s": 10, **kwargs},
        },
    )
    return AutoscalingContext(
        deployment_id=deployment,
        deployment_name=name,
        app_name="qwen35",
        current_num_replicas=current,
        target_num_replicas=current if target is None else target,
        running_replicas=replicas[:current],
        total_num_requests=0.0,
        total_queued_requests=0.0,
        aggregated_metrics=aggregated,
        raw_metrics={k: {replicas[0]: v} for k, v in (raw or {}).items()},
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        policy_state=state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=config,
    )


@pytest.fixture
def decisions(caplog):
    """The policy's log lines (the logger Serve's controller writes to its log)."""
    logger = logging.getLogger("ray.serve")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="ray.serve")
    yield caplog
    logger.removeHandler(caplog.handler)


def prompts(queued: float, rate: float = 4000.0) -> dict:
    return {"queued_prompt_tokens": queued, "prefill_tokens_per_second": rate}


def test_a_prefill_queue_over_the_ttft_target_adds_one_replica_and_says_why(decisions):
    # 8000 queued tokens at 4000 tokens/s: a new prompt waits 2 s for its first token
    n, _ = prefill_policy(context(signals=[prompts(8000)]))
    assert n == 2
    assert "PrefillServer prefill_policy: 1 -> 2: TTFT estimate 2.00 s" in decisions.text
    assert "ttft_target_s 0.5" in decisions.text


def test_one_replica_per_adjustment_and_none_while_one_starts():
    flood = [prompts(10**6)]
    assert prefill_policy(context(signals=flood, current=1))[0] == 2
    # a replica is starting (running 1 of a target of 2): no third before it runs
    assert prefill_policy(context(signals=flood, current=1, target=2))[0] == 2
    assert prefill_policy(context(signals=flood * 2, current=2))[0] == 3
    assert prefill_policy(context(signals=flood * 3, current=3))[0] == 3  # max_replicas


def test_the_prefill_throughput_last_measured_counts_not_its_window_mean():
    # readings before the first prefill said 0; the last one 8000 tokens/s: 0.375 s, on target
    series = [TimeStampedValue(1.0, 0.0), TimeStampedValue(3.0, 8000.0), TimeStampedValue(2, 0.0)]
    # 2000: their mean over the look-back window
    ctx = context(signals=[prompts(3000, 2000.0)], raw={"prefill_tokens_per_second": series})
    assert replica_signals(ctx)["r0"]["prefill_tokens_per_second"] == 8000
    assert prefill_policy(ctx)[0] == 1
    assert prefill_policy(context(signals=[prompts(3000, rate=2000.0)]))[0] == 2


def test_a_just_started_replica_counts_as_fast_as_the_measured_ones():
    # 3000 tokens over two replicas of 4000 tokens/s each (one not measured yet): 0.375 s
    n, _ = prefill_policy(context(signals=[prompts(3000), prompts(0, 0.0)], current=2))
    assert n == 2


def test_scale_down_only_after_the_quiet_period_of_low_load(decisions):
    idle, state = [IDLE, IDLE], {}
    for t in (0, 5, 9.9):
        n, state = prefill_policy(context(signals=idle, current=2, now=1000 + t, state=state))
        assert n == 2
    # load comes back: the quiet period starts over once it goes
    busy = [prompts(1500), prompts(1500)]
    n, state = prefill_policy(context(signals=busy, current=2, now=1010, state=state))
    assert n == 2
    for t in (11, 15, 20.9):
        n, state = prefill_policy(context(signals=idle, current=2, now=1000 + t, state=state))
        assert n == 2
    assert "1 -> " not in decisions.text and "2 -> 1" not in decisions.text
    n, state = prefill_policy(context(signals=idle, current=2, now=1021, state=state))
    assert n == 1
    assert "PrefillServer prefill_policy: 2 -> 1: low for 10 s" in decisions.text
    # Serve applied it; the replica is still stopping: no second step down, and the next one
    # would wait a quiet period of its own
    n, state = prefill_policy(context(signals=idle, current=2, target=1, now=1040, state=state))
    assert n == 1 and state["scale_downs"] == 1


def test_a_load_one_replica_fewer_could_not_carry_holds(decisions):
    # 0.2 s estimated TTFT on 2 replicas would be 0.4 s on one: over scale_down_fraction 0.6
    busy = [prompts(800), prompts(800)]
    state = {}
    for t in range(0, 60, 5):
        n, state = prefill_policy(context(signals=busy, current=2, now=1000 + t, state=state))
        assert n == 2
    assert "->" not in decisions.text  # holding is no decision worth a log line


def test_no_step_down_while_a_replica_starts():
    state = {}
    for t in range(0, 60, 10):
        n, state = prefill_policy(
            context(signals=[IDLE], current=1, target=2, now=1000 + t, state=state)
        )
        assert n == 2


def test_never_below_nor_above_the_capacity_adjusted_bounds():
    state = {}
    for t in range(0, 100, 10):
        n, state = prefill_policy(context(signals=[IDLE], current=1, now=1000 + t, state=state))
        assert n == 1
    # the cluster's target capacity shrank the bounds under the current target
    assert prefill_policy(context(signals=[prompts(10**6)] * 3, current=3, lo=1, hi=2))[0] == 2
    assert prefill_policy(context(signals=[IDLE], current=1, lo=2, hi=3))[0] == 2


def test_decode_scales_on_occupancy_and_on_inter_token_latency(decisions):
    full = {**DECODE_IDLE, "slot_occupancy": 1.5}  # every slot taken, half as many waiting
    assert decode_policy(context("decode_policy", [full]))[0] == 2
    assert "DecodeServer decode_policy: 1 -> 2: occupancy 1.50 vs occupancy_target 0.8" in (
        decisions.text
    )
    kv = {**DECODE_IDLE, "kv_block_occupancy": 0.9}
    assert decode_policy(context("decode_policy", [kv]))[0] == 2
    slow = {**DECODE_IDLE, "slot_occupancy": 0.25, "itl_seconds": 0.08}
    n, _ = decode_policy(context("decode_policy", [slow], itl_target_s=0.05))
    assert n == 2 and "ITL 80.0 ms vs itl_target_s 0.05" in decisions.text
    fine = {**DECODE_IDLE, "slot_occupancy": 0.5, "itl_seconds": 0.02}
    assert decode_policy(context("decode_policy", [fine]))[0] == 1
    state = {}
    for t in (0, 10):
        n, state = decode_policy(
            context("decode_policy", [DECODE_IDLE] * 2, current=2, now=1000 + t, state=state)
        )
    assert n == 1


def test_collocated_follows_the_worse_of_prefill_and_decode():
    both = {**IDLE, **DECODE_IDLE}
    assert collocated_policy(context("collocated_policy", [both]))[0] == 1
    busy_decode = {**both, "slot_occupancy": 1.0}
    assert collocated_policy(context("collocated_policy", [busy_decode]))[0] == 2
    busy_prefill = {**both, **prompts(8000)}
    assert collocated_policy(context("collocated_policy", [busy_prefill]))[0] == 2
    state = {}
    for t in (0, 10):
        n, state = collocated_policy(
            context("collocated_policy", [both] * 2, current=2, now=1000 + t, state=state)
        )
    assert n == 1


def test_no_signals_holds_and_warns_once_replicas_should_have_reported(decisions):
    n, state = prefill_policy(context(signals=[], current=2))
    assert n == 2 and "no autoscaling signals" not in decisions.text  # just started
    n, state = prefill_policy(context(signals=[], current=2, now=1029, state=state))
    assert n == 2 and "no autoscaling signals" not in decisions.text
    n, state = prefill_policy(context(signals=[], current=2, now=1030, state=state))
    assert n == 2
    assert "no autoscaling signals from its replicas" in decisions.text
    assert decisions.records[-1].levelno == logging.WARNING


@pytest.mark.parametrize(
    "kwargs,named",
    [
        ({"ttft_target": 0.5}, "policy_kwargs.ttft_target is not a setting of prefill_policy"),
        ({"ttft_target_s": 0}, "policy_kwargs.ttft_target_s=0 must be a positive number"),
        ({"quiet_period_s": "10"}, "policy_kwargs.quiet_period_s='10' must be a number"),
        ({"occupancy_target": 1.5}, "policy_kwargs.occupancy_target=1.5 must be at most 1"),
        ({"scale_down_fraction": 1}, "policy_kwargs.scale_down_fraction=1 must be below 1"),
    ],
)
def test_invalid_policy_kwargs_are_named(kwargs, named, decisions):
    with pytest.raises(ValueError, match="policy_kwargs") as e:
        PolicySettings.from_kwargs(kwargs, "prefill_policy")
    assert named in str(e.value)
    config = {"policy": {"policy_function": "qwen35_ray.serving.autoscaling:prefill_policy"}}
    config["policy"]["policy_kwargs"] = kwargs
    with pytest.raises(ValueError) as e:
        check_autoscaling_config(config, "prefill_server.autoscaling_config")
    assert f"prefill_server.autoscaling_config.policy.{named}" in str(e.value)
    # in the controller a policy never raises (that would stop every app's update): it holds
    n, _ = prefill_policy(context(signals=[prompts(10**6)], current=2, **kwargs))
    assert n == 2 and named in decisions.text


@pytest.mark.parametrize(
    "config,named",
    [
        ({"min_replicas": 3, "max_replicas": 2}, "max_replicas (2) must be greater"),
        # Serve itself would drop these without a word
        ({"max_replica": 2}, "autoscaling_config.max_replica is not a Serve setting"),
        ({"policy": {"policy_kwarg": {}}}, "autoscaling_config.policy.policy_kwarg is not a"),
        (
            {"policy": {"policy_function": "qwen35_ray.serving.autoscaling:nope"}},
            "autoscaling_config.policy.policy_function: module",
        ),
    ],
)
def test_serve_s_own_settings_are_checked_too(config, named):
    with pytest.raises(ValueError, match="decode_server.autoscaling_config") as e:
        check_autoscaling_config(config, "decode_server.autoscaling_config")
    assert named in str(e.value)


def test_through_serve_s_own_wrapper_and_pickled_copy():
    """The controller runs a cloudpickled copy of the policy, wrapped in Serve's delays and
    bounds, and hands back the state it returned."""
    ctx = context(signals=[prompts(8000)])
    policy = _apply_autoscaling_config(ctx.config.policy.get_policy())
    n, state = policy(ctx)
    assert n == 2 and state["last_target"] == 1 and state["logged"][0] == 2
    ctx = context(signals=[prompts(8000)] * 2, current=2, state=state)
    n, state = policy(ctx)
    assert n == 3 and state["scale_ups"] == 1


def test_decisions_as_metrics_samples():
    record = {
        "current": 1,
        "target": 1,
        "desired": 2,
        "direction": "up",
        "code": "ttft",
        "reason": "1 -> 2: TTFT estimate 2.00 s",
        "pressure": 4.0,
        "gauges": {"ttft_estimate_seconds": 2.0},
        "replicas": {"abc": prompts(8000)},
        "scale_ups": 3,
        "scale_downs": 2,
    }
    samples = [(f"qwen35_ray_{n}", la, v) for n, la, v in decision_samples("PrefillServer", record)]
    text = exposition(list(families(samples)), None)[0].decode()
    found = parse(text)
    pool = {"pool": "PrefillServer"}
    assert ("qwen35_ray_autoscaling_desired_replicas", pool, 2) in found
    decision = {**pool, "direction": "up", "code": "ttft"}
    assert ("qwen35_ray_autoscaling_decision", decision, 1) in found
    assert "# TYPE qwen35_ray_autoscaling_scale_ups_total counter" in text
    assert ("qwen35_ray_autoscaling_pool_ttft_estimate_seconds", pool, 2.0) in found
    queued = ("qwen35_ray_autoscaling_queued_prompt_tokens", {**pool, "replica": "abc"}, 8000)
    assert queued in found


def stats(**kw) -> dict:
    """AsyncEngine.stats() of an idle engine with 8 slots and 100 blocks, overridden by kw."""
    base = {
        "running": 0,
        "waiting": 0,
        "waiting_prompt_tokens": 0,
        "state_slots_total": 8,
        "state_slots_free": 8,
        "kv_blocks_total": 100,
        "kv_blocks_free": 100,
        "prompt_tokens_computed_total": 0,
        "generation_tokens_total": 0,
    }
    return {**base, **kw}


def test_signals_from_engine_counters_differenced_between_readings():
    meter = SignalMeter()
    counters = {"step_seconds_total": 0.0, "decode_steps_total": 0}
    counters["decode_step_seconds_total"] = 0.0
    first = meter.update(stats(**counters), now=10.0)
    assert first["prefill_tokens_per_second"] == 0 and first["itl_seconds"] == 0
    busy = stats(
        running=8,
        waiting=4,
        waiting_prompt_tokens=6000,
        kv_blocks_free=25,
        prompt_tokens_computed_total=3000,
        step_seconds_total=1.5,
        decode_steps_total=40,
        decode_step_seconds_total=1.0,
    )
    s = meter.update(busy, now=12.0)
    # 3000 tokens over 1.5 busy seconds (not the 2 s between readings); 1 s over 40 steps
    assert s["prefill_tokens_per_second"] == 2000 and s["itl_seconds"] == 0.025
    assert s["queued_prompt_tokens"] == 6000
    assert s["kv_block_occupancy"] == 0.75 and s["slot_occupancy"] == 1.5
    # an interval without prefill keeps the throughput last measured
    # and one where sequences run but none decoded (a long prefill step) the ITL last measured:
    # a 0 there would pull the window's mean below what clients see
    quiet = meter.update({**busy, "step_seconds_total": 2.0, "decode_steps_total": 40}, 13.0)
    assert quiet["prefill_tokens_per_second"] == 2000 and quiet["itl_seconds"] == 0.025
    pending = meter.update({**busy, "pending_prompt_tokens": 9000}, 14.0)
    assert pending["queued_prompt_tokens"] == 9000
    # idle: nothing runs, nothing waits for a token
    idle = meter.update({**busy, "running": 0, "step_seconds_total": 2.0}, 15.0)
    assert idle["itl_seconds"] == 0


def test_signals_before_the_engine_counts_steps():
    """Without step counters: wall time, and a token per running sequence per step."""
    meter = SignalMeter()
    meter.update(stats(), now=0.0)
    s = meter.update(
        stats(running=4, prompt_tokens_computed_total=2000, generation_tokens_total=80), now=2.0
    )
    assert s["prefill_tokens_per_second"] == 1000 and s["itl_seconds"] == 0.1


def test_the_mixin_reports_its_engine_s_signals():
    class Engine:
        def stats(self):
            return stats(running=2)

    class Replica(AutoscalingSignals):
        engine = Engine()

    replica = Replica()
    first, second = replica.record_autoscaling_stats(), replica.record_autoscaling_stats()
    assert set(first) == set(SIGNALS) and second["slot_occupancy"] == 0.25
    assert all(isinstance(v, float) for v in second.values())  # Serve checks the types
