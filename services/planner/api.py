"""The planner's pure entry point: validate the inputs, pick the planner, return a plan set.

No gRPC, no I/O: the servicer, the CLI (``doramesh plan``) and the bench call this same
function, so a scenario planned offline and one planned over the wire give the same plans.

The ``doramesh`` planner, within ``time_limit_s`` (model building included, never exceeded):

1. *Fast path*: the exact single-device dynamic program (``dp.py``) on the real layers (models
   up to ``DP_FULL_LAYERS`` layers) or on ``DP_BLOCKS`` coarsened blocks (``coarsen.py``), over
   up to ``DP_MAX_DEVICES`` devices chosen for the objective. Its plan is the incumbent.
2. *Replicas, greedily*: with several samples per microbatch, data-parallel replicas are added
   to stages one at a time while the objective improves (from the DP's plan and from the best
   single device): cheap, and a good incumbent makes the exact search short.
3. *Hybrid partitioner* (``milp.py``): the mixed-integer program over every device type, with
   data-parallel groups, on at most ``MAX_BLOCKS`` blocks that keep the incumbent's cuts; warm-
   started with the incumbent, so it can only improve on it. Skipped when it cannot beat the DP
   (one-sample microbatches on a fleet the DP saw whole).
4. *Refine* the winner's stage boundaries on the real layers (coarsening kept only some cuts).
4b. *Power modes* (``min_energy`` only): a device in a lower power mode is a slower, more frugal
   variant of itself (``DeviceProfile.power_modes``). Steps 1-4 rerun on fleets with one mode
   per device (every assignment on small fleets, each mode rank per class on large ones), then
   the best plan's own devices get the modes that serve it best (``_slower_modes``). The
   other objectives, and every baseline, run devices in their top mode.
5. *Plan set*: more plans on devices no earlier plan uses (so they can run at the same time), or
   whole-model replicas side by side when they serve more (inference only: training plans would
   train separate copies); then the best plans for the other objectives when they are not
   dominated; a dominated plan is kept only when it shares no device with its dominator.
6. *Mix and network scheduler*: the request rate is split over plans that can run at once, and
   ``netsched.schedule`` sets every flow's token bucket and re-prices the plans live together.

The time limit holds in every phase: the searches get shares of the time to a deadline of
``SOLVER_SHARE`` of the limit (the rest is for building the plans, the network scheduler and
the interpreter's jitter). A DP search runs at least one full pass whatever its budget, so an
optional one (another plan for the set, another power-mode fleet, another objective) starts
only when the time left covers the furthest a search of the same call ran past its budget
(``_Search.affords_search``). The partitioner keeps its own limit, CVXPY's compile included
(``milp.py``: an estimated compile that does not fit is not started, one that overruns is
abandoned). Whatever stopped early is in the report: ``milp_status`` says why the program did
not run (``no-time``, ``abandoned``, ``busy``) or HiGHS' status, with its gap.

When the request rate is given, the first plan is asked to keep up with it alone
(``bottleneck <= 1 / rate``), since a pipeline that cannot queues without bound; only when no
plan can does the set share the load. With ``max_throughput`` and a request rate, throughput
past the rate is only headroom: the first plan is the least-latency one with
``THROUGHPUT_HEADROOM`` times the rate, if there is one. A QoE no plan meets raises
``QoEUnreachable`` naming the bound, by how much it is missed, and the closest plan.

Baseline planners live in ``baselines.py`` (``BASELINES``), imported when first asked for.
"""

from __future__ import annotations

import importlib
import itertools
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import structlog

from doramesh.errors import FailedPrecondition, InvalidArgument
from doramesh.types import (
    DeviceProfile,
    DeviceShare,
    LayerTable,
    Network,
    Objective,
    Plan,
    PlanId,
    PlanSet,
    QoESpec,
    StagePlan,
    Workload,
)

from . import coarsen, cost, dp, milp, netsched

_log = structlog.get_logger("planner")

DEFAULT_PLANNER = "doramesh"
#: The baseline planners (``baselines.py``), for honest comparison.
BASELINE_NAMES: tuple[str, ...] = (
    "single-device",
    "uniform",
    "memory-proportional",
    "throughput-optimal",
    "latency-optimal",
    "data-parallel",
)
#: Every planner name this build may know; ``known_planners()`` says which are installed.
PLANNERS: tuple[str, ...] = (DEFAULT_PLANNER, *BASELINE_NAMES)
DEFAULT_MAX_PLANS = 4
#: Upper bound on ``max_plans``: a plan set is meant to be compact.
MAX_PLANS_LIMIT = 16
#: Planning time when the caller sets none (seconds).
DEFAULT_TIME_LIMIT_S = 5.0
#: Blocks the partitioner's program sees at most (plus the cuts of its warm start).
MAX_BLOCKS = 20
#: Models with at most this many layers are planned by the dynamic program layer by layer;
#: longer ones on ``DP_BLOCKS`` blocks (its work grows with the square of the cut positions).
DP_FULL_LAYERS = 32
DP_BLOCKS = 24
#: Devices the dynamic program sees at most (its work doubles with each one).
DP_MAX_DEVICES = 10
#: A battery-powered device must last at least this long at a plan's average draw.
DEFAULT_BATTERY_HOURS = 1.0
#: Training: the DP's steady-state energy plans are asked for a slowest stage at most these
#: fractions of the step bound, leaving the rest for the GPipe pipeline's fill and drain.
STEADY_STEP_FRACTIONS = (0.9, 0.75)
#: ``max_throughput`` with a request rate: capacity over the rate that counts as enough.
THROUGHPUT_HEADROOM = 2.0
#: Utilisation each plan is loaded to at most when several share the request rate.
MIX_UTILISATION = 0.85
#: Replicas the greedy data-parallel search adds at most.
MAX_GROW_STEPS = 16
#: The partitioner is not started with less time than this left (seconds).
MILP_MIN_SECONDS = 0.15
#: A search is not started with less time left than this many times the longest minimal DP
#: search measured in the same call (``_Search.affords_search``).
SEARCH_SAFETY = 1.5
#: Importing CVXPY the first time takes seconds; without this much time left the first call
#: plans with the dynamic program alone (``warm_up`` imports it ahead of time).
COLD_IMPORT_BUDGET_S = 8.0
#: Share of the time limit the solvers may use; the rest covers coarsening, checks, the network
#: scheduler and the interpreter's own jitter.
SOLVER_SHARE = 0.85
#: ``min_energy`` over power modes: whole-fleet mode assignments searched at most, the share of
#: the time left they may use together, and the time below which no further one starts.
MODE_ASSIGNMENTS_LIMIT = 16
MODE_SEARCH_SHARE = 0.6
MODE_MIN_SECONDS = 0.05
#: Mode combinations of one plan's own devices priced at most (one device at a time past it).
MODE_COMBOS_LIMIT = 256

