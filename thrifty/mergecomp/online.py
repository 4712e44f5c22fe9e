"""Online and hybrid search: choose the partition by timing real iterations.

``GradientSync(model, compressor="dgc", plan="mergecomp")`` (or
``plan=MergeComp(mode=...)``) starts with one whole-model group and hooks a
:class:`MergeCompTuner` into the engine's iteration callbacks:

1. Warm-up iterations record when each gradient becomes ready. With a single
   group nothing is compressed during backward, so these times are clean.
2. Candidates:

   * ``"hybrid"`` (default): the timeline's best partitions (the exact optimum,
     layer-wise, whole-model, even splits), priced with a profile built from the
     observed ready times, the compressor's measured cost on this machine, and
     a network model fitted in place (a few timed collectives) unless one is given;
   * ``"online"``: the paper's search without any model: a binary search of
     each split point in turn (two groups, then more), comparing measured times.

3. Each candidate runs ``trial_iters`` iterations (after one to settle); rank
   0's median is broadcast, so every rank takes the same decisions.
4. The fastest measured plan is kept; the tuner logs predicted vs measured
   time and detaches. Error feedback carries over at every switch.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import statistics
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from thrifty.comm import NetworkModel
from thrifty.comm.calibration import fit_network
from thrifty.mergecomp.search import candidate_partitions, plan_for
from thrifty.sync import GradientSync, Plan, Strategy
from thrifty.sync.profile import Profile, profile_from_ready_times, ready_order
from thrifty.sync.timeline import payload_bytes

__all__ = ["MergeComp", "MergeCompTuner", "Trial"]

log = logging.getLogger(__name__)


@dataclass
class Trial:
    lengths: tuple[int, ...]
    predicted: float | None
    measured: float | None = None


@dataclass
class MergeComp:
    """The ``plan=`` argument of GradientSync that runs MergeComp's search.

    Args:
        mode: ``"hybrid"`` (model candidates, then measured) or ``"online"``
            (measured binary search, no model).
        network: a fitted NetworkModel; by default one is fitted in place.
        warmup: iterations before searching (the first ones are slow anyway).
        trial_iters: timed iterations per candidate (one more runs first to settle).
        max_trials: bound on candidates measured.
        confirm: re-measure this many of the best candidates once more and decide
            on the mean of both runs (one noisy trial on a shared machine can
            otherwise pick a plan that is slower than the runner-up); 1 disables.
    """

    mode: str = "hybrid"
    network: NetworkModel | None = None
    warmup: int = 3
    trial_iters: int = 3
    max_trials: int = 8
    confirm: int = 2
    tuners: list[MergeCompTuner] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("hybrid", "online"):
            raise ValueError(f"mode must be 'hybrid' or 'online', got {self.mode!r}")
        if self.trial_iters < 1 or self.warmup < 1:
            raise ValueError(
                f"warmup and trial_iters must be >= 1, got warmup={self.warmup!r} and "
                f"trial_iters={self.trial_iters!r}"
            )
        if self.network is not None and not isinstance(self.network, NetworkModel):
            raise TypeError(
                f"network must be a NetworkModel or None, got {type(self.network).__name__} "
                f"{self.network!r}"
            )

    def __call__(self, sync: GradientSync, strategy: Strategy) -> Plan:
        tuner = MergeCompTuner(sync, strategy, self)
        self.tuners.append(tuner)
        sync.iteration_callbacks.append(tuner)
        return Plan.whole_model(sync.backward_order, strategy)


class MergeCompTuner:
    """The state machine behind :class:`MergeComp`; one per GradientSync."""

    def __init__(self, sync: GradientSync, strategy: Strategy, config: MergeComp) -> None:
        self.sync, self.strategy, self.config = sync, strategy, config
        self._reset()

    def _reset(self) -> None:
        """A search not started yet, whose warm-up counts from the engine's next iteration."""
        sync = self.sync
        self.trials: list[Trial] = []
        self.chosen: Trial | None = None
        self.search_seconds = 0.0
        self._ready: dict[str, list[float]] = {}
        self._backward: list[float] = []
        self._last_end: float | None = None
        self._times: list[float] = []
        self._current: Trial | None = None
        self._queue: list[Trial] = []
        self._online: Generator[tuple[int, ...], float, None] | None = None
        self._names: list[str] = []
        self._confirming = False
        self._start = sync.iterations  # warm-up counts from here (a restarted search)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The search's outcome in plain values, so that a resumed job does not search again.

        ``GradientSync.state_dict`` saves it with the chosen plan.
        """
        return {
            "chosen": _trial_dict(self.chosen),
            "names": list(self._names),
            "trials": [_trial_dict(t) for t in self.trials],
            "search_seconds": self.search_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: a finished search stays finished; one cut short starts again.

        A search interrupted before it chose restarts from its warm-up on the
        whole-model plan (its trial plans measured nothing that survives).
        """
        if state["chosen"] is None:
            self._reset()
            if self not in self.sync.iteration_callbacks:
                self.sync.iteration_callbacks.append(self)
            self.sync.set_plan(Plan.whole_model(self.sync.backward_order, self.strategy))
            return
        self.trials = [_trial_from(t) for t in state["trials"]]
        self.chosen = _trial_from(state["chosen"])
        self._names = list(state["names"])
        self.search_seconds = float(state["search_seconds"])
        if self in self.sync.iteration_callbacks:
            self.sync.iteration_callbacks.remove(self)

    # ------------------------------------------------------------------ callback

    def __call__(self, sync: GradientSync) -> None:
        now = time.perf_counter()
        elapsed = None if self._last_end is None else now - self._last_end
        self._last_end = now
        if self.chosen is not None:
            return
        if sync.iterations - self._start <= self.config.warmup:
            for name, t in sync.ready_times.items():
                self._ready.setdefault(name, []).append(t)
            if sync.iterations - self._start == self.config.warmup:
                started = time.perf_counter()
                self._start_search()
                self.search_seconds += time.perf_counter() - started
                self._next_trial()
                self._last_end = time.perf_counter()
            return
        assert self._current is not None and elapsed is not None
        self._times.append(elapsed)
        if len(self._times) < self.config.trial_iters + 1:  # the first one settles
            return
        self._current.measured = self._agreed(statistics.median(self._times[1:]))
        self.trials.append(self._current)
        if self._online is not None and not self._confirming:
            with contextlib.suppress(StopIteration):
                self._queue.append(Trial(self._online.send(self._current.measured), None))
        self._next_trial()
        self._last_end = time.perf_counter()

    # ------------------------------------------------------------------ search

    def _agreed(self, value: float) -> float:
        """Rank 0's measurement, so that every rank takes the same decision."""
        t = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(t, src=self._root(), group=self.sync.group)
        return float(t.item())

    def _root(self) -> int:
        group = self.sync.group
        return 0 if group is None else dist.get_global_rank(group, 0)

    def _start_search(self) -> None:
        # Backward order as observed (ready time), names the plan uses; the
        # profile's tensors come in the same order.
        self._names = ready_order(self._ready, self.sync.backward_order)
        if self.config.mode == "online":
            self._online = _binary_search(len(self._names), self.config.max_trials)
            self._queue.append(Trial(next(self._online), None))
            return
        profile = self._profile()
        network = self.config.network or self._fit_network()
        # Profiles differ a little by rank: rank 0 decides, everyone follows.
        payload: list[Any] = [None]
        if self.sync.rank == 0:
            n, limit = self.sync.world_size, self.config.max_trials
            found = candidate_partitions(profile, self.strategy, network, n, limit=limit)
            payload = [[(p.lengths, p.predicted) for p in found]]
        dist.broadcast_object_list(payload, src=self._root(), group=self.sync.group)
        self._queue = [Trial(tuple(lengths), predicted) for lengths, predicted in payload[0]]

    def _profile(self) -> Profile:
        named = dict(self.sync.model.named_parameters())
        params = {name: named[name] for name in self._names}
        return profile_from_ready_times(params, self._ready, [self.strategy], self.sync.world_size)

    def _fit_network(self) -> NetworkModel:
        """Time only the collective this strategy uses, up to the whole model's payload."""
        strategy, n = self.strategy, self.sync.world_size
        total = sum(p.numel() for p in self.sync.model.parameters() if p.requires_grad)
        if strategy.compressor is None or strategy.collective == "all_reduce":
            primitive, biggest = "all_reduce", payload_bytes(strategy, total)
        elif strategy.collective == "all_gather":
            primitive, biggest = "all_gather", payload_bytes(strategy, total) * n
        else:
            primitive, biggest = "all_to_all", payload_bytes(strategy, total)
        sizes = sorted({4096, 65536, 1 << 20, max(biggest, 4 << 20)})
        return fit_network("in-place", [primitive], sizes, group=self.sync.group)

    def _ranked(self) -> list[tuple[tuple[int, ...], float]]:
        """Partitions by mean measured time over all their trials, fastest first."""
        runs: dict[tuple[int, ...], list[float]] = {}
        for t in self.trials:
            if t.measured is not None:
                runs.setdefault(t.lengths, []).append(t.measured)
        return sorted(((k, statistics.fmean(v)) for k, v in runs.items()), key=lambda kv: kv[1])

    def _next_trial(self) -> None:
        self._times = []
        budget = self.config.max_trials + (self.config.confirm if self._confirming else 0)
        if self._queue and len(self.trials) < budget:
            self._current = self._queue.pop(0)
            self.sync.set_plan(plan_for(self._names, self._current.lengths, self.strategy))
            return
        if not self._confirming and self.config.confirm > 1:
            self._confirming = True
            best = [lengths for lengths, _ in self._ranked()[: self.config.confirm]]
            if len(best) > 1:
                predicted = {t.lengths: t.predicted for t in self.trials}
                self._queue = [Trial(lengths, predicted[lengths]) for lengths in reversed(best)]
                self._next_trial()
                return
        lengths, mean = self._ranked()[0]
        predicted = next(t.predicted for t in self.trials if t.lengths == lengths)
        self.chosen = Trial(lengths, predicted, mean)
        self.sync.set_plan(plan_for(self._names, lengths, self.strategy))
        self.sync.iteration_callbacks.remove(self)
        log.info(
            "MergeComp chose %d groups %s after %d trials: measured %.4fs/iter, predicted %s",
            len(lengths),
            list(lengths),
            len(self.trials),
            mean,
            "n/a" if predicted is None else f"{predicted:.4f}s",
        )


