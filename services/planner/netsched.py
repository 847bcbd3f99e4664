"""The network scheduler: token-bucket rates and bursts for every flow of the plans live at once.

On a shared medium (Wi-Fi) every transfer of every live plan competes for one capacity, and
unpaced TCP flows split it unfairly (the testbed saw two flows on an 80 Mbit/s medium split it
69/7). The scheduler gives each flow a token bucket (``rate_mbps``, ``burst_kb``), which the
sending agent enforces, and re-prices each plan under that pacing. Pure: plans in, plans out.

The model, per *domain* (the shared medium, or one directed link with per-pair links):

- A flow ``f`` of plan ``p`` carries ``X_f`` bits per period ``P_p`` (``cost.evaluate``'s
  steady-state period): its pair's part of the cut's activation for one microbatch, or for a
  training step cut into several microbatches, for all of them (they cross in one pass, and
  the next step waits for the optimiser), so it needs a sustained rate ``rho_f = X_f / P_p`` to
  keep the plan's throughput: its *floor*.
- Order: a plan's own transfers never compete with each other. In steady state the pipeline
  sends one cut at a time per period (the cost model's bottleneck already charges their sum to
  the medium), so each plan's flows are listed in pipeline order and sent whole, each as one
  burst, while the next microbatch is computed: transfers overlap compute instead of adding to
  it. Competition only comes from *other* plans.
- A latency-critical plan's flows get a burst of their whole per-microbatch activation, so a
  transfer leaves at the line rate the other plans leave free: ``C - sum(rates of other plans'
  flows)`` (others send at most their token rate on average). Its latency SLO then fixes how
  much the others may take: ``sum(others) <= C - bits_p / slack_p`` where ``slack_p`` is the
  SLO minus everything that is not wire time, less ``SLO_MARGIN`` of it kept spare for what the
  model leaves out (when the medium has room for all of it; else the SLO exactly). Critical
  plans are served first.
- The rest of the capacity is shared by max-min fairness (water-filling) among the other flows,
  above their floors. When critical plans are live, the others get bursts of one chunk of
  ``CHUNK_BYTES`` (64 KB; their senders cut activations to it) so that they cannot hold the
  medium for long, and a critical plan's wire budget leaves room for one such chunk of every
  other flow ahead of its transfer; without critical plans every flow keeps the
  whole-activation burst.
- If even the floors do not fit, the non-critical floors are scaled down first (those plans
  slow down), then the critical ones.

Predictions are updated with the paced figures: a whole-activation burst takes
``X_f / (C - others)``; a chunked flow takes ``chunk / (C - others) + (X_f - chunk) / r_f``; a
plan's period grows to ``X_f / r_f`` if a rate falls below the floor, and its energy by the idle
draw over that longer period. A plan alone on the medium keeps ``cost.predict``'s figures.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from doramesh.types import (
    DeviceProfile,
    Flow,
    LayerTable,
    Network,
    NodeId,
    Plan,
    PlanId,
    Prediction,
    QoESpec,
    Workload,
)

from . import cost

#: Smallest token-bucket burst: below it per-packet overhead dominates.
MIN_BURST_BYTES = 64 * 1000
#: Burst of a paced (non-critical) flow while latency-critical plans are live, and with it the
#: chunk its sender cuts activations into (a paced agent writes at most one burst at once): a
#: critical transfer may find one such chunk of every other flow ahead of it on the medium
#: (13 ms at 40 Mbit/s). A 1 MiB chunk held a 40 Mbit/s medium for 210 ms, and the testbed's
#: doorbell frames missed their SLO behind it more often paced than unpaced.
CHUNK_BYTES = MIN_BURST_BYTES
#: Share of a critical plan's wire budget kept spare when the others' rates are capped: the
#: cost model leaves out per-hop software overheads and compute jitter, so a plan priced at
#: exactly its SLO missed it on 13% of the testbed doorbell's frames (paced, 250 ms SLO).
SLO_MARGIN = 0.25
#: Rates are never set below this (Mbit/s), so a bucket always refills.
MIN_RATE_MBPS = 0.01


@dataclass(slots=True)
class _Flow:
    plan: int
    index: int  # position in the plan's flows
    src: NodeId
    dst: NodeId
    bits: float  # per period: one microbatch, or a training step's microbatches together
    boundary: int  # cut index; gradients are numbered after the forward cuts
    floor_bps: float
    rate_bps: float = 0.0
    burst_bytes: float = 0.0
    domain: tuple[str, str] = ("shared", "")


@dataclass(frozen=True, slots=True)
class Job:
    """One job's live plans with what they serve: its model's layer table, workload and QoE.

    ``latency_critical`` names the plans whose latency SLO is protected first; None: every plan
    of the job is critical when its QoE has a latency bound, none otherwise.
    """

    plans: tuple[Plan, ...]
    table: LayerTable
    workload: Workload
    qoe: QoESpec
    latency_critical: frozenset[PlanId] | None = None

    def critical(self, plan: Plan) -> bool:
        if self.latency_critical is None:
            return bool(self.qoe.latency_ms)
        return plan.plan_id in self.latency_critical


def schedule(
    plans: Sequence[Plan],
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    *,
    latency_critical: set[PlanId] | None = None,
) -> tuple[Plan, ...]:
    """The plans of one job with every flow's token bucket set and their predictions re-priced
    (``schedule_jobs`` with one job)."""
    critical = None if latency_critical is None else frozenset(latency_critical)
    (out,) = schedule_jobs([Job(tuple(plans), table, workload, qoe, critical)], devices, network)
    return out


def schedule_jobs(
    jobs: Sequence[Job], devices: Sequence[DeviceProfile], network: Network
) -> tuple[tuple[Plan, ...], ...]:
    """Every job's plans with their token buckets set together, per job in the given order.

    The plans of different jobs (different models, a latency-critical camera next to a bulk
    job) share the medium like the plans of one job do, so they are scheduled as one set: each
    plan is priced with its own job's layer table and workload, and a critical plan's SLO is
    its own job's.
    """
    entries = [(job, p) for job in jobs for p in job.plans]
    if not entries:
        return tuple(() for _ in jobs)
    plans = [p for _, p in entries]
    tables = [job.table for job, _ in entries]
    # An inference plan given by hand may carry another request size than the job's default
    # workload: a request is one microbatch of the plan's size, so price it at that size.
    workloads = [
        job.workload
        if job.workload.kind == "training" or p.microbatch in (None, job.workload.batch)
        else replace(job.workload, batch=p.microbatch)
        for job, p in entries
    ]
    qoes = [job.qoe for job, _ in entries]
    lookup: dict[str, DeviceProfile] = {d.node_id: d for d in devices}
    costs = [
        cost.evaluate(p.stages, lookup, t, network, w, microbatch=p.microbatch)
        for p, t, w in zip(plans, tables, workloads, strict=True)
    ]
    flows = _flows(plans, costs, tables, network, workloads)
    critical = [job.critical(p) for job, p in entries]
    chunked = any(critical) and len(plans) > 1

    domains: dict[tuple[str, str], list[_Flow]] = {}
    for f in flows:
        domains.setdefault(f.domain, []).append(f)
    for key, members in domains.items():
        capacity = _capacity(network, key) * 1e6
        _allocate(members, capacity, plans, costs, critical, qoes, network, tables, workloads)
        for f in members:
            f.burst_bytes = f.bits / 8
            if chunked and not critical[f.plan]:
                f.burst_bytes = min(f.bits / 8, CHUNK_BYTES)
            f.burst_bytes = max(f.burst_bytes, MIN_BURST_BYTES)
            f.rate_bps = max(f.rate_bps, MIN_RATE_MBPS * 1e6)

    out: list[Plan] = []
    for k, plan in enumerate(plans):
        mine = sorted((f for f in flows if f.plan == k), key=lambda f: f.index)
        wait = 0.0
        if critical[k] and chunked:
            for key in dict.fromkeys(f.domain for f in mine):
                capacity = _capacity(network, key) * 1e6
                wait += _ahead_s(domains[key], k, critical, capacity)
        paced = _paced_prediction(
            k, plan, costs[k], mine, flows, network, lookup, workloads[k], wait
        )
        new_flows = list(plan.flows)
        for f in mine:
            new_flows[f.index] = Flow(
                src=f.src,
                dst=f.dst,
                rate_mbps=f.rate_bps / 1e6,
                burst_kb=f.burst_bytes / 1e3,
            )
        out.append(replace(plan, flows=tuple(new_flows), predicted=paced))
    grouped: list[tuple[Plan, ...]] = []
    start = 0
    for job in jobs:
        grouped.append(tuple(out[start : start + len(job.plans)]))
        start += len(job.plans)
    return tuple(grouped)


def _flows(
    plans: Sequence[Plan],
    costs: Sequence[cost.PlanCost],
    tables: Sequence[LayerTable],
    network: Network,
    workloads: Sequence[Workload],
) -> list[_Flow]:
    """One ``_Flow`` per entry of each plan's ``flows`` that carries bytes."""
    out: list[_Flow] = []
    for k, (plan, pc) in enumerate(zip(plans, costs, strict=True)):
        table, workload = tables[k], workloads[k]
        carried: dict[tuple[NodeId, NodeId], tuple[float, int]] = {}
        cuts = list(itertools.pairwise(plan.stages))
        for b, (before, after) in enumerate(cuts):
            nbytes = table.layers[before.last].activation_bytes * plan.microbatch
            nbytes *= pc.microbatches
            for src in before.devices:
                for dst in after.devices:
                    if src.id == dst.id:
                        continue
                    bits = nbytes * src.share * dst.share * 8
                    carried[(src.id, dst.id)] = (bits, b)
                    if workload.kind == "training":
                        carried[(dst.id, src.id)] = (bits, len(cuts) + (len(cuts) - 1 - b))
        period = pc.period_s
        for index, flow in enumerate(plan.flows):
            found = carried.get((flow.src, flow.dst))
            if found is None or found[0] <= 0:
                continue
            bits, boundary = found
            domain = ("shared", "") if network.kind == "shared" else (flow.src, flow.dst)
            out.append(
                _Flow(
                    plan=k,
                    index=index,
                    src=flow.src,
                    dst=flow.dst,
                    bits=bits,
                    boundary=boundary,
                    floor_bps=bits / period,
                    domain=domain,
                )
            )
    return out