_OBJECTIVES: tuple[Objective, ...] = ("min_latency", "max_throughput", "min_energy")

PlannerFn = Callable[..., PlanSet]


class QoEUnreachable(FailedPrecondition):
    """No plan meets the QoE: the message names the bound and by how much; ``closest`` is the
    plan that misses it least (None when memory rules out every plan)."""

    def __init__(self, message: str, *, closest: Plan | None = None) -> None:
        super().__init__(message)
        self.closest = closest


@dataclass(frozen=True, slots=True)
class PlanningReport:
    """How a plan set was found: the plans and what the bench and the logs want to know."""

    plan_set: PlanSet
    seconds: float
    time_limit_s: float
    coarsening: str
    methods: dict[PlanId, str]
    """Per plan: which search found it (``dp``, ``milp``, plus ``+refined``)."""
    milp_status: str | None
    milp_gap: float | None
    """HiGHS' relative optimality gap on the first plan's program (None: not run)."""
    dp_exact: bool | None
    keeps_up: bool
    """Whether the first plan alone serves the request rate."""
    notes: tuple[str, ...] = ()


def known_planners() -> tuple[str, ...]:
    """The planners this installation can run: ``doramesh`` and whichever baselines exist."""
    return (DEFAULT_PLANNER, *_baselines())


def warm_up() -> float:
    """Import the solver stack now (seconds taken), so the first plan does not pay for it."""
    start = time.perf_counter()
    importlib.import_module("cvxpy")
    importlib.import_module("highspy")
    return time.perf_counter() - start


def plan(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    *,
    max_plans: int = DEFAULT_MAX_PLANS,
    planner: str = DEFAULT_PLANNER,
    time_limit_s: float | None = None,
) -> PlanSet:
    """A compact set of QoE-compliant plans, best first (see the module docstring).

    Raises ``InvalidArgument`` for malformed input (naming the field) or an unknown planner, and
    ``FailedPrecondition`` when the fleet cannot run the model within memory or the QoE (the
    message names the binding constraint and by how much).
    """
    baseline: PlannerFn | None = None
    if planner != DEFAULT_PLANNER:
        baseline = _baselines().get(planner)
        if baseline is None:
            raise InvalidArgument(
                f"unknown planner {planner!r}; known planners: {', '.join(known_planners())}"
            )
    _check_options(max_plans, time_limit_s)
    validate(devices, table, network, workload, qoe)
    if baseline is not None:
        return baseline(devices, table, network, workload, qoe, time_limit_s=time_limit_s)
    return _plan_doramesh(devices, table, network, workload, qoe, max_plans, time_limit_s).plan_set


def plan_detailed(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    *,
    max_plans: int = DEFAULT_MAX_PLANS,
    time_limit_s: float | None = None,
) -> PlanningReport:
    """The ``doramesh`` planner's plan set with its report (solver status, gap, methods)."""
    _check_options(max_plans, time_limit_s)
    validate(devices, table, network, workload, qoe)
    return _plan_doramesh(devices, table, network, workload, qoe, max_plans, time_limit_s)


def _check_options(max_plans: int, time_limit_s: float | None) -> None:
    if not 1 <= max_plans <= MAX_PLANS_LIMIT:
        raise InvalidArgument(f"max_plans must be in 1..{MAX_PLANS_LIMIT}, got {max_plans}")
    if time_limit_s is not None and not (math.isfinite(time_limit_s) and time_limit_s > 0):
        raise InvalidArgument(f"time_limit_s must be a positive number, got {time_limit_s}")


def _baselines() -> Mapping[str, PlannerFn]:
    """``baselines.BASELINES`` when that module exists (imported lazily: it may not yet)."""
    try:
        module = importlib.import_module(f"{__package__}.baselines")
    except ModuleNotFoundError as err:
        if err.name and err.name.endswith("baselines"):
            return {}
        raise
    found: Mapping[str, PlannerFn] = getattr(module, "BASELINES", {})
    return found


# ---------------------------------------------------------------------------------------------
# The doramesh planner


@dataclass(slots=True)
class _Candidate:
    stages: tuple[StagePlan, ...]
    pc: cost.PlanCost
    method: str


