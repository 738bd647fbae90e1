"""Each engine pool autoscaled on its own signals, as Dynamo's planner does, through Serve's
custom-policy hook (`autoscaling_config.policy.policy_function: module:fn`).

Replicas (autoscaling_signals.AutoscalingSignals, mixed into LLMServer) report from their
engine's stats: prompt tokens queued, measured prefill throughput and inter-token latency,
KV-block and state-slot occupancy. Serve aggregates each replica's reports over
`look_back_period_s` and calls the pool's policy in the controller every control-loop tick
(0.1 s):

- prefill_policy: estimated TTFT = queued prompt tokens / measured prefill tokens/s, against
  `ttft_target_s`;
- decode_policy: max(KV-block, slot occupancy) against `occupancy_target`, and measured ITL
  against `itl_target_s`;
- collocated_policy: whichever of the two is worse.

Load over target adds one replica; a pool scales down by one only once the load on one
replica fewer would stay under `scale_down_fraction` of every target, and has for
`quiet_period_s`; nothing changes while a replica starts or stops; always within the
capacity-adjusted min/max. Serve's upscale/downscale delays still apply on top.

Settings come from `policy_kwargs`: Serve passes them only to policy classes, so the functions
read them from ctx.config. Decisions and reasons go to the controller log (logger "ray.serve")
and, through Ray's GCS key-value store (the one store both the controller and the ingress
reach), to /metrics (autoscaling_samples).
"""

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields

from qwen35_ray.serving.autoscaling_signals import ITL, KV, PREFILL_RATE, QUEUED, SIGNALS, SLOTS

# the Serve controller writes this logger's INFO lines to its log
log = logging.getLogger("ray.serve")

Sample = tuple[str, dict[str, str], float]

KV_NAMESPACE = "qwen35_ray_autoscaling"
# a decision is published on every change, and otherwise this often, so /metrics stays fresh
# without a GCS write per control-loop tick
PUBLISH_PERIOD_S = 1.0
# replicas report within metrics_interval_s of starting: a pool silent this long is warned of
NO_SIGNALS_WARN_S = 30.0


@dataclass(frozen=True)
class PolicySettings:
    """policy_kwargs of the three policies (each reads the settings its signals need)."""

    ttft_target_s: float = 0.5
    itl_target_s: float = 0.05
    occupancy_target: float = 0.8
    quiet_period_s: float = 60.0
    # hysteresis: scale down only when one replica fewer would carry at most this fraction of
    # every target, so the pool does not shrink into a load that grows it again
    scale_down_fraction: float = 0.6

    @classmethod
    def from_kwargs(cls, kwargs: dict | None, policy: str = "the policy") -> "PolicySettings":
        """Raises ValueError naming the policy_kwargs key at fault and the fix."""
        names = [f.name for f in fields(cls)]
        for key, value in (kwargs or {}).items():
            if key not in names:
                raise ValueError(
                    f"policy_kwargs.{key} is not a setting of {policy}; "
                    f"use one of {', '.join(names)}"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"policy_kwargs.{key}={value!r} must be a number")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"policy_kwargs.{key}={value!r} must be a positive number")
        s = cls(**{k: float(v) for k, v in (kwargs or {}).items()})
        if s.occupancy_target > 1:
            raise ValueError(
                f"policy_kwargs.occupancy_target={s.occupancy_target:g} must be at most 1 "
                "(a fraction of the KV blocks and state slots)"
            )
        if s.scale_down_fraction >= 1:
            raise ValueError(
                f"policy_kwargs.scale_down_fraction={s.scale_down_fraction:g} must be below 1, "
                "or a pool shrinks into a load that grows it again"
            )
        return s


def check_autoscaling_config(autoscaling_config: dict | None, where: str = "autoscaling_config"):
    """Validate a deployment's autoscaling_config as Serve will (keys, bounds, the policy's
    import path) and, for one of these policies, its policy_kwargs; raises ValueError naming
    the key. For an app's config, so a mistake fails the deploy instead of every policy tick."""
    if autoscaling_config is None:
        return
    import pydantic
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

    # Serve drops keys it does not know without a word
    policy = autoscaling_config.get("policy")
    for at, given, model in (
        (where, autoscaling_config, AutoscalingConfig),
        (f"{where}.policy", policy if isinstance(policy, dict) else {}, AutoscalingPolicy),
    ):
        if unknown := sorted(set(given) - set(model.model_fields)):
            raise ValueError(
                f"{at}.{unknown[0]} is not a Serve setting; use one of "
                f"{', '.join(model.model_fields)}"
            )
    try:
        config = AutoscalingConfig(**autoscaling_config)
    except pydantic.ValidationError as e:
        lines = [f"{'.'.join([where, *map(str, err['loc'])])}: {err['msg']}" for err in e.errors()]
        raise ValueError("; ".join(lines)) from None
    except Exception as e:  # the policy's module or function failing to import
        raise ValueError(f"{where}.policy.policy_function: {e}") from None
    name = str(config.policy.policy_function)
    if name.startswith(__name__ + ":"):
        try:
            PolicySettings.from_kwargs(config.policy.policy_kwargs, name.split(":")[1])
        except ValueError as e:
            raise ValueError(f"{where}.policy.{e}") from None