def _capacity(network: Network, domain: tuple[str, str]) -> float:
    if network.kind == "shared":
        return network.bandwidth_mbps
    bandwidth, _ = network.link(NodeId(domain[0]), NodeId(domain[1]))
    return bandwidth


def _slack_s(
    plan: Plan,
    pc: cost.PlanCost,
    qoe: QoESpec,
    network: Network,
    table: LayerTable,
    workload: Workload,
) -> float:
    """Seconds of the latency SLO left for wire time: SLO minus compute, sync and path latency."""
    if not qoe.latency_ms:
        return math.inf
    wire = _wire_seconds(plan, network, table, workload)
    return qoe.latency_ms / 1e3 - (pc.latency_s - wire)


def _wire_seconds(plan: Plan, network: Network, table: LayerTable, workload: Workload) -> float:
    """The wire part of the plan's latency under ``cost.py`` (both ways for training)."""
    dirs = cost.direction_factor(workload.kind)
    # A training step's microbatches together: the bytes of the whole batch.
    samples = workload.batch if workload.kind == "training" else plan.microbatch
    total = 0.0
    for before, after in itertools.pairwise(plan.stages):
        nbytes = table.layers[before.last].activation_bytes * samples
        per_sender: dict[NodeId, float] = {}
        for src in before.devices:
            for dst in after.devices:
                if src.id == dst.id:
                    continue
                bandwidth, _ = network.link(src.id, dst.id)
                w = cost.wire_seconds(nbytes * src.share * dst.share, bandwidth)
                per_sender[src.id] = per_sender.get(src.id, 0.0) + w
        if per_sender:
            values = per_sender.values()
            total += dirs * (sum(values) if network.kind == "shared" else max(values))
    return total