@dataclass(slots=True)
class _Search:
    """One planning call's inputs, clock and findings."""

    devices: tuple[DeviceProfile, ...]
    table: LayerTable
    network: Network
    workload: Workload
    qoe: QoESpec
    deadline: float
    co: coarsen.Coarsening
    """The dynamic program's blocks (and the refinement's: boundaries move within one)."""
    coarse: LayerTable
    milp_ready: bool
    battery_hours: float | None = DEFAULT_BATTERY_HOURS
    milp_status: str | None = None
    milp_gap: float | None = None
    dp_exact: bool | None = None
    notes: list[str] = field(default_factory=list)
    dp_seconds: list[tuple[float, float]] = field(default_factory=list)
    """Every DP search so far: (seconds, how far it ran past its own budget)."""

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def affords_search(self) -> bool:
        """Whether one more search fits before the deadline. A DP search runs at least one
        full pass (a few for some objectives) whatever its budget, so it may end past it; one
        is not started with less time left than ``SEARCH_SAFETY`` times the furthest a search
        ran past its budget so far (before any did, the shortest search)."""
        if not self.dp_seconds:
            return self.left() > 0
        overrun = max(over for _, over in self.dp_seconds)
        floor = overrun if overrun > 0 else min(s for s, _ in self.dp_seconds)
        return self.left() > SEARCH_SAFETY * floor

    def best(
        self,
        pool: Sequence[DeviceProfile],
        bounds: milp.Bounds,
        objective: Objective,
        *,
        share: float,
        use_milp: bool = True,
        record: bool = False,
    ) -> _Candidate | None:
        """The best plan on ``pool`` under ``bounds``, using ``share`` of the time left."""
        until = time.perf_counter() + max(self.left(), 0.0) * share
        found: list[_Candidate] = []
        subset = _dp_subset(pool, objective)
        # The DP models a training step as a pipeline in steady state, but steps are
        # synchronous (cost.py): throughput is batch / step latency, so max_throughput is
        # min_latency; the energy's period is the step too, so the DP's energy plan (on the
        # wrong period, and slow to prove) is one candidate, with a slice of the time, and its
        # latency plan another. The cost model picks, microbatch size included.
        training = self.workload.kind == "training"
        runs: list[tuple[Objective, milp.Bounds, float]] = [(objective, bounds, 1.0)]
        if training and objective != "min_latency":
            runs = [("min_latency", bounds, 1.0)]
            if objective == "min_energy":
                runs.append(("min_energy", bounds, 0.3))
        if training and self.workload.batch >= 2:
            # A GPipe step of m microbatches takes about L/m + (1 - 1/m) C for a plan of
            # one-microbatch step L and slowest stage C: with enough microbatches a pipeline is
            # as fast as its slowest stage, which is the DP's steady-state model. Its pipelines
            # with C under the step bound (L free) are the ones microbatching makes fast enough:
            # the fastest, and for energy the most frugal under a few margins for the fill.
            step = min(bounds.latency_s, bounds.bottleneck_s)
            steady = milp.Bounds(energy_j=bounds.energy_j)
            runs.append(("max_throughput", steady, 0.2))
            if objective == "min_energy":
                for fraction in STEADY_STEP_FRACTIONS:
                    margin = milp.Bounds(bottleneck_s=step * fraction, energy_j=bounds.energy_j)
                    runs.append(("min_energy", margin, 0.2))
        proven: list[bool] = []
        for k, (dp_objective, dp_bounds, dp_share) in enumerate(runs):
            if k > 0 and (time.perf_counter() >= until or not self.affords_search()):
                break  # a DP run takes at least one full pass: none starts past the budget
            dp_until = until
            if dp_share < 1.0:
                now = time.perf_counter()
                dp_until = now + max(until - now, 0.0) * dp_share
            dp_stages, dp_exact = self._dp(
                subset, dp_bounds, dp_objective, dp_until, steady=dp_bounds is not bounds
            )
            if dp_bounds is bounds:
                # Proven for the real objective only where the DP's model agrees with cost.py.
                proven.append(
                    dp_exact and (dp_objective == objective or objective == "max_throughput")
                )
            if dp_stages is not None:
                pc = self._valid(dp_stages, bounds, objective)
                if pc is not None:
                    found.append(_Candidate(dp_stages, pc, "dp"))
        training_energy = training and objective == "min_energy"
        # Microbatched steps are outside the DP's model: it proves nothing about them.
        exact = all(proven) and not training_energy and not (training and self.workload.batch >= 2)
        if record:
            self.dp_exact = exact
        if self.workload.batch >= 2:
            # Data-parallel replicas where they pay, greedily, from the DP's plan and from the
            # best single device: good incumbents make the partitioner's search short.
            seeds = [c for c in found]
            single = self._best_single(pool, bounds, objective)
            if single is not None:
                seeds.append(single)
            if objective == "min_energy":
                # The device that does the most work per joule, even where it misses a bound
                # alone: replicas of it (or of the next most frugal) may meet the bound at less
                # energy than any valid plan grown from faster, hungrier devices.
                frugal = self._frugal_single(pool)
                if frugal is not None and all(frugal.stages != c.stages for c in seeds):
                    seeds.append(frugal)
            for seed in seeds:
                grown = self._grow(seed, pool, bounds, objective, until)
                if grown is not seed:
                    found.append(grown)
        worthwhile = (
            self.workload.batch >= 2
            or len(subset) < len(pool)
            or not exact
            or any(d.battery_wh > 0 for d in pool)
        )
        time_left = until - time.perf_counter()
        if use_milp and worthwhile and self.milp_ready and time_left > MILP_MIN_SECONDS:
            incumbent = (
                min(found, key=lambda c: milp.objective_key(objective, c.pc)) if found else None
            )
            warm = incumbent.stages if incumbent is not None else None
            # The program's blocks keep the incumbent's cuts, so it is a point of the program.
            keep = [s.last for s in warm[:-1]] if warm is not None else []
            result = milp.solve(
                pool,
                self.table,
                self.network,
                self.workload,
                QoESpec(objective),
                bounds=bounds,
                coarsening=coarsen.coarsen(self.table, MAX_BLOCKS, keep_cuts=keep),
                warm_start=warm,
                time_limit_s=time_left,
                battery_hours=self.battery_hours,
                incumbent_energy_j=incumbent.pc.energy_j if incumbent is not None else None,
            )
            if record:
                self.milp_status, self.milp_gap = result.status, result.gap
            if result.plan is not None and result.plan_cost is not None:
                if result.plan.stages != warm:
                    # The program prices a training step as one microbatch; cut it as suits.
                    pc = self._valid(result.plan.stages, bounds, objective)
                    if pc is not None:
                        found.append(_Candidate(result.plan.stages, pc, "milp"))
        if not found:
            return None
        best = min(found, key=lambda c: milp.objective_key(objective, c.pc))
        return self._refine(best, bounds, objective)

    def _best_single(
        self, pool: Sequence[DeviceProfile], bounds: milp.Bounds, objective: Objective
    ) -> _Candidate | None:
        """The whole model on the one device that serves the objective best."""
        n = len(self.table.layers)
        best: _Candidate | None = None
        for group in milp.device_groups(pool, self.network):
            stages = (StagePlan(0, n - 1, (DeviceShare(group[0].node_id, 1.0),)),)
            pc = self._valid(stages, bounds, objective)
            if pc is not None and (
                best is None
                or milp.objective_key(objective, pc) < milp.objective_key(objective, best.pc)
            ):
                best = _Candidate(stages, pc, "single")
        return best

    def _frugal_single(self, pool: Sequence[DeviceProfile]) -> _Candidate | None:
        """The whole model on the device of least active energy per GFLOP that holds it,
        priced without the QoE bounds (a seed for ``_grow``, which only returns valid plans)."""
        n = len(self.table.layers)
        order = sorted(
            (group[0] for group in milp.device_groups(pool, self.network)),
            key=lambda d: (d.power_active_w / d.gflops if d.gflops > 0 else math.inf, d.node_id),
        )
        for device in order:
            stages = (StagePlan(0, n - 1, (DeviceShare(device.node_id, 1.0),)),)
            pc = self._valid(stages, milp.Bounds())
            if pc is not None:
                return _Candidate(stages, pc, "frugal")
        return None

    def _grow(
        self,
        cand: _Candidate,
        pool: Sequence[DeviceProfile],
        bounds: milp.Bounds,
        objective: Objective,
        until: float,
    ) -> _Candidate:
        """Add data-parallel replicas to stages one at a time, best move first, while the
        objective improves (samples re-split for speed each time). A seed that misses a
        bound takes the first move that meets them all; only a grown plan is returned valid."""
        m = self.workload.batch
        lookup = {d.node_id: d for d in self.devices}
        stages = list(cand.stages)
        best_pc = cand.pc
        best_key = milp.objective_key(objective, cand.pc)
        if not milp.meets_bounds(cand.pc, bounds):
            best_key = (math.inf, math.inf)
        grown = False
        for _ in range(MAX_GROW_STEPS):
            if time.perf_counter() > until:
                break
            used = {mm.id for s in stages for mm in s.devices}
            free = [d for d in pool if d.node_id not in used]
            options = [g[0] for g in milp.device_groups(free, self.network)]
            move: tuple[tuple[float, float], int, StagePlan, cost.PlanCost] | None = None
            for si, stage in enumerate(stages):
                if len(stage.devices) >= m:
                    continue
                members = [lookup[mm.id] for mm in stage.devices]
                for extra in options:
                    if time.perf_counter() > until:
                        break  # one step prices every stage x device: stop mid-step too
                    group = [*members, extra]
                    split = milp.balanced_split([g.gflops for g in group], m)
                    trial_stage = StagePlan(
                        stage.first,
                        stage.last,
                        tuple(
                            DeviceShare(g.node_id, k / m) for g, k in zip(group, split, strict=True)
                        ),
                    )
                    trial = [*stages[:si], trial_stage, *stages[si + 1 :]]
                    pc = self._valid(trial, bounds, objective)
                    if pc is None:
                        continue
                    key = milp.objective_key(objective, pc)
                    if key < best_key and (move is None or key < move[0]):
                        move = (key, si, trial_stage, pc)
            if move is None:
                break
            best_key, si, trial_stage, best_pc = move
            stages[si] = trial_stage
            grown = True
        if not grown:
            return cand
        return _Candidate(tuple(stages), best_pc, cand.method + "+groups")

    def _dp(
        self,
        subset: Sequence[DeviceProfile],
        bounds: milp.Bounds,
        objective: Objective,
        until: float,
        *,
        steady: bool = False,
    ) -> tuple[tuple[StagePlan, ...] | None, bool]:
        """The DP's plan on the blocks (as layer ranges) and whether it is proven optimal
        (``steady``: training priced as a pipeline in steady state, see ``dp._Problem``)."""
        started = time.perf_counter()
        pb = dp._Problem(subset, self.coarse, self.network, self.workload, steady=steady)
        dp_bounds = dp._Bounds(bounds.latency_s, bounds.bottleneck_s, bounds.energy_j)
        # The DP's own budget for its exact fallback is capped by ours.
        stages, _, exact = dp._solve(pb, objective, dp_bounds, "auto", until)
        ended = time.perf_counter()
        self.dp_seconds.append((ended - started, max(0.0, ended - until)))
        if stages is None:
            return None, exact
        return self.co.expand(dp._stage_plans(pb, stages)), exact

    def _valid(
        self,
        stages: Sequence[StagePlan],
        bounds: milp.Bounds,
        objective: Objective | None = None,
    ) -> cost.PlanCost | None:
        """The plan's cost if it is valid; for training, at the microbatch size that serves
        ``objective`` best (``PlanCost.microbatch``), else with the whole batch."""
        if objective is not None and self.workload.kind == "training":
            return milp.best_microbatch(
                stages,
                self.devices,
                self.table,
                self.network,
                self.workload,
                bounds,
                self.battery_hours,
                objective,
            )
        return milp.valid_plan(
            stages,
            self.devices,
            self.table,
            self.network,
            self.workload,
            bounds,
            self.battery_hours,
        )

    def _refine(self, cand: _Candidate, bounds: milp.Bounds, objective: Objective) -> _Candidate:
        """Move each stage boundary within a block's reach on the real layers while it helps.

        Coarsening kept only some cuts; the devices and groups stay, only the split moves. A
        microbatched training step is priced by neither search's model (the DP's steady state
        is its limit), so there cuts move even on a model the DP saw whole: anywhere on one of
        at most ``DP_FULL_LAYERS`` layers, within a block's reach on a coarsened one.
        """
        n = len(self.table.layers)
        microbatched = self.workload.kind == "training" and cand.pc.microbatches > 1
        if len(cand.stages) < 2 or (n <= MAX_BLOCKS and not microbatched):
            return cand  # nothing was coarsened, and the search's model is cost.py's
        # The widest block of either search's coarsening bounds how far a cut may be off.
        reach = max(
            max(last - first + 1 for first, last in self.co.blocks), math.ceil(n / MAX_BLOCKS) + 1
        )
        if microbatched and len(self.co.blocks) == n:
            reach = n  # the DP saw every layer (at most DP_FULL_LAYERS): every cut may move
        stages = list(cand.stages)
        best_key = milp.objective_key(objective, cand.pc)
        best_pc = cand.pc
        improved = False
        for _ in range(3):
            moved = False
            for b in range(len(stages) - 1):
                if self.left() <= 0:
                    break
                left, right = stages[b], stages[b + 1]
                lo = max(left.first, left.last - reach)
                hi = min(right.last - 1, left.last + reach)
                for cut in range(lo, hi + 1):
                    if cut == left.last:
                        continue
                    if self.left() <= 0:
                        break
                    trial = list(stages)
                    trial[b] = StagePlan(left.first, cut, left.devices)
                    trial[b + 1] = StagePlan(cut + 1, right.last, right.devices)
                    pc = self._valid(trial, bounds, objective)
                    if pc is None:
                        continue
                    key = milp.objective_key(objective, pc)
                    if key < best_key:
                        best_key, best_pc, stages = key, pc, trial
                        left, right = stages[b], stages[b + 1]
                        moved = improved = True
            if not moved:
                break
        if not improved:
            return cand
        return _Candidate(tuple(stages), best_pc, cand.method + "+refined")