@dataclass(frozen=True)
class Load:
    """A pool's load as a policy sees it."""

    pressure: float  # the worst ratio of a signal to its target; over 1.0 wants a replica more
    signal: str  # the signal that sets it: "ttft", "itl" or "occupancy"
    detail: str  # the numbers behind it, for the log
    gauges: dict  # pool-level signals, for /metrics


def prefill_load(replicas: dict[str, dict[str, float]], s: PolicySettings) -> Load | None:
    """TTFT a new prompt would see: the pool's queued prompt tokens over its throughput. A
    replica with no measurement yet (just started) is taken to be as fast as the others."""
    queued = sum(r.get(QUEUED, 0.0) for r in replicas.values())
    rates = [r.get(PREFILL_RATE, 0.0) for r in replicas.values()]
    known = [x for x in rates if x > 0]
    if queued > 0 and not known:
        return None
    capacity = sum(known) + (sum(known) / len(known)) * (len(rates) - len(known)) if known else 0
    ttft = queued / capacity if queued > 0 else 0.0
    detail = (
        f"TTFT estimate {ttft:.2f} s vs ttft_target_s {s.ttft_target_s:g} "
        f"({queued:.0f} queued prompt tokens, {capacity:.0f} prompt tokens/s)"
    )
    gauges = {"ttft_estimate_seconds": ttft, "queued_prompt_tokens": queued}
    return Load(ttft / s.ttft_target_s, "ttft", detail, gauges)


def decode_load(replicas: dict[str, dict[str, float]], s: PolicySettings) -> Load | None:
    """The pool's mean occupancy (KV blocks or state slots, whichever is fuller; slots count
    queued requests, so they pass 1.0 when requests wait) and mean ITL of replicas decoding."""
    if not replicas:
        return None
    occupancy = sum(max(r.get(KV, 0.0), r.get(SLOTS, 0.0)) for r in replicas.values())
    occupancy /= len(replicas)
    itls = [r[ITL] for r in replicas.values() if r.get(ITL, 0.0) > 0]
    itl = sum(itls) / len(itls) if itls else 0.0
    by_occupancy, by_itl = occupancy / s.occupancy_target, itl / s.itl_target_s
    detail = (
        f"occupancy {occupancy:.2f} vs occupancy_target {s.occupancy_target:g}, "
        f"ITL {itl * 1000:.1f} ms vs itl_target_s {s.itl_target_s:g}"
    )
    gauges = {"occupancy": occupancy, "itl_seconds": itl}
    if by_itl > by_occupancy:
        return Load(by_itl, "itl", detail, gauges)
    return Load(by_occupancy, "occupancy", detail, gauges)


def collocated_load(replicas: dict[str, dict[str, float]], s: PolicySettings) -> Load | None:
    prefill, decode = prefill_load(replicas, s), decode_load(replicas, s)
    if prefill is None or decode is None:
        return prefill or decode
    worse = prefill if prefill.pressure >= decode.pressure else decode
    both = f"{prefill.detail}; {decode.detail}"
    return Load(worse.pressure, worse.signal, both, {**prefill.gauges, **decode.gauges})


def prefill_policy(ctx) -> tuple[int, dict]:
    """Serve policy of a prefill pool (ctx: ray.serve.config.AutoscalingContext)."""
    return _policy(ctx, "prefill_policy", prefill_load)


def decode_policy(ctx) -> tuple[int, dict]:
    """Serve policy of a decode pool."""
    return _policy(ctx, "decode_policy", decode_load)


def collocated_policy(ctx) -> tuple[int, dict]:
    """Serve policy of a collocated pool (LLMServer): prefill or decode, whichever is worse."""
    return _policy(ctx, "collocated_policy", collocated_load)


@dataclass(frozen=True)
class Decision:
    desired: int
    direction: str  # "up", "down" or "hold"
    code: str  # why, in a word (a /metrics label)
    reason: str  # why, in numbers (the log line)


