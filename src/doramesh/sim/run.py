"""One simulated run: requests (or training steps) through the live plans, microbatch by
microbatch, on shared devices and a shared network, under the scenario's dynamics.

Modelling choices (the ones a reader would otherwise have to guess):

- *Arrivals.* Inference with ``rate_rps > 0`` is an open loop: Poisson arrivals from the seed
  (``arrivals="periodic"`` gives a fixed interval), the first at time 0. ``rate_rps == 0`` is a
  closed loop that measures the maximum throughput: each plan keeps ``window_per_stage`` (2)
  microbatches per stage in flight, and a new request is admitted when its plan has room.
  Training is always a closed loop of one step at a time per plan (a step needs the previous
  step's weights); its ``rate_rps`` is ignored.
- *Dispatch.* Each request goes to a live plan (share > 0) by smooth weighted round robin over
  the mix: deterministic, and any prefix of the sequence follows the shares closely. In a closed
  loop requests are admitted in that order, so a plan whose window is full holds back the next
  ones and the mix is kept exactly. Plans with share 0 are not deployed: they take no device
  time, energy or memory.
- *Compute.* A stage splits each microbatch across its replicas by share (whole samples, at least
  one per replica when there are enough); a replica's task is ``stage GFLOP x samples / device
  GFLOP/s``, times the device's current slowdown, on the device's single FIFO queue.
- *Transfers.* Replica ``i`` of stage ``k`` sends replica ``j`` of stage ``k+1`` the activation
  of ``n_i * n_j / n`` samples (every replica to every replica, in proportion to shares); replica
  ``j`` starts once all its pieces arrived. (The agent runtime fans each part out and computes
  the parts as they come; same bytes and FLOPs, without the overlap of partial arrivals.) Two
  stages on one device hand over in memory, at no cost. The input to stage 0 and the output of
  the last stage are not simulated: they depend only on the coordinator's link and shift every
  plan by the same amount.
- *Training* is GPipe: every microbatch of the step goes forward through all stages; once the
  last stage has all of them, backward runs in reverse (``gflops_bwd``, or twice the forward),
  each boundary carrying the activation gradient back with the activation's size. When a stage
  has finished all its backward work its replicas all-reduce their gradients with a ring:
  each sends ``2(n-1)/n x stage parameter bytes`` to its successor, with ``2(n-1)`` path
  latencies (the ring's rounds). The step ends when every stage is synchronised; the optimiser
  step is taken as free.
- *Dynamics.* ``bandwidth_mbps`` sets the medium (or every link); ``slowdown`` sets a device's
  factor relative to its profile (1.0 restores it), taking effect on the running task;
  ``leave`` drops the device's running and queued work and the transfers from and to it, losing
  their requests; requests that reach the device later, or that are dispatched to a plan using
  it while it is away, are lost too (the simulator does not re-plan). ``join`` brings it back
  for later requests. Work of a lost request that has not started anywhere is skipped; work
  already running finishes (no one tells those devices at once).
- *Loss.* A request is lost once; it counts as a QoE violation. In a closed loop whose plans are
  all down, the client keeps trying at the pace it was served (the mean time between
  completions), each try lost, so an outage costs requests (or training steps) in proportion to
  its length, as in an open loop. Requests still unfinished when nothing else can happen (a
  medium at 0 Mbit/s for good) are lost at the end.
- *Energy* (DESIGN.md): every device of a live plan draws active power while computing, idle
  power for the rest of the time it is present during the run (``wall_s``: from 0 to the last
  request's completion or loss), and ``power_tx_w`` *on top of* whichever of those while its
  radio is on the air (airtime, see ``network.py``). Total over completed samples.
- *Power modes.* A device runs in the power mode its plan names (``DeviceShare.mode``): the
  mode's fraction of its GFLOP/s and the mode's active power, for the whole run (read here from
  the device's ``power_modes``, not through the cost model). One device runs one mode: when live
  plans name different ones, it runs the fastest of them, so no plan is slower than planned.
- *Steady state.* Throughput is measured between the completion of the first tenth of the
  requests and the last completion, which cuts the pipeline's fill; latency quantiles are over
  all completed requests.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from doramesh.scenario_types import DynamicsEvent, Scenario
from doramesh.sim.compute import ComputePool, Task
from doramesh.sim.engine import Callback, EventQueue, Owner
from doramesh.sim.network import NetworkModel
from doramesh.sim.plans import PlanModel
from doramesh.sim.result import SimResult
from doramesh.types import DeviceProfile

Arrivals = Literal["poisson", "periodic"]

#: Requests a run makes when the caller sets neither ``requests`` nor ``duration_s``.
DEFAULT_REQUESTS = 200
#: With dynamics and no explicit length, arrivals go on this long after the last event (or a
#: quarter of its time, if longer), so the run shows the fleet after the change.
DYNAMICS_TAIL_S = 10.0
#: A default-length run never makes more requests than this, whatever the dynamics' times.
MAX_DEFAULT_REQUESTS = 50_000
#: A closed loop whose plans are all down retries this often until something has completed.
RETRY_S = 1.0
#: Share of the completions ignored at the start when measuring steady-state throughput.
WARMUP_FRACTION = 0.1


@dataclass(slots=True, eq=False)
class _Job:
    """One inference request or one training step."""

    plan: PlanModel
    start: float
    samples: int
    lost: bool = False
    done: bool = False
    left: int = 0  # inference: microbatches not yet through; training: forwards not yet through
    micro: list[_Micro] = field(default_factory=list)
    bwd_left: list[int] = field(default_factory=list)  # per stage, backward tasks to run
    sync_left: list[int] = field(default_factory=list)  # per stage, all-reduce pieces to arrive
    stages_left: int = 0  # training: stages not yet synchronised


@dataclass(slots=True, eq=False)
class _Micro:
    job: _Job
    samples: int
    counts: tuple[tuple[int, ...], ...]  # samples per replica, per stage
    last_left: int  # last-stage replicas still computing
    waiting: dict[tuple[int, int, bool], int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunLimits:
    """When to stop starting requests: ``requests`` and ``duration_s`` as the caller gave them,
    or the defaults (``min_requests`` and, with dynamics, ``horizon_s``)."""

    requests: int | None
    duration_s: float | None
    min_requests: int = DEFAULT_REQUESTS
    horizon_s: float = 0.0
    max_requests: int = MAX_DEFAULT_REQUESTS

    def may_start(self, started: int, now: float) -> bool:
        if self.requests is None and self.duration_s is None:
            wanted = started < self.min_requests or now < self.horizon_s
            return wanted and started < self.max_requests
        if self.requests is not None and started >= self.requests:
            return False
        return not (self.duration_s is not None and now >= self.duration_s)


class Simulation:
    def __init__(
        self,
        plans: Sequence[PlanModel],
        scenario: Scenario,
        limits: RunLimits,
        *,
        seed: int,
        arrivals: Arrivals,
        apply_dynamics: bool,
    ) -> None:
        self.plans = list(plans)
        self.scenario = scenario
        self.limits = limits
        self.training = scenario.workload.kind == "training"
        self.batch = max(1, scenario.workload.batch)
        rate = scenario.workload.rate_rps
        self.open_loop = not self.training and rate > 0
        self.rate = rate
        self.arrivals: Arrivals = arrivals
        self.rng = random.Random(seed)
        self.events = EventQueue()
        self.participants = sorted({node for p in self.plans for node in p.nodes})
        profiles = {str(d.node_id): d for d in scenario.devices}
        self.profiles = profiles
        self.speed, self.active_w = _power_modes(self.plans, profiles)
        self.compute = ComputePool(self.events, ((n, self.speed[n]) for n in profiles))
        self.network = NetworkModel(self.events, scenario.network)
        self.dead: set[str] = set()
        self.dynamics = scenario.dynamics if apply_dynamics else ()
        # Smooth weighted round robin state.
        self._wrr = [0.0] * len(self.plans)
        self._next_plan: PlanModel | None = None
        self._admitting = False
        self._retry_pending = False
        self.started = 0
        self.in_flight = 0
        self.arrival_pending = False
        self.jobs: list[_Job] = []
        self.completions: list[tuple[float, float, int]] = []  # (time, latency, samples)
        self.lost = 0
        self.last_activity = 0.0

    # --- the run -------------------------------------------------------------------------------

    def run(self) -> SimResult:
        for event in self.dynamics:
            self.events.at(event.at_s, partial(self._dynamics, event))
        if self.open_loop:
            if self.limits.may_start(0, 0.0):
                self.arrival_pending = True
                self.events.at(0.0, self._arrive)
        else:
            self.events.at(0.0, self._admit)
        events = self.events
        while len(events) and self._outstanding():
            events.run_next()
        wall = self.last_activity
        for job in self.jobs:
            if not job.done and not job.lost:
                self._lose(job)
        if not self.open_loop and self.limits.requests is not None:
            self.lost += max(0, self.limits.requests - self.started)
        self.compute.close(wall)
        return self._result(wall)

    def _outstanding(self) -> bool:
        if self.in_flight > 0 or self.arrival_pending:
            return True
        return not self.open_loop and self.limits.may_start(self.started, self.events.now)

    # --- dispatch ------------------------------------------------------------------------------

    def _peek_plan(self) -> PlanModel:
        if self._next_plan is None:
            total = 0.0
            best = 0
            for i, plan in enumerate(self.plans):
                self._wrr[i] += plan.share
                total += plan.share
                if self._wrr[i] > self._wrr[best]:
                    best = i
            self._wrr[best] -= total
            self._next_plan = self.plans[best]
        return self._next_plan

    def _take_plan(self) -> PlanModel:
        plan = self._peek_plan()
        self._next_plan = None
        self.started += 1
        return plan

    def _is_down(self, plan: PlanModel) -> bool:
        return not self.dead.isdisjoint(plan.nodes)

    def _arrive(self) -> None:
        self.arrival_pending = False
        now = self.events.now
        plan = self._take_plan()
        self._start(plan)
        if self.arrivals == "periodic":
            gap = 1.0 / self.rate
        else:
            gap = self.rng.expovariate(self.rate)
        if self.limits.may_start(self.started, now + gap):
            self.arrival_pending = True
            self.events.after(gap, self._arrive)

    def _admit(self) -> None:
        """Closed loop: start requests while the next one's plan has room in its window."""
        if self._admitting:
            return
        self._admitting = True
        try:
            while self.limits.may_start(self.started, self.events.now):
                plan = self._peek_plan()
                if self._is_down(plan):
                    if not all(self._is_down(p) for p in self.plans):
                        self._start(self._take_plan())  # lost at once; on to the next plan
                        continue
                    # Nothing can serve: the client tries again at the pace it was served, so
                    # an outage costs requests in proportion to its length.
                    if not self._retry_pending:
                        self._start(self._take_plan())
                        self._retry_pending = True
                        self.events.after(self._retry_s(), self._retry)
                    break
                if plan.inflight > 0 and plan.inflight + plan.units_per_job > plan.window:
                    break
                self._start(self._take_plan())
        finally:
            self._admitting = False

    def _retry(self) -> None:
        self._retry_pending = False
        self._admit()

    def _retry_s(self) -> float:
        """A closed-loop client's pace: the mean time between completions so far."""
        done = self.completions
        if len(done) >= 2:
            return max((done[-1][0] - done[0][0]) / (len(done) - 1), 1e-6)
        if done:
            return max(done[0][1], 1e-6)
        return RETRY_S

    def _start(self, plan: PlanModel) -> None:
        now = self.events.now
        job = _Job(plan, now, self.batch)
        self.jobs.append(job)
        self.last_activity = now
        if self._is_down(plan):
            job.lost = True
            self.lost += 1
            return
        self.in_flight += 1
        plan.inflight += plan.units_per_job
        nstages = len(plan.stages)
        for samples in plan.microbatches:
            counts = tuple(plan.counts(k, samples) for k in range(nstages))
            last = sum(1 for n in counts[-1] if n)
            job.micro.append(_Micro(job, samples, counts, last))
        job.left = len(job.micro)
        if self.training:
            job.bwd_left = [
                sum(1 for mb in job.micro for n in mb.counts[k] if n) for k in range(nstages)
            ]
            job.sync_left = [0] * nstages
            job.stages_left = nstages
        for mb in job.micro:
            for j, n in enumerate(mb.counts[0]):
                if n:
                    self._compute(mb, 0, j, forward=True)
                    if job.lost:
                        return

    # --- microbatches through the stages -------------------------------------------------------

    def _compute(self, mb: _Micro, k: int, j: int, *, forward: bool) -> None:
        job = mb.job
        stage = job.plan.stages[k]
        samples = mb.counts[k][j]
        gflop = (stage.fwd_gflop if forward else stage.bwd_gflop) * samples
        done = partial(self._forward_done if forward else self._backward_done, mb, k, j)
        if not self.compute.submit(stage.devices[j], Task(gflop, job, done)):
            self._lose(job)

    def _forward_done(self, mb: _Micro, k: int, j: int) -> None:
        job = mb.job
        if job.lost:
            return
        stages = job.plan.stages
        if k == len(stages) - 1:
            mb.last_left -= 1
            if mb.last_left == 0:
                self._through(mb)
            return
        src = stages[k].devices[j]
        per_sample = stages[k].out_bytes * mb.counts[k][j] / mb.samples
        nxt = stages[k + 1]
        for j2, n2 in enumerate(mb.counts[k + 1]):
            if n2:
                arrive = partial(self._piece_arrived, mb, k + 1, j2, True)
                self._send(job, src, nxt.devices[j2], per_sample * n2, arrive)
                if job.lost:
                    return

    def _piece_arrived(self, mb: _Micro, k: int, j: int, forward: bool) -> None:
        """One piece of replica ``j`` of stage ``k``'s input (forward) or gradient arrived."""
        if mb.job.lost:
            return
        key = (k, j, forward)
        senders = mb.counts[k - 1] if forward else mb.counts[k + 1]
        left = mb.waiting.get(key, sum(1 for n in senders if n)) - 1
        mb.waiting[key] = left
        if left == 0:
            self._compute(mb, k, j, forward=forward)

    def _through(self, mb: _Micro) -> None:
        """A microbatch left the last stage (training: its forward did)."""
        job = mb.job
        job.left -= 1
        if job.left:
            return
        if not self.training:
            self._complete(job)
            return
        # GPipe: the backward pass starts once the whole step has gone forward.
        last = len(job.plan.stages) - 1
        for each in job.micro:
            for j, n in enumerate(each.counts[last]):
                if n:
                    self._compute(each, last, j, forward=False)
                    if job.lost:
                        return

    def _backward_done(self, mb: _Micro, k: int, j: int) -> None:
        job = mb.job
        if job.lost:
            return
        stages = job.plan.stages
        if k > 0:
            src = stages[k].devices[j]
            prev = stages[k - 1]
            per_sample = prev.out_bytes * mb.counts[k][j] / mb.samples
            for i, ni in enumerate(mb.counts[k - 1]):
                if ni:
                    arrive = partial(self._piece_arrived, mb, k - 1, i, False)
                    self._send(job, src, prev.devices[i], per_sample * ni, arrive)
                    if job.lost:
                        return
        job.bwd_left[k] -= 1
        if job.bwd_left[k] == 0:
            self._all_reduce(job, k)

    def _all_reduce(self, job: _Job, k: int) -> None:
        stage = job.plan.stages[k]
        ring = stage.devices
        n = len(ring)
        if n == 1 or stage.param_bytes <= 0:
            self._stage_synced(job)
            return
        job.sync_left[k] = n
        nbytes = 2 * (n - 1) / n * stage.param_bytes
        for idx, src in enumerate(ring):
            dst = ring[(idx + 1) % n]
            self._send(
                job,
                src,
                dst,
                nbytes,
                partial(self._sync_arrived, job, k),
                latency_scale=2 * (n - 1),
            )
            if job.lost:
                return

    def _sync_arrived(self, job: _Job, k: int) -> None:
        if job.lost:
            return
        job.sync_left[k] -= 1
        if job.sync_left[k] == 0:
            self._stage_synced(job)

    def _stage_synced(self, job: _Job) -> None:
        job.stages_left -= 1
        if job.stages_left == 0:
            self._complete(job)

    def _send(
        self,
        job: _Job,
        src: str,
        dst: str,
        nbytes: float,
        on_arrival: Callback,
        *,
        latency_scale: float = 1.0,
    ) -> None:
        if src == dst:
            on_arrival()
            return
        if src in self.dead or dst in self.dead:
            self._lose(job)
            return

        def delivered() -> None:
            if job.lost:
                return
            if dst in self.dead:
                self._lose(job)
                return
            on_arrival()

        plan = job.plan
        self.network.send(
            (plan.index, src, dst),
            src,
            dst,
            nbytes,
            job,
            delivered,
            pace=plan.pace.get((src, dst)),
            latency_scale=latency_scale,
        )

    # --- endings -------------------------------------------------------------------------------

    def _complete(self, job: _Job) -> None:
        now = self.events.now
        job.done = True
        self.completions.append((now, now - job.start, job.samples))
        self._resolve(job)

    def _lose(self, job: Owner) -> None:
        if not isinstance(job, _Job) or job.lost or job.done:
            return
        job.lost = True
        self.lost += 1
        self._resolve(job)

    def _resolve(self, job: _Job) -> None:
        self.in_flight -= 1
        job.plan.inflight -= job.plan.units_per_job
        self.last_activity = self.events.now
        if not self.open_loop:
            self._admit()

    # --- dynamics ------------------------------------------------------------------------------

    def _dynamics(self, event: DynamicsEvent) -> None:
        if event.bandwidth_mbps is not None:
            self.network.set_bandwidth(event.bandwidth_mbps)
        node = str(event.device) if event.device is not None else None
        if node is None or node not in self.profiles:
            return
        if event.leave:
            self.dead.add(node)
            for owner in self.compute.leave(node) + self.network.drop_device(node):
                self._lose(owner)
        elif event.join:
            self.dead.discard(node)
            self.compute.join(node)
            if not self.open_loop:
                self._admit()
        elif event.slowdown is not None:
            self.compute.set_slowdown(node, event.slowdown)

    # --- figures -------------------------------------------------------------------------------

    def _result(self, wall: float) -> SimResult:
        completed = len(self.completions)
        latencies = sorted(latency for _, latency, _ in self.completions)
        slo_ms = self.scenario.qoe.latency_ms
        missed = 0
        if slo_ms is not None:
            missed = sum(1 for latency in latencies if latency * 1e3 > slo_ms + 1e-9)
        total = completed + self.lost
        violation = (missed + self.lost) / total if total else 0.0
        samples = sum(n for _, _, n in self.completions)
        busy = {n: self.compute.processors[n].busy_s for n in self.participants}
        tx = {n: self.network.airtime_s.get(n, 0.0) for n in self.participants}
        energy = 0.0
        for node in self.participants:
            profile = self.profiles[node]
            proc = self.compute.processors[node]
            idle = max(0.0, proc.alive_s - proc.busy_s)
            energy += self.active_w[node] * proc.busy_s + profile.power_idle_w * idle
            energy += profile.power_tx_w * tx[node]
        return SimResult(
            latency_ms=_quantile(latencies, 0.5) * 1e3,
            latency_ms_p95=_quantile(latencies, 0.95) * 1e3,
            throughput_sps=self._throughput(wall),
            energy_j_per_sample=energy / samples if samples else math.inf,
            qoe_violation_rate=violation,
            completed=completed,
            lost=self.lost,
            busy_s=busy,
            tx_s=tx,
            wall_s=wall,
        )

    def _throughput(self, wall: float) -> float:
        done = sorted(self.completions)
        if not done:
            return 0.0
        # The first completions include the pipeline's fill; count from the end of the warm-up
        # (at least the first completion, so the span holds whole inter-completion gaps).
        skip = int(len(done) * WARMUP_FRACTION)
        span = done[-1][0] - done[skip][0]
        if span <= 0:
            return sum(n for _, _, n in done) / wall if wall > 0 else 0.0
        return sum(n for _, _, n in done[skip + 1 :]) / span


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), inf when empty."""
    if not sorted_values:
        return math.inf
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _power_modes(
    plans: Sequence[PlanModel], profiles: dict[str, DeviceProfile]
) -> tuple[dict[str, float], dict[str, float]]:
    """Each device's GFLOP/s and active power in the mode the plans run it in."""
    speed = {n: p.gflops for n, p in profiles.items()}
    active = {n: p.power_active_w for n, p in profiles.items()}
    chosen: dict[str, tuple[float, float]] = {}
    for plan in plans:
        for node, name in plan.modes.items():
            mode = next(m for m in profiles[node].power_modes if m.name == name)
            if node not in chosen or mode.speed_factor > chosen[node][0]:
                chosen[node] = (mode.speed_factor, mode.power_active_w)
    for plan in plans:  # a plan that runs the device in its top mode wins over every other
        for node in plan.nodes:
            if node not in plan.modes:
                chosen.pop(node, None)
    for node, (factor, watts) in chosen.items():
        speed[node] = profiles[node].gflops * factor
        active[node] = watts
    return speed, active
