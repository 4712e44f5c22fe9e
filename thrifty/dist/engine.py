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

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from thrifty.compressors import Compressor
from thrifty.compressors.memory import Memory
from thrifty.dist import collectives as C
from thrifty.dist.plan import Group, Plan, Strategy, has_feedback

__all__ = ["GradientSync", "get_planner", "register_planner"]

log = logging.getLogger(__name__)

# Planners turn (sync engine, strategy) into a Plan; MergeComp and ByteComp
# register a factory of planners here so the engine never imports them.
Planner = Callable[["GradientSync", Strategy], Plan]
_PLANNERS: dict[str, Callable[..., Planner]] = {}


def register_planner(name: str, factory: Callable[..., Planner]) -> None:
    """Make ``GradientSync(model, plan=name)`` use ``factory()`` as its planner."""
    _PLANNERS[name] = factory


def get_planner(name: str, **options: Any) -> Planner:
    """The planner registered as ``name`` (importing ``thrifty.<name>`` if needed)."""
    if name not in _PLANNERS:
        with contextlib.suppress(ImportError):
            __import__(f"thrifty.{name}")  # a planner registers itself on import
    if name not in _PLANNERS:
        known = ["layerwise", "whole", *sorted(_PLANNERS)]
        raise ValueError(f"unknown plan {name!r}; expected a Plan or one of {known}")
    return _PLANNERS[name](**options)


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
    finish: Callable[[], Tensor] | None = None