@dataclass(slots=True)
class _Share:
    """One plan's part of one domain: its flows there, their bits, its floor and its rate."""

    plan: int
    flows: list[_Flow]
    bits: float
    floor_bps: float
    rate_bps: float = 0.0


def _allocate(
    members: list[_Flow],
    capacity_bps: float,
    plans: Sequence[Plan],
    costs: Sequence[cost.PlanCost],
    critical: Sequence[bool],
    qoes: Sequence[QoESpec],
    network: Network,
    tables: Sequence[LayerTable],
    workloads: Sequence[Workload],
) -> None:
    """Rates for the flows of one domain (see the module docstring).

    Plans, not flows, are the parties that share the domain: a plan's rate is split among its
    flows in proportion to their bits, so that all of its transfers of one microbatch fit in
    the same time (its own transfers take turns anyway).
    """
    shares: dict[int, _Share] = {}
    for f in members:
        sh = shares.setdefault(f.plan, _Share(f.plan, [], 0.0, 0.0))
        sh.flows.append(f)
        sh.bits += f.bits
        sh.floor_bps += f.floor_bps
    crit = [sh for sh in shares.values() if critical[sh.plan]]
    rest = [sh for sh in shares.values() if not critical[sh.plan]]
    crit_floor = sum(sh.floor_bps for sh in crit)
    if crit_floor > capacity_bps:
        _scale_floors(crit, capacity_bps)
        _scale_floors(rest, 0.0)
    else:
        for sh in crit:
            sh.rate_bps = sh.floor_bps
        # What the others may take so that every critical plan's transfers meet its SLO.
        allowance = capacity_bps - crit_floor
        for sh in crit:
            k = sh.plan
            slack = _slack_s(plans[k], costs[k], qoes[k], network, tables[k], workloads[k])
            if network.kind != "shared":
                # This link's part of the plan's wire budget.
                total = sum(f.bits for f in members if f.plan == sh.plan)
                slack = slack * (sh.bits / total) if total > 0 else slack
            slack -= _ahead_s(members, k, critical, capacity_bps)
            need = sh.bits / slack if slack > 0 else math.inf
            others_crit = sum(o.rate_bps for o in crit if o is not sh)
            if need > capacity_bps - others_crit:
                continue  # out of reach even alone on the medium: starving others won't help
            if need / (1 - SLO_MARGIN) <= capacity_bps - others_crit:
                need /= 1 - SLO_MARGIN  # the margin when the medium has room for it
            # else the SLO exactly: the margin would starve the others entirely
            allowance = min(allowance, capacity_bps - need - others_crit)
        allowance = max(allowance, 0.0)
        rest_floor = sum(sh.floor_bps for sh in rest)
        if rest_floor > allowance:
            _scale_floors(rest, allowance)  # critical SLOs first: the others slow down
        else:
            for sh in rest:
                sh.rate_bps = sh.floor_bps
            _water_fill(rest, allowance - rest_floor)
        spare = capacity_bps - sum(sh.rate_bps for sh in shares.values())
        _water_fill(crit if crit else rest, spare)
    for sh in shares.values():
        for f in sh.flows:
            f.rate_bps = sh.rate_bps * f.bits / sh.bits if sh.bits > 0 else 0.0


