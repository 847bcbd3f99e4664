"""What one simulated run reports."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SimResult:
    """Figures of one simulated run; times in seconds unless the name says otherwise.

    An infeasible run (``feasible`` False, ``reason`` says why) completed nothing: throughput 0,
    every request lost, violation rate 1, and latency and energy infinite.
    """

    latency_ms: float  # median per request (inference) or per step (training)
    latency_ms_p95: float
    throughput_sps: float  # samples per second completed, in steady state
    energy_j_per_sample: float
    qoe_violation_rate: float  # requests or steps that missed the latency SLO or were lost
    completed: int
    lost: int
    busy_s: dict[str, float] = field(default_factory=dict)  # compute time per device
    tx_s: dict[str, float] = field(default_factory=dict)  # transmit (air) time per device
    wall_s: float = 0.0
    feasible: bool = True
    reason: str = ""

    @classmethod
    def infeasible(cls, reason: str, *, requests: int) -> SimResult:
        return cls(
            latency_ms=math.inf,
            latency_ms_p95=math.inf,
            throughput_sps=0.0,
            energy_j_per_sample=math.inf,
            qoe_violation_rate=1.0,
            completed=0,
            lost=requests,
            feasible=False,
            reason=reason,
        )