class GradientSync:
    """Synchronise the gradients of ``model`` across the ranks of a process group.

    Args:
        model: a plain ``nn.Module``, identical on every rank.
        compressor: registry name (see ``thrifty.compressors.available_compressors()``)
            or None for fp32. Ignored when ``plan`` is a :class:`Plan`.
        plan: ``"layerwise"`` (one group per tensor), ``"whole"`` (one group), a
            registered planner name (``"mergecomp"``, ``"bytecomp"``), a planner
            object (``thrifty.mergecomp.MergeComp(...)``), or a :class:`Plan`.
        collective: for the default strategy; None picks all-reduce when the
            compressor allows it, else all-gather.
        memory: error feedback for the default strategy (``"default"``, ``"none"``,
            ``"residual"``, ``"dgc"``).
        process_group: defaults to the world.
        broadcast_parameters: copy rank 0's parameters and buffers to every rank
            at construction, as DDP does, so the replicas start equal.
        check_plan: all-gather the plan's fingerprint and refuse to start when
            ranks disagree (a mismatched plan would hang or corrupt collectives).
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
        broadcast_parameters: bool = True,
        check_plan: bool = True,
        **compressor_options: Any,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "GradientSync needs torch.distributed: call init_process_group first"
            )
        self.model = model
        self.group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        # Backward produces gradients roughly in reverse registration order;
        # plans are written in that order (DDP makes the same first guess).
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.backward_order = [n for n, _ in reversed(named)]
        self._params = dict(named)
        self.strategy = Strategy.make(compressor, collective, memory, **compressor_options)
        # Called with this engine after every synchronised backward (planners
        # that tune online hook in here); ``iterations`` counts those backwards.
        self.iteration_callbacks: list[Callable[[GradientSync], None]] = []
        self.iterations = 0
        if broadcast_parameters:
            self._broadcast_state()
        self.plan = self._resolve_plan(plan)
        self.plan.check_covers(self._params)
        if check_plan:
            self._check_plan_agrees()
        self._groups = self._build_groups(self.plan)
        self._group_of = self._index_groups(self._groups)
        self.ledger = C.CommLedger()
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
        with torch.no_grad():
            for t in [*self.model.parameters(), *self.model.buffers()]:
                src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
                dist.broadcast(t.data, src=src, group=self.group)

    def _check_plan_agrees(self) -> None:
        mine = self.plan.fingerprint()
        everyone = C.all_gather_packed([torch.tensor(list(mine.encode()), dtype=torch.uint8)])
        prints = [bytes(t[0].tolist()).decode() for t in everyone]
        if len(set(prints)) > 1:
            differ = [r for r, fp in enumerate(prints) if fp != prints[0]]
            raise RuntimeError(
                f"GradientSync plans differ across ranks: ranks {differ} disagree with rank 0 "
                f"(this rank's plan: {self.plan.describe()[:300]}). Build the plan "
                "deterministically or decide it on rank 0 and broadcast it."
            )

    def _build_groups(self, plan: Plan) -> list[_GroupState]:
        groups = []
        for i, g in enumerate(plan.groups):
            params = [self._params[n] for n in g.names]
            groups.append(
                _GroupState(
                    index=i,
                    group=g,
                    params=params,
                    compressor=_with_layer_shape(g.strategy, params),
                    memory=g.strategy.build_memory(),
                    second_memory=g.strategy.build_memory()
                    if g.strategy.collective == "all_to_all"
                    else None,
                    numel=sum(p.numel() for p in params),
                )
            )
        return groups

    # ------------------------------------------------------------------ public

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
        """
        if self._in_backward:
            raise RuntimeError("set_plan must be called between iterations, not during backward")
        plan.check_covers(self._params)
        previous = self.plan
        self.plan = plan
        if check_plan:
            try:
                self._check_plan_agrees()
            except RuntimeError:
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

    def remove(self) -> None:
        """Detach the hooks; the model goes back to purely local gradients."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

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
            self._launch_ready_groups()

        return hook

    def _launch_ready_groups(self) -> None:
        while self._next_launch < len(self._groups):
            state = self._groups[self._next_launch]
            if len(state.ready) < len(state.params):
                return
            self._launch(state)
            self._next_launch += 1

    def _finish_backward(self) -> None:
        try:
            while self._next_launch < len(self._groups):  # groups with unused parameters
                self._launch(self._groups[self._next_launch])
                self._next_launch += 1
            for state in self._groups:
                assert state.finish is not None
                averaged = state.finish()
                self._write_grads(state, averaged)
        finally:
            for state in self._groups:
                state.ready.clear()
                state.finish = None
            self._next_launch = 0
            self._in_backward = False
        self.iterations += 1
        for callback in list(self.iteration_callbacks):
            callback(self)

    def _flatten(self, state: _GroupState) -> Tensor:
        parts = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
            for p in state.params
        ]
        return torch.cat(parts).to(torch.float32) if parts else torch.zeros(0)

    def _write_grads(self, state: _GroupState, averaged: Tensor) -> None:
        offset = 0
        for p in state.params:
            n = p.numel()
            value = averaged[offset : offset + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = value.clone()
            else:
                p.grad.copy_(value)
            offset += n

    # ------------------------------------------------------------------ strategies

    def _launch(self, state: _GroupState) -> None:
        flat = self._flatten(state)
        strategy = state.group.strategy
        with C.count_bytes(self.ledger):
            if state.compressor is None:
                state.finish = self._launch_plain(flat)
            elif strategy.collective == "all_reduce":
                state.finish = self._launch_allreduce(state, flat)
            elif strategy.collective == "all_gather":
                state.finish = self._launch_allgather(state, flat)
            else:
                state.finish = self._launch_divisible(state, flat)

    def _launch_plain(self, flat: Tensor) -> Callable[[], Tensor]:
        flat.div_(self.world_size)  # before the sum, as DDP does: no overflow
        pending = C.all_reduce(flat, group=self.group, async_op=True)
        return pending.wait  # type: ignore[union-attr]

    def _compensate(self, memory: Memory | None, flat: Tensor, key: Any) -> Tensor:
        return flat if memory is None else memory.compensate(flat, key)

    def _launch_allreduce(self, state: _GroupState, flat: Tensor) -> Callable[[], Tensor]:
        compressor = state.compressor
        assert compressor is not None
        key, n = state.index, self.world_size
        compensated = self._compensate(state.memory, flat, key)
        # Linear compressors (payloads sum elementwise) get the input divided
        # first, like DDP's fp16 hook: the sum then cannot overflow FP16.
        linear = compressor.allreduce_compatible
        rounds = compressor.allreduce_rounds(compensated / n if linear else compensated, key)
        request = next(rounds)
        own = request.tensor.clone()
        pending = C.all_reduce(request.tensor, _op(request.op), self.group, async_op=True)

        def finish() -> Tensor:
            reduced = pending.wait()  # type: ignore[union-attr]
            with C.count_bytes(self.ledger):
                while True:
                    try:
                        nxt = rounds.send(reduced)
                    except StopIteration as stop:
                        total: Tensor = stop.value
                        break
                    reduced = C.all_reduce(nxt.tensor, _op(nxt.op), self.group)  # type: ignore[assignment]
            mean = total if linear else total / n
            if has_feedback(state.memory):
                sent = self._sent(compressor, own, mean, key, scale=n if linear else 1)
                state.memory.update(key, compensated, sent)
            return mean

        return finish

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

    def _launch_allgather(self, state: _GroupState, flat: Tensor) -> Callable[[], Tensor]:
        compressor = state.compressor
        assert compressor is not None
        key, numel = state.index, flat.numel()
        payload = self._compress(compressor, state.memory, flat, key)
        layout = C.Layout.of(payload)
        pending = C.all_gather(C.pack(payload), self.group, async_op=True)

        def finish() -> Tensor:
            gathered = pending.wait()  # type: ignore[union-attr]
            payloads = [C.unpack(buf, layout) for buf in gathered]
            return compressor.aggregate(payloads, numel, key) / self.world_size

        return finish

    def _launch_divisible(self, state: _GroupState, flat: Tensor) -> Callable[[], Tensor]:
        """All-to-all of compressed shards, aggregate own shard, re-compress, all-gather."""
        compressor = state.compressor
        assert compressor is not None
        n, numel = self.world_size, flat.numel()
        shard = math.ceil(numel / n) if numel else 0
        padded = torch.zeros(shard * n, dtype=torch.float32)
        padded[:numel] = flat
        compensated = self._compensate(state.memory, padded, state.index)
        keys = [(state.index, "shard", j) for j in range(n)]
        parts = compensated.split(shard) if shard else [padded] * n
        payloads = [compressor.compress(part, k) for part, k in zip(parts, keys, strict=True)]
        if has_feedback(state.memory):
            sent = [compressor.decompress(p, shard, k) for p, k in zip(payloads, keys, strict=True)]
            state.memory.update(state.index, compensated, torch.cat(sent) if shard else padded)
        layout = C.Layout.of(payloads[0])
        buffers = [C.pack(p) for p in payloads]
        pending = C.all_to_all_v(buffers, self.group, async_op=True, recv_sizes=[layout.nbytes] * n)

        def finish() -> Tensor:
            received = pending.wait()  # type: ignore[union-attr]
            mine = [C.unpack(buf, layout) for buf in received]
            shard_sum = compressor.aggregate(mine, shard, keys[self.rank])
            key2 = (state.index, "reduced")
            with C.count_bytes(self.ledger):
                again = self._compress(compressor, state.second_memory, shard_sum, key2)
                gathered = C.all_gather(C.pack(again), self.group)
            layout2 = C.Layout.of(again)
            parts = [compressor.decompress(C.unpack(b, layout2), shard, key2) for b in gathered]
            return torch.cat(parts)[:numel] / self.world_size if parts else flat

        return finish


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
        and getattr(compressor, "shape", "absent") is None
        and strategy.collective != "all_to_all"  # shards are not the layer's matrix
    ):
        compressor.shape = (lone.shape[0], lone.numel() // lone.shape[0])  # type: ignore[union-attr]
    return compressor


def _carry_memory(old: list[_GroupState], new: list[_GroupState]) -> None:
    """Move per-parameter error-feedback state from the old groups to the new ones."""
    per_param: dict[str, tuple[type, dict[str, Tensor]]] = {}
    for state in old:
        if state.memory is None or state.group.strategy.collective == "all_to_all":
            continue  # the divisible scheme's state is per shard, not per parameter
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
        if state.memory is None or state.group.strategy.collective == "all_to_all":
            continue
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