def _policy(ctx, name: str, load_of) -> tuple[int, dict]:
    # an exception here would stop the controller's update of every application, not just
    # this pool's scaling: any failure holds the current target and is logged
    state = dict(ctx.policy_state or {})
    try:
        return _decide(ctx, name, load_of, state)
    except Exception as e:
        if state.get("failed") != repr(e):
            log.exception("%s of %s failed; holding its replicas", name, ctx.deployment_name)
        return ctx.target_num_replicas, {**state, "failed": repr(e)}


def _decide(ctx, name: str, load_of, state: dict) -> tuple[int, dict]:
    now = ctx.current_time or time.time()
    target = ctx.target_num_replicas
    state.pop("failed", None)
    if state.get("last_target") not in (None, target):
        # Serve applied a change: counted, and the quiet period restarts from it
        key = "scale_ups" if target > state["last_target"] else "scale_downs"
        state[key] = state.get(key, 0) + 1
        state["low_since"] = None
    state["last_target"] = target
    try:
        settings = PolicySettings.from_kwargs(ctx.config.policy.policy_kwargs, name)
    except ValueError as e:
        if state.get("bad_kwargs") != str(e):
            log.error("%s %s: %s; holding its replicas", ctx.deployment_name, name, e)
        state["bad_kwargs"] = str(e)
        return _clamp(ctx, target), state
    state.pop("bad_kwargs", None)
    replicas = replica_signals(ctx)
    load = load_of(replicas, settings) if replicas else None
    decision = _choose(ctx, load, bool(replicas), settings, now, state)
    if [decision.desired, decision.code] != state.get("logged"):
        level = logging.DEBUG if decision.direction == "hold" else logging.INFO
        if decision.code == "no_signals":
            level = logging.WARNING
        log.log(level, "%s %s: %s", ctx.deployment_name, name, decision.reason)
        state["logged"] = [decision.desired, decision.code]
    _publish(ctx, decision, load, replicas, state, now)
    return decision.desired, state


def _clamp(ctx, n: int) -> int:
    return min(max(n, ctx.capacity_adjusted_min_replicas), ctx.capacity_adjusted_max_replicas)


def _choose(ctx, load, reported: bool, s: PolicySettings, now: float, state: dict) -> Decision:
    """One replica per adjustment, counted from the running replicas: while one starts
    (current < target) or stops (current > target) the policy holds rather than stacks
    changes."""
    current, target = ctx.current_num_replicas, ctx.target_num_replicas
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    hold = _clamp(ctx, target)
    if reported:
        state.pop("silent_since", None)
    silent_for = 0.0 if reported else now - state.setdefault("silent_since", now)
    if load is None:
        state["low_since"] = None
        if silent_for >= NO_SIGNALS_WARN_S:
            why = "no autoscaling signals from its replicas (is AutoscalingSignals mixed in?)"
            return Decision(hold, "hold", "no_signals", f"holding {hold}: {why}")
        why = "prompts queued, no prefill throughput measured yet"
        if not reported:
            why = "waiting for its replicas' first signals"
        return Decision(hold, "hold", "measuring", f"holding {hold}: {why}")
    if load.pressure > 1:
        state["low_since"] = None
        desired = min(max(target, current + 1), hi)
        if desired > target:
            return Decision(desired, "up", load.signal, f"{target} -> {desired}: {load.detail}")
        code = "max_replicas" if desired >= hi else "starting"
        return Decision(hold, "hold", code, f"holding {hold} ({code}): {load.detail}")
    # the load one replica fewer would carry (it spreads over the others)
    after = load.pressure * current / (current - 1) if current > 1 else math.inf
    if current != target or target <= lo or after >= s.scale_down_fraction:
        state["low_since"] = None
        code = "on_target"
        if current != target:
            code = "starting" if current < target else "stopping"
        elif target <= lo:
            code = "min_replicas"
        return Decision(hold, "hold", code, f"holding {hold} ({code}): {load.detail}")
    state["low_since"] = low_since = state.get("low_since") or now
    quiet = now - low_since
    if quiet < s.quiet_period_s:
        why = f"low for {quiet:.0f} s of quiet_period_s {s.quiet_period_s:g}: {load.detail}"
        return Decision(hold, "hold", "quiet_period", f"holding {hold}: {why}")
    desired = _clamp(ctx, target - 1)
    why = (
        f"{target} -> {desired}: low for {quiet:.0f} s (one replica fewer would carry "
        f"{after:.2f} of the target): {load.detail}"
    )
    return Decision(desired, "down", "low_load", why)