def _ahead_s(
    members: Sequence[_Flow], plan: int, critical: Sequence[bool], capacity_bps: float
) -> float:
    """Seconds a critical plan's transfer may wait behind one chunk of every non-critical flow
    of the other plans (the most a paced sender puts on the medium at once)."""
    bits = sum(
        min(f.bits, CHUNK_BYTES * 8) for f in members if f.plan != plan and not critical[f.plan]
    )
    return bits / capacity_bps if capacity_bps > 0 else 0.0


def _scale_floors(shares: Iterable[_Share], capacity_bps: float) -> None:
    shares = list(shares)
    total = sum(sh.floor_bps for sh in shares)
    scale = capacity_bps / total if total > 0 else 0.0
    for sh in shares:
        sh.rate_bps = sh.floor_bps * scale


def _water_fill(shares: Sequence[_Share], spare_bps: float) -> None:
    """Raise the lowest rates first until ``spare_bps`` is spent (max-min fairness)."""
    if not shares or spare_bps <= 0:
        return
    rates = sorted(sh.rate_bps for sh in shares)
    level = rates[0]
    total = 0.0
    for i, r in enumerate(rates):
        total += r
        candidate = (spare_bps + total) / (i + 1)  # the level if the i+1 lowest are raised
        if i + 1 == len(rates) or candidate <= rates[i + 1]:
            level = candidate
            break
    for sh in shares:
        sh.rate_bps = max(sh.rate_bps, level)