def _dp_subset(pool: Sequence[DeviceProfile], objective: Objective) -> tuple[DeviceProfile, ...]:
    """Up to ``DP_MAX_DEVICES`` devices for the DP: the fastest, and for energy also the most
    frugal per GFLOP and at idle (the partitioner sees every device anyway)."""
    if len(pool) <= DP_MAX_DEVICES:
        return tuple(pool)
    fastest = sorted(pool, key=lambda d: (-d.gflops, -d.memory_bytes, d.node_id))
    if objective != "min_energy":
        return tuple(fastest[:DP_MAX_DEVICES])
    frugal = sorted(
        pool,
        key=lambda d: ((d.power_active_w - d.power_idle_w) / d.gflops, d.power_idle_w, d.node_id),
    )
    quiet = sorted(pool, key=lambda d: (d.power_idle_w, -d.gflops, d.node_id))
    chosen: dict[str, DeviceProfile] = {}
    for trio in zip(fastest, frugal, quiet, strict=True):
        for d in trio:
            if len(chosen) < DP_MAX_DEVICES:
                chosen.setdefault(d.node_id, d)
    return tuple(chosen.values())


def _plan_doramesh(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
    max_plans: int,
    time_limit_s: float | None,
) -> PlanningReport:
    started = time.perf_counter()
    network = milp.indexed(network)
    limit = DEFAULT_TIME_LIMIT_S if time_limit_s is None else time_limit_s
    deadline = started + limit * SOLVER_SHARE - 0.005
    milp_ready = "cvxpy" in sys.modules
    if not milp_ready and limit >= COLD_IMPORT_BUDGET_S:
        warm_up()
        milp_ready = True
    co = coarsen.coarsen(
        table, DP_BLOCKS if len(table.layers) > DP_FULL_LAYERS else len(table.layers)
    )
    search = _Search(
        devices=tuple(devices),
        table=table,
        network=network,
        workload=workload,
        qoe=qoe,
        deadline=deadline,
        co=co,
        coarse=coarsen.coarse_table(table, co, workload),
        milp_ready=milp_ready,
    )
    if not milp_ready:
        search.notes.append("partitioner skipped: the solver stack is not imported yet")
    objective = qoe.objective
    bounds = milp.Bounds.of(qoe, workload.batch)
    rate_period = 1.0 / workload.rate_rps if workload.rate_rps > 0 else math.inf
    capped = bounds.tightened(rate_period)

    first: _Candidate | None = None
    if (
        objective == "max_throughput"
        and math.isfinite(rate_period)
        and workload.kind == "inference"
    ):
        # An open loop delivers the request rate and no more: past it, capacity is only
        # headroom. Serve the rate with THROUGHPUT_HEADROOM x to spare at the least latency,
        # which keeps slack against the SLO and fewer devices exposed to trouble; only when no
        # plan has that headroom is throughput itself maximised.
        roomy = bounds.tightened(rate_period / THROUGHPUT_HEADROOM)
        first = search.best(devices, roomy, "min_latency", share=0.4, record=True)
        if first is not None:
            search.notes.append(
                f"serves the request rate with {THROUGHPUT_HEADROOM:g}x headroom at least latency"
            )
    if first is None:
        first = search.best(devices, capped, objective, share=0.6, record=True)
    keeps_up = first is not None
    used_bounds = capped
    if first is None and math.isfinite(rate_period):
        search.notes.append("no single plan keeps up with the request rate: the set shares it")
        first = search.best(devices, bounds, objective, share=0.6, record=True)
        used_bounds = bounds
    if first is None:
        raise _explain(search, bounds)
    if objective == "min_energy":
        first = _slower_modes(search, first, used_bounds)

    found = _disjoint_plans(search, first, used_bounds, bounds, objective, max_plans)
    if (objective == "max_throughput" or not keeps_up) and workload.kind == "inference":
        # Serving more requests than one pipeline can: several small plans side by side may
        # beat one big pipeline and its leftovers (no transfers, no pipeline bubbles).
        replicas = _replicated_plans(search, bounds, objective, max_plans)
        if replicas and _capacity(replicas) > _capacity(found) * (1 + 1e-9):
            found = replicas
    # The best plans for the other objectives, when they add something.
    for other in _OBJECTIVES:
        if len(found) >= max_plans or not search.affords_search() or other == objective:
            continue
        alt = search.best(devices, bounds, other, share=0.5, use_milp=False)
        if alt is not None and all(alt.stages != c.stages for c in found):
            found.append(alt)
    found = _non_dominated(found)

    plans = [
        milp.make_plan(
            c.stages, devices, table, network, workload, microbatch=c.pc.microbatch or None
        )
        for c in found
    ]
    methods = {p.plan_id: c.method for p, c in zip(plans, found, strict=True)}
    plans = _dedupe(plans)
    mix = _mix(plans, workload, objective)
    plans = _schedule(plans, mix, devices, table, network, workload, qoe)
    mix = _mix(plans, workload, objective, live={k for k, v in mix.items() if v > 0})
    seconds = time.perf_counter() - started
    report = PlanningReport(
        plan_set=PlanSet(plans=tuple(plans), mix=mix),
        seconds=seconds,
        time_limit_s=limit,
        coarsening=co.describe(),
        methods=methods,
        milp_status=search.milp_status,
        milp_gap=search.milp_gap,
        dp_exact=search.dp_exact,
        keeps_up=keeps_up,
        notes=tuple(search.notes),
    )
    _log.info(
        "planned",
        objective=objective,
        plans=len(plans),
        methods=list(methods.values()),
        milp_status=report.milp_status,
        milp_gap=report.milp_gap,
        coarsening=report.coarsening,
        seconds=round(seconds, 3),
    )
    return report


