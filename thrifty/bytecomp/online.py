"""``GradientSync(model, compressor=..., plan="bytecomp")``: profile, decide, switch.

1. While profiling, the model trains with one uncompressed whole-model group:
   nothing is sent during backward, so the recorded ready times are clean.
2. After ``warmup`` iterations rank 0 builds a :class:`~thrifty.sync.profile.Profile`
   (median ready times, the compressors' measured cost on this machine), takes
   the given :class:`~thrifty.comm.Topology` or fits one in place (a few timed
   collectives on the world, and on the node groups when there are several
   nodes), and runs :func:`~thrifty.bytecomp.decide`.
3. Rank 0 broadcasts the plan; every rank switches to it (error feedback starts
   fresh: nothing was compressed before).

With both ``profile`` and ``topology`` given, the decision is made at once,
deterministically, on every rank, and no warm-up is needed.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from thrifty.bytecomp.decide import Decision, decide
from thrifty.bytecomp.tree import Constraints
from thrifty.comm import Topology
from thrifty.comm.calibration import CALIBRATION_SIZES, measure_topology
from thrifty.sync import GradientSync, Plan, Strategy
from thrifty.sync.profile import Profile, profile_from_ready_times

__all__ = ["ByteComp", "ByteCompTuner", "fit_topology", "spare_cores"]

log = logging.getLogger(__name__)


@dataclass
class ByteComp:
    """The ``plan=`` argument of GradientSync that runs ByteComp's decision.

    Args:
        topology: nodes, ranks per node and network models; None fits one in place.
        profile: a profile of this model (:func:`thrifty.sync.profile.profile_model`);
            None measures one during the first ``warmup`` iterations.
        warmup: iterations with the uncompressed whole-model plan before deciding.
        constraints: passed to :func:`decide`; None allows CPU offload only when
            this machine has a spare core for every rank on it (:func:`spare_cores`).
        bucket_bytes, offload_end: passed to :func:`decide`.
    """

    topology: Topology | None = None
    profile: Profile | None = None
    warmup: int = 3
    constraints: Constraints | None = None
    bucket_bytes: int | str = "auto"
    offload_end: str = "output"
    decisions: list[Decision] = field(default_factory=list, repr=False)
    tuners: list[ByteCompTuner] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {self.warmup}")
        # decide() checks these too, but only after the warm-up iterations: fail now.
        if self.bucket_bytes != "auto" and (
            isinstance(self.bucket_bytes, bool)
            or not isinstance(self.bucket_bytes, int)
            or self.bucket_bytes < 0
        ):
            raise ValueError(
                f"bucket_bytes must be 'auto' or a byte count >= 0, got {self.bucket_bytes!r}"
            )
        if self.offload_end not in ("output", "input"):
            raise ValueError(f"offload_end must be 'output' or 'input', got {self.offload_end!r}")

    def decide(
        self, profile: Profile, strategy: Strategy, topology: Topology, ranks_here: int = 1
    ) -> Decision:
        constraints = self.constraints or Constraints(offload=spare_cores(ranks_here))
        decision = decide(
            profile,
            strategy,
            topology,
            constraints=constraints,
            bucket_bytes=self.bucket_bytes,
            offload_end=self.offload_end,
        )
        self.decisions.append(decision)
        return decision

    def __call__(self, sync: GradientSync, strategy: Strategy) -> Plan:
        if strategy.compressor is None:
            raise ValueError(
                "plan='bytecomp' chooses where and how to compress: give it a compressor, "
                "e.g. GradientSync(model, compressor='randomk', plan='bytecomp', ratio=0.01)"
            )
        # A profile or topology measured on another world size would give a plan
        # decided for other collectives' costs, silently. (A profile of 1 rank is
        # one taken without communication; decide() accepts it for any size.)
        n = sync.world_size
        profile_ranks = self.profile.world_size if self.profile is not None else None
        topology_ranks = self.topology.world_size if self.topology is not None else None
        if profile_ranks not in (None, 1, n) or topology_ranks not in (None, n):
            given = [
                f"a {what} of {ranks} ranks"
                for what, ranks in (("profile", profile_ranks), ("topology", topology_ranks))
                if ranks is not None
            ]
            raise ValueError(
                f"ByteComp was given {' and '.join(given)}, this job has {n}: profile and fit "
                "the topology on the job's own world size (or leave them None to measure "
                "them in place)"
            )
        if self.profile is not None and self.topology is not None:
            return self.decide(self.profile, strategy, self.topology, sync.ranks_per_node).plan
        tuner = ByteCompTuner(sync, strategy, self)
        self.tuners.append(tuner)
        sync.iteration_callbacks.append(tuner)
        return Plan.whole_model(sync.backward_order, Strategy())


class ByteCompTuner:
    """Collects ready times during warm-up, then decides and switches the plan."""

    def __init__(self, sync: GradientSync, strategy: Strategy, config: ByteComp) -> None:
        self.sync, self.strategy, self.config = sync, strategy, config
        self.decision: Decision | None = None
        self.search_seconds = 0.0
        self._ready: dict[str, list[float]] = {}
        self._start = sync.iterations  # warm-up counts from here (a restarted decision)

    def state_dict(self) -> dict[str, Any]:
        """The decision in plain values, so that a resumed job does not profile again."""
        d = self.decision
        if d is None:
            return {"decision": None, "search_seconds": self.search_seconds}
        decision = {
            "plan": d.plan.to_dict(),
            "predicted": d.predicted,
            "baseline": d.baseline,
            "bucket_bytes": d.bucket_bytes,
            "evaluations": d.evaluations,
        }
        return {"decision": decision, "search_seconds": self.search_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: a decision stays made; one not made yet starts its warm-up again."""
        saved = state["decision"]
        if saved is None:
            self._ready = {}
            self._start = self.sync.iterations
            if self not in self.sync.iteration_callbacks:
                self.sync.iteration_callbacks.append(self)
            self.sync.set_plan(Plan.whole_model(self.sync.backward_order, Strategy()))
            return
        self.decision = Decision(
            Plan.from_dict(saved["plan"]),
            float(saved["predicted"]),
            float(saved["baseline"]),
            int(saved["bucket_bytes"]),
            int(saved["evaluations"]),
        )
        self.search_seconds = float(state["search_seconds"])
        if self in self.sync.iteration_callbacks:
            self.sync.iteration_callbacks.remove(self)

    @property
    def chosen(self) -> Decision | None:  # the benchmark's "search finished" flag
        return self.decision

    def __call__(self, sync: GradientSync) -> None:
        for name, t in sync.ready_times.items():
            self._ready.setdefault(name, []).append(t)
        if sync.iterations - self._start < self.config.warmup:
            return
        started = time.perf_counter()
        topology = self.config.topology or fit_topology(sync)
        plan_dict = [None]
        if sync.rank == 0:
            decision = self.config.decide(
                self._profile(), self.strategy, topology, sync.ranks_per_node
            )
            self.decision = decision
            plan_dict = [decision.plan.to_dict()]
        dist.broadcast_object_list(plan_dict, src=_global(sync, 0), group=sync.group)
        plan = Plan.from_dict(plan_dict[0])  # type: ignore[arg-type]
        sync.iteration_callbacks.remove(self)
        sync.set_plan(plan)
        if self.decision is None:  # other ranks: same plan, no prediction of their own
            self.decision = Decision(plan, float("nan"), float("nan"), -1, 0)
        self.search_seconds = time.perf_counter() - started
        log.info("ByteComp switched to %s after %.2fs", plan.describe()[:200], self.search_seconds)

    def _profile(self) -> Profile:
        named = dict(self.sync.model.named_parameters())
        params = {name: named[name] for name in self.sync.backward_order}
        bases = [self.strategy]
        if self.config.constraints is not None:
            bases += [Strategy.make(name) for name in self.config.constraints.extra]
        return profile_from_ready_times(params, self._ready, bases, self.sync.world_size)


def spare_cores(ranks_here: int) -> bool:
    """Whether this machine has a core to spare for each of its ``ranks_here`` ranks.

    The timeline runs offloaded (de)compression on a CPU lane in parallel with
    backward. That holds on a GPU machine (backward runs on the GPU) or with
    idle cores; with every core already running a rank's backward (e.g. 4 ranks
    on 2 cores) the lane does not exist, and offloading only moves the work.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) >= 2 * max(ranks_here, 1)


def _global(sync: GradientSync, rank: int) -> int:
    return dist.get_global_rank(sync.group, rank) if sync.group is not None else rank


def fit_topology(sync: GradientSync) -> Topology:
    """Time a few collectives now (every rank calls this) and fit the topology's models.

    Three reps of each primitive at each of :data:`CALIBRATION_SIZES` (and in
    the node groups when there are several nodes): a few dozen collectives,
    paid once before deciding, on the group the plan will run on.
    """
    return measure_topology(
        CALIBRATION_SIZES, budget_s=0.0, ranks_per_node=sync.ranks_per_node, group=sync.group
    )