def _paced_prediction(
    k: int,
    plan: Plan,
    pc: cost.PlanCost,
    mine: Sequence[_Flow],
    flows: Sequence[_Flow],
    network: Network,
    lookup: dict[str, DeviceProfile],
    workload: Workload,
    wait_s: float,
) -> Prediction:
    """The plan's figures with its transfers paced (see the module docstring); ``wait_s``: a
    critical plan's wait behind the other flows' chunks."""
    if not mine:
        return pc.prediction()
    # Line rate a burst of this plan finds, per domain: the capacity minus the other plans' rates.
    others: dict[tuple[str, str], float] = {}
    for f in flows:
        if f.plan != k:
            others[f.domain] = others.get(f.domain, 0.0) + f.rate_bps
    by_boundary: dict[int, list[float]] = {}
    cost_wire: dict[int, list[float]] = {}
    for f in mine:
        capacity = _capacity(network, f.domain) * 1e6
        line = max(capacity - others.get(f.domain, 0.0), f.rate_bps, 1.0)
        burst_bits = f.burst_bytes * 8
        if burst_bits >= f.bits:
            seconds = f.bits / line
        else:
            seconds = burst_bits / line + (f.bits - burst_bits) / max(f.rate_bps, 1.0)
        by_boundary.setdefault(f.boundary, []).append(seconds)
        cost_wire.setdefault(f.boundary, []).append(f.bits / capacity)
    extra = 0.0
    for b, times in by_boundary.items():
        # A whole-activation burst of one cut's senders takes turns on a shared medium (as in
        # the cost model); paced flows of one cut run side by side.
        chunked = any(f.burst_bytes * 8 < f.bits for f in mine if f.boundary == b)
        if network.kind == "shared" and not chunked:
            paced, base = sum(times), sum(cost_wire[b])
        elif network.kind == "shared":
            paced, base = max(times), sum(cost_wire[b])
        else:
            paced, base = max(times), max(cost_wire[b])
        extra += max(0.0, paced - base)
    latency = pc.latency_s + extra + wait_s
    # A token rate caps the flow's sustained throughput: one microbatch per bits / rate.
    bottleneck = max(pc.bottleneck_s, *(f.bits / max(f.rate_bps, 1.0) for f in mine))
    period = bottleneck
    if workload.rate_rps > 0:
        period = max(period, 1.0 / workload.rate_rps)
    energy = pc.energy_j
    if period > pc.period_s:
        idle = sum(lookup[i].power_idle_w for i in dict.fromkeys(plan.device_ids))
        energy += idle * (period - pc.period_s)
    return Prediction(
        latency_ms=latency * 1e3,
        throughput_sps=pc.batch / bottleneck,
        energy_j_per_sample=energy / pc.batch,
    )


__all__ = ["CHUNK_BYTES", "MIN_BURST_BYTES", "Job", "schedule", "schedule_jobs"]