def _mode_assignments(devices: Sequence[DeviceProfile]) -> list[dict[str, str]]:
    """Power-mode assignments to search whole-fleet, each ``{node_id: mode}`` with the top mode
    left out: every one when there are at most ``MODE_ASSIGNMENTS_LIMIT``, else each lower mode
    rank for the whole fleet and for each device class alone (devices of a class usually sit
    on the same side of the energy trade-off)."""
    switchable = [d for d in devices if len(d.power_modes) > 1]
    if not switchable:
        return []
    choices = [[""] + [m.name for m in d.power_modes[1:]] for d in switchable]
    if math.prod(len(c) for c in choices) <= MODE_ASSIGNMENTS_LIMIT:
        return [
            {d.node_id: mode for d, mode in zip(switchable, combo, strict=True) if mode}
            for combo in itertools.product(*choices)
            if any(combo)
        ]
    out: list[dict[str, str]] = []
    classes = sorted({d.device_class for d in switchable})
    for rank in range(1, max(len(c) for c in choices)):
        for only in (None, *classes):
            assignment: dict[str, str] = {
                d.node_id: d.power_modes[min(rank, len(d.power_modes) - 1)].name
                for d in switchable
                if only is None or d.device_class == only
            }
            if assignment not in out:
                out.append(assignment)
    return out[:MODE_ASSIGNMENTS_LIMIT]


def _in_modes(stages: Sequence[StagePlan], assignment: Mapping[str, str]) -> tuple[StagePlan, ...]:
    """``stages`` with every device share naming the device's mode in ``assignment``."""
    return tuple(
        StagePlan(
            s.first,
            s.last,
            tuple(replace(m, mode=assignment.get(m.id, "")) for m in s.devices),
        )
        for s in stages
    )


