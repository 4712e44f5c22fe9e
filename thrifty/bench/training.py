"""The one training-benchmark harness: wrap a configuration, time it, count its bytes.

Every end-to-end training benchmark (``thrifty compress bench``, ``thrifty
mergecomp bench``, ``thrifty bytecomp bench``) runs through this module, so
their numbers mean the same thing and their tables compare:

* a :class:`Configuration` is one way to synchronise gradients: PyTorch DDP
  fp32 (the baseline, :func:`ddp`), DDP with one of PyTorch's communication
  hooks (:func:`ddp_hook`: ``powerSGD_hook``, ``fp16_compress_hook``), or
  thrifty's GradientSync (:func:`gradient_sync`) with a built-in plan
  (``"layerwise"``, ``"whole"``), a :class:`~thrifty.sync.Plan`, or a planner
  object that a system hands over (``thrifty.mergecomp.MergeComp(...)``);
* :func:`time_configurations` (every rank of a process group) builds the model
  afresh for each configuration, lets an online planner finish its search,
  times the iterations after a warm-up (:func:`time_iterations`) and counts
  the bytes sent (:func:`wire_bytes_per_iter`, the one definition every table
  uses);
* :func:`run_training_benchmark` runs that on N local ranks at each rate, on
  plain loopback (``"loopback"``: no emulation, no root needed) or inside a
  rate-limited network namespace (``"1gbit"``: root), and returns a
  :class:`TrainingResult` that writes its JSON and plots itself.

When ``thrifty bench collectives`` has fitted a network model for a rate
(``results/collectives.json``), each rank also profiles the model locally and
the timeline predicts every GradientSync configuration: the result records
predicted beside measured.

``thrifty compress bench`` is this harness with :func:`compression_configurations`
(:func:`run_compress_benchmark`). The harness imports substrates only; a
system's benchmark (``thrifty.mergecomp.benchmark``, ``thrifty.bytecomp.benchmark``)
adds its configurations as planner objects.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powerSGD
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from thrifty.bench import netem
from thrifty.bench.launch import run_ranks
from thrifty.bench.models import MODEL_NAMES, build_model, count_parameters, training_loss
from thrifty.bench.operating_points import BATCH, operating_points
from thrifty.bench.results import (
    interrupted_by,
    note_partial,
    result_path,
    results_dir,
    write_json,
)
from thrifty.comm import NetworkModel, collectives
from thrifty.compressors import available_compressors
from thrifty.sync import GradientSync, Plan, Planner, Strategy
from thrifty.sync.profile import Profile, profile_model
from thrifty.sync.timeline import simulate

__all__ = [
    "BASELINE",
    "BATCH",
    "COMPUTE_BOUND",
    "DEFAULT_OPTIONS",
    "HOOKS",
    "LOOPBACK",
    "Configuration",
    "TrainingResult",
    "TrainingRow",
    "TrainingRun",
    "check_rates",
    "compression_configurations",
    "compute_bound",
    "count_wire_bytes",
    "ddp",
    "ddp_hook",
    "decode_objects",
    "draw_training",
    "encode_objects",
    "family_colours",
    "gradient_sync",
    "plot_training",
    "profile_training_model",
    "run_compress_benchmark",
    "run_training_benchmark",
    "time_configurations",
    "time_iterations",
    "training_loss",
    "wire_bytes_per_iter",
]

log = logging.getLogger(__name__)

LOOPBACK = "loopback"
"""The rate that means "no emulation": ranks talk over the plain loopback (no root needed)."""

# Compressor options used by the benchmarks (the papers' usual settings).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "topk": {"ratio": 0.01},
    "randomk": {"ratio": 0.01},
    "dgc": {"ratio": 0.01},
    "powersgd": {"rank": 4},
}

# Legend entries ("families") of the plots; a system's benchmark adds its own.
BASELINE = "PyTorch DDP fp32"
COMPUTE_BOUND = "compute bound (no communication)"
HOOK = "PyTorch DDP + comm hook"
LAYERWISE = "thrifty layer-wise"
WHOLE = "thrifty whole-model"
_PLAN_FAMILIES = {"layerwise": LAYERWISE, "whole": WHOLE}

HOOKS: dict[str, str] = {
    "powersgd": "DDP powerSGD_hook r4",
    "fp16": "DDP fp16_compress_hook",
}
"""PyTorch communication hooks the harness can register, and their row labels."""

# PowerSGD compresses from this iteration on (PyTorch requires > 1); the warm-up
# covers the plain all-reduce iterations before it.
POWERSGD_START_ITER = 2
# An online planner (MergeComp's search) gets at most this many iterations to choose.
MAX_SEARCH_ITERATIONS = 100

Kind = Literal["ddp", "ddp_hook", "sync", "local"]


# --------------------------------------------------------------------------- configurations


@dataclass
class Configuration:
    """One way to synchronise gradients, timed by :func:`time_configurations`.

    Build one with :func:`ddp`, :func:`ddp_hook` or :func:`gradient_sync`.

    Args:
        label: the row's name in tables and plots.
        kind: ``"ddp"`` (PyTorch DDP fp32), ``"ddp_hook"`` (DDP with ``hook``),
            ``"sync"`` (thrifty's GradientSync) or ``"local"`` (no
            communication at all: the compute bound, :func:`compute_bound`).
        family: the plot's legend entry (bars of one family share a colour).
        hook: a :data:`HOOKS` name, for ``kind="ddp_hook"``.
        compressor: registry name or None (fp32), for ``kind="sync"``.
        options: the compressor's keyword arguments.
        plan: ``"layerwise"``, ``"whole"``, a Plan or a planner object.
        ranks_per_node: passed to GradientSync (hierarchical strategies).
        predicted_s: a prediction made before the run (else the harness's
            ``predict`` prices the plan that ran).
        bound_s: the best this configuration could do (e.g. ByteComp's
            zero-cost compression bound); plotted as a marker.
        extra: copied into the row (a system's own columns).
        summarize: called on rank 0 with ``plan`` after the run; what it
            returns is added to the row's ``extra`` (e.g. a planner's search).
    """

    label: str
    kind: Kind = "sync"
    family: str = ""
    hook: str | None = None
    compressor: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    plan: str | Plan | Planner = "layerwise"
    ranks_per_node: int | None = None
    predicted_s: float | None = None
    bound_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    summarize: Callable[[Any], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("ddp", "ddp_hook", "sync", "local"):
            raise ValueError(
                f"kind must be 'ddp', 'ddp_hook', 'sync' or 'local', got {self.kind!r}"
            )
        if self.kind == "ddp_hook" and self.hook not in HOOKS:
            raise ValueError(f"unknown DDP hook {self.hook!r}; expected one of {list(HOOKS)}")
        if self.compressor is not None and self.compressor not in available_compressors():
            raise ValueError(
                f"unknown compressor {self.compressor!r}; "
                f"available: {', '.join(available_compressors())}"
            )
        self.family = self.family or self.label


def ddp() -> Configuration:
    """PyTorch DDP, fp32 all-reduce: the baseline every row is compared with."""
    return Configuration("DDP fp32", kind="ddp", family=BASELINE)


def compute_bound() -> Configuration:
    """Every rank trains on its own, no communication: the best any plan could do.

    All ranks run it at once, so their cores are shared as in training: the
    bound is "the same job with a free network", not an idle machine's time.
    """
    return Configuration(COMPUTE_BOUND, kind="local", family=COMPUTE_BOUND)


def ddp_hook(name: str) -> Configuration:
    """PyTorch DDP with one of its own communication hooks (a :data:`HOOKS` name)."""
    if name not in HOOKS:
        raise ValueError(f"unknown DDP hook {name!r}; expected one of {list(HOOKS)}")
    return Configuration(HOOKS[name], kind="ddp_hook", family=HOOK, hook=name)


def gradient_sync(
    compressor: str | None,
    plan: str | Plan | Planner = "layerwise",
    *,
    label: str | None = None,
    family: str | None = None,
    options: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Configuration:
    """thrifty's GradientSync with ``compressor`` (``"none"`` or None: fp32) and ``plan``.

    ``options`` default to :data:`DEFAULT_OPTIONS`; ``settings`` are further
    :class:`Configuration` fields (``ranks_per_node``, ``summarize``, ...).
    """
    name = None if compressor in (None, "none") else compressor
    plan_name = plan if isinstance(plan, str) else type(plan).__name__
    if isinstance(plan, str) and plan not in _PLAN_FAMILIES:
        raise ValueError(
            f"unknown built-in plan {plan!r}; expected 'layerwise' or 'whole', "
            "or pass a Plan or a planner object"
        )
    return Configuration(
        label or f"{compressor or 'fp32'} {plan_name}",
        kind="sync",
        family=family or _PLAN_FAMILIES.get(plan_name, plan_name),
        compressor=name,
        options=dict(DEFAULT_OPTIONS.get(name or "", {}) if options is None else options),
        plan=plan,
        **settings,
    )


def compression_configurations(
    compressors: Sequence[str],
    plans: Sequence[str | Plan | Planner] = ("layerwise", "whole"),
    hooks: Sequence[str] = ("fp16", "powersgd"),
) -> list[Configuration]:
    """The compute bound, DDP fp32, DDP with each hook, then each plan per compressor."""
    configs = [compute_bound(), ddp(), *(ddp_hook(h) for h in hooks)]
    configs += [gradient_sync(name, plan) for name in compressors for plan in plans]
    return configs


# --------------------------------------------------------------------------- results


@dataclass
class TrainingRow:
    """One configuration's measurement (the same on every rank except ``times``).

    Attributes:
        iteration_s: median seconds per timed iteration, of the slowest rank;
            with several repetitions, the median of their ``repeats_s``.
        times: this rank's timed iterations (rank 0's in results), seconds,
            every repetition's in turn.
        wire_bytes_per_iter: see :func:`wire_bytes_per_iter`.
        plan: the plan that was timed, described (GradientSync only).
        groups: its number of groups.
        search_iterations: iterations an online planner searched before timing.
        search_s: their wall-clock seconds.
        predicted_s: the timeline's prediction, when a network model was known.
        bound_s: the configuration's bound, when it has one.
        speedup_vs_ddp: DDP fp32's iteration time over this one's.
        prediction_error: ``(predicted - measured) / measured``.
        extra: a system's own columns.
        repeats_s: each repetition's iteration time (slowest rank's median);
            their min and max are the spread a table reports.
    """

    label: str
    kind: str
    family: str
    iteration_s: float
    times: list[float]
    wire_bytes_per_iter: float
    compressor: str | None = None
    plan: str | None = None
    groups: int | None = None
    search_iterations: int = 0
    search_s: float = 0.0
    predicted_s: float | None = None
    bound_s: float | None = None
    speedup_vs_ddp: float | None = None
    prediction_error: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    repeats_s: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def spread(self) -> tuple[float, float]:
        """The fastest and slowest repetition, seconds per iteration."""
        values = self.repeats_s or [self.iteration_s]
        return min(values), max(values)

    def add_repeat(self, other: TrainingRow) -> None:
        """Fold in a later repetition of the same configuration."""
        self.repeats_s.append(other.iteration_s)
        self.times.extend(other.times)
        self.iteration_s = statistics.median(self.repeats_s)
        self.wire_bytes_per_iter = other.wire_bytes_per_iter

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> TrainingRow:
        return cls(**doc)


@dataclass
class TrainingRun:
    """Rows measured side by side in one job (one rate, or one topology and model)."""

    rows: list[TrainingRow]
    meta: dict[str, Any] = field(default_factory=dict)

    def baseline(self) -> TrainingRow | None:
        """The DDP fp32 row, if the run has one."""
        return next((r for r in self.rows if r.kind == "ddp"), None)

    def compare(self) -> None:
        """Fill each row's speedup over DDP fp32 and the prediction's relative error."""
        base = self.baseline()
        for row in self.rows:
            if base is not None:
                row.speedup_vs_ddp = base.iteration_s / row.iteration_s
            if row.predicted_s is not None:
                row.prediction_error = (row.predicted_s - row.iteration_s) / row.iteration_s

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [r.to_dict() for r in self.rows], "meta": self.meta}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> TrainingRun:
        return cls([TrainingRow.from_dict(r) for r in doc["rows"]], dict(doc.get("meta", {})))


@dataclass
class TrainingResult:
    """A training benchmark's result: runs by key (a rate, or "2x2 cnn"), and its settings.

    :meth:`write` stores it as JSON (machine info added) and :meth:`plot`
    draws one panel per run; both default to ``results/<name>.*``.
    """

    name: str
    title: str
    runs: dict[str, TrainingRun]
    settings: dict[str, Any] = field(default_factory=dict)
    bound_label: str = "bound"
    json_path: Path | None = None
    plot_path: Path | None = None
    interrupted_by: str | None = None  # "SIGINT" when Ctrl-C stopped it: the runs are partial

    def rows(self) -> Iterator[tuple[str, TrainingRow]]:
        """Every row with the key of its run."""
        for key, run in self.runs.items():
            for row in run.rows:
                yield key, row

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "title": self.title,
            "bound_label": self.bound_label,
            "settings": self.settings,
            "runs": {key: run.to_dict() for key, run in self.runs.items()},
        }
        if self.interrupted_by is not None:
            doc.update(partial=True, interrupted_by=self.interrupted_by)
        return doc

    @classmethod
    def from_dict(cls, name: str, doc: Mapping[str, Any]) -> TrainingResult:
        runs = {key: TrainingRun.from_dict(run) for key, run in doc["runs"].items()}
        bound = doc.get("bound_label", "bound")
        result = cls(name, doc["title"], runs, dict(doc["settings"]), bound)
        result.interrupted_by = doc.get("interrupted_by")
        return result

    @classmethod
    def load(cls, path: str | Path) -> TrainingResult:
        """Read a result that :meth:`write` wrote."""
        doc = json.loads(Path(path).read_text())
        return cls.from_dict(doc["benchmark"], doc)

    def write(self, target: str | Path | None = None) -> Path:
        """Write the JSON: ``results/<name>.json``, ``results/<target>.json`` or the path given."""
        self.json_path = write_json(self.name, self.to_dict(), path=target)
        return self.json_path

    def plot(self, target: str | Path | None = None) -> Path:
        """Draw the PNG: ``results/<name>.png``, ``results/<target>.png`` or the path given."""
        self.plot_path = plot_training(self, result_path(target or self.name, ".png"))
        return self.plot_path


# --------------------------------------------------------------------------- one rank's work


def profile_training_model(
    model_name: str,
    strategies: Sequence[Strategy],
    world_size: int,
    batch_size: Mapping[str, int] | None = None,
) -> Profile:
    """Profile ``model_name`` here (no communication), with each strategy's compression cost.

    The timeline's predictions price plans with this profile. Call it on every
    rank at once, so that the cores are as busy as in training, and at the
    batch (``batch_size``: an operating point's, default :data:`BATCH`'s) that
    is timed.
    """
    torch.manual_seed(0)
    model = build_model(model_name)
    batch = model.example_batch(
        **(batch_size or BATCH[model_name]),
        generator=torch.Generator().manual_seed(dist.get_rank()),
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return profile_model(
        model,
        lambda: training_loss(model_name, model, batch),
        opt,
        iters=3,
        warmup=1,
        compressors=list(dict.fromkeys(strategies)),
        world_size=world_size,
    )


def _wrap(config: Configuration, model: nn.Module) -> tuple[nn.Module, GradientSync | None]:
    """The module to train and, for thrifty configurations, its GradientSync."""
    if config.kind == "local":
        return model, None
    if config.kind == "ddp":
        return DDP(model), None
    if config.kind == "ddp_hook":
        # One bucket: powerSGD_hook launches its second all-reduce from a future
        # callback, and with several buckets on gloo the ranks then interleave
        # collectives in different orders (seen here as a size-mismatch abort).
        wrapped = DDP(model, bucket_cap_mb=1024)
        if config.hook == "powersgd":
            state = powerSGD.PowerSGDState(
                None, matrix_approximation_rank=4, start_powerSGD_iter=POWERSGD_START_ITER
            )
            wrapped.register_comm_hook(state, powerSGD.powerSGD_hook)
        else:
            wrapped.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return wrapped, None
    sync = GradientSync(
        model,
        config.compressor,
        plan=config.plan,
        ranks_per_node=config.ranks_per_node,
        **config.options,
    )
    return model, sync


def time_iterations(step: Callable[[], None], iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``step`` (one training iteration each).

    The caller runs the warm-up first, outside whatever counts the timed ones.
    """
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def wire_bytes_per_iter(ledger: collectives.CommLedger, iterations: int) -> float:
    """The bytes one rank sends per iteration: the one figure every benchmark table shows.

    What is counted: each gradient collective's bytes on the wire under the
    algorithm the timeline assumes (:func:`thrifty.comm.collectives.wire_bytes`:
    a ring all-reduce sends ``2(n-1)/n`` of the tensor, an all-gather sends a
    rank's contribution to each of the ``n-1`` others), as
    :func:`count_wire_bytes` fills ``ledger``. Over which iterations: the timed
    ones only, after the warm-up and after any online planner's search, so the
    figure is the steady state of the plan that was timed. DDP's per-forward
    buffer broadcast (BatchNorm statistics) is not gradient traffic and is not
    counted; GradientSync does not send it.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    return ledger.wire_bytes / iterations


@contextlib.contextmanager
def count_wire_bytes(config: Configuration) -> Iterator[collectives.CommLedger]:
    """A ledger of the gradient collectives of ``config`` sent inside the block.

    GradientSync's collectives count themselves (:func:`collectives.count_bytes`).
    PyTorch's hooks call ``torch.distributed.all_reduce`` from Python: inside
    the block that function is wrapped to count each call. DDP's built-in fp32
    all-reduce runs in C++, out of reach; :func:`time_configurations` enters its
    iterations as what they send, one all-reduce of every fp32 gradient.
    """
    with collectives.count_bytes() as ledger:
        if config.kind != "ddp_hook":
            yield ledger
            return
        all_reduce = dist.all_reduce

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            group = kwargs.get("group", args[1] if len(args) > 1 else None)
            nbytes = tensor.numel() * tensor.element_size()
            n = dist.get_world_size(group)
            ledger.add("all_reduce", nbytes, int(collectives.wire_bytes("all_reduce", nbytes, n)))
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counted
        try:
            yield ledger
        finally:
            dist.all_reduce = all_reduce


def _time_one(
    config: Configuration,
    model_name: str,
    batch_size: Mapping[str, int],
    warmup: int,
    iters: int,
    predict: Callable[[Plan], float] | None,
) -> tuple[TrainingRow, Plan | None]:
    """One configuration's row, and the plan its GradientSync ran (None for DDP)."""
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_model(model_name)
    batch = model.example_batch(**batch_size, generator=torch.Generator().manual_seed(rank))
    wrapped, sync = _wrap(config, model)
    opt = torch.optim.SGD(wrapped.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        training_loss(model_name, wrapped, batch).backward()
        opt.step()

    # An online planner hooks into the iteration callbacks and leaves when it
    # has chosen: let it finish, so that only the chosen plan is timed. The
    # count is the same on every rank (planners decide collectively).
    search, started = 0, time.perf_counter()
    while sync is not None and sync.iteration_callbacks and search < MAX_SEARCH_ITERATIONS:
        step()
        search += 1
    search_s = time.perf_counter() - started
    if config.hook == "powersgd":  # time PowerSGD compressing, not its plain first iterations
        warmup = max(warmup, POWERSGD_START_ITER)
    for _ in range(warmup):
        step()
    with count_wire_bytes(config) as ledger:
        times = time_iterations(step, iters)
    if config.kind == "ddp":
        nbytes = 4 * count_parameters(model, trainable_only=True)
        for _ in range(iters):
            ledger.add("all_reduce", nbytes, int(collectives.wire_bytes("all_reduce", nbytes, n)))
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    row = TrainingRow(
        label=config.label,
        kind=config.kind,
        family=config.family,
        iteration_s=slowest.item(),
        times=times,
        wire_bytes_per_iter=wire_bytes_per_iter(ledger, iters),
        compressor=config.compressor,
        search_iterations=search,
        search_s=search_s if search else 0.0,
        predicted_s=config.predicted_s,
        bound_s=config.bound_s,
        extra=dict(config.extra),
    )
    row.repeats_s = [row.iteration_s]
    plan = None
    if sync is not None:
        plan = sync.plan
        row.plan = plan.describe()[:200]
        row.groups = len(plan.groups)
        if row.predicted_s is None and predict is not None:
            row.predicted_s = predict(plan)
        sync.remove()
    if config.summarize is not None and rank == 0:
        row.extra.update(config.summarize(config.plan))
    return row, plan


def time_configurations(
    model_name: str,
    configs: Sequence[Configuration],
    warmup: int = 3,
    iters: int = 4,
    *,
    batch_size: Mapping[str, int] | None = None,
    repeats: int = 1,
    predict: Callable[[Plan], float] | None = None,
    progress: bool = True,
    on_row: Callable[[TrainingRow], None] | None = None,
) -> list[TrainingRow]:
    """Time every configuration in turn on this process group (call on every rank).

    Each configuration trains a fresh ``model_name`` (same seed, a different
    batch per rank, of ``batch_size``: default :data:`BATCH`'s) with SGD;
    ``predict`` prices the plan a GradientSync ran. With ``repeats`` > 1 the
    whole list is timed that many times in interleaved rounds, so that a slow
    spell of the machine spreads over every configuration instead of landing
    on one; a planner searches in the first round only, and later rounds time
    the plan it chose. Every rank returns the rows (``times`` are its own);
    ``on_row`` sees each row as it is measured or updated, so that an
    interrupted run keeps it.
    """
    if warmup < 0 or iters < 1 or repeats < 1:
        raise ValueError(
            "need warmup >= 0, iters >= 1 and repeats >= 1, "
            f"got warmup={warmup}, iters={iters}, repeats={repeats}"
        )
    batch_size = dict(batch_size or BATCH[model_name])
    rounds = [list(configs)]
    bar = tqdm(
        total=len(configs) * repeats,
        desc=f"{model_name} {batch_size}",
        disable=not progress or dist.get_rank() != 0,
        file=sys.stderr,
        leave=False,
    )
    rows: list[TrainingRow] = []
    for repeat in range(repeats):
        later = []
        for i, config in enumerate(rounds[-1]):
            bar.set_postfix_str(f"{config.label} ({repeat + 1}/{repeats})")
            row, plan = _time_one(config, model_name, batch_size, warmup, iters, predict)
            if repeat == 0:
                rows.append(row)
            else:
                rows[i].add_repeat(row)
            # A planner's choice is a fixed Plan from now on (the same on every rank).
            fixed = plan is not None and not isinstance(config.plan, str | Plan)
            later.append(
                dataclasses.replace(config, plan=plan, summarize=None) if fixed else config
            )
            bar.update()
            if on_row is not None:
                on_row(rows[i])
        rounds.append(later)
    bar.close()
    return rows


def _rank_benchmark(
    model_name: str,
    configs: list[Configuration],
    warmup: int,
    iters: int,
    network: dict[str, Any] | None,
    rows_file: str | None = None,
    batch_size: dict[str, int] | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """Every rank of one run (rate, operating point): profile when a network is known, then time.

    Rank 0 appends each row to ``rows_file`` (JSON lines) as it is measured:
    what the driver keeps when the run is interrupted.
    """
    n = dist.get_world_size()
    meta: dict[str, Any] = {
        "parameters": count_parameters(build_model(model_name), trainable_only=True),
        "batch": dict(batch_size or BATCH[model_name]),
    }
    predict = None
    if network is not None:
        net = NetworkModel.from_dict(network)
        strategies = [
            Strategy.make(c.compressor, **c.options)
            for c in configs
            if c.kind == "sync" and not isinstance(c.plan, Plan)
        ]
        profile = profile_training_model(model_name, strategies, n, batch_size)
        meta["profile"] = profile.to_dict()

        def predict(plan: Plan) -> float:
            return simulate(profile, plan, net, n).iteration

    on_row = None
    if rows_file is not None and dist.get_rank() == 0:

        def on_row(row: TrainingRow) -> None:
            with open(rows_file, "a") as out:
                out.write(json.dumps(row.to_dict()) + "\n")

    rows = time_configurations(
        model_name,
        configs,
        warmup,
        iters,
        batch_size=batch_size,
        repeats=repeats,
        predict=predict,
        on_row=on_row,
    )
    return TrainingRun(rows, meta).to_dict() if dist.get_rank() == 0 else {}


# --------------------------------------------------------------------------- entry points


def encode_objects(obj: Any) -> str:
    """``obj`` as text for a JSON job spec (configurations carry planner objects)."""
    return base64.b64encode(pickle.dumps(obj)).decode("ascii")


def decode_objects(text: str) -> Any:
    """The inverse of :func:`encode_objects`, in the worker this process started."""
    return pickle.loads(base64.b64decode(text))


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside the (possibly rate-limited) worker process: run the ranks."""
    return run_ranks(
        _rank_benchmark,
        spec["workers"],
        spec["model"],
        decode_objects(spec["configs"]),
        spec["warmup"],
        spec["iters"],
        spec["network"],
        spec.get("rows_file"),
        spec.get("batch"),
        spec.get("repeats", 1),
        timeout=spec["timeout"],
    )[0]


def _fitted_network(rate: str, network_json: Path) -> NetworkModel | None:
    try:
        return NetworkModel.load(network_json, rate)
    except (OSError, KeyError) as exc:
        log.warning(
            "no network model fitted for %s in %s (%s; run `thrifty bench collectives`): "
            "no timeline predictions",
            rate,
            network_json,
            exc,
        )
        return None


def check_rates(rates: Sequence[str]) -> None:
    """Raise ValueError naming a rate that is neither :data:`LOOPBACK` nor like ``"1gbit"``."""
    if not rates:
        raise ValueError("need at least one rate, e.g. 'loopback' or '1gbit'")
    for rate in rates:
        if rate != LOOPBACK:
            netem.parse_rate(rate)  # ValueError names the rate


def run_training_benchmark(
    name: str,
    model: str,
    configs: Sequence[Configuration],
    rates: Sequence[str] = (LOOPBACK,),
    workers: int = 2,
    warmup: int = 3,
    iters: int = 4,
    *,
    points: Sequence[str] = ("heavy",),
    repeats: int = 1,
    title: str | None = None,
    network_json: str | Path | None = None,
    plot: bool = True,
    timeout: float = 3600.0,
) -> TrainingResult:
    """Time ``configs`` on ``workers`` local ranks at each rate and point; write JSON (+ PNG).

    One job per (operating point, rate); its run's key is the rate, or
    ``"<point> <rate>"`` when several points are asked for.

    Args:
        name: the result's file name (``results/<name>.json``).
        model: a :data:`thrifty.bench.models.MODEL_NAMES` name.
        configs: what to time; must include :func:`ddp`, the baseline.
        rates: :data:`LOOPBACK` (plain loopback) or emulated rates like
            ``"1gbit"`` (needs root, ``ip`` and ``tc``).
        warmup: untimed iterations per configuration (the PowerSGD hook's are
            at least ``POWERSGD_START_ITER``, so that it compresses when timed).
        iters: timed iterations per configuration.
        points: operating points (:data:`thrifty.bench.operating_points.POINTS`):
            ``"heavy"`` (the default batch) and/or ``"gpu-like"`` (a batch whose
            one-rank compute is 50-150 ms here, chosen by measurement before
            the jobs start and recorded in the settings).
        repeats: interleaved repetitions of the whole list (see
            :func:`time_configurations`); rows report the median and spread.
        network_json: fitted network models (default ``results/collectives.json``)
            for the timeline's predictions.
    """
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; expected one of {list(MODEL_NAMES)}")
    if not any(c.kind == "ddp" for c in configs):
        raise ValueError(
            "configs must include the DDP fp32 baseline (thrifty.bench.training.ddp())"
        )
    if workers < 1 or repeats < 1:
        raise ValueError(f"workers and repeats must be >= 1, got {workers} and {repeats}")
    check_rates(rates)
    resolved = operating_points(model, points)
    for point in resolved:
        log.info(
            "operating point %s: batch %s, %.3f s compute", point.name, point.batch, point.compute_s
        )
    network_json = Path(network_json or results_dir() / "collectives.json")
    result = TrainingResult(
        name,
        title or f"{model}, {workers} workers",
        {},
        {
            "model": model,
            "workers": workers,
            "batch": BATCH[model],
            "points": [p.to_dict() for p in resolved],
            "warmup": warmup,
            "iters": iters,
            "repeats": repeats,
            "rates": list(rates),
        },
    )
    with tempfile.TemporaryDirectory(prefix="thrifty-rows-") as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        key = None
        try:
            for point in resolved:
                for rate in rates:
                    key = rate if len(resolved) == 1 else f"{point.name} {rate}"
                    network = _fitted_network(rate, network_json)
                    spec = {
                        "workers": workers,
                        "model": model,
                        "configs": encode_objects(list(configs)),
                        "warmup": warmup,
                        "iters": iters,
                        "network": None if network is None else network.to_dict(),
                        "timeout": timeout,
                        "rows_file": str(rows_file),
                        "batch": point.batch,
                        "repeats": repeats,
                    }
                    rows_file.unlink(missing_ok=True)
                    doc = netem.run_worker(rate, "thrifty.bench.training", spec)
                    result.runs[key] = TrainingRun.from_dict(doc)
                    result.runs[key].meta.update(point=point.name, rate=rate)
                    result.runs[key].compare()
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM: keep the rows measured so far
            rows = _rows_so_far(rows_file)
            if key is not None and key not in result.runs and rows:
                result.runs[key] = TrainingRun(rows, {"partial": True})
                result.runs[key].compare()
            result.interrupted_by = interrupted_by(exc)
            note_partial(exc, result.write())
            raise
    result.write()
    if plot:
        result.plot()
    return result


def _rows_so_far(rows_file: Path) -> list[TrainingRow]:
    """The rows rank 0 finished before an interrupt (a half-written last line is dropped).

    A row rewritten by a later repetition replaces its earlier line.
    """
    rows: dict[str, TrainingRow] = {}
    with contextlib.suppress(OSError):
        for line in rows_file.read_text().splitlines():
            with contextlib.suppress(ValueError, TypeError):
                row = TrainingRow.from_dict(json.loads(line))
                rows[row.label] = row
    return list(rows.values())


def run_compress_benchmark(
    model: str = "cnn",
    workers: int = 2,
    rates: Sequence[str] = ("1gbit",),
    compressors: Sequence[str] | None = None,
    warmup: int = 3,
    iters: int = 4,
    *,
    hooks: Sequence[str] = ("fp16", "powersgd"),
    points: Sequence[str] = ("heavy",),
    repeats: int = 1,
    plot: bool = True,
) -> TrainingResult:
    """``thrifty compress bench``: the compute bound, DDP, DDP + hooks, and per compressor
    layer-wise and whole-model.

    Writes ``results/compress_<model>.json`` (+ PNG). ``compressors`` default to
    every registered one but ``"none"``.
    """
    names = list(compressors or [c for c in available_compressors() if c != "none"])
    configs = compression_configurations(names, ("layerwise", "whole"), hooks)
    return run_training_benchmark(
        f"compress_{model}",
        model,
        configs,
        rates,
        workers,
        warmup,
        iters,
        points=points,
        repeats=repeats,
        plot=plot,
    )


# --------------------------------------------------------------------------- plot

_BASELINE_COLOUR = "tab:gray"
_PALETTE = (
    "tab:red",
    "tab:blue",
    "tab:green",
    "tab:orange",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
)


def family_colours(rows: Sequence[TrainingRow]) -> dict[str, str]:
    """One colour per legend entry, in order of first appearance; the baseline is grey."""
    families = list(dict.fromkeys(r.family for r in rows))
    others = [f for f in families if f != BASELINE]
    colours = {f: _PALETTE[i % len(_PALETTE)] for i, f in enumerate(others)}
    if BASELINE in families:
        colours[BASELINE] = _BASELINE_COLOUR
    return {f: colours[f] for f in families}


def draw_training(result: TrainingResult) -> Any:
    """The figure of :func:`plot_training` (a matplotlib Figure; close it when done).

    One panel per run: bars = measured s/iter, coloured by family with the
    legend built from the same colours; a dashed line = the DDP fp32 baseline;
    dots = the timeline's predictions; crosses = bounds.
    """
    import matplotlib  # optional: [bench]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: [bench]
    from matplotlib.patches import Patch  # optional: [bench]

    keys = list(result.runs)
    widest = max((len(run.rows) for run in result.runs.values()), default=1)
    fig, axes = plt.subplots(
        len(keys), 1, figsize=(max(8.0, 0.5 * widest + 4), 4 * len(keys)), squeeze=False
    )
    for ax, key in zip(axes[:, 0], keys, strict=True):
        rows = result.runs[key].rows
        colours = family_colours(rows)
        xs = list(range(len(rows)))
        ax.bar(xs, [r.iteration_s for r in rows], color=[colours[r.family] for r in rows])
        handles: list[Any] = [Patch(color=c, label=f) for f, c in colours.items()]
        base = result.runs[key].baseline()
        if base is not None:
            handles.append(
                ax.axhline(
                    base.iteration_s,
                    color="black",
                    linestyle="--",
                    linewidth=1,
                    label=f"baseline: {base.label}",
                )
            )
        predicted = [(i, r.predicted_s) for i, r in zip(xs, rows, strict=True) if r.predicted_s]
        if predicted:
            handles += ax.plot(*zip(*predicted, strict=True), "k.", label="timeline prediction")
        bounds = [(i, r.bound_s) for i, r in zip(xs, rows, strict=True) if r.bound_s]
        if bounds:
            handles += ax.plot(
                *zip(*bounds, strict=True), "kx", markersize=8, label=result.bound_label
            )
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_xticks(xs, [r.label for r in rows], rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("iteration (s)")
        ax.set_title(f"{result.title}: {key}")
    fig.tight_layout()
    return fig


def plot_training(result: TrainingResult, path: Path) -> Path:
    """Save :func:`draw_training`'s figure as a PNG at ``path``."""
    fig = draw_training(result)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt  # optional: [bench]

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    netem.worker_main(_worker)
