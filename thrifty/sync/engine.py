"""GradientSync: data-parallel gradient synchronisation of a plain module by a Plan.

No DDP underneath. For every trainable parameter a
``register_post_accumulate_grad_hook`` marks it ready during backward. When
the last gradient of a group is ready (and every earlier group has been
launched, so all ranks issue collectives in the same order), the group is:

1. flattened into one buffer,
2. compensated by its error feedback (memory),
3. compressed,
4. sent with its collective, asynchronously, while backward goes on.

At the end of backward (an autograd engine callback) the remaining groups,
including those whose parameters got no gradient on this rank, are launched;
then every result is waited for, decompressed, aggregated, divided by the
world size and written to ``.grad``. Any optimizer then steps as usual.

The two switches of a :class:`~thrifty.sync.plan.Strategy` change where that
work happens, as :mod:`thrifty.sync.timeline` models it:

* ``offload``: steps 2-4 of the group run on one CPU worker thread, the
  *launcher*, so backward is not delayed by them. Collectives must be issued
  in plan order on every rank, so when a plan offloads any group, *every*
  group's collective is issued by the launcher, in plan order: a group that is
  not offloaded is compressed on the backward thread and its payload handed
  over; an offloaded group hands over its flat gradient. Results are the same
  bit for bit as without offload. An exception on the launcher is re-raised
  from ``backward()``.
* ``hierarchical``: with ``k`` ranks per node (ranks numbered node by node),
  the fp32 group is reduce-scattered inside the node (blocking, on the
  launching thread), the rank's shard of the node mean goes through the
  group's strategy across nodes (one rank per node, same local index), and at
  the end of backward the mean shards are all-gathered inside the node. In a
  plan with a launcher the whole launch of a hierarchical group (the intra-node
  step, then compressing its shard) runs there, offloaded or not: its shard
  only exists after a collective that must be issued in plan order; when the
  group is not offloaded, backward waits for that launch, so the work still
  delays backward as the timeline assumes. One node
  (``k`` = world) or one rank per node is allowed: a step over one rank is a copy.

Sparse gradients (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``):

* with ``sparse_scheme`` set (a :class:`SparseSync` object, a factory of
  them, or the name a system registered with :func:`register_sparse_scheme`:
  ``import thrifty.zen`` registers ``"zen"``, ``"agsparse"``, ``"sparcml"``,
  ``"omnireduce"``, ``"dense"`` and ``"auto"``), a plan
  group whose parameters are *all* weights of such modules (a layer-wise plan
  gives each its own group) skips flattening and its strategy: at the end of
  backward, in plan order with the other groups' second phases, each of its
  gradients is averaged by its own scheme object (``scheme.sync``)
  and written back as a coalesced sparse ``.grad``, so ``SparseAdam`` and
  ``SGD`` work on it. Which groups are sparse is decided once, from the
  modules, so every rank takes the same path even when a rank's embedding got
  no gradient (it then sends an empty tensor). Syncing at the end loses no
  overlap for a language model: its input embedding is the last gradient
  backward produces. A weight whose gradient is dense anyway (tied to a dense
  output layer) is sent as sparse rows, still exactly;
* otherwise (no ``sparse_scheme``, or a group that mixes sparse and dense
  parameters) sparse gradients are densified and go through the group's
  strategy like any other; ``.grad`` is then dense.

Example::

    model = Net()
    sync = GradientSync(model, compressor="topk", plan="layerwise", ratio=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()   # gradients are averaged here
        opt.step()
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import datetime
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from thrifty.comm import collectives
from thrifty.comm.agreement import (
    Entry,
    NonFiniteGradientError,
    check_agreement,
    count_slots,
    nonfinite_count,
    nonfinite_message,
    read_slots,
)
from thrifty.comm.topology import NodeGroups, split_groups
from thrifty.compressors import Compressor
from thrifty.compressors.memory import Memory
from thrifty.sync.plan import Group, Plan, Strategy, has_feedback

__all__ = [
    "NONFINITE_MODES",
    "GradientSync",
    "Planner",
    "SparseSync",
    "get_planner",
    "get_sparse_scheme",
    "register_planner",
    "register_sparse_scheme",
]

log = logging.getLogger(__name__)

NONFINITE_MODES = ("raise", "skip", "off")
"""What ``GradientSync(nonfinite=...)`` does when a gradient holds NaN/Inf on some rank."""

# Planners turn (sync engine, strategy) into a Plan; MergeComp and ByteComp
# register a factory of planners here when they are imported, so the engine
# never imports them (a substrate imports no system).
Planner = Callable[["GradientSync", Strategy], Plan]
_PLANNERS: dict[str, Callable[..., Planner]] = {}


@runtime_checkable
class SparseSync(Protocol):
    """What GradientSync needs of a sparse scheme: average one sparse gradient over a group.

    ``sync`` gets the parameter's sparse COO gradient (an empty one when this
    rank produced none, so every rank calls it) and returns the mean over the
    ranks of ``group`` when ``average`` (else the sum), sparse and coalesced.
    It is a collective: every rank calls it for the same parameters in the
    same order. One object serves one parameter and may keep state across
    iterations (e.g. a scheme that profiles before it chooses). A scheme may
    also have a ``describe()`` method returning its name and the settings every
    rank must share (Zen's schemes do: e.g. the hash seed); GradientSync checks
    at construction that every rank's schemes describe themselves alike.
    """

    def sync(self, grad: Tensor, group: dist.ProcessGroup | None, average: bool) -> Tensor: ...


SparseSchemeFactory = Callable[[], SparseSync]
_SPARSE_SCHEMES: dict[str, SparseSchemeFactory] = {}

# A scheme in two halves: preparing (error feedback, compression) returns a
# Launch; calling it issues the asynchronous collective and returns a Finish;
# calling that at the end of backward waits, runs any second phase and returns
# the mean over the ranks of the link.
Finish = Callable[[], Tensor]
Launch = Callable[[], Finish]


def register_planner(name: str, factory: Callable[..., Planner]) -> None:
    """Make ``GradientSync(model, plan=name)`` use ``factory()`` as its planner.

    Systems call this when imported (``import thrifty.mergecomp`` registers
    ``"mergecomp"``); registering a name again replaces its factory.
    """
    _check_factory(name, factory, "planner")
    _PLANNERS[name] = factory


def get_planner(name: str, **options: Any) -> Planner:
    """A fresh planner of the factory registered as ``name``, built with ``options``."""
    if name not in _PLANNERS:
        raise ValueError(
            f"unknown plan {name!r}: not 'layerwise', 'whole' nor a registered planner "
            f"(registered: {sorted(_PLANNERS) or 'none'}). Planners register when their "
            "system is imported (import thrifty.mergecomp for 'mergecomp', thrifty.bytecomp "
            "for 'bytecomp'), or pass a planner object or a Plan instead of a name"
        )
    return _PLANNERS[name](**options)


def register_sparse_scheme(name: str, factory: SparseSchemeFactory) -> None:
    """Make ``GradientSync(model, sparse_scheme=name)`` build its schemes with ``factory()``.

    ``factory()`` must return a fresh :class:`SparseSync` (one per parameter).
    Systems call this when imported (``import thrifty.zen`` registers its
    schemes); registering a name again replaces its factory.
    """
    _check_factory(name, factory, "sparse scheme")
    _SPARSE_SCHEMES[name] = factory


def _check_factory(name: str, factory: object, what: str) -> None:
    """A registry entry fails when registered, not when a user first asks for it by name."""
    if not isinstance(name, str):
        raise TypeError(f"a {what} is registered under a string name, got {name!r}")
    if not callable(factory):
        raise TypeError(
            f"{what} factory for {name!r} must be callable, got {type(factory).__name__} "
            f"{factory!r}"
        )


def get_sparse_scheme(name: str) -> SparseSchemeFactory:
    """The factory registered as ``name`` (see :func:`register_sparse_scheme`)."""
    if name not in _SPARSE_SCHEMES:
        raise ValueError(
            f"unknown sparse scheme {name!r} (registered: {sorted(_SPARSE_SCHEMES) or 'none'}). "
            "Sparse schemes register when their system is imported: import thrifty.zen to "
            "register its schemes ('zen', 'agsparse', 'sparcml', 'omnireduce', 'dense', "
            "'auto'), or pass a scheme object or a factory of them instead of a name"
        )
    return _SPARSE_SCHEMES[name]


def _sparse_factory(spec: str | SparseSync | SparseSchemeFactory) -> SparseSchemeFactory:
    """How to build one parameter's scheme from what ``GradientSync`` was given.

    A name comes from the registry; a scheme object is a prototype, copied for
    every parameter (schemes may keep state per parameter); anything else
    callable (a class, a function) is a factory.
    """
    if isinstance(spec, str):
        return get_sparse_scheme(spec)
    if not isinstance(spec, type) and isinstance(spec, SparseSync):
        return lambda: copy.deepcopy(spec)
    if callable(spec):
        return spec
    raise TypeError(
        f"sparse_scheme must be a registered name, an object with a sync(grad, group, "
        f"average) method or a factory of them, got {type(spec).__name__}"
    )


@dataclass(frozen=True)
class _Link:
    """The ranks one scheme runs over: a process group, its size, this rank's index in it."""

    group: dist.ProcessGroup | None
    size: int
    rank: int


@dataclass
class _GroupState:
    """Everything one group owns across iterations: its compressor and memories."""

    index: int
    group: Group
    params: list[nn.Parameter]
    compressor: Compressor | None
    memory: Memory | None
    second_memory: Memory | None  # for the re-compression of the divisible scheme
    numel: int = 0
    ready: set[int] = field(default_factory=set)
    finish: Finish | None = None
    launched: concurrent.futures.Future[Finish] | None = None  # its launch on the launcher
    sparse: bool = False  # synced by its sparse schemes at the end of backward
    nonfinite: int = 0  # NaN/Inf elements of this rank's gradient, this iteration
    seen: dict[int, int] = field(default_factory=dict)  # every rank's count, after the collective
    # Error feedback as it was before this iteration, by reference (memories
    # replace their tensors, never write into them): restored on a dropped step.
    snapshots: list[tuple[Memory, Hashable, dict[str, Tensor]]] = field(default_factory=list)


class GradientSync:
    """Synchronise the gradients of ``model`` across the ranks of a process group.

    Args:
        model: a plain ``nn.Module``, identical on every rank.
        compressor: registry name (see ``thrifty.compressors.available_compressors()``)
            or None for fp32. Ignored when ``plan`` is a :class:`Plan`.
        plan: ``"layerwise"`` (one group per tensor), ``"whole"`` (one group), a
            planner object (``thrifty.mergecomp.MergeComp(...)``), a name registered
            with :func:`register_planner` (``"mergecomp"`` once ``thrifty.mergecomp``
            is imported, ``"bytecomp"`` once ``thrifty.bytecomp`` is), or a :class:`Plan`.
        collective: for the default strategy; None picks all-reduce when the
            compressor allows it, else all-gather.
        memory: error feedback for the default strategy (``"default"``, ``"none"``,
            ``"residual"``, ``"dgc"``).
        process_group: defaults to the world. Hierarchical strategies need the world.
        ranks_per_node: ranks on each node, for hierarchical strategies (ranks are
            numbered node by node). Defaults to ``LOCAL_WORLD_SIZE``, else the world
            size. Given, the node groups are created at construction (every rank
            must pass the same value); otherwise when a plan first needs them.
        broadcast_parameters: copy rank 0's parameters and buffers to every rank
            at construction, as DDP does, so the replicas start equal.
        check_plan: check at construction, and at every :meth:`set_plan`, that every
            rank agrees on the parameters (names, shapes, dtypes, device types,
            ``requires_grad``), the buffers (when broadcast), the compressor and its
            options, the sparse schemes, the plan and the world size: one
            all-gather of a 32-byte digest. A mismatch (which would abort gloo,
            hang, or silently average unrelated numbers) raises the same
            :class:`~thrifty.comm.agreement.RankMismatchError` on every rank.
        sparse_scheme: how groups of sparse-gradient parameters are synchronised
            (see the module docstring): a name registered with
            :func:`register_sparse_scheme` (``import thrifty.zen`` first for
            ``"zen"`` and the schemes it is compared with), a :class:`SparseSync`
            object (copied for each parameter), a callable returning a fresh
            one (called once per parameter), or None to densify sparse gradients.
        nonfinite: what happens when a gradient holds NaN or Inf on any rank.
            ``"raise"``: every rank raises the same
            :class:`~thrifty.comm.agreement.NonFiniteGradientError` at the end of
            that ``backward()``, naming the groups, ranks and counts. ``"skip"``:
            every rank drops the step, as ``torch.amp.GradScaler`` does: every
            ``.grad`` is set to None (so ``optimizer.step()`` changes nothing),
            error feedback is left as it was, ``skipped_last_step`` is True and
            ``skipped_steps`` counts them. Either way each rank's count rides in
            the group's own collective (one element per rank, or 8 bytes per
            packed payload): no extra round trip; the compressors' own per-tensor
            check is then off. ``"off"``: no agreement; a compressor that checks
            raises on its rank alone (its peers then fail in the collective).
            Sparse groups agree through their scheme: Zen's input check carries
            the counts; other schemes get one small all-reduce per step.
        timeout: seconds (or a ``timedelta``) each collective of this engine may
            wait for its peers; None keeps the process group's timeout (30 min
            by default). A peer that is stopped or hung then gives every
            survivor a :class:`~thrifty.comm.collectives.SyncTimeoutError`
            naming the collective, the process group and the timeout; a dead
            peer a :class:`~thrifty.comm.collectives.CollectiveError` at once.
            Planners' own broadcasts between iterations get it too.
        **compressor_options: keyword arguments of the compressor (e.g. ``ratio``).
    """

    def __init__(
        self,
        model: nn.Module,
        compressor: str | None = None,
        plan: str | Plan | Planner = "layerwise",
        *,
        collective: str | None = None,
        memory: str = "default",
        process_group: dist.ProcessGroup | None = None,
        ranks_per_node: int | None = None,
        broadcast_parameters: bool = True,
        check_plan: bool = True,
        sparse_scheme: str | SparseSync | SparseSchemeFactory | None = None,
        nonfinite: str = "raise",
        timeout: float | datetime.timedelta | None = None,
        **compressor_options: Any,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "GradientSync needs torch.distributed: call init_process_group first"
            )
        # Wrong types fail here, named, not as an AttributeError deep inside.
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                "process_group must be a torch.distributed.ProcessGroup or None, got "
                f"{type(process_group).__name__} {process_group!r}"
            )
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        timeout = collectives.timeout_seconds(timeout)
        self.nonfinite = nonfinite
        self.timeout: float | None = timeout
        self.skipped_last_step = False  # the last synchronised backward was dropped
        self.skipped_steps = 0
        if ranks_per_node is not None and ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be >= 1, got {ranks_per_node}")
        self.model = model
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self._world = _Link(process_group, self.world_size, self.rank)
        self._ranks_per_node = ranks_per_node
        self._nodes: NodeGroups | None = None
        self._launcher: concurrent.futures.ThreadPoolExecutor | None = None
        self._launcher_failed = False
        self._broadcasts = broadcast_parameters
        # The ledger is entered once while any thread of this engine communicates.
        self._ledger_lock = threading.Lock()
        self._ledger_users = 0
        self._ledger_scope = contextlib.ExitStack()
        self.ledger = collectives.CommLedger()
        # Backward produces gradients roughly in reverse registration order;
        # plans are written in that order (DDP makes the same first guess).
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.backward_order = [n for n, _ in reversed(named)]
        self._params = dict(named)
        self.sparse_scheme = sparse_scheme
        self._sparse_names = _sparse_parameter_names(model, self._params)
        self._sparse_schemes: dict[str, SparseSync] = {}  # per parameter: they may keep state
        # Called with this engine after every synchronised backward (planners
        # that tune online hook in here); ``iterations`` counts those backwards.
        self.iteration_callbacks: list[Callable[[GradientSync], None]] = []
        self.iterations = 0
        # Everything up to the agreement check is local: a mistake on one rank
        # is reported on every rank by the check instead of leaving the others
        # waiting in the first collective.
        error: ValueError | TypeError | None = None
        try:
            self.strategy = Strategy.make(compressor, collective, memory, **compressor_options)
            if sparse_scheme is not None:
                factory = _sparse_factory(sparse_scheme)  # ValueError names the registered ones
                self._sparse_schemes = {n: _built(factory) for n in sorted(self._sparse_names)}
            self.plan = self._resolve_plan(plan)
            self.plan.check_covers(self._params)
        except (TypeError, ValueError) as exc:
            if not check_plan:
                raise
            error = exc
        if check_plan:  # before any other collective: mismatched sizes abort gloo
            with collectives.collective_timeout(self.timeout):
                self._check_agreement(error)
        # Planners that tune online (and keep a decision a checkpoint must carry)
        # hooked themselves in while the plan was resolved; they stay known here
        # after they detach from iteration_callbacks.
        self._stateful_callbacks: list[Any] = [
            c for c in self.iteration_callbacks if callable(getattr(c, "state_dict", None))
        ]
        if ranks_per_node is not None:
            self._node_links()
        if broadcast_parameters:
            self._broadcast_state()
        self._provide_for(self.plan)
        self._groups = self._build_groups(self.plan)
        self._group_of = self._index_groups(self._groups)
        self._enabled = True
        self._in_backward = False
        self._next_launch = 0
        self._backward_start: float | None = None
        self.ready_times: dict[str, float] = {}  # seconds since the first hook, last iteration
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._make_hook(name))
            for name, p in self._params.items()
        ]
        log.info("GradientSync on %d ranks: %s", self.world_size, self.plan.describe())

    # ------------------------------------------------------------------ set-up

    def _resolve_plan(self, plan: str | Plan | Planner) -> Plan:
        if isinstance(plan, Plan):
            return plan
        if callable(plan):  # a planner object, e.g. thrifty.mergecomp.MergeComp(mode="online")
            return plan(self, self.strategy)
        if plan in ("layerwise", "layer_wise"):
            return Plan.layer_wise(self.backward_order, self.strategy)
        if plan in ("whole", "whole_model"):
            return Plan.whole_model(self.backward_order, self.strategy)
        return get_planner(plan)(self, self.strategy)

    def _broadcast_state(self) -> None:
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        with torch.no_grad(), collectives.backend_timeout(self.group, self.timeout):
            for t in [*self.model.parameters(), *self.model.buffers()]:
                try:
                    dist.broadcast(t.data, src=src, group=self.group)
                except RuntimeError as exc:
                    raise collectives.explained(exc, "broadcast", self.group, self.timeout) from exc

    def _check_agreement(self, error: BaseException | None = None) -> None:
        """One all-gather of a digest of :meth:`_description`; the same error on every rank.

        See :mod:`thrifty.comm.agreement`. ``error`` is a mistake this rank met
        while setting up: raised on every rank, not only here.
        """
        plan = getattr(self, "plan", None)
        check_agreement(self._description(plan), self.group, "GradientSync", error)

    def _description(self, plan: Plan | None) -> list[Entry]:
        """What every rank must share: the model, the compressor, the plan, the schemes.

        Counts and names come before per-item fields, so that the first
        difference reported is the telling one (a missing layer, not the
        shape of whatever came after it).
        """
        model_hint = "every rank must build the same model, as DDP requires"
        entries = [
            Entry("world size", str(self.world_size)),
            # it changes every payload's size
            Entry("nonfinite", self.nonfinite, "pass the same nonfinite= on every rank"),
        ]
        if self._ranks_per_node is not None:
            entries.append(Entry("ranks_per_node", str(self._ranks_per_node)))
        params = list(self.model.named_parameters())
        entries.append(Entry("number of parameters", str(len(params)), model_hint))
        entries += [
            Entry(f"parameter #{i}: name", repr(n), model_hint) for i, (n, _) in enumerate(params)
        ]
        for n, p in params:
            entries += [
                Entry(f"parameter {n!r}: shape", str(tuple(p.shape)), model_hint),
                Entry(f"parameter {n!r}: dtype", str(p.dtype), model_hint),
                Entry(f"parameter {n!r}: device type", p.device.type, model_hint),
                Entry(f"parameter {n!r}: requires_grad", str(p.requires_grad), model_hint),
            ]
        entries.append(
            Entry("sparse-gradient parameters", str(sorted(self._sparse_names)), model_hint)
        )
        if self._broadcasts:  # broadcast with mismatched buffers would abort gloo too
            buffers = list(self.model.named_buffers())
            entries.append(Entry("number of buffers", str(len(buffers)), model_hint))
            entries += [
                Entry(f"buffer #{i}: name", repr(n), model_hint) for i, (n, _) in enumerate(buffers)
            ]
            for n, b in buffers:
                entries += [
                    Entry(f"buffer {n!r}: shape", str(tuple(b.shape)), model_hint),
                    Entry(f"buffer {n!r}: dtype", str(b.dtype), model_hint),
                ]
        strategy = getattr(self, "strategy", None)
        if strategy is not None:
            hint = "pass the same compressor and options on every rank"
            options = ", ".join(f"{k}={v!r}" for k, v in strategy.options) or "none"
            entries += [
                Entry("compressor", str(strategy.compressor or "none"), hint),
                Entry("compressor configuration", options, hint),
                Entry("collective", strategy.collective, hint),
                Entry("memory", strategy.memory, hint),
            ]
        hint = "every rank must pass the same sparse_scheme and scheme settings"
        entries.append(Entry("sparse scheme", _scheme_name(self.sparse_scheme), hint))
        entries += [
            Entry(f"sparse scheme of {n!r}", _describe_scheme(scheme), hint)
            for n, scheme in sorted(self._sparse_schemes.items())
        ]
        if plan is not None:
            hint = (
                "plans differ across ranks: build the plan deterministically, or decide it "
                "on rank 0 and broadcast it"
            )
            entries.append(Entry("plan: number of groups", str(len(plan.groups)), hint))
            for i, g in enumerate(plan.groups):
                entries += [
                    Entry(f"plan group {i}: parameters", ", ".join(g.names), hint),
                    Entry(f"plan group {i}: strategy", _describe_strategy(g.strategy), hint),
                ]
        return entries

    def _provide_for(self, plan: Plan) -> None:
        """Node groups for hierarchical groups, the launcher thread for offloaded ones.

        Plans agree across ranks, so every rank creates the node groups (a
        collective over the world) at the same point.
        """
        if any(g.strategy.hierarchical for g in plan.groups):
            self._node_links()
        offload = any(g.strategy.offload for g in plan.groups)
        if offload and self._launcher is None:
            self._launcher = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="thrifty-launcher"
            )
        elif not offload and self._launcher is not None:
            self._launcher.shutdown(wait=True)
            self._launcher = None

    def _node_links(self) -> tuple[_Link, _Link]:
        """(intra-node, cross-node) links of this rank; the groups are created once."""
        if self._nodes is None:
            if self.group is not None and self.group is not dist.group.WORLD:
                raise ValueError(
                    "hierarchical strategies split the world into nodes; they cannot run on "
                    "a custom process_group (use the default world group, or plain strategies)"
                )
            k = self._ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
            self._nodes = split_groups(k)  # ValueError when k does not divide the world
        nodes = self._nodes
        return (
            _Link(nodes.intra, nodes.ranks_per_node, nodes.local_rank),
            _Link(nodes.cross, nodes.nodes, nodes.node),
        )

    def _build_groups(self, plan: Plan) -> list[_GroupState]:
        groups = []
        for i, g in enumerate(plan.groups):
            params = [self._params[n] for n in g.names]
            compressor = _with_layer_shape(g.strategy, params)
            if compressor is not None and self.nonfinite != "off":
                compressor.check_finite = False  # the engine checks, on every rank alike
            sparse = [n in self._sparse_names for n in g.names]
            if self.sparse_scheme is not None and any(sparse) and not all(sparse):
                mixed = [n for n, s in zip(g.names, sparse, strict=True) if s]
                log.warning(
                    "group %d mixes sparse-gradient parameters %s with dense ones: their "
                    "gradients are densified; give them a group of their own to use %s",
                    i,
                    mixed,
                    self.sparse_scheme,
                )
            groups.append(
                _GroupState(
                    index=i,
                    group=g,
                    params=params,
                    compressor=compressor,
                    memory=g.strategy.build_memory(),
                    second_memory=g.strategy.build_memory()
                    if g.strategy.collective == "all_to_all"
                    else None,
                    numel=sum(p.numel() for p in params),
                    sparse=self.sparse_scheme is not None and bool(sparse) and all(sparse),
                )
            )
        return groups

    # ------------------------------------------------------------------ public

    @property
    def ranks_per_node(self) -> int:
        """Ranks per node for hierarchical groups (``LOCAL_WORLD_SIZE`` unless given)."""
        return self._ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally; the first backward after the block syncs them."""
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    def set_plan(self, plan: Plan, check_plan: bool = True) -> None:
        """Switch to another plan between iterations (all ranks at the same iteration).

        Error feedback carries over: each parameter's residual (or DGC momentum
        and velocity) moves to the group that holds it in the new plan, when
        both use the same kind of memory; nothing already accumulated is lost.
        Groups of the divisible scheme (``all_to_all``) and hierarchical groups
        keep state per shard, not per parameter: theirs starts afresh.
        """
        if self._in_backward:
            raise RuntimeError("set_plan must be called between iterations, not during backward")
        if not isinstance(plan, Plan):
            raise TypeError(
                f"set_plan needs a Plan, got {type(plan).__name__} {plan!r} (build one with "
                "Plan.layer_wise, Plan.whole_model or Plan.contiguous)"
            )
        error: ValueError | None = None
        try:
            plan.check_covers(self._params)
        except ValueError as exc:
            if not check_plan:
                raise
            error = exc
        previous = self.plan
        self.plan = plan
        try:
            if check_plan:  # one collective per switch: every rank switches alike
                self._check_agreement(error)
            self._provide_for(plan)
        except (RuntimeError, ValueError):
            self.plan = previous
            raise
        groups = self._build_groups(plan)
        _carry_memory(self._groups, groups)
        self._groups = groups
        self._group_of = self._index_groups(groups)
        log.info("GradientSync switched plan: %s", plan.describe())

    @staticmethod
    def _index_groups(groups: list[_GroupState]) -> dict[int, _GroupState]:
        return {id(p): state for state in groups for p in state.params}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What a resumed job needs to continue exactly: error feedback, compressor state, plan.

        Holds every group's error feedback (residuals, DGC momentum and
        velocity), its compressor's state (PowerSGD's Q, Random-k's shared-seed
        step, Signum's momentum, DGC's warm-up step), the plan, the iteration
        count and the decision of an online planner (MergeComp's chosen
        partition, ByteComp's plan), so a resumed job does not search again.

        Only tensors, strings and ints: ``torch.save`` it and read it back with
        ``torch.load(..., weights_only=True)``, or put it (or this object) in a
        ``torch.distributed.checkpoint`` state dict. Error feedback is each
        rank's own, so it sits under ``"ranks"`` keyed by this rank: every rank
        saves its part. Every state a group may keep appears, as zeros with a
        ``set_*`` flag while it does not exist yet, so that the state dict of a
        freshly built engine is the template ``dcp.load`` fills in place.
        """
        for c in self.iteration_callbacks:  # planners hooked in after construction
            if callable(getattr(c, "state_dict", None)) and c not in self._stateful_callbacks:
                self._stateful_callbacks.append(c)
        groups = {}
        for state in self._groups:
            entry: dict[str, dict[str, Tensor]] = {}
            for slot, owner, key, numel in self._state_slots(state):
                template = owner.state_template(key, numel)
                if template:
                    entry[slot] = _with_flags(template, owner.export_state(key), slot)
            if state.compressor is not None and state.compressor.extra_state():
                entry["compressor_extra"] = state.compressor.extra_state()
            groups[str(state.index)] = entry
        return {
            "format": _STATE_FORMAT,
            "world_size": self.world_size,
            "parameters": json.dumps(self._parameter_list()),
            "plan": json.dumps(self.plan.to_dict(), sort_keys=True, default=repr),
            "iterations": self.iterations,
            "tuners": {
                str(i): {"type": type(c).__qualname__, "state": json.dumps(c.state_dict())}
                for i, c in enumerate(self._stateful_callbacks)
            },
            "ranks": {str(self.rank): groups},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the plan, the state of every group, the tuners.

        Call it on every rank at the same point (between iterations), on an
        engine built like the saved one (same model, compressor and planner).
        Switching to the saved plan is a :meth:`set_plan`: one collective.
        ``torch.distributed.checkpoint`` loads into the state dict of the engine
        being resumed, so there the engine must already be on the saved plan:
        true for fixed plans; after an online planner chose, ``torch.save``
        the state instead (or build the engine with the saved ``Plan``).

        Raises:
            ValueError: the checkpoint is of another world size, another model
                (names, shapes or dtypes of the trainable parameters), another
                planner, or not a GradientSync state at all.
        """
        if self._in_backward:
            raise RuntimeError("load_state_dict must be called between iterations")
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"not a GradientSync state dict (format {_STATE_FORMAT!r} expected, got "
                f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})"
            )
        saved_world = int(state["world_size"])
        if saved_world != self.world_size:
            raise ValueError(
                f"GradientSync state was saved by {saved_world} ranks, this job has "
                f"{self.world_size}: error feedback is kept per rank and cannot be resharded. "
                f"Resume on {saved_world} ranks, or skip the sync state (start it afresh)"
            )
        _check_same_parameters(json.loads(state["parameters"]), self._parameter_list())
        tuners = state.get("tuners", {})
        saved_types = [tuners[str(i)]["type"] for i in range(len(tuners))]
        types = [type(c).__qualname__ for c in self._stateful_callbacks]
        if saved_types != types:
            raise ValueError(
                f"GradientSync state was saved with planner state {saved_types or 'none'}, this "
                f"engine has {types or 'none'}: build it with the same plan= as the saved job"
            )
        mine = state["ranks"].get(str(self.rank))
        if mine is None:
            raise ValueError(
                f"GradientSync state holds no entry for rank {self.rank} (it has ranks "
                f"{sorted(state['ranks'])}): load the state this rank saved"
            )
        plan = Plan.from_dict(json.loads(state["plan"]))
        if plan != self.plan:
            self.set_plan(plan)
        for group in self._groups:
            saved = mine.get(str(group.index), {})
            for slot, owner, key, numel in self._state_slots(group):
                template = owner.state_template(key, numel)
                if not template:
                    continue
                if slot not in saved:
                    raise ValueError(f"GradientSync state lacks {slot} of group {group.index}")
                _reset(owner, key)
                owner.import_state(key, _without_flags(template, saved[slot], slot))
            if group.compressor is not None and "compressor_extra" in saved:
                group.compressor.load_extra_state(saved["compressor_extra"])
        self.iterations = int(state["iterations"])
        for i, callback in enumerate(list(self._stateful_callbacks)):
            callback.load_state_dict(json.loads(tuners[str(i)]["state"]))

    def _parameter_list(self) -> list[list[Any]]:
        """``[name, shape, dtype]`` of every trainable parameter: what a state belongs to."""
        return [[n, list(p.shape), str(p.dtype)] for n, p in self._params.items()]

    def _state_slots(self, state: _GroupState) -> list[tuple[str, Any, Hashable, int]]:
        """(slot name, memory or compressor, key, numel) of every state a group may keep.

        The keys and sizes the launch paths use (see :meth:`_prepare_flat`,
        :meth:`_prepare_divisible`, :meth:`_launch_hierarchical`).
        """
        compressor = state.compressor
        if compressor is None or state.sparse:
            return []
        strategy = state.group.strategy
        numel, n = state.numel, self.world_size
        if strategy.hierarchical:
            k = self.ranks_per_node
            numel, n = (math.ceil(numel / k) if numel else 0), self.world_size // k
        slots: list[tuple[str, Any, Hashable, int]] = []
        if strategy.collective != "all_to_all":
            if state.memory is not None:
                slots.append(("memory", state.memory, state.index, numel))
            slots.append(("compressor", compressor, state.index, numel))
            return slots
        shard = math.ceil(numel / n) if numel else 0
        if state.memory is not None:
            slots.append(("memory", state.memory, state.index, shard * n))
        for j in range(n):
            slots.append((f"compressor_shard{j}", compressor, (state.index, "shard", j), shard))
        if state.second_memory is not None:
            slots.append(("second_memory", state.second_memory, (state.index, "reduced"), shard))
        slots.append(("compressor_reduced", compressor, (state.index, "reduced"), shard))
        return slots

    def remove(self) -> None:
        """Detach the hooks and stop the launcher; the model goes back to local gradients."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._launcher is not None:
            self._launcher.shutdown(wait=True)
            self._launcher = None

    # ------------------------------------------------------------------ backward

    def _make_hook(self, name: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if not self._enabled:
                return
            now = time.perf_counter()
            if not self._in_backward:
                self._in_backward = True
                self._backward_start = now
                self.ready_times = {}
                torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self.ready_times[name] = now - (self._backward_start or now)
            state = self._group_of[id(param)]
            state.ready.add(id(param))
            try:
                self._launch_ready_groups()
            except BaseException:
                # backward fails and never calls _finish_backward: start afresh next time
                self._end_iteration()
                raise

        return hook

    def _launch_ready_groups(self) -> None:
        while self._next_launch < len(self._groups):
            state = self._groups[self._next_launch]
            if len(state.ready) < len(state.params):
                return
            self._launch(state)
            self._next_launch += 1

    def _finish_backward(self) -> None:
        # Every rank's NaN/Inf counts, by group, once a collective has told them.
        # They are the same on every rank, so every rank drops the same step.
        counts: dict[str, dict[int, int]] = {}
        try:
            with self._counting():
                while self._next_launch < len(self._groups):  # groups with unused parameters
                    self._launch(self._groups[self._next_launch])
                    self._next_launch += 1
                for state in self._groups:
                    if state.launched is not None:
                        state.finish = state.launched.result()  # re-raises the launcher's error
                for state in self._groups:
                    if state.sparse:
                        if not counts:  # else every rank skips it alike: nothing is sent
                            counts.update(self._sync_sparse_group(state))
                        continue
                    assert state.finish is not None
                    averaged = state.finish()
                    if state.seen:
                        counts[_place(state)] = state.seen
                    elif not counts:
                        self._write_grads(state, averaged)
            if counts:
                self._drop_step(counts)
        finally:
            self._end_iteration()
        self.skipped_last_step = bool(counts)
        self.iterations += 1
        with (
            collectives.collective_timeout(self.timeout),
            collectives.backend_timeout(self.group, self.timeout),  # planners' own broadcasts
        ):
            for callback in list(self.iteration_callbacks):
                callback(self)

    def _drop_step(self, counts: dict[str, dict[int, int]]) -> None:
        """A gradient held NaN/Inf on some rank: drop this step alike on every rank.

        Every ``.grad`` becomes None and error feedback goes back to what it
        was; then ``nonfinite="raise"`` raises, ``"skip"`` counts and warns.
        """
        for state in self._groups:
            for memory, key, saved in state.snapshots:
                memory.reset(key)
                if saved:
                    memory.import_state(key, saved)
        for p in self._params.values():
            p.grad = None
        self.skipped_last_step = True
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                nonfinite_message(
                    "GradientSync",
                    counts,
                    "every rank raises this error and no gradient was applied (.grad is None, "
                    "error feedback unchanged). Lower the learning rate, scale the loss, clip "
                    "gradients, or pass nonfinite='skip' to drop such steps as GradScaler does",
                ),
                counts,
            )
        self.skipped_steps += 1
        log.warning(
            "%s",
            nonfinite_message(
                "GradientSync", counts, "step skipped on every rank (.grad set to None)"
            ),
        )

    def _end_iteration(self) -> None:
        launched = [s.launched for s in self._groups if s.launched is not None]
        concurrent.futures.wait(launched)  # nothing of this iteration runs into the next
        for state in self._groups:
            state.ready.clear()
            state.finish = None
            state.launched = None
            state.nonfinite = 0
            state.seen = {}
            state.snapshots = []
        self._next_launch = 0
        self._in_backward = False
        self._launcher_failed = False

    def _flatten(self, state: _GroupState) -> Tensor:
        """The group's gradient as a fresh fp32 vector, with room after it for count slots.

        The room (one element per rank, see :func:`_with_slots`) lets the
        uncompressed all-reduce carry the NaN/Inf counts without another copy.
        """
        parts = []
        for p in state.params:
            if p.grad is None:
                parts.append(torch.zeros(p.numel(), dtype=p.dtype))
            elif p.grad.is_sparse:  # a sparse gradient in a dense group: densified
                parts.append(p.grad.to_dense().reshape(-1))
            else:
                parts.append(p.grad.reshape(-1))
        numel = sum(t.numel() for t in parts)
        spare = self.world_size if self.nonfinite != "off" else 0
        flat = torch.empty(numel + spare, dtype=torch.float32)[:numel]
        if parts:
            torch.cat(parts, out=flat)
        return flat

    def _sync_sparse_group(self, state: _GroupState) -> dict[str, dict[int, int]]:
        """Average each sparse gradient of the group with its scheme; write a sparse ``.grad``.

        Returns every rank's NaN/Inf counts by parameter (empty when none):
        a scheme that checks its inputs collectively (``reports_nonfinite``,
        as Zen's do: the counts ride in their input check) raises alike on
        every rank with a ``nonfinite`` ``{rank: count}``; for any other
        scheme one small all-reduce of the counts comes first. Then the
        group's remaining parameters are skipped alike on every rank.
        """
        grads = {}
        for name, p in zip(state.group.names, state.params, strict=True):
            grad = p.grad
            if grad is None:  # unused on this rank: the others still expect its part
                grad = torch.sparse_coo_tensor(
                    torch.zeros(1, 0, dtype=torch.int64),
                    torch.zeros(0, *p.shape[1:], dtype=p.dtype),
                    p.shape,
                )
            elif not grad.is_sparse:  # e.g. tied to a dense layer: rows of the dense gradient
                grad = grad.to_sparse(sparse_dim=1)
            grads[name] = grad
        unchecked = [
            n
            for n in state.group.names
            if not getattr(self._sparse_schemes[n], "reports_nonfinite", False)
        ]
        if self._checks and unchecked:
            local = [nonfinite_count(grads[n].coalesce().values()) for n in unchecked]
            slots = torch.cat(
                [count_slots(c, self.rank, self.world_size, torch.float64) for c in local]
            )
            summed: Tensor = collectives.all_reduce(slots, group=self.group)  # type: ignore[assignment]
            counts = {
                f"{n!r}": read_slots(row)
                for n, row in zip(unchecked, summed.view(len(unchecked), -1), strict=True)
            }
            counts = {k: v for k, v in counts.items() if v}
            if counts:
                return counts
        for name, p in zip(state.group.names, state.params, strict=True):
            try:
                synced = self._sparse_schemes[name].sync(grads[name], self.group, True)
            except ValueError as exc:
                per_rank = getattr(exc, "nonfinite", None)
                if not self._checks or not per_rank:
                    raise
                return {f"{name!r}": dict(per_rank)}
            p.grad = synced if p.grad is None or p.grad.is_sparse else synced.to_dense()
        return {}

    def _write_grads(self, state: _GroupState, averaged: Tensor) -> None:
        offset = 0
        for p in state.params:
            n = p.numel()
            value = averaged[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None or p.grad.is_sparse:
                p.grad = value.clone()
            else:
                p.grad.copy_(value)
            offset += n

    # ------------------------------------------------------------------ launching

    def _launch(self, state: _GroupState) -> None:
        """Prepare and launch one group, here or on the launcher (see the module docstring)."""
        if state.sparse:  # synced at the end of backward, in plan order
            return
        flat = self._flatten(state)
        if self.nonfinite != "off":
            state.nonfinite = nonfinite_count(flat)
            if state.nonfinite:  # sent as zeros: every rank still runs the collective
                flat.zero_()
            state.snapshots = [
                (m, k, m.export_state(k))
                for m, k in (
                    (state.memory, state.index),
                    (state.second_memory, (state.index, "reduced")),
                )
                if m is not None
            ]
        if self._launcher is None:
            with self._counting():
                state.finish = self._prepare(state, flat)()
            return
        if state.group.strategy.offload:

            def job() -> Finish:
                return self._prepare(state, flat)()

        else:
            job = self._prepare(state, flat)  # compressed here, on the backward thread
        state.launched = self._launcher.submit(self._on_launcher, job)
        strategy = state.group.strategy
        if strategy.hierarchical and not strategy.offload:
            # Its intra-node step and compression run on the launcher (see the
            # module docstring) but belong to backward's thread, as the
            # timeline models them: backward waits for them here.
            concurrent.futures.wait([state.launched])

    def _on_launcher(self, job: Launch) -> Finish:
        if self._launcher_failed:  # the main thread re-raises the first failure
            raise RuntimeError("not launched: an earlier group failed on the launcher thread")
        try:
            with self._counting():
                return job()
        except BaseException:
            self._launcher_failed = True
            raise

    @contextlib.contextmanager
    def _counting(self) -> Iterator[None]:
        """Count the collectives inside the block into ``self.ledger``, from any thread.

        ``collectives.count_bytes`` keeps one process-wide list of active ledgers (so that
        an outer ``count_bytes()`` also sees what the launcher sends). Two
        overlapping blocks of the same ledger, one per thread, would count every
        collective twice, so the ledger is entered once while any thread of this
        engine is inside.
        """
        with self._ledger_lock:
            if self._ledger_users == 0:
                self._ledger_scope.enter_context(collectives.count_bytes(self.ledger))
            self._ledger_users += 1
        try:
            with collectives.collective_timeout(self.timeout):  # this thread's collectives
                yield
        finally:
            with self._ledger_lock:
                self._ledger_users -= 1
                if self._ledger_users == 0:
                    self._ledger_scope.close()

    # ------------------------------------------------------------------ strategies

    def _prepare(self, state: _GroupState, flat: Tensor) -> Launch:
        strategy = state.group.strategy
        if strategy.hierarchical:
            return lambda: self._launch_hierarchical(state, flat)
        return self._prepare_flat(state, strategy, flat, self._world, state.nonfinite)

    # Each path below carries ``count`` (this rank's NaN/Inf count, or its
    # node's) in its first collective, when the engine checks: count slots
    # appended to an all-reduced payload, an int64 packed with a gathered one,
    # or a slot after each all-to-all chunk. Its finish sets ``state.seen``.

    def _prepare_flat(
        self, state: _GroupState, strategy: Strategy, flat: Tensor, link: _Link, count: int
    ) -> Launch:
        """The group's own work for a non-hierarchical ``strategy`` over ``link``."""
        if state.compressor is None:
            if strategy.collective == "all_to_all":
                return self._prepare_scatter_gather(state, flat, link, count)
            return self._prepare_plain(state, flat, link, count)
        if strategy.collective == "all_reduce":
            return self._prepare_allreduce(state, flat, link, count)
        if strategy.collective == "all_gather":
            return self._prepare_allgather(state, flat, link, count)
        return self._prepare_divisible(state, flat, link, count)

    @property
    def _checks(self) -> bool:
        return self.nonfinite != "off"

    def _prepare_plain(self, state: _GroupState, flat: Tensor, link: _Link, count: int) -> Launch:
        flat.div_(link.size)  # before the sum, as DDP does: no overflow
        numel = flat.numel()
        send = flat
        if self._checks:
            send = _with_slots(flat, count_slots(count, link.rank, link.size, flat.dtype))

        def launch() -> Finish:
            pending = collectives.all_reduce(send, group=link.group, async_op=True)

            def finish() -> Tensor:
                reduced: Tensor = pending.wait()  # type: ignore[union-attr,assignment]
                if self._checks:
                    state.seen = read_slots(reduced[numel:])
                return reduced[:numel]

            return finish

        return launch

    def _slotted_rows(self, flat: Tensor, n: int, count: int) -> tuple[Tensor, int]:
        """``flat`` in ``n`` chunks of ``shard`` elements (zero padded), each plus a count slot."""
        numel = flat.numel()
        shard = math.ceil(numel / n)
        extra = 1 if self._checks else 0
        rows = torch.zeros(n, shard + extra)
        full = numel // shard
        rows[:full, :shard] = flat[: full * shard].view(full, shard)
        if full < n:
            rows[full, : numel - full * shard] = flat[full * shard :]
        if extra:
            rows[:, shard] = min(count, 2**24)  # exact in fp32
        return rows, shard

    def _read_rows(self, state: _GroupState, received: list[Tensor], shard: int) -> list[Tensor]:
        """The data parts of the received chunks; their count slots go to ``state.seen``."""
        if not self._checks:
            return received
        state.seen = {r: int(c[shard]) for r, c in enumerate(received) if c[shard] != 0}
        return [c[:shard] for c in received]

    def _prepare_scatter_gather(
        self, state: _GroupState, flat: Tensor, link: _Link, count: int
    ) -> Launch:
        """Uncompressed ``all_to_all``: reduce-scatter (all-to-all of fp32 shards), all-gather."""
        n, numel = link.size, flat.numel()
        if numel == 0:
            return lambda: lambda: flat
        rows, shard = self._slotted_rows(flat, n, count)
        rows[:, :shard].div_(n)  # before the sum, as DDP does
        width = rows.shape[1]

        def launch() -> Finish:
            pending = collectives.all_to_all_v(
                list(rows.view(-1).split(width)), link.group, async_op=True, recv_sizes=[width] * n
            )

            def finish() -> Tensor:
                received = self._read_rows(state, pending.wait(), shard)  # type: ignore[arg-type,union-attr]
                mine = torch.stack(received).sum(0)
                with self._counting():
                    gathered = collectives.all_gather(mine, link.group)
                return torch.cat(gathered)[:numel]  # type: ignore[arg-type]

            return finish

        return launch

    def _launch_hierarchical(self, state: _GroupState, flat: Tensor) -> Finish:
        """Reduce-scatter in the node, the flat strategy across nodes, all-gather in the node.

        The node's NaN/Inf counts ride in the intra-node step; their sum goes
        across nodes, so ``state.seen`` is keyed by *node* for such a group.
        """
        intra, cross = self._node_links()
        k, numel = intra.size, flat.numel()
        if numel == 0:
            return lambda: flat
        rows, shard = self._slotted_rows(flat, k, state.nonfinite)
        width = rows.shape[1]
        received = collectives.all_to_all_v(
            list(rows.view(-1).split(width)), intra.group, recv_sizes=[width] * k
        )
        parts = self._read_rows(state, received, shard)  # type: ignore[arg-type]
        node_count = sum(state.seen.values())
        # The node mean, not the sum: the strategy across nodes then averages
        # node means into the world mean, and linear compressors see the scale
        # they see in the flat scheme.
        node_mean = torch.stack(parts).sum(0).div_(k)
        across = replace(state.group.strategy, hierarchical=False)
        inner = self._prepare_flat(state, across, node_mean, cross, node_count)()

        def finish() -> Tensor:
            mean = inner()
            with self._counting():
                gathered = collectives.all_gather(mean, intra.group)
            return torch.cat(gathered)[:numel]  # type: ignore[arg-type]

        return finish

    def _compensate(self, memory: Memory | None, flat: Tensor, key: Any) -> Tensor:
        return flat if memory is None else memory.compensate(flat, key)

    def _prepare_allreduce(
        self, state: _GroupState, flat: Tensor, link: _Link, count: int
    ) -> Launch:
        compressor = state.compressor
        assert compressor is not None
        key, n = state.index, link.size
        compensated = self._compensate(state.memory, flat, key)
        # Linear compressors (payloads sum elementwise) get the input divided
        # first, like DDP's fp16 hook: the sum then cannot overflow FP16.
        linear = compressor.allreduce_compatible
        rounds = compressor.allreduce_rounds(compensated / n if linear else compensated, key)
        request = next(rounds)
        if self._checks:  # the sent copy carries the slots; the payload itself stays ours
            own = request.tensor
            slots = count_slots(count, link.rank, n, own.dtype)
            send = torch.cat([own.reshape(-1), slots])
        else:
            own = request.tensor.clone()
            send = request.tensor

        def launch() -> Finish:
            pending = collectives.all_reduce(send, _op(request.op), link.group, async_op=True)

            def finish() -> Tensor:
                reduced: Tensor = pending.wait()  # type: ignore[union-attr,assignment]
                if self._checks:
                    state.seen = read_slots(reduced[own.numel() :])
                    reduced = reduced[: own.numel()].view_as(own)
                with self._counting():
                    while True:
                        try:
                            nxt = rounds.send(reduced)
                        except StopIteration as stop:
                            total: Tensor = stop.value
                            break
                        reduced = collectives.all_reduce(nxt.tensor, _op(nxt.op), link.group)  # type: ignore[assignment]
                mean = total if linear else total / n
                if has_feedback(state.memory):
                    sent = self._sent(compressor, own, mean, key, scale=n if linear else 1)
                    state.memory.update(key, compensated, sent)
                return mean

            return finish

        return launch

    def _sent(
        self, compressor: Compressor, own: Tensor, mean: Tensor, key: Any, scale: int
    ) -> Tensor:
        """What this rank contributed on the all-reduce path, for error feedback.

        When the single round carries the compressor's own payload, it is its
        decompression (times the pre-division); otherwise (PowerSGD's two rounds,
        the int8 sign vote) the paper's convention: the mean approximation.
        """
        numel = mean.numel()
        specs = compressor.payload_spec(numel)
        if len(specs) == 1 and specs[0].matches(own):
            return compressor.decompress((own,), numel, key) * scale
        return mean

    def _compress(
        self, compressor: Compressor, memory: Memory | None, flat: Tensor, key: Any
    ) -> tuple[Tensor, ...]:
        compensated = self._compensate(memory, flat, key)
        payload = compressor.compress(compensated, key)
        if has_feedback(memory):
            memory.update(key, compensated, compressor.decompress(payload, flat.numel(), key))
        return payload

    def _prepare_allgather(
        self, state: _GroupState, flat: Tensor, link: _Link, count: int
    ) -> Launch:
        compressor = state.compressor
        assert compressor is not None
        key, numel = state.index, flat.numel()
        payload = self._with_count(self._compress(compressor, state.memory, flat, key), count)
        layout = collectives.Layout.of(payload)
        packed = collectives.pack(payload)

        def launch() -> Finish:
            pending = collectives.all_gather(packed, link.group, async_op=True)

            def finish() -> Tensor:
                gathered = pending.wait()  # type: ignore[union-attr]
                payloads = self._read_counts(
                    state, [collectives.unpack(buf, layout) for buf in gathered]
                )
                return compressor.aggregate(payloads, numel, key) / link.size

            return finish

        return launch

    def _with_count(self, payload: tuple[Tensor, ...], count: int) -> tuple[Tensor, ...]:
        """The payload and, when the engine checks, this rank's count as one more tensor."""
        if not self._checks:
            return payload
        return (*payload, torch.tensor([count], dtype=torch.int64))

    def _read_counts(self, state: _GroupState, payloads: list[list[Tensor]]) -> list[list[Tensor]]:
        """Every rank's payload without its count; the counts go to ``state.seen``."""
        if not self._checks:
            return payloads
        state.seen = {r: int(p[-1][0]) for r, p in enumerate(payloads) if int(p[-1][0])}
        return [p[:-1] for p in payloads]

    def _prepare_divisible(
        self, state: _GroupState, flat: Tensor, link: _Link, count: int
    ) -> Launch:
        """All-to-all of compressed shards, aggregate own shard, re-compress, all-gather."""
        compressor = state.compressor
        assert compressor is not None
        n, numel = link.size, flat.numel()
        shard = math.ceil(numel / n) if numel else 0
        padded = _padded(flat, shard * n)
        compensated = self._compensate(state.memory, padded, state.index)
        keys = [(state.index, "shard", j) for j in range(n)]
        parts = compensated.split(shard) if shard else [padded] * n
        payloads = [compressor.compress(part, k) for part, k in zip(parts, keys, strict=True)]
        if has_feedback(state.memory):
            sent = [compressor.decompress(p, shard, k) for p, k in zip(payloads, keys, strict=True)]
            state.memory.update(state.index, compensated, torch.cat(sent) if shard else padded)
        payloads = [self._with_count(p, count) for p in payloads]
        layout = collectives.Layout.of(payloads[0])
        buffers = [collectives.pack(p) for p in payloads]

        def launch() -> Finish:
            pending = collectives.all_to_all_v(
                buffers, link.group, async_op=True, recv_sizes=[layout.nbytes] * n
            )

            def finish() -> Tensor:
                received = pending.wait()  # type: ignore[union-attr]
                mine = self._read_counts(
                    state, [collectives.unpack(buf, layout) for buf in received]
                )
                shard_sum = compressor.aggregate(mine, shard, keys[link.rank])
                # A vote is re-compressed as the vote (its ties, 0, travel as +1:
                # one bit per element has no third state); a sum as the sum.
                vote = compressor.majority_vote
                reduced = shard_sum / n if vote else shard_sum
                key2 = (state.index, "reduced")
                with self._counting():
                    again = self._compress(compressor, state.second_memory, reduced, key2)
                    gathered = collectives.all_gather(collectives.pack(again), link.group)
                layout2 = collectives.Layout.of(again)
                parts = [
                    compressor.decompress(collectives.unpack(b, layout2), shard, key2)
                    for b in gathered
                ]
                if not parts:
                    return flat
                return torch.cat(parts)[:numel] / (1 if vote else n)

            return finish

        return launch


def _scheme_name(spec: object) -> str:
    """How the ``sparse_scheme`` argument is described across ranks."""
    if spec is None or isinstance(spec, str):
        return repr(spec)
    return f"{type(spec).__module__}.{type(spec).__qualname__}"


def _describe_scheme(scheme: SparseSync) -> str:
    """A scheme's settings every rank must share: its ``describe()``, else its class."""
    describe = getattr(scheme, "describe", None)
    if callable(describe):
        return str(describe())
    return f"{type(scheme).__module__}.{type(scheme).__qualname__}"


def _describe_strategy(strategy: Strategy) -> str:
    return f"{strategy.label()} (memory={strategy.memory})"


_STATE_FORMAT = "thrifty.GradientSync/1"


def _with_flags(
    template: dict[str, Tensor], have: dict[str, Tensor], slot: str
) -> dict[str, Tensor]:
    """Each state of ``template`` (its value, or zeros) and a ``set_`` flag saying which."""
    out: dict[str, Tensor] = {}
    for kind, zeros in template.items():
        value = have.get(kind)
        if value is not None and value.shape != zeros.shape:
            raise RuntimeError(
                f"{slot} state {kind!r} has shape {tuple(value.shape)}, expected "
                f"{tuple(zeros.shape)}: the engine's slots are out of step with its launches"
            )
        out[kind] = zeros if value is None else value.detach()
        out[f"set_{kind}"] = torch.tensor(value is not None)
    return out


def _without_flags(
    template: dict[str, Tensor], saved: dict[str, Tensor], slot: str
) -> dict[str, Tensor]:
    """The saved states whose ``set_`` flag is on, checked against ``template``'s shapes."""
    out = {}
    for kind, zeros in template.items():
        if kind not in saved or f"set_{kind}" not in saved:
            raise ValueError(f"GradientSync state of {slot} lacks {kind!r}")
        if not bool(saved[f"set_{kind}"]):
            continue
        value = saved[kind]
        if value.shape != zeros.shape:
            raise ValueError(
                f"GradientSync state {slot}/{kind} has shape {tuple(value.shape)}, this "
                f"engine expects {tuple(zeros.shape)}: saved with another plan or compressor"
            )
        out[kind] = value
    return out


def _reset(owner: Any, key: Hashable) -> None:
    """Forget ``owner``'s state of ``key`` (a memory or a compressor) before loading it."""
    if isinstance(owner, Memory):
        owner.reset(key)
    else:
        owner.reset_state(key)


def _check_same_parameters(saved: list[list[Any]], mine: list[list[Any]]) -> None:
    """Raise naming the first difference between the saved and this engine's parameters."""
    if saved == mine:
        return
    saved_names = [n for n, _, _ in saved]
    names = [n for n, _, _ in mine]
    missing = [n for n in names if n not in saved_names]
    extra = [n for n in saved_names if n not in names]
    if missing or extra:
        raise ValueError(
            "GradientSync state is of another model: trainable parameters "
            f"{missing[:3]} are not in it, and it has {extra[:3]} that this model lacks"
        )
    for (name, shape, dtype), (_, my_shape, my_dtype) in zip(saved, mine, strict=True):
        if shape != my_shape or dtype != my_dtype:
            raise ValueError(
                f"GradientSync state is of another model: parameter {name!r} is {dtype} "
                f"{tuple(shape)} in it, {my_dtype} {tuple(my_shape)} here"
            )
    raise ValueError(
        "GradientSync state is of another model: its trainable parameters come in another "
        f"order ({saved_names[:5]}... there, {names[:5]}... here)"
    )


def _built(factory: SparseSchemeFactory) -> SparseSync:
    """One parameter's scheme, checked to have the method the engine calls."""
    scheme = factory()
    if not isinstance(scheme, SparseSync):
        raise TypeError(
            f"sparse_scheme factory {factory!r} returned a {type(scheme).__name__}, "
            "which has no sync(grad, group, average) method"
        )
    return scheme


def _sparse_parameter_names(model: nn.Module, params: dict[str, nn.Parameter]) -> set[str]:
    """Names (as in ``params``) of the weights of embeddings built with ``sparse=True``."""
    sparse_ids = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse
    }
    return {name for name, p in params.items() if id(p) in sparse_ids}


def _place(state: _GroupState) -> str:
    """How an error names a group: its index and first parameters."""
    names = state.group.names
    shown = ", ".join(names[:3]) + (f", ... ({len(names)} tensors)" if len(names) > 3 else "")
    where = " (ranks here are node indices)" if state.group.strategy.hierarchical else ""
    return f"group {state.index} ({shown}){where}"


def _with_slots(flat: Tensor, slots: Tensor) -> Tensor:
    """``flat`` then ``slots``: in place when ``flat`` has room after it (see ``_flatten``)."""
    base = flat._base
    numel = flat.numel()
    if (
        base is not None
        and base.dim() == 1
        and base.numel() == numel + slots.numel()
        and base.data_ptr() == flat.data_ptr()
        and base.dtype == slots.dtype
    ):
        base[numel:] = slots
        return base
    return torch.cat([flat, slots])


def _padded(flat: Tensor, numel: int) -> Tensor:
    """A fresh fp32 copy of ``flat`` with zeros up to ``numel`` elements."""
    out = torch.zeros(numel, dtype=torch.float32)
    out[: flat.numel()] = flat
    return out


def _with_layer_shape(strategy: Strategy, params: list[nn.Parameter]) -> Compressor | None:
    """The group's compressor; a low-rank one sees a lone weight as its own matrix.

    PowerSGD views a flat buffer as a near-square matrix, which scrambles the
    low-rank structure of a layer's gradient; for a group of one tensor with
    two or more dims use ``(out, rest)`` instead, as PyTorch's PowerSGD hook
    does (on the digits CNN, rank 1: 0.94 test accuracy instead of 0.64).
    """
    compressor = strategy.build_compressor()
    lone = params[0] if len(params) == 1 else None
    if (
        lone is not None
        and lone.dim() >= 2
        and lone.numel() > 0  # a (0, k) weight has no rows to view
        and getattr(compressor, "shape", "absent") is None
        and strategy.collective != "all_to_all"  # shards are not the layer's matrix
        and not strategy.hierarchical
    ):
        compressor.shape = (lone.shape[0], lone.numel() // lone.shape[0])  # type: ignore[union-attr]
    return compressor


def _keeps_state_per_parameter(state: _GroupState) -> bool:
    """Whether a group's error feedback is laid out parameter by parameter.

    Not for the divisible scheme nor hierarchical groups: theirs is per shard.
    """
    strategy = state.group.strategy
    return (
        state.memory is not None
        and strategy.collective != "all_to_all"
        and not strategy.hierarchical
    )


def _carry_memory(old: list[_GroupState], new: list[_GroupState]) -> None:
    """Move per-parameter error-feedback state from the old groups to the new ones."""
    per_param: dict[str, tuple[type, dict[str, Tensor]]] = {}
    for state in old:
        if not _keeps_state_per_parameter(state):
            continue
        assert state.memory is not None
        exported = state.memory.export_state(state.index)
        offset = 0
        for name, p in zip(state.group.names, state.params, strict=True):
            n = p.numel()
            per_param[name] = (
                type(state.memory),
                {k: v[offset : offset + n] for k, v in exported.items()},
            )
            offset += n
    for state in new:
        if not _keeps_state_per_parameter(state):
            continue
        assert state.memory is not None
        kinds = set().union(*(per_param.get(n, (None, {}))[1].keys() for n in state.group.names))
        if not kinds:
            continue
        merged = {}
        for kind in kinds:
            parts = []
            for name, p in zip(state.group.names, state.params, strict=True):
                mtype, tensors = per_param.get(name, (None, {}))
                same = mtype is type(state.memory) and kind in tensors
                parts.append(tensors[kind] if same else torch.zeros(p.numel()))
            merged[kind] = torch.cat(parts)
        state.memory.import_state(state.index, merged)


def _op(name: str) -> dist.ReduceOp.RedOpType:
    return {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[name]