def _trial_dict(trial: Trial | None) -> dict[str, Any] | None:
    if trial is None:
        return None
    return {
        "lengths": list(trial.lengths),
        "predicted": trial.predicted,
        "measured": trial.measured,
    }


def _trial_from(data: dict[str, Any]) -> Trial:
    return Trial(tuple(data["lengths"]), data["predicted"], data["measured"])


def _binary_search(n: int, budget: int) -> Generator[tuple[int, ...], float, None]:
    """Cupcake's online search, generalised: binary-search each split point in turn.

    Starts from two equal-count groups and binary-searches the split (comparing
    the measured time at ``mid`` and ``mid + step``), then adds a split in the
    larger group and searches it between its neighbours. Yields partitions and
    receives their measured times; memoised, at most ``budget`` measurements.
    """
    seen: dict[tuple[int, ...], float] = {}

    def lengths_of(splits: Sequence[int]) -> tuple[int, ...]:
        bounds = [0, *sorted(splits), n]
        return tuple(b - a for a, b in itertools.pairwise(bounds) if b > a)

    def measure(splits: Sequence[int]) -> Generator[tuple[int, ...], float, float]:
        key = lengths_of(splits)
        if key not in seen:
            if len(seen) >= budget:
                return float("inf")  # out of trials: never preferred
            seen[key] = yield key
        return seen[key]

    whole = yield (n,)
    seen[(n,)] = whole
    if n < 2:
        return
    splits: list[int] = []
    while len(seen) < budget:
        bounds = [0, *splits, n]
        widest = max(range(len(bounds) - 1), key=lambda k: bounds[k + 1] - bounds[k])
        lo, hi = bounds[widest] + 1, bounds[widest + 1] - 1
        if lo > hi:
            return
        while lo < hi and len(seen) < budget:
            mid = (lo + hi) // 2
            here = yield from measure([*splits, mid])
            right = yield from measure([*splits, min(mid + 1, hi)])
            if here <= right:
                hi = mid
            else:
                lo = mid + 1
        best_here = yield from measure([*splits, lo])
        if best_here >= min(seen.values()) and splits:
            return  # another split does not pay
        splits = sorted([*splits, lo])
