"""StepCounters: how many steps an engine ran and how long they took, the steps with a decode
apart. The autoscaler differences them over its window: busy time, and the inter-token latency
(decode step seconds per decode step) that every running sequence sees. cpu_seconds is the
stepping thread's own CPU time in them: the rest of a step's wall time it waited (for a CPU
the host's other work held, for the GIL, for a device or the ranks)."""

from dataclasses import dataclass


@dataclass
class StepCounters:
    steps: int = 0
    seconds: float = 0.0
    decode_steps: int = 0  # steps in which at least one sequence decoded
    decode_seconds: float = 0.0
    cpu_seconds: float = 0.0

    def record(self, seconds: float, decodes: bool, cpu_seconds: float = 0.0) -> None:
        self.steps += 1
        self.seconds += seconds
        self.cpu_seconds += cpu_seconds
        if decodes:
            self.decode_steps += 1
            self.decode_seconds += seconds

    def stats(self) -> dict:
        return {
            "steps_total": self.steps,
            "step_seconds_total": self.seconds,
            "decode_steps_total": self.decode_steps,
            "decode_step_seconds_total": self.decode_seconds,
            "step_cpu_seconds_total": self.cpu_seconds,
        }