def _slower_modes(search: _Search, first: _Candidate, bounds: milp.Bounds) -> _Candidate:
    """The least-energy plan over power modes (``min_energy``): a device in a lower mode is a
    slower, more frugal variant of itself, so the search reruns on fleets of such variants (one
    mode per device, ``_mode_assignments``), each with a share of the time left; then the best
    plan's own devices get the modes that serve it best, every combination priced by the cost
    model (``MODE_COMBOS_LIMIT``; one device at a time past it). Exact on small fleets (every
    assignment searched), a heuristic on large ones."""
    assignments = _mode_assignments(search.devices)
    if not assignments:
        return first
    found = [first]
    for k, assignment in enumerate(assignments):
        if search.left() <= MODE_MIN_SECONDS or not search.affords_search():
            search.notes.append(
                f"power modes: {k} of {len(assignments)} assignments searched in the time limit"
            )
            break
        fleet = tuple(d.in_mode(assignment.get(d.node_id, "")) for d in search.devices)
        variant = replace(search, devices=fleet, notes=[])
        share = MODE_SEARCH_SHARE / (len(assignments) - k)
        cand = variant.best(fleet, bounds, "min_energy", share=share)
        if cand is None:
            continue
        stages = _in_modes(cand.stages, assignment)
        pc = search._valid(stages, bounds, "min_energy")
        if pc is not None:
            found.append(_Candidate(stages, pc, cand.method + "+modes"))
    best = min(found, key=lambda c: milp.objective_key("min_energy", c.pc))
    return _best_modes(search, best, bounds)


def _best_modes(search: _Search, cand: _Candidate, bounds: milp.Bounds) -> _Candidate:
    """``cand``'s devices and split with each device's power mode chosen for least energy."""
    lookup = {d.node_id: d for d in search.devices}
    used = [
        lookup[i]
        for i in dict.fromkeys(m.id for s in cand.stages for m in s.devices)
        if len(lookup[i].power_modes) > 1
    ]
    if not used:
        return cand
    choices = [[""] + [m.name for m in d.power_modes[1:]] for d in used]
    current = {m.id: m.mode for s in cand.stages for m in s.devices if m.mode}
    best_key = milp.objective_key("min_energy", cand.pc)
    best = cand

    def offer(assignment: Mapping[str, str]) -> bool:
        nonlocal best, best_key
        stages = _in_modes(cand.stages, assignment)
        pc = search._valid(stages, bounds, "min_energy")
        if pc is None:
            return False
        key = milp.objective_key("min_energy", pc)
        if key < best_key:
            best_key, best = key, _Candidate(stages, pc, cand.method.split("+modes")[0] + "+modes")
            return True
        return False

    if math.prod(len(c) for c in choices) <= MODE_COMBOS_LIMIT:
        for combo in itertools.product(*choices):
            if search.left() <= 0:
                break
            offer({d.node_id: mode for d, mode in zip(used, combo, strict=True) if mode})
        return best
    for _ in range(3):  # one device at a time, while it helps
        moved = False
        for d, options in zip(used, choices, strict=True):
            for mode in options:
                if search.left() <= 0:
                    return best
                trial = {**current, d.node_id: mode}
                if offer({k: v for k, v in trial.items() if v}):
                    current, moved = trial, True
        if not moved:
            break
    return best


def _disjoint_plans(
    search: _Search,
    first: _Candidate,
    bounds: milp.Bounds,
    fallback: milp.Bounds,
    objective: Objective,
    max_plans: int,
) -> list[_Candidate]:
    """The first plan, then the best plans on devices no earlier plan uses."""
    found = [first]
    used = {m.id for s in first.stages for m in s.devices}
    while len(found) < max_plans and search.affords_search():
        remaining = [d for d in search.devices if d.node_id not in used]
        if not remaining:
            break
        share = 1.0 / (max_plans - len(found) + 1)
        extra = search.best(remaining, bounds, objective, share=share)
        if extra is None and fallback is not bounds and search.affords_search():
            extra = search.best(remaining, fallback, objective, share=share)
        if extra is None:
            break
        found.append(extra)
        used.update(m.id for s in extra.stages for m in s.devices)
    return found


def _replicated_plans(
    search: _Search, bounds: milp.Bounds, objective: Objective, max_plans: int
) -> list[_Candidate]:
    """Whole-model replicas on the devices that can each run it alone (fastest first), then
    one plan over the devices left, if any. ``bounds`` are the QoE's own: a replica serves
    part of the load, so it need not keep up with the whole request rate."""
    n = len(search.table.layers)
    singles: list[_Candidate] = []
    for d in search.devices:
        stages = (StagePlan(0, n - 1, (DeviceShare(d.node_id, 1.0),)),)
        pc = search._valid(stages, bounds)
        if pc is not None:
            singles.append(_Candidate(stages, pc, "replica"))
    singles.sort(key=lambda c: (c.pc.bottleneck_s, c.pc.latency_s))
    found = singles[:max_plans]
    if not found:
        return []
    used = {m.id for c in found for s in c.stages for m in s.devices}
    remaining = [d for d in search.devices if d.node_id not in used]
    if len(found) < max_plans and remaining and search.affords_search():
        extra = search.best(remaining, bounds, objective, share=0.5)
        if extra is not None:
            found.append(extra)
    return found


def _capacity(found: Sequence[_Candidate]) -> float:
    """Samples per second the runnable (pairwise disjoint, in order) plans serve together."""
    busy: set[str] = set()
    total = 0.0
    for c in found:
        ids = {m.id for s in c.stages for m in s.devices}
        if ids & busy:
            continue
        busy |= ids
        total += c.pc.throughput_sps
    return total


def _dominates(a: cost.PlanCost, b: cost.PlanCost) -> bool:
    better_or_equal = (
        a.latency_s <= b.latency_s and a.bottleneck_s <= b.bottleneck_s and a.energy_j <= b.energy_j
    )
    strictly = (
        a.latency_s < b.latency_s or a.bottleneck_s < b.bottleneck_s or a.energy_j < b.energy_j
    )
    return better_or_equal and strictly


def _non_dominated(found: list[_Candidate]) -> list[_Candidate]:
    """Drop a plan another one dominates *and* shares a device with; the first plan stays."""
    kept = [found[0]]
    for c in found[1:]:
        mine = {m.id for s in c.stages for m in s.devices}
        beaten = any(
            _dominates(o.pc, c.pc) and mine & {m.id for s in o.stages for m in s.devices}
            for o in found
            if o is not c
        )
        if not beaten:
            kept.append(c)
    return kept


def _dedupe(plans: list[Plan]) -> list[Plan]:
    seen: set[PlanId] = set()
    out = []
    for p in plans:
        if p.plan_id not in seen:
            seen.add(p.plan_id)
            out.append(p)
    return out


