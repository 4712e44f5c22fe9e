"""Calibration: time real collectives here and fit the network models that price them.

The timelines of MergeComp and ByteComp ask a :class:`~thrifty.comm.network.NetworkModel`
(or a :class:`~thrifty.comm.topology.Topology` of them) what a collective costs. This
module is the one place that measures those models on the current process group(s):
planners fit one in place before they decide, and ``thrifty bench collectives`` and the
emulated cluster (:mod:`thrifty.bench.cluster`) write the same measurements to disk.

Every function that communicates must be called on every rank of the group, with the
same arguments; every rank then gets the same timings and the same fitted models, so
the decisions taken from them agree without a broadcast.

Message size follows nccl-tests: the tensor for all-reduce, the gathered result for
all-gather, one rank's whole send buffer for all-to-all.

Example::

    network = fit_network("in-place", ["all_reduce"], [64 << 10, 4 << 20])
    topology = measure_topology(ranks_per_node=2)  # flat, intra-node, inter-node models
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from thrifty.comm import collectives
from thrifty.comm.network import LARGE_MESSAGE, PRIMITIVES, Measurement, NetworkModel
from thrifty.comm.topology import Topology, split_groups

__all__ = [
    "CALIBRATION_SIZES",
    "TOPOLOGY_SIZES",
    "CollectiveTiming",
    "TopologyCalibration",
    "calibrate_topology",
    "compute_load",
    "fit_network",
    "fit_report",
    "fit_timings",
    "measure_topology",
    "time_collectives",
]

# A quick in-place fit: two sizes on each side of the 1 MB bandwidth threshold.
CALIBRATION_SIZES = (16 << 10, 256 << 10, 2 << 20, 8 << 20)
TOPOLOGY_SIZES = tuple(16384 * 4**i for i in range(6))  # 16 KB ... 16 MB
_WARMUP_UP_TO = 4 << 20  # bytes: smaller messages run once untimed first
_MIN_REPS, _MAX_REPS = 3, 20


@dataclass(frozen=True)
class CollectiveTiming:
    """One primitive at one size: the median over reps of the slowest rank's seconds.

    The slowest rank, because a collective ends for everyone when its last rank
    is done; the median, because one rep on a shared machine can stall.
    """

    primitive: str
    world_size: int
    nbytes: int  # message size, nccl-tests convention (see comm.collectives.wire_bytes)
    seconds: float
    reps: tuple[float, ...] = ()

    @property
    def measurement(self) -> Measurement:
        """What :meth:`NetworkModel.fit` takes."""
        return Measurement(self.primitive, self.world_size, self.nbytes, self.seconds)

    def to_dict(self) -> dict[str, Any]:
        """The JSON row the benchmarks write (``reps`` as a list)."""
        return {
            "primitive": self.primitive,
            "world_size": self.world_size,
            "nbytes": self.nbytes,
            "seconds": self.seconds,
            "reps": list(self.reps),
        }

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> CollectiveTiming:
        """Read a row back; keys other than the fields (a benchmark's ``rate``) are ignored."""
        reps = tuple(row.get("reps", ()))
        return cls(row["primitive"], row["world_size"], row["nbytes"], row["seconds"], reps)


def _run_once(
    primitive: str,
    buf: torch.Tensor,
    out: torch.Tensor,
    n: int,
    group: dist.ProcessGroup | None,
) -> None:
    """One collective on ``buf``, receiving into ``out``: the network, not the allocator."""
    chunk = buf.numel() // n
    if primitive == "all_reduce":
        collectives.all_reduce(buf, group=group)
    elif primitive == "all_gather":
        collectives.all_gather(buf[:chunk], group=group, out=list(out[: chunk * n].split(chunk)))
    elif primitive == "all_to_all":
        sends = list(buf[: chunk * n].split(chunk))
        collectives.all_to_all_v(sends, group=group, recv_sizes=[chunk] * n, out=out[: chunk * n])
    else:
        raise ValueError(f"unknown primitive {primitive!r}; expected one of {PRIMITIVES}")


@contextlib.contextmanager
def compute_load() -> Iterator[None]:
    """Keep one more thread of this process busy with matrix products inside the block.

    In training a gradient's collective runs while backward computes the next
    ones on the same process. Where ranks share cores (several ranks on one
    machine, or a busy host thread feeding a GPU), the collective's own threads
    then wait for CPU time, and a network model fitted on idle cores prices
    every collective too low. Timing the calibration under this load prices it
    as training sees it.
    """
    stop = threading.Event()

    def spin() -> None:
        a = torch.randn(128, 128)
        while not stop.is_set():
            torch.mm(a, a)

    worker = threading.Thread(target=spin, name="thrifty-compute-load", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()


def time_collectives(
    primitives: Sequence[str] = PRIMITIVES,
    sizes: Sequence[int] = CALIBRATION_SIZES,
    *,
    budget_s: float = 0.0,
    group: dist.ProcessGroup | None = None,
    lockstep: dist.ProcessGroup | None = None,
    label: str = "",
    progress: bool = False,
    under_load: bool = False,
) -> list[CollectiveTiming]:
    """Time each primitive at each size in ``group`` (call on every rank of ``lockstep``).

    Each (primitive, size) runs at least 3 and at most 20 reps, more while their
    total stays under ``budget_s`` (0: just 3, the quick fit a planner can
    afford). Every rank gets the same timings.

    Args:
        group: the process group the collectives run in; None is the world.
        lockstep: the group that synchronises the reps and takes the slowest
            time, by default ``group`` itself. To time disjoint groups running at
            the same time (every node's intra group, or all cross groups sharing
            the NICs), call this on every rank with ``lockstep`` spanning them
            all: the groups then start each rep together, run the same number of
            reps, and every rank gets the same timings.
        label, progress: a tqdm bar with this label on global rank 0 (one bar
            also when several groups are timed at once).
        under_load: time every collective while this rank also computes
            (:func:`compute_load`), as in training.
    """
    unknown = [p for p in primitives if p not in PRIMITIVES]
    if unknown:
        raise ValueError(f"unknown primitives {unknown}; expected some of {PRIMITIVES}")
    n = dist.get_world_size(group)
    sync = group if lockstep is None else lockstep
    items = [(p, s) for p in primitives for s in sizes]
    show = progress and dist.get_rank() == 0
    bar = tqdm(items, desc=label, disable=not show, leave=False, file=sys.stderr)
    with compute_load() if under_load else contextlib.nullcontext():
        return _time_each(bar, n, group, sync, budget_s)


def _time_each(
    items: Iterable[tuple[str, int]],
    n: int,
    group: dist.ProcessGroup | None,
    sync: dist.ProcessGroup | None,
    budget_s: float,
) -> list[CollectiveTiming]:
    out = []
    for primitive, nbytes in items:
        buf = torch.ones(max(n, nbytes // 4), dtype=torch.float32)
        recv = torch.empty_like(buf)
        if nbytes <= _WARMUP_UP_TO:
            _run_once(primitive, buf, recv, n, group)  # warm-up: connections, allocator
        reps: list[float] = []
        # Decide on the all-reduced times, never a local clock: every rank must
        # run the same number of reps or the collectives mismatch.
        while len(reps) < _MIN_REPS or (sum(reps) < budget_s and len(reps) < _MAX_REPS):
            dist.barrier(group=sync)
            start = time.perf_counter()
            _run_once(primitive, buf, recv, n, group)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=sync)
            reps.append(elapsed.item())
        seconds = statistics.median(reps)
        out.append(CollectiveTiming(primitive, n, nbytes, seconds, tuple(reps)))
    return out


def fit_timings(name: str, timings: Iterable[CollectiveTiming]) -> NetworkModel:
    """One alpha-beta fit per (primitive, world size) in ``timings``; no communication."""
    return NetworkModel.fit(name, [t.measurement for t in timings])


def fit_network(
    name: str,
    primitives: Sequence[str] = PRIMITIVES,
    sizes: Sequence[int] = CALIBRATION_SIZES,
    *,
    budget_s: float = 0.0,
    group: dist.ProcessGroup | None = None,
    label: str = "",
    progress: bool = False,
) -> NetworkModel:
    """Time ``primitives`` at ``sizes`` in ``group`` and fit a model called ``name``.

    Call on every rank of ``group``: all of them get the same model, so
    planners that decide from it agree without exchanging it.
    """
    timings = time_collectives(
        primitives, sizes, budget_s=budget_s, group=group, label=label, progress=progress
    )
    return fit_timings(name, timings)


def fit_report(model: NetworkModel, timings: Sequence[CollectiveTiming]) -> dict[str, float | None]:
    """Relative errors of the fit: all sizes, and sizes >= 1 MB (the accuracy target).

    Small messages are dominated by a noisy synchronisation floor; what the
    timelines need right is the time of the large payloads.
    """
    measurements = [t.measurement for t in timings]
    errors = model.relative_errors(measurements)
    large = [abs(e) for m, e in zip(measurements, errors, strict=True) if m.nbytes >= LARGE_MESSAGE]
    return {
        "max_abs_rel_error": max(abs(e) for e in errors),
        "max_abs_rel_error_ge_1MB": max(large) if large else None,
        "median_abs_rel_error_ge_1MB": statistics.median(large) if large else None,
    }


@dataclass(frozen=True)
class TopologyCalibration:
    """A measured :class:`Topology` and the timings each of its models was fitted on."""

    topology: Topology
    timings: dict[str, list[CollectiveTiming]]  # "flat", and "intra", "inter" when measured

    def models(self) -> dict[str, NetworkModel]:
        """The fitted models by the name of their timings."""
        by_name = {
            "flat": self.topology.flat,
            "intra": self.topology.intra,
            "inter": self.topology.inter,
        }
        return {name: model for name, model in by_name.items() if model is not None}

    def fit_reports(self) -> dict[str, dict[str, float | None]]:
        """:func:`fit_report` of each model on its own timings."""
        models = self.models()
        return {name: fit_report(models[name], got) for name, got in self.timings.items()}


def calibrate_topology(
    sizes: Sequence[int] = TOPOLOGY_SIZES,
    *,
    budget_s: float = 0.5,
    ranks_per_node: int | None = None,
    group: dist.ProcessGroup | None = None,
    progress: bool = False,
    under_load: bool = False,
) -> TopologyCalibration:
    """:func:`measure_topology`, keeping the timings (for reports and plots)."""
    primitives = PRIMITIVES
    if group is not None and group is not dist.group.WORLD:
        # A sub-group says nothing about which of its ranks share a node.
        flat = time_collectives(
            primitives,
            sizes,
            budget_s=budget_s,
            group=group,
            label="flat",
            progress=progress,
            under_load=under_load,
        )
        n = dist.get_world_size(group)
        return TopologyCalibration(
            Topology.single_node(fit_timings("flat", flat), n), {"flat": flat}
        )
    world = dist.get_world_size()
    k = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if k < 1 or world % k:
        raise ValueError(
            f"cannot measure a topology of {world} ranks with ranks_per_node={k}: every node "
            "must hold the same number of ranks"
        )
    nodes = world // k
    shape = f"{nodes}x{k}"
    timings = {
        "flat": time_collectives(
            primitives,
            sizes,
            budget_s=budget_s,
            label=f"flat {shape}",
            progress=progress,
            under_load=under_load,
        )
    }
    if nodes > 1 and k > 1:
        groups = split_groups(k)
        everyone = dist.group.WORLD
        for name, sub in (("intra", groups.intra), ("inter", groups.cross)):
            timings[name] = time_collectives(
                primitives,
                sizes,
                budget_s=budget_s,
                group=sub,
                lockstep=everyone,
                label=f"{name} {shape}",
                progress=progress,
                under_load=under_load,
            )
    models = {name: fit_timings(name, got) for name, got in timings.items()}
    topology = Topology(nodes, k, models["flat"], models.get("intra"), models.get("inter"))
    return TopologyCalibration(topology, timings)


def measure_topology(
    sizes: Sequence[int] = TOPOLOGY_SIZES,
    *,
    budget_s: float = 0.5,
    ranks_per_node: int | None = None,
    group: dist.ProcessGroup | None = None,
    progress: bool = False,
    under_load: bool = False,
) -> Topology:
    """Fit the flat, intra-node and inter-node network models (call on every rank).

    Times all-reduce, all-gather and all-to-all at each size (a) over the
    world (``flat``), (b) in every node's group at once (``intra``), and (c) in
    all cross-node groups at once (``inter``): the ``k`` cross groups share each
    node's NIC, as the hierarchical scheme runs them, so one group timed alone
    would see a NIC to itself and under-price it. Concurrent groups start every
    rep together, so every rank fits the same models and returns an equal
    :class:`Topology`.

    ``ranks_per_node`` defaults to torchrun's ``LOCAL_WORLD_SIZE`` (else the
    world: one node). ``intra`` and ``inter`` are None on one node or with one
    rank per node. A ``group`` other than the world is timed flat only and
    described as one node. About 25 s at 1 Gbit/s on 2 x 2 ranks. ``under_load``
    times every collective while each rank also computes (:func:`compute_load`).
    """
    return calibrate_topology(
        sizes,
        budget_s=budget_s,
        ranks_per_node=ranks_per_node,
        group=group,
        progress=progress,
        under_load=under_load,
    ).topology
