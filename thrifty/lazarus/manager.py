"""Lazarus for a user's own training loop: survive rank failures without restarting the job.

The user keeps the model, the optimizer and the loop; the manager takes the
MoE blocks and every step's commit decision (the shape of TorchFT's
``Manager``)::

    mgr = Lazarus(model, lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
                  LazarusOptions(slots_per_rank=3), store="127.0.0.1:29600")
    while mgr.committed_steps < steps:
        x, y = batch(mgr.committed_steps, mgr.rank, mgr.world_size)

        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = mgr.step(closure)
    mgr.close()

What the manager does:

* **Swap.** Every MoE block (Mixtral, Qwen3-MoE, OLMoE, see
  :mod:`thrifty.lazarus.replicated_moe`) becomes a
  :class:`~thrifty.lazarus.replicated_moe.ReplicatedExperts` with
  ``slots_per_rank`` fixed slots, filled per Eq. 1 + :func:`place_experts`
  over the current members. The optimizer is built by the user's factory
  *after* the swap, over the final parameters; slots stay the same
  ``nn.Parameter`` objects forever, so on a re-placement only slot contents
  change: the weights and the optimizer's ``state[param]`` tensors
  (``exp_avg``/``exp_avg_sq``/``step`` for AdamW, ``momentum_buffer`` for
  SGD, whatever the optimizer keeps), which travel with the replica.
* **Step.** ``mgr.step(closure)`` zeroes the gradients, runs the closure
  (forward + backward: the expert all-to-alls run inside), all-reduces the
  dense gradients (mean over members), sums each expert's gradient over
  exactly its replicas (:class:`~thrifty.lazarus.expert_grads.ExpertGradSync`),
  then votes (one all-reduce of ``[1, loss, joins]``) and only then runs
  ``optimizer.step()``. The default process group belongs to the manager:
  it is rebuilt in every generation.
* **Failure.** Any rank failing at any moment makes the others' collectives
  raise within milliseconds (:mod:`thrifty.lazarus.membership`: liveness
  connection, heartbeats, and a watchdog that shuts down the group's sockets).
  The survivors agree on the members of the next generation (a failure
  during recovery just starts the one after), build a new gloo group on the
  coordinator's store, make the committed step equal, re-place the experts
  for the survivors, move missing replicas (weights + optimizer state) from
  surviving owners, and re-run the step. When some expert lost every
  replica, everyone reloads the last checkpoint (logged as an error and
  reported).
* **Join.** A process started later (e.g. a restarted worker) with the same
  script enters at a step boundary and receives dense state and replicas.

Roll forward, not back. The vote is the commit point: when the vote
all-reduce completed on *any* rank, every rank had contributed to it, so
every rank had finished its gradient synchronisation. So a survivor that
failed inside the vote while another one committed still holds the complete,
synchronised gradients: it applies the same ``optimizer.step()`` during
recovery (bit-identical to the others, same gradients and same state), and
no snapshot of parameters or optimizer state is ever needed. A step no
survivor committed is simply run again.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from thrifty.comm.collectives import Layout, pack, unpack
from thrifty.lazarus.coordinator import STORE_ENV
from thrifty.lazarus.expert_grads import ExpertGradSync
from thrifty.lazarus.membership import (
    Agreement,
    GenerationFailed,
    MemberEvicted,
    Membership,
    client,
)
from thrifty.lazarus.replan import SlotPlan, plan_slots
from thrifty.lazarus.replicated_moe import ReplicatedExperts, find_moe_blocks, replicate_moe_blocks

__all__ = ["Lazarus", "LazarusError", "LazarusOptions", "LazarusReport", "Reconfiguration"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]

_START_ATTEMPTS = 3

# Text of the errors a gloo collective or rendezvous raises when a peer is gone.
_COMM_MARKERS = (
    "Connection closed by peer",
    "Connection reset",
    "Broken pipe",
    "Timed out",
    "timed out",
    "timeout",
    "Socket",
    "gloo",
    "connect",
)


class LazarusError(RuntimeError):
    """The job cannot continue (e.g. experts lost every replica and there is no checkpoint)."""


@dataclass(frozen=True)
class LazarusOptions:
    """What the user sets (fault injection is not here: tests kill processes from outside).

    Args:
        slots_per_rank: ``c``, expert replica slots per rank per MoE layer
            (memory bound). ``members x c`` must be at least the number of experts.
        fault_tolerance: ``f``, replicas per expert on distinct ranks (Eq. 1's
            minimum; relaxed with a warning when too few slots remain).
        reallocate_every: re-plan replicas from the token loads every this
            many steps (0: only on membership changes).
        heartbeat_interval_s: how often each member bumps its heartbeat counter.
        failure_timeout_s: a member whose heartbeat stands still this long is
            declared gone (a stopped or hung process; a dead one is seen at
            once through the coordinator's liveness port). Measured on a loaded
            2-core machine (6 ranks + other jobs): live heartbeats stood still
            for at most ~0.5 s, so 2 s leaves room.
        collective_timeout_s: gloo's timeout, the backstop for a collective
            that waits on a member that is alive but never arrives.
        connect_timeout_s: the longest a new generation's gloo rendezvous may
            take (a member dying in the few milliseconds of the connect costs this).
        checkpoint_dir / checkpoint_every: per-member checkpoints (weights and
            optimizer state of everything) every this many committed steps;
            used only when an expert lost every replica.
        namespace: key prefix in the coordinator's store (one per job).
        grad_sync: :class:`~thrifty.lazarus.expert_grads.ExpertGradSync` method.
        start_timeout_s: how long the initial members and joiners wait for each other.
        max_spurious_recoveries: recoveries in a row that lose nobody before
            the error is re-raised (a deterministic collective error is a bug,
            not a failure).
    """

    slots_per_rank: int = 2
    fault_tolerance: int = 2
    reallocate_every: int = 0
    heartbeat_interval_s: float = 0.1
    failure_timeout_s: float = 2.0
    collective_timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    namespace: str = "lazarus"
    grad_sync: str = "alltoall"
    start_timeout_s: float = 300.0
    max_spurious_recoveries: int = 3

    def __post_init__(self) -> None:
        if self.slots_per_rank < 1 or self.fault_tolerance < 1:
            raise ValueError(
                f"slots_per_rank={self.slots_per_rank}, fault_tolerance={self.fault_tolerance}: "
                "expected >= 1"
            )
        if self.reallocate_every < 0 or self.checkpoint_every < 0:
            raise ValueError(
                f"reallocate_every={self.reallocate_every}, checkpoint_every="
                f"{self.checkpoint_every}: expected >= 0"
            )
        if not 0 < self.heartbeat_interval_s < self.failure_timeout_s:
            raise ValueError(
                f"heartbeat_interval_s={self.heartbeat_interval_s}, failure_timeout_s="
                f"{self.failure_timeout_s}: expected 0 < interval < timeout"
            )
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every > 0 needs checkpoint_dir")


@dataclass(frozen=True)
class Reconfiguration:
    """One membership change or re-placement, as this member saw it.

    Times are seconds. ``detection_s``: from the failure (the coordinator's
    record of the dead connection, or the last heartbeat seen) to this member
    noticing it; ``agree_s``: noticing to the agreed member list;
    ``regroup_s``: to the new gloo group; ``transfer_s``: to training again
    (roll forward, state to joiners, replica moves or checkpoint reload).
    """

    kind: str  # "failure", "join" or "rebalance"
    generation: int
    step: int
    members_before: tuple[int, ...]
    members_after: tuple[int, ...]
    attempts: int = 1
    detection_s: float | None = None
    agree_s: float = 0.0
    regroup_s: float = 0.0
    transfer_s: float = 0.0
    total_s: float = 0.0
    replicas_moved: int = 0
    bytes_moved: int = 0
    rolled_forward: bool = False
    checkpoint_reload: int | None = None
    lost_experts: tuple[tuple[int, int], ...] = ()
    relaxed: bool = False

    @property
    def lost_members(self) -> tuple[int, ...]:
        return tuple(m for m in self.members_before if m not in self.members_after)


@dataclass
class LazarusReport:
    """What happened to this member so far."""

    member_id: int
    committed_steps: int = 0
    reconfigurations: list[Reconfiguration] = field(default_factory=list)
    checkpoints_saved: int = 0
    max_heartbeat_gap_s: float = 0.0

    @property
    def checkpoint_reloads(self) -> list[Reconfiguration]:
        return [r for r in self.reconfigurations if r.checkpoint_reload is not None]


def _store_address(store: str | dist.TCPStore | None) -> str:
    if isinstance(store, dist.TCPStore):
        return f"{store.host}:{store.port}"
    address = store or os.environ.get(STORE_ENV)
    if not address:
        raise ValueError(
            f"no coordinator: pass store='host:port' or set {STORE_ENV}. Start one with "
            "`python -m thrifty.lazarus.coordinator --host 127.0.0.1 --port 29600`"
        )
    return address


def _is_comm_failure(exc: BaseException) -> bool:
    if isinstance(exc, GenerationFailed | dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _COMM_MARKERS)


def _set_layer(layer: ReplicatedExperts, experts: tuple[int, ...], counts: list[list[int]]) -> None:
    """Point ``layer`` at a new placement on the current default group.

    ReplicatedExperts fixes its placement at construction; this re-points
    the few attributes that describe it, keeping the slot modules (and their
    parameters). It belongs in ReplicatedExperts as a public method.
    """
    layer.group = None
    layer.rank, layer.world_size = dist.get_rank(), dist.get_world_size()
    layer.replica_experts = tuple(experts)
    layer.replica_counts = torch.tensor(counts, dtype=torch.int64)
    slots_of: dict[int, list[int]] = {}
    for slot, expert in enumerate(experts):
        slots_of.setdefault(expert, []).append(slot)
    layer._slots_of = slots_of


class Lazarus:
    """The resilience manager for one worker; see the module docstring.

    Args:
        model: the user's model (any ``nn.Module`` with MoE blocks), built the
            same way on every worker. Its MoE blocks are replaced in place.
        optimizer: ``factory(model) -> torch.optim.Optimizer``, called once
            after the swap, so the optimizer holds the final parameters.
            Available afterwards as :attr:`optimizer`.
        options: :class:`LazarusOptions`.
        store: the coordinator's ``host:port`` (or a TCPStore client to it);
            default ``$THRIFTY_LAZARUS_STORE``.
        rank / world_size: this worker's place in the initial job; default
            the current process group (which the manager then replaces) or
            ``$RANK`` / ``$WORLD_SIZE`` (torchrun). Ignored for a process
            that starts after the job began: it joins.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        options: LazarusOptions | None = None,
        store: str | dist.TCPStore | None = None,
        *,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        # Checked before anything else: _initial_rank destroys the caller's
        # process group, and a wrong argument must leave nothing changed.
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "optimizer must be a factory, e.g. `lambda m: torch.optim.AdamW(m.parameters())`: "
                "the manager replaces the MoE blocks first, and an optimizer built before that "
                "would hold the replaced parameters"
            )
        self.options = options or LazarusOptions()
        self.model = model
        address = _store_address(store)
        rank, world_size = self._initial_rank(rank, world_size)
        opts = self.options
        self._ms = Membership(
            address,
            opts.namespace,
            opts.heartbeat_interval_s,
            opts.failure_timeout_s,
        )
        blocks = find_moe_blocks(model)
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no MoE block Lazarus can replicate")
        counts = [int(next(b.experts.parameters()).shape[0]) for _, b in blocks]
        replaced = replicate_moe_blocks(model, lambda i: list(range(counts[i])), group=None)
        self.layers: list[ReplicatedExperts] = list(replaced.values())
        self._experts = counts
        self._loads = [torch.zeros(e, dtype=torch.int64) for e in counts]
        self._mark = [t.clone() for t in self._loads]
        self._pending = [t.clone() for t in self._loads]
        for index, layer in enumerate(self.layers):
            layer.register_forward_hook(self._count_tokens(index))
        self._committed = 0
        self._grads_ready = False
        self._fresh = False
        self._gen = 0
        self._members: tuple[int, ...] = ()
        self._admitted = 0
        self._plan: SlotPlan | None = None
        self._grad_sync: ExpertGradSync | None = None
        self._saved_step = -1
        self._spurious = 0
        self._local_loss = math.nan
        self.report = LazarusReport(member_id=-1)
        if self._ms.store.check(["members/0"]):  # the job runs already: this process joins
            self._join(optimizer)
        else:
            self._start(optimizer, rank, world_size)
        self.report.committed_steps = self._committed

    # ------------------------------------------------------------------ public

    @property
    def member_id(self) -> int:
        """This worker's id for the whole job (initial rank; joiners get new ids)."""
        return self._ms.me

    @property
    def members(self) -> tuple[int, ...]:
        return self._members

    @property
    def rank(self) -> int:
        """This worker's rank in the current generation's group (changes after failures)."""
        return self._members.index(self.member_id)

    @property
    def world_size(self) -> int:
        return len(self._members)

    @property
    def generation(self) -> int:
        return self._gen

    @property
    def committed_steps(self) -> int:
        """Optimizer steps applied (the same on every member; drives the user's loop and data)."""
        return self._committed

    def step(self, closure: Callable[[], Any]) -> float:
        """Run one training step to its commit; returns the loss averaged over members.

        ``closure`` runs forward and backward (as for ``optimizer.step(closure)``)
        and returns the loss; it may run again after a failure, so it must
        not depend on state it changed itself. Gradients are zeroed before it.

        It returns early when a recovery moved :attr:`committed_steps`: forward
        (this member's step was committed by rolling forward; the loss is then
        this member's own) or back (a checkpoint reload; the loss is NaN). Either
        way the loop should take the batch for the new :attr:`committed_steps`.
        """
        entry = self._committed
        while True:
            try:
                self._maybe_checkpoint()
                votes = self._attempt(closure)
            except BaseException as exc:
                self._handle(exc)
                if self._committed != entry:
                    return self._local_loss if self._committed > entry else math.nan
                continue
            self._spurious = 0
            loss = float(votes[1]) / float(votes[0])
            try:
                self._at_boundary(int(votes[2]))
            except BaseException as exc:
                self._handle(exc)  # the step is committed: recovery, no re-run
            return loss

    def close(self) -> None:
        """Leave the job at the end of training (after the last step, on every member)."""
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.barrier()
        self.report.max_heartbeat_gap_s = self._ms.max_heartbeat_gap_s
        self._ms.close()
        self._teardown_group()
        with contextlib.suppress(Exception):
            self._ms.store.set(f"left/{self.member_id}", "finished")
            self._ms.store.set("finished", "1")  # joiners still waiting give up

    def replica_experts(self) -> list[tuple[int, ...]]:
        """Per layer, the expert in each of this member's slots."""
        return [layer.replica_experts for layer in self.layers]

    def slot_state(self, layer: int, slot: int) -> dict[str, Any]:
        """Weights and optimizer state of one slot (clones): what a move would send."""
        weights, opt = self._slot_tensors(layer, slot)
        return {"weights": weights, "optimizer": opt}

    def dense_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The replicated (non-expert) parameters, by name."""
        slot_ids = self._slot_param_ids()
        for name, p in self.model.named_parameters():
            if id(p) not in slot_ids:
                yield name, p

    # ------------------------------------------------------------------ start

    @staticmethod
    def _initial_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
        if dist.is_initialized():  # a launcher's group: the manager builds its own
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
            dist.destroy_process_group()
        if rank is None or world_size is None:
            try:
                rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            except KeyError:
                raise ValueError(
                    "no rank: pass rank= and world_size=, run under torchrun, or initialise a "
                    "process group first"
                ) from None
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}: expected 0..world_size-1 (world_size={world_size})")
        return rank, world_size

    def _start(self, factory: OptimizerFactory, rank: int, world_size: int) -> None:
        """Generation 0: the initial members, placement from uniform loads."""
        opts = self.options
        self._ms.store.set("world0", str(world_size))
        self._ms.start(rank)
        self.report.member_id = rank
        agreement = self._ms.agree(0, tuple(range(world_size)), 0, opts.start_timeout_s)
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                self._ms.watch(agreement.members)
                self._ms.wait_ready(agreement, opts.start_timeout_s, heartbeats=False)
                self._build_group(agreement)
                self._broadcast_model()  # every worker starts from rank 0's weights
                break
            except Exception as exc:
                # On a loaded machine gloo's full-mesh connect now and then loses a socket.
                if attempt == _START_ATTEMPTS or not _is_comm_failure(exc):
                    raise
                log.warning("member %d: start failed (%s); trying again", rank, exc)
                self._teardown_group()
                base = agreement.members
                # Only a death counts here: a member still inside gloo's connect
                # (a loaded machine) beats late but is alive, and retries too.
                agreement = self._ms.agree(
                    agreement.gen + 1, base, 0, opts.start_timeout_s, heartbeats=False
                )
        held: dict[int, Any] = dict.fromkeys(agreement.members)
        plan = plan_slots(
            self._alloc_loads(), agreement.members, held, opts.slots_per_rank, opts.fault_tolerance
        )
        self._trim(plan.slots, agreement.members.index(rank))
        self._make_optimizer(factory)
        self._adopt(agreement, plan)

    def _join(self, factory: OptimizerFactory) -> None:
        """A process that starts after the job began: wait for admission, then receive state."""
        opts = self.options
        _, member = self._ms.register_joiner()
        self._ms.start(member)
        self.report.member_id = member
        c = opts.slots_per_rank
        placeholder = tuple(
            (tuple(i % e for i in range(c)),) for e in self._experts
        )  # overwritten by the moves
        self._trim(placeholder, 0)
        self._make_optimizer(factory)
        self._fresh = True
        gen = self._ms.wait_admission(opts.start_timeout_s)
        agreed = json.loads(self._ms.store.get(f"members/{gen}"))
        members = tuple(agreed["members"])
        first = Agreement(gen, members, agreed["admitted"], (member,))
        self._reconfigure("join", members, gen, first=first)

    def _trim(self, slots: Any, index: int) -> None:
        """Keep ``slots_per_rank`` replicas per layer (copies of the full layer's experts)."""
        for layer_index, layer in enumerate(self.layers):
            row = slots[layer_index][index]
            full = list(layer.replicas)
            used: set[int] = set()
            kept = []
            for e in row:
                kept.append(full[e] if e not in used else copy.deepcopy(full[e]))
                used.add(e)
            layer.replicas = nn.ModuleList(kept)
            layer.replica_experts = tuple(row)

    def _make_optimizer(self, factory: OptimizerFactory) -> None:
        self.optimizer = factory(self.model)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"the optimizer factory returned {type(self.optimizer).__name__}; expected a "
                "torch.optim.Optimizer"
            )
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [
            n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in held
        ]
        if missing:
            raise ValueError(
                f"the optimizer does not hold parameters {missing[:4]}...: build it over "
                "model.parameters() inside the factory"
            )

    def _broadcast_model(self) -> None:
        tensors = [p.detach() for p in self.model.parameters()]
        tensors += list(self.model.buffers())
        flat = pack(tensors)
        dist.broadcast(flat, src=0)
        with torch.no_grad():
            for t, new in zip(tensors, unpack(flat, Layout.of(tensors)), strict=True):
                t.copy_(new)

    # ------------------------------------------------------------------ step

    def _count_tokens(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            counts = getattr(module, "last_token_counts", None)
            if counts is not None:
                self._pending[index] += counts.sum(dim=0).to(torch.int64)

        return hook

    def _attempt(self, closure: Callable[[], Any]) -> torch.Tensor:
        for t in self._pending:
            t.zero_()
        self._grads_ready = False
        self.optimizer.zero_grad(set_to_none=True)
        loss = closure()
        self._sync_dense_grads()
        assert self._grad_sync is not None
        self._grad_sync.sync()
        self._grads_ready = True
        if torch.is_tensor(loss):
            loss = loss.detach()
        value = math.nan if loss is None else float(loss)
        self._local_loss = value
        joins = self._ms.joins_requested() if self.rank == 0 else 0
        votes = torch.tensor([1.0, value, float(joins)], dtype=torch.float64)
        dist.all_reduce(votes)  # the commit point: see the module docstring
        if int(votes[0]) != self.world_size:
            raise LazarusError(f"vote counted {int(votes[0])} of {self.world_size} members")
        self._apply_step()
        return votes

    def _apply_step(self) -> None:
        self.optimizer.step()
        self._committed += 1
        self._grads_ready = False
        for total, new in zip(self._loads, self._pending, strict=True):
            total += new
            new.zero_()

    def _sync_dense_grads(self) -> None:
        params = [p for _, p in self.dense_parameters() if p.requires_grad]
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        world = self.world_size
        for group in by_dtype.values():
            flat = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
            )
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for p in group:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()

    def _at_boundary(self, joins: int) -> None:
        opts = self.options
        if joins > self._admitted:
            self._reconfigure("join", self._members, self._gen + 1)
        elif opts.reallocate_every and self._committed % opts.reallocate_every == 0:
            self._rebalance()

    # ------------------------------------------------------------------ failures

    def _handle(self, exc: BaseException) -> None:
        """Recover from a peer's failure; leave and re-raise on a local error."""
        peer_failure = self._ms.failure.is_set() or _is_comm_failure(exc)
        if isinstance(exc, MemberEvicted | KeyboardInterrupt | LazarusError) or not peer_failure:
            log.error("member %d leaves the job: %r", self.member_id, exc)
            self._ms.leave(f"{type(exc).__name__}: {exc}")
            self._teardown_group()
            raise exc
        noticed = time.time()
        if self._ms.failure.is_set():
            noticed = min(noticed, self._ms.failure_at)
        log.warning(
            "member %d: step %d failed (%s); recovering",
            self.member_id,
            self._committed,
            self._ms.failure_reason or str(exc).splitlines()[0][:200],
        )
        before = self._members
        record = self._reconfigure("failure", self._members, self._gen + 1, noticed=noticed)
        if record.members_after == before:
            self._spurious += 1
            if self._spurious > self.options.max_spurious_recoveries:
                raise LazarusError(
                    f"{self._spurious} recoveries in a row lost no member: the error is not a "
                    f"failure of a peer ({exc!r})"
                ) from exc

    def _teardown_group(self) -> None:
        self._ms.sockets.shutdown()  # peers blocked on us fail now, not at their timeout
        self._ms.sockets.forget()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        self._grad_sync = None

    def _build_group(self, agreement: Agreement) -> None:
        opts = self.options
        ms = self._ms
        # c10d names the default group after a counter that destroy_process_group() resets;
        # an init that failed leaves it raised, and the next group would then wait for
        # rendezvous keys under another name than the members whose last init succeeded.
        dist.distributed_c10d._world.group_count = 0
        ms.sockets.before()
        rendezvous = client(ms.host, ms.port, ms.namespace, opts.connect_timeout_s)
        ms.sockets.after()  # a death now shuts this connection: the rendezvous fails at once
        dist.init_process_group(
            "gloo",
            store=dist.PrefixStore(f"pg/{agreement.gen}", rendezvous),
            rank=agreement.members.index(self.member_id),
            world_size=len(agreement.members),
            timeout=datetime.timedelta(seconds=opts.connect_timeout_s),
        )
        self._ms.sockets.after()
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        backend._set_default_timeout(datetime.timedelta(seconds=opts.collective_timeout_s))

    def _reconfigure(
        self,
        kind: str,
        base: tuple[int, ...],
        gen: int,
        noticed: float | None = None,
        first: Agreement | None = None,
    ) -> Reconfiguration:
        """Generations ``gen, gen+1, ...`` until one forms and finishes; returns its record."""
        opts = self.options
        began = noticed if noticed is not None else time.time()
        step = self._committed
        original = base
        failed_at: float | None = None
        attempts = 0
        agreement = first
        while True:
            attempts += 1
            self._teardown_group()
            try:
                if agreement is None:
                    agreement = self._ms.agree(gen, base, self._admitted, opts.start_timeout_s)
                agreed = time.time()
                if failed_at is None and kind == "failure":  # before watch() forgets them
                    failed_at = self._failure_time(original, agreement.members)
                self._ms.watch(agreement.members)
                self._ms.wait_ready(agreement, opts.connect_timeout_s)
                self._build_group(agreement)
                regrouped = time.time()
                outcome = self._reconcile(agreement)
                dist.barrier()
                break
            except MemberEvicted:
                raise
            except Exception as exc:
                if agreement is None or not (_is_comm_failure(exc) or self._ms.failure.is_set()):
                    raise
                log.warning(
                    "member %d: generation %d failed during %s recovery (%s); trying %d",
                    self.member_id,
                    agreement.gen,
                    kind,
                    str(exc).splitlines()[0][:200],
                    agreement.gen + 1,
                )
                base, gen, agreement = agreement.members, agreement.gen + 1, None
        self._ms.watch(agreement.members)
        done = time.time()
        record = Reconfiguration(
            kind=kind,
            generation=agreement.gen,
            step=step,
            members_before=original,
            members_after=agreement.members,
            attempts=attempts,
            detection_s=None if failed_at is None else began - failed_at,
            agree_s=agreed - began,
            regroup_s=regrouped - agreed,
            transfer_s=done - regrouped,
            total_s=done - began,
            **outcome,
        )
        self.report.reconfigurations.append(record)
        self.report.committed_steps = self._committed
        return record

    def _failure_time(self, base: tuple[int, ...], after: tuple[int, ...]) -> float | None:
        """When the first of the members that are gone failed, as far as anyone can tell."""
        failed = []
        for m in set(base) - set(after):
            at = self._ms.gone_since(m)
            if at is None:
                at = self._ms.last_beat(m)
            if at is not None:
                failed.append(at)
        return min(failed) if failed else None

    def _reconcile(self, agreement: Agreement) -> dict[str, Any]:
        """In the new group: equal committed steps, state to joiners, re-placement, moves."""
        opts = self.options
        members = agreement.members
        flat_slots = [e for layer in self.layers for e in layer.replica_experts]
        mine = torch.tensor(
            [self._committed, int(self._grads_ready), int(self._fresh), *flat_slots],
            dtype=torch.int64,
        )
        table = [torch.empty_like(mine) for _ in members]
        dist.all_gather(table, mine)
        old = [i for i, row in enumerate(table) if int(row[2]) == 0]
        rolled = False
        held: dict[int, Any] = dict.fromkeys(members)
        if old:
            target = max(int(table[i][0]) for i in old)
            if not self._fresh and self._committed < target:
                if self._committed != target - 1 or not self._grads_ready:
                    raise LazarusError(
                        f"member {self.member_id} is at step {self._committed} without complete "
                        f"gradients while others committed {target}: cannot roll forward"
                    )
                self._apply_step()  # the same update the others applied (module docstring)
                rolled = True
            if any(int(row[2]) for row in table):
                self._broadcast_dense(old[0])
            c = opts.slots_per_rank
            for i in old:
                slots = table[i][3:].tolist()
                held[members[i]] = [slots[li * c : (li + 1) * c] for li in range(len(self.layers))]
        self.optimizer.zero_grad(set_to_none=True)
        self._grads_ready = False
        plan = plan_slots(
            self._alloc_loads(), members, held, opts.slots_per_rank, opts.fault_tolerance
        )
        reload = None
        moved = nbytes = 0
        if plan.lost:
            reload = self._reload_checkpoint(plan, members)
        else:
            moved, nbytes = self._move(plan, members)
        self._adopt(agreement, plan)
        return {
            "replicas_moved": moved,
            "bytes_moved": nbytes,
            "rolled_forward": rolled,
            "checkpoint_reload": reload,
            "lost_experts": plan.lost,
            "relaxed": plan.relaxed,
        }

    def _adopt(self, agreement: Agreement, plan: SlotPlan) -> None:
        """The new generation's placement becomes current: layers, gradient sync, bookkeeping."""
        index = agreement.members.index(self.member_id)
        for li, layer in enumerate(self.layers):
            _set_layer(layer, plan.slots[li][index], plan.counts(li, self._experts[li]))
        self._grad_sync = ExpertGradSync(self.layers, method=self.options.grad_sync, average=True)
        self._plan = plan
        self._gen, self._members = agreement.gen, agreement.members
        self._admitted = max(self._admitted, agreement.admitted)
        self._fresh = False
        self._mark = [t.clone() for t in self._loads]

    def _rebalance(self) -> None:
        """Periodic re-plan on recent loads at a step boundary, in the current group."""
        began = time.time()
        assert self._plan is not None
        opts = self.options
        held = {
            m: [self._plan.slots[li][i] for li in range(len(self.layers))]
            for i, m in enumerate(self._members)
        }
        plan = plan_slots(
            self._alloc_loads(), self._members, held, opts.slots_per_rank, opts.fault_tolerance
        )
        moved, nbytes = self._move(plan, self._members)
        agreement = Agreement(self._gen, self._members, self._admitted, ())
        self._adopt(agreement, plan)
        dist.barrier()
        done = time.time()
        self.report.reconfigurations.append(
            Reconfiguration(
                kind="rebalance",
                generation=self._gen,
                step=self._committed,
                members_before=self._members,
                members_after=self._members,
                transfer_s=done - began,
                total_s=done - began,
                replicas_moved=moved,
                bytes_moved=nbytes,
                relaxed=plan.relaxed,
            )
        )

    def _alloc_loads(self) -> list[list[int]]:
        """Eq. 1's input per layer: loads since the last plan, or all loads when none came since."""
        out = []
        for total, mark in zip(self._loads, self._mark, strict=True):
            recent = total - mark
            out.append((recent if int(recent.sum()) > 0 else total).tolist())
        return out

    # ------------------------------------------------------------------ state moves

    def _slot_param_ids(self) -> set[int]:
        return {id(p) for layer in self.layers for p in layer.replicas.parameters()}

    def _slot_tensors(
        self, layer: int, slot: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
        replica = self.layers[layer].replicas[slot]
        weights = self.layers[layer].replica_state(slot)
        opt = {
            name: _clone_state(self.optimizer.state.get(p, {}))
            for name, p in replica.named_parameters()
        }
        return weights, opt

    def _load_slot(
        self,
        layer: int,
        slot: int,
        weights: dict[str, torch.Tensor],
        opt: dict[str, dict[str, Any]],
    ) -> None:
        self.layers[layer].load_replica_state(slot, weights)
        for name, p in self.layers[layer].replicas[slot].named_parameters():
            state = opt.get(name) or {}
            if state:
                self.optimizer.state[p] = _clone_state(state)
            else:
                self.optimizer.state.pop(p, None)
            p.grad = None

    def _move(self, plan: SlotPlan, members: tuple[int, ...]) -> tuple[int, int]:
        """Carry out ``plan.moves``: packs from the current contents first, then overwrite."""
        me = self.member_id
        packed = {
            i: _pack_state(*self._slot_tensors(mv.layer, mv.src_slot))
            for i, mv in enumerate(plan.moves)
            if mv.src == me
        }
        sends = []
        moved = nbytes = 0
        for i, mv in enumerate(plan.moves):
            if mv.src == me and mv.dst != me:
                size = torch.tensor([packed[i].numel()], dtype=torch.int64)
                dst = members.index(mv.dst)
                sends += [
                    dist.isend(size, dst, tag=2 * i),
                    dist.isend(packed[i], dst, tag=2 * i + 1),
                ]
        incoming = []
        for i, mv in enumerate(plan.moves):
            if mv.dst != me:
                continue
            if mv.src == me:
                incoming.append((mv, packed[i]))
                continue
            src = members.index(mv.src)
            size = torch.empty(1, dtype=torch.int64)
            dist.recv(size, src, tag=2 * i)
            buf = torch.empty(int(size), dtype=torch.uint8)
            dist.recv(buf, src, tag=2 * i + 1)
            incoming.append((mv, buf))
            moved += 1
            nbytes += buf.numel()
        for work in sends:
            work.wait()
        for mv, buf in incoming:
            self._load_slot(mv.layer, mv.dst_slot, *_unpack_state(buf))
        return moved, nbytes

    def _dense_named(self) -> tuple[dict[str, nn.Parameter], dict[str, torch.Tensor]]:
        params = dict(self.dense_parameters())
        slot_buffers = {id(b) for layer in self.layers for b in layer.replicas.buffers()}
        buffers = {n: b for n, b in self.model.named_buffers() if id(b) not in slot_buffers}
        return params, buffers

    def _broadcast_dense(self, src: int) -> None:
        """Dense weights, buffers, their optimizer state and the counters, to joiners."""
        params, buffers = self._dense_named()
        if dist.get_rank() == src:
            weights = {
                **{n: p.detach() for n, p in params.items()},
                **{f"buffer:{n}": b for n, b in buffers.items()},
            }
            for li, (total, mark) in enumerate(zip(self._loads, self._mark, strict=True)):
                weights[f"loads:{li}"], weights[f"mark:{li}"] = total, mark
            weights["committed"] = torch.tensor([self._committed], dtype=torch.int64)
            opt = {n: _clone_state(self.optimizer.state.get(p, {})) for n, p in params.items()}
            buf = _pack_state(weights, opt)
            size = torch.tensor([buf.numel()], dtype=torch.int64)
        else:
            size = torch.empty(1, dtype=torch.int64)
        dist.broadcast(size, src)
        if dist.get_rank() != src:
            buf = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(buf, src)
        if not self._fresh:
            return
        weights, opt = _unpack_state(buf)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n])
                if opt.get(n):
                    self.optimizer.state[p] = _clone_state(opt[n])
            for n, b in buffers.items():
                b.copy_(weights[f"buffer:{n}"])
        for li in range(len(self.layers)):
            self._loads[li] = weights[f"loads:{li}"].clone()
            self._mark[li] = weights[f"mark:{li}"].clone()
        self._committed = int(weights["committed"][0])

    # ------------------------------------------------------------------ checkpoints

    def _maybe_checkpoint(self) -> None:
        opts = self.options
        if not opts.checkpoint_every or self._committed % opts.checkpoint_every:
            return
        if self._saved_step == self._committed:
            return
        assert opts.checkpoint_dir is not None
        out = Path(opts.checkpoint_dir) / f"step{self._committed:08d}"
        out.mkdir(parents=True, exist_ok=True)
        experts: dict[str, Any] = {}
        for li, layer in enumerate(self.layers):
            for slot, e in enumerate(layer.replica_experts):
                experts.setdefault(f"{li}/{e}", self._slot_tensors(li, slot))
        payload: dict[str, Any] = {
            "step": self._committed,
            "experts": experts,
            "loads": [t.clone() for t in self._loads],
        }
        if self.rank == 0:
            params, buffers = self._dense_named()
            payload["dense"] = {
                "params": {n: p.detach().clone() for n, p in params.items()},
                "buffers": {n: b.clone() for n, b in buffers.items()},
                "optimizer": {
                    n: _clone_state(self.optimizer.state.get(p, {})) for n, p in params.items()
                },
            }
        tmp = out / f".member{self.member_id}.tmp"
        torch.save(payload, tmp)
        tmp.rename(out / f"member{self.member_id}.pt")
        self._saved_step = self._committed
        self.report.checkpoints_saved += 1

    def _reload_checkpoint(self, plan: SlotPlan, members: tuple[int, ...]) -> int:
        """Every member loads the newest checkpoint that has dense state and every expert."""
        opts = self.options
        log.error(
            "LAZARUS: experts %s (layer, expert) lost every replica; reloading the last checkpoint",
            list(plan.lost),
        )
        warnings.warn(
            f"Lazarus: experts {list(plan.lost)} lost every replica: reloading a checkpoint",
            RuntimeWarning,
            stacklevel=2,
        )
        if not opts.checkpoint_dir:
            raise LazarusError(
                f"experts {list(plan.lost)} lost every replica and there is no checkpoint_dir"
            )
        need = {f"{li}/{e}" for li, n in enumerate(self._experts) for e in range(n)}
        for step_dir in sorted(Path(opts.checkpoint_dir).glob("step*"), reverse=True):
            files = [torch.load(f, weights_only=False) for f in sorted(step_dir.glob("member*.pt"))]
            experts: dict[str, Any] = {}
            dense = None
            for f in files:
                experts.update(f["experts"])
                dense = f.get("dense", dense)
            if dense is None or not need <= set(experts):
                continue
            params, buffers = self._dense_named()
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(dense["params"][n])
                    self.optimizer.state.pop(p, None)
                    if dense["optimizer"].get(n):
                        self.optimizer.state[p] = _clone_state(dense["optimizer"][n])
                for n, b in buffers.items():
                    b.copy_(dense["buffers"][n])
            index = members.index(self.member_id)
            for li in range(len(self.layers)):
                for slot, e in enumerate(plan.slots[li][index]):
                    self._load_slot(li, slot, *experts[f"{li}/{e}"])
            step = int(files[0]["step"])
            self._committed = step
            self._loads = [t.clone() for t in files[0]["loads"]]
            self._saved_step = step
            return step
        raise LazarusError(
            f"experts {list(plan.lost)} lost every replica and no complete checkpoint is in "
            f"{opts.checkpoint_dir}"
        )