def _mix(
    plans: Sequence[Plan],
    workload: Workload,
    objective: Objective,
    *,
    live: set[PlanId] | None = None,
) -> dict[PlanId, float]:
    """Share of the requests each plan serves.

    Only plans on disjoint devices run at once; the first plan always runs, and for training
    it runs alone. With a request rate the first plan serves it alone when it can; otherwise
    the fewest plans (in order) that serve it at ``MIX_UTILISATION`` share it in proportion to
    their throughput (all of them, when even that is not enough). Without one,
    ``max_throughput`` runs every such plan flat out (shares in proportion to throughput) and
    the other objectives run the first plan alone.
    """
    runnable: list[Plan] = []
    busy: set[str] = set()
    for p in plans:
        ids = set(p.device_ids)
        if live is not None and p.plan_id not in live:
            continue
        if ids & busy:
            continue
        runnable.append(p)
        busy |= ids
    mix = {p.plan_id: 0.0 for p in plans}
    if not runnable:
        return mix
    if workload.kind == "training":
        # Plans side by side would train separate copies of the weights: one plan trains, the
        # others are alternatives (its data-parallel groups are where replicas belong).
        mix[runnable[0].plan_id] = 1.0
        return mix
    demand = workload.rate_rps * workload.batch  # samples per second
    if demand > 0:
        capacity = [p.predicted.throughput_sps for p in runnable]
        if capacity[0] >= demand:
            mix[runnable[0].plan_id] = 1.0  # the first plan keeps up alone
            return mix
        # Share the load over as few plans as leave each some headroom, at equal utilisation:
        # a plan run at its limit by an irregular share of the arrivals builds a queue.
        count = len(runnable)
        for k in range(1, len(runnable) + 1):
            if sum(capacity[:k]) * MIX_UTILISATION >= demand:
                count = k
                break
        total = sum(capacity[:count])
        for p, cap in zip(runnable[:count], capacity[:count], strict=True):
            mix[p.plan_id] = cap / total
        return mix
    if objective == "max_throughput":
        total = sum(p.predicted.throughput_sps for p in runnable)
        for p in runnable:
            mix[p.plan_id] = p.predicted.throughput_sps / total
        return mix
    mix[runnable[0].plan_id] = 1.0
    return mix


def _schedule(
    plans: list[Plan],
    mix: Mapping[PlanId, float],
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
) -> list[Plan]:
    """Token buckets for every flow: the plans live together are scheduled together, the
    others (alternatives the adapter may switch to) each on their own."""
    live = [p for p in plans if mix.get(p.plan_id, 0.0) > 0]
    scheduled: dict[PlanId, Plan] = {}
    if live:
        for p in netsched.schedule(live, devices, table, network, workload, qoe):
            scheduled[p.plan_id] = p
    for p in plans:
        if p.plan_id not in scheduled:
            (alone,) = netsched.schedule([p], devices, table, network, workload, qoe)
            scheduled[p.plan_id] = alone
    return [scheduled[p.plan_id] for p in plans]


# ---------------------------------------------------------------------------------------------
# Explanations


def _explain(search: _Search, bounds: milp.Bounds) -> QoEUnreachable:
    """Why no plan exists: memory, or which QoE bound binds, by how much, and the closest plan.

    Uses whatever time is left (the dynamic program alone when little is).
    """
    qoe = search.qoe
    devices = search.devices
    relaxed = milp.Bounds()
    any_plan = search.best(devices, relaxed, "min_latency", share=0.3, use_milp=False)
    if any_plan is None:
        any_plan = search.best(devices, relaxed, "min_latency", share=0.5)
    if any_plan is None:
        return QoEUnreachable(_explain_memory(search))

    checks: list[tuple[Objective, str, float]] = []
    if qoe.latency_ms:
        checks.append(("min_latency", "latency_ms", qoe.latency_ms))
    if qoe.min_throughput_sps:
        checks.append(("max_throughput", "min_throughput_sps", qoe.min_throughput_sps))
    if qoe.energy_j_per_sample:
        checks.append(("min_energy", "energy_j_per_sample", qoe.energy_j_per_sample))
    candidates = [any_plan]
    reasons: list[str] = []
    alone: list[str] = []
    for objective, name, bound in checks:
        best = search.best(devices, relaxed, objective, share=0.5, use_milp=search.left() > 1.0)
        if best is None:
            continue
        candidates.append(best)
        value = _figure(best.pc, name)
        on = ",".join(dict.fromkeys(m.id for s in best.stages for m in s.devices))
        missed = _violation(best.pc, name, bound)
        verb = "best plan needs" if name == "energy_j_per_sample" else "best plan reaches"
        text = f"{verb} {_fmt(name, value)} on {on}"
        if missed > 0:
            reasons.append(
                f"qoe.{name} {bound:g} cannot be met: {text} "
                f"({_fmt(name, abs(value - bound))} or {missed:.1%} "
                f"{'short' if name == 'min_throughput_sps' else 'over'})"
            )
        else:
            alone.append(f"qoe.{name} {bound:g} alone is met ({text})")
    closest = min(candidates, key=lambda c: _worst_violation(c.pc, checks))
    plan = milp.make_plan(closest.stages, devices, search.table, search.network, search.workload)
    p = plan.predicted
    layout = " | ".join(
        f"layers {s.first}-{s.last} on {','.join(m.id for m in s.devices)}" for s in plan.stages
    )
    closest_text = (
        f"closest plan {plan.plan_id} ({layout}): latency {p.latency_ms:.1f} ms, "
        f"throughput {p.throughput_sps:.3g} samples/s, energy {p.energy_j_per_sample:.4g} J/sample"
    )
    if reasons:
        message = "; ".join(reasons) + "; " + closest_text
    elif alone:
        message = (
            "the QoE bounds cannot all be met by one plan: "
            + "; ".join(alone)
            + "; "
            + closest_text
        )
    else:
        message = "no plan meets the QoE (memory or battery budgets bind); " + closest_text
    return QoEUnreachable(message, closest=plan)


def _figure(pc: cost.PlanCost, name: str) -> float:
    if name == "latency_ms":
        return pc.latency_s * 1e3
    if name == "min_throughput_sps":
        return pc.throughput_sps
    return pc.energy_j_per_sample


def _violation(pc: cost.PlanCost, name: str, bound: float) -> float:
    """Relative miss of one bound (0 when met)."""
    value = _figure(pc, name)
    if name == "min_throughput_sps":
        return max(0.0, (bound - value) / bound)
    return max(0.0, (value - bound) / bound)


def _worst_violation(pc: cost.PlanCost, checks: Sequence[tuple[Objective, str, float]]) -> float:
    return max((_violation(pc, name, bound) for _, name, bound in checks), default=0.0)


def _fmt(name: str, value: float) -> str:
    if name == "latency_ms":
        return f"{value:.1f} ms"
    if name == "min_throughput_sps":
        return f"{value:.3g} samples/s"
    return f"{value:.4g} J/sample"


