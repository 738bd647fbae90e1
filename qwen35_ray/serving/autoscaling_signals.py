"""What an engine replica reports to its pool's autoscaling policy (serving/autoscaling.py):
Serve calls record_autoscaling_stats() on each replica of an autoscaled deployment and hands
the values, aggregated per replica over look_back_period_s, to the policy in the controller."""

import time

# the signals, by the names a replica reports them under
QUEUED = "queued_prompt_tokens"
PREFILL_RATE = "prefill_tokens_per_second"
ITL = "itl_seconds"
KV = "kv_block_occupancy"
SLOTS = "slot_occupancy"
SIGNALS = (QUEUED, PREFILL_RATE, ITL, KV, SLOTS)


class SignalMeter:
    """A replica's signals from its engine's stats; rates come from counters differenced since
    the last reading, so each reading covers the interval since the one before."""

    def __init__(self):
        self._last: dict | None = None
        self._at = 0.0
        # the last measured prefill throughput: an interval with no prefill keeps it, so a
        # queue that forms after a quiet spell is priced at once
        self._prefill_rate = 0.0
        self._itl = 0.0

    def update(self, stats: dict, now: float) -> dict[str, float]:
        itl = 0.0
        if self._last is not None:
            prev, wall = self._last, now - self._at
            delta = lambda k: stats.get(k, 0) - prev.get(k, 0)  # noqa: E731
            # busy time when the engine counts it; else wall time (equal under load)
            busy = delta("step_seconds_total") if "step_seconds_total" in stats else wall
            computed = delta("prompt_tokens_computed_total")
            if computed > 0 and busy > 0:
                self._prefill_rate = computed / busy
            if "decode_steps_total" in stats:
                steps = delta("decode_steps_total")
                if steps > 0:
                    itl = self._itl = delta("decode_step_seconds_total") / steps
                elif stats["running"] > 0:
                    # sequences run but none decoded in this interval (a long prefill step):
                    # the last measured ITL, not a 0 that would pull the window's mean down
                    itl = self._itl
            elif (generated := delta("generation_tokens_total")) > 0:
                # each running sequence gains one token per step
                itl = wall * max(stats["running"], 1) / generated
        self._last, self._at = stats, now
        slots, blocks = stats["state_slots_total"], stats["kv_blocks_total"]
        # prompt tokens not yet computed, running prompts' rest included, once the engine
        # counts them; until then the waiting prompts'
        queued = stats.get("pending_prompt_tokens", stats["waiting_prompt_tokens"])
        return {
            QUEUED: float(queued),
            PREFILL_RATE: self._prefill_rate,
            ITL: itl,
            KV: 1 - stats["kv_blocks_free"] / blocks if blocks else 0.0,
            SLOTS: (stats["running"] + stats["waiting"]) / slots if slots else 0.0,
        }


class AutoscalingSignals:
    """Mixed into an engine replica (a class with `self.engine`, an AsyncEngine): Serve calls
    record_autoscaling_stats() every look_back_period_s / 5 (at most metrics_interval_s) while
    the pool autoscales, and the pool's policy reads what it returns."""

    def record_autoscaling_stats(self) -> dict[str, float]:
        meter = getattr(self, "_signal_meter", None)
        if meter is None:
            meter = self._signal_meter = SignalMeter()
        return meter.update(self.engine.stats(), time.monotonic())