def replica_signals(ctx) -> dict[str, dict[str, float]]:
    """{replica id: {signal: value}} of the running replicas that reported, each signal
    aggregated by Serve over look_back_period_s (aggregation_function, mean by default), the
    prefill throughput excepted."""
    out: dict[str, dict[str, float]] = {}
    for signal, by_replica in (ctx.aggregated_metrics or {}).items():
        if signal in SIGNALS:
            for replica, value in by_replica.items():
                out.setdefault(replica.unique_id, {})[signal] = float(value)
    # a replica's prefill throughput as last measured: its mean over the window would count
    # the readings from before its first prefill as 0
    for replica, series in ((ctx.raw_metrics or {}).get(PREFILL_RATE) or {}).items():
        if series and replica.unique_id in out:
            last = max(series, key=lambda point: point.timestamp)
            out[replica.unique_id][PREFILL_RATE] = float(last.value)
    return out


def _publish(ctx, decision: Decision, load, replicas: dict, state: dict, now: float) -> None:
    key = [ctx.current_num_replicas, ctx.target_num_replicas, decision.desired, decision.code]
    fresh = now - state.get("published_at", 0) < PUBLISH_PERIOD_S
    if key == state.get("published") and fresh:
        return
    state["published"], state["published_at"] = key, now
    record = {
        "current": ctx.current_num_replicas,
        "target": ctx.target_num_replicas,
        **asdict(decision),
        "pressure": load.pressure if load else 0.0,
        "gauges": load.gauges if load else {},
        "replicas": replicas,
        "scale_ups": state.get("scale_ups", 0),
        "scale_downs": state.get("scale_downs", 0),
    }
    try:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_put(
            _kv_key(ctx.app_name, ctx.deployment_name),
            json.dumps({**record, "at": now}),
            namespace=KV_NAMESPACE,
        )
    except Exception as e:  # /metrics goes stale; scaling goes on
        log.debug("publishing the autoscaling decision failed: %s", e)


def _kv_key(app: str | None, deployment: str) -> str:
    return f"{app or ''}#{deployment}"


async def autoscaling_samples(app_name: str | None = None) -> list[Sample]:
    """/metrics samples of an app's autoscaling (default: the calling replica's app):
    serve_replicas{pool,state} from serve.status(); for each autoscaled pool the policy's last
    decision: autoscaling_target_replicas and _desired_replicas, autoscaling_decision{direction,
    code} 1, autoscaling_pressure, scale_ups/downs_total, the pool's signals, and each
    replica's signals as autoscaling_<signal>{pool,replica}."""
    import asyncio

    if app_name is None:
        from ray import serve

        app_name = serve.get_replica_context().app_name
    return await asyncio.to_thread(collect_autoscaling_samples, app_name)


def collect_autoscaling_samples(app_name: str) -> list[Sample]:
    """autoscaling_samples, blocking (it asks the Serve controller and the GCS)."""
    from ray import serve
    from ray.experimental import internal_kv

    app = serve.status().applications.get(app_name)
    out: list[Sample] = []
    for pool, status in (app.deployments if app else {}).items():
        for state, n in status.replica_states.items():  # ReplicaState: a str enum
            out.append(
                ("serve_replicas", {"pool": pool, "state": getattr(state, "value", state)}, n)
            )
        raw = internal_kv._internal_kv_get(_kv_key(app_name, pool), namespace=KV_NAMESPACE)
        if raw:
            out += decision_samples(pool, json.loads(raw))
    return out


def decision_samples(pool: str, record: dict) -> list[Sample]:
    """A published decision (see _publish) as samples."""
    at = {"pool": pool}
    out: list[Sample] = [
        ("autoscaling_target_replicas", at, record["target"]),
        ("autoscaling_desired_replicas", at, record["desired"]),
        (
            "autoscaling_decision",
            {**at, "direction": record["direction"], "code": record["code"]},
            1,
        ),
        ("autoscaling_pressure", at, round(record["pressure"], 6)),
        ("autoscaling_scale_ups_total", at, record["scale_ups"]),
        ("autoscaling_scale_downs_total", at, record["scale_downs"]),
    ]
    out += [(f"autoscaling_pool_{k}", at, round(v, 6)) for k, v in record["gauges"].items()]
    for replica, signals in sorted(record["replicas"].items()):
        labels = {**at, "replica": replica}
        out += [(f"autoscaling_{k}", labels, round(v, 6)) for k, v in sorted(signals.items())]
    return out