def _explain_memory(search: _Search) -> str:
    table = search.table
    n = len(table.layers)
    need = cost.stage_memory_bytes(
        table, 0, n - 1, samples=search.workload.batch, kind=search.workload.kind
    )
    params = sum(layer.param_bytes for layer in table.layers)
    largest = max(search.devices, key=lambda d: d.memory_bytes)
    total = sum(d.memory_bytes for d in search.devices)
    text = (
        f"memory: the model needs {_fmt_bytes(need)} on one device (parameters "
        f"{_fmt_bytes(params)}); the largest device ({largest.node_id}) has "
        f"{_fmt_bytes(largest.memory_bytes)} and the fleet's total is {_fmt_bytes(total)}"
    )
    singles = [
        cost.stage_memory_bytes(table, i, i, samples=1, kind=search.workload.kind) for i in range(n)
    ]
    worst = max(range(n), key=lambda i: singles[i])
    if singles[worst] > largest.memory_bytes:
        layer = table.layers[worst]
        return text + f"; layer {worst} ({layer.name}) alone needs {_fmt_bytes(singles[worst])}"
    if search.network.kind == "links" and not search.network.links:
        return text + "; and no two devices are linked"
    return text + "; no split into contiguous stages fits"


def _fmt_bytes(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"


# ---------------------------------------------------------------------------------------------
# Validation


def validate(
    devices: Sequence[DeviceProfile],
    table: LayerTable,
    network: Network,
    workload: Workload,
    qoe: QoESpec,
) -> None:
    """Reject inputs the cost model cannot price, naming the field (and device or layer)."""
    if not table.layers:
        raise InvalidArgument(f"model {table.model!r}: the layer table is empty")
    _non_negative_int(table.input_bytes, "model.input_bytes")
    for index, layer in enumerate(table.layers):
        where = f"model.layers[{index}] ({layer.name})"
        _non_negative(layer.gflops, f"{where}.gflops")
        _non_negative(layer.gflops_bwd, f"{where}.gflops_bwd")
        _non_negative_int(layer.param_bytes, f"{where}.param_bytes")
        _non_negative_int(layer.activation_bytes, f"{where}.activation_bytes")
        _non_negative_int(layer.workspace_bytes, f"{where}.workspace_bytes")

    if workload.kind not in ("inference", "training"):
        raise InvalidArgument(
            f"workload.kind must be 'inference' or 'training', got {workload.kind!r}"
        )
    if not isinstance(workload.batch, int) or workload.batch < 1:
        raise InvalidArgument(f"workload.batch must be a positive integer, got {workload.batch}")
    _non_negative(workload.rate_rps, "workload.rate_rps")

    if qoe.objective not in _OBJECTIVES:
        raise InvalidArgument(
            f"qoe.objective must be one of {', '.join(_OBJECTIVES)}, got {qoe.objective!r}"
        )
    for name in ("latency_ms", "min_throughput_sps", "energy_j_per_sample"):
        value = getattr(qoe, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InvalidArgument(f"qoe.{name} must be positive when set, got {value}")

    if not devices:
        raise FailedPrecondition("no devices to plan on: the fleet is empty")
    seen: set[str] = set()
    for device in devices:
        name = device.node_id
        if not name:
            raise InvalidArgument("device.node_id must not be empty")
        if name in seen:
            raise InvalidArgument(f"device {name}: node_id appears twice")
        seen.add(name)
        _positive(device.gflops, f"device {name}: gflops")
        if not isinstance(device.memory_bytes, int) or device.memory_bytes <= 0:
            raise InvalidArgument(
                f"device {name}: memory_bytes must be positive, got {device.memory_bytes}"
            )
        _non_negative(device.power_idle_w, f"device {name}: power_idle_w")
        _non_negative(device.power_active_w, f"device {name}: power_active_w")
        _non_negative(device.power_tx_w, f"device {name}: power_tx_w")
        _non_negative(device.battery_wh, f"device {name}: battery_wh")
        _check_modes(device)

    if network.kind == "shared":
        _positive(network.bandwidth_mbps, "network.bandwidth_mbps")
        _non_negative(network.latency_ms, "network.latency_ms")
    elif network.kind == "links":
        for index, link in enumerate(network.links):
            where = f"network.links[{index}] ({link.a}-{link.b})"
            for end in (link.a, link.b):
                if end not in seen:
                    raise InvalidArgument(f"{where}: unknown device {end!r}")
            if link.a == link.b:
                raise InvalidArgument(f"{where}: a link joins two different devices")
            _positive(link.bandwidth_mbps, f"{where}.bandwidth_mbps")
            _non_negative(link.latency_ms, f"{where}.latency_ms")
    else:
        raise InvalidArgument(f"network.kind must be 'shared' or 'links', got {network.kind!r}")


def _check_modes(device: DeviceProfile) -> None:
    """Power modes: named once each, the first the top one (the profile's own figures), every
    other no faster than it."""
    if not device.power_modes:
        return
    where = f"device {device.node_id}: power_modes"
    top = device.power_modes[0]
    if top.speed_factor != 1.0 or top.power_active_w != device.power_active_w:
        raise InvalidArgument(
            f"{where}[0] must be the top mode (speed_factor 1, power_active_w "
            f"{device.power_active_w:g}), got {top.speed_factor:g} at {top.power_active_w:g} W"
        )
    names: set[str] = set()
    for index, mode in enumerate(device.power_modes):
        if not mode.name or mode.name in names:
            raise InvalidArgument(f"{where}[{index}]: name must be non-empty and unique")
        names.add(mode.name)
        if not (math.isfinite(mode.speed_factor) and 0 < mode.speed_factor <= 1):
            raise InvalidArgument(
                f"{where}[{index}] ({mode.name}): speed_factor must be in (0, 1], "
                f"got {mode.speed_factor}"
            )
        _non_negative(mode.power_active_w, f"{where}[{index}] ({mode.name}).power_active_w")


def _positive(value: float, field: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgument(f"{field} must be positive, got {value}")


def _non_negative(value: float, field: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise InvalidArgument(f"{field} must be zero or positive, got {value}")


def _non_negative_int(value: int, field: str) -> None:
    if not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{field} must be a non-negative integer, got {value}")


__all__ = [
    "BASELINE_NAMES",
    "DEFAULT_MAX_PLANS",
    "DEFAULT_PLANNER",
    "DEFAULT_TIME_LIMIT_S",
    "PLANNERS",
    "PlannerFn",
    "PlanningReport",
    "QoEUnreachable",
    "known_planners",
    "plan",
    "plan_detailed",
    "validate",
    "warm_up",
]