# --------------------------------------------------------------------------- helpers


def _clone_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in state.items()}


def _pack_state(weights: dict[str, torch.Tensor], opt: dict[str, dict[str, Any]]) -> torch.Tensor:
    """Weights and per-parameter optimizer state in one uint8 buffer (bit-exact, self-describing).

    The first tensor is a JSON manifest: the weight names, and per parameter
    its state keys, each a tensor index or a plain JSON value (hyper-state
    some optimizers keep as Python numbers).
    """
    tensors = [t.detach() for t in weights.values()]
    manifest: dict[str, Any] = {"weights": list(weights), "opt": {}}
    for name, state in opt.items():
        entry = {}
        for k, v in state.items():
            if torch.is_tensor(v):
                entry[k] = ["t", len(tensors)]
                tensors.append(v.detach())
            else:
                entry[k] = ["v", v]
        manifest["opt"][name] = entry
    head = torch.frombuffer(bytearray(json.dumps(manifest).encode()), dtype=torch.uint8)
    return pack([head, *tensors], header=True)


def _unpack_state(buf: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    head, *tensors = unpack(buf)
    manifest = json.loads(head.numpy().tobytes().decode())
    weights = {n: tensors[i].clone() for i, n in enumerate(manifest["weights"])}
    opt = {
        name: {k: tensors[v].clone() if kind == "t" else v for k, (kind, v) in entry.items()}
        for name, entry in manifest["opt"].items()
    }
    return weights, opt
