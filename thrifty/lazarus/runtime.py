"""Lazarus training on real processes: replicated experts, kill -9, recovery without reload.

Each gloo rank is a "node" with ``slots`` expert slots per MoE layer. The
dense part of :class:`~thrifty.lazarus.moe.MoEGPT` is replicated; experts
live where the placement puts them. One training step:

1. Forward. Per MoE layer: all-gather the per-expert token counts, build the
   dispatch plan (Algorithm 1, identical on every rank), move (token, expert)
   pairs to a replica with one variable-split all-to-all, run the experts,
   and bring the outputs back with a second one (both differentiable).
2. Backward (the all-to-alls run in reverse).
3. One all-reduce of ``[loss, dense grads, expert-grad table]``. The table is
   ``layers x experts x expert_numel``, zero where a rank holds no replica, so
   after the sum every replica sees the gradient summed over exactly the
   replicas of its expert. Cost: every rank sends the whole table (all
   experts) instead of only its own; fine for small models, a per-expert
   subgroup all-reduce would send only ``replicas`` copies.
4. Only then Adam (state per replica, identical across replicas).

Failure (a rank ``kill -9``-ed mid-step): a survivor's collective raises
(``Connection closed by peer`` within milliseconds for direct peers,
otherwise the ``collective_timeout``). Survivors then:

1. destroy the process group (closing sockets, so the others fail fast too);
2. find who is alive from heartbeat counters in the TCPStore (a daemon thread
   bumps ``hb/<rank>`` every 50 ms; a counter that does not move during a
   short window belongs to a dead rank) and agree through one
   ``compare_set`` (the first proposal wins);
3. build a new group on a fresh ``PrefixStore`` (``g<generation>``) over the
   caller's store, which lives outside every worker;
4. agree on the last step every survivor completed (all-reduce MIN); a
   survivor that already applied the failed step rolls back to its copy of
   the step-start state, so no half-finished step is ever kept;
5. new rank 0 computes the allocation (Eq. 1 from the token loads seen so
   far) and placement for the survivors, maps placement rows onto survivors
   to keep what each already holds, and picks a source for every missing
   replica (the surviving owner with the fewest sends so far); the plan goes
   through the store so everyone uses the same one;
6. weights and Adam state move point-to-point; training continues.

When some expert lost every replica, everyone reloads the last periodic
checkpoint (``checkpoint_every`` steps, one file per rank) and says so.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from thrifty.comm.collectives import all_to_all_v
from thrifty.lazarus.allocation import allocate_replicas
from thrifty.lazarus.dispatcher import dispatch_local, plan_dispatch, token_counts
from thrifty.lazarus.moe import (
    EXPERT_KEYS,
    MoEConfig,
    MoEGPT,
    expert_forward,
    init_expert,
)
from thrifty.lazarus.placement_search import place_experts

__all__ = ["LazarusConfig", "moe_dispatch", "summarize", "train_rank"]

log = logging.getLogger(__name__)

_HEARTBEAT_S = 0.05
_BETAS = (0.9, 0.99)
_EPS = 1e-8


@dataclass(frozen=True)
class LazarusConfig:
    """One Lazarus training run.

    Args:
        workers: ranks ("nodes") at the start.
        slots: expert slots per node per MoE layer (``c``).
        min_replicas: ``f``, replicas per expert on distinct nodes (relaxed
            when fewer slots remain, see :func:`allocate_replicas`).
        kill_ranks / kill_at_step: these ranks SIGKILL themselves after the
            forward of that step (a real process death mid-step), noting the
            time in the store and in ``checkpoint_dir/killed<rank>.txt``.
        collective_timeout: seconds before a collective waiting for a dead
            rank gives up; bounds detection for ranks not directly connected.
        liveness_window: seconds a heartbeat counter must stand still to
            declare its rank dead.
        balance_coef: weight of the gate's load-balancing loss (Switch's 0.01);
            the reported loss is the cross-entropy alone.
        checkpoint_every: periodic checkpoint interval in steps (0: never),
            used only when some expert lost every replica.
        joiners / join_at_step: extra processes that ask to join once the
            run reaches that step; they are admitted at the next step
            boundary and receive dense state and expert replicas.
        reallocate_every: re-plan allocation and placement (Eq. 1 on the
            token loads seen since the last plan) every this many steps.
        on_failure: ``"recover"`` (Lazarus) or ``"abort"``: survivors stop,
            the first half of the checkpoint-restart baseline.
        resume: start from the newest complete checkpoint in ``checkpoint_dir``
            (the second half of that baseline).
    """

    workers: int = 4
    slots: int = 3
    experts: int = 6
    top_k: int = 2
    layers: int = 2
    d_model: int = 64
    vocab: int = 2048
    seq_len: int = 32
    batch: int = 4
    steps: int = 40
    lr: float = 3e-3
    balance_coef: float = 0.01
    min_replicas: int = 2
    kill_ranks: tuple[int, ...] = ()
    kill_at_step: int = -1
    collective_timeout: float = 5.0
    liveness_window: float = 0.5
    checkpoint_every: int = 10
    checkpoint_dir: str = ""
    seed: int = 0
    corpus_tokens: int = 60_000
    return_states: bool = False
    joiners: int = 0
    join_at_step: int = -1
    reallocate_every: int = 0
    on_failure: str = "recover"
    resume: bool = False

    def __post_init__(self) -> None:
        for name in ("workers", "slots", "experts", "layers", "steps", "batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected >= 1")
        if self.joiners < 0 or self.reallocate_every < 0 or self.checkpoint_every < 0:
            raise ValueError("joiners, reallocate_every and checkpoint_every must be >= 0")
        if self.joiners and not 0 <= self.join_at_step < self.steps:
            raise ValueError(f"join_at_step={self.join_at_step}: expected 0..steps-1 with joiners")
        if any(not 0 <= r < self.workers for r in self.kill_ranks):
            raise ValueError(f"kill_ranks={self.kill_ranks}: expected 0..{self.workers - 1}")
        if self.on_failure not in ("recover", "abort"):
            raise ValueError(f"on_failure={self.on_failure!r}: expected 'recover' or 'abort'")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("resume=True needs checkpoint_dir (where the checkpoints are)")
        if self.experts > self.workers * self.slots:
            raise ValueError(
                f"experts={self.experts}: more than workers={self.workers} x "
                f"slots={self.slots} slots can hold, so some expert would have no replica"
            )
        _ = self.model  # MoEConfig checks top_k against experts, d_model against heads

    @property
    def model(self) -> MoEConfig:
        return MoEConfig(
            vocab=self.vocab,
            d_model=self.d_model,
            layers=self.layers,
            seq_len=self.seq_len,
            experts=self.experts,
            top_k=self.top_k,
        )


# --------------------------------------------------------------------------- dispatch


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` to ranks by ``send``; the backward sends gradients back by ``recv``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> Any:
        ctx.splits = (send, recv, group)
        return _rows_all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        send, recv, group = ctx.splits
        return _rows_all_to_all(grad, recv, send, group), None, None, None


def _rows_all_to_all(
    x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group: Any
) -> torch.Tensor:
    d = x.shape[1]
    chunks = list(x.contiguous().reshape(-1).split([s * d for s in send]))
    got = all_to_all_v(chunks, group=group, recv_sizes=[s * d for s in recv])
    return torch.cat(got).reshape(-1, d)


def moe_dispatch(
    h: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    replica_matrix: torch.Tensor,
    expert_fn: Callable[[int, torch.Tensor], torch.Tensor],
    group: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoE layer across ranks: gate output in, weighted expert outputs out.

    ``replica_matrix[rank, e]`` is the placement; ``expert_fn(e, rows)`` runs
    expert ``e`` on this rank. Returns the output ``[tokens, d]`` and the
    all-gathered token counts ``T[rank, e]``.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    experts = replica_matrix.shape[1]
    counts = token_counts(expert_ids, experts)
    gathered = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(gathered, counts, group=group)
    table = torch.stack(gathered)
    local = dispatch_local(plan_dispatch(table, replica_matrix), rank, expert_ids)
    k = expert_ids.shape[1]
    pairs = h.unsqueeze(1).expand(-1, k, -1).reshape(-1, h.shape[1])
    recv = _AllToAll.apply(pairs[local.send_order], local.send_splits, local.recv_splits, group)
    out = recv * 0  # keeps the graph connected even when nothing arrives
    for e in local.recv_experts.unique().tolist():
        rows = (local.recv_experts == e).nonzero().squeeze(1)
        out = out.index_copy(0, rows, expert_fn(e, recv[rows]))
    back = _AllToAll.apply(out, local.recv_splits, local.send_splits, group)
    y = local.restore(back)
    return (y * weights.unsqueeze(-1)).sum(dim=1), table


# --------------------------------------------------------------------------- state


@dataclass
class _State:
    """Everything a rank trains: dense model, its expert replicas, Adam state per tensor."""

    model: MoEGPT
    experts: dict[tuple[int, int], dict[str, torch.Tensor]]
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    t: int = 0

    def named(self) -> dict[str, torch.Tensor]:
        out = {f"d.{n}": p for n, p in self.model.named_parameters()}
        for (layer, e), params in self.experts.items():
            for k in EXPERT_KEYS:
                out[f"x.{layer}.{e}.{k}"] = params[k]
        return out

    def snapshot(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "p": {n: p.detach().clone() for n, p in self.named().items()},
            "m": {n: x.clone() for n, x in self.m.items()},
            "v": {n: x.clone() for n, x in self.v.items()},
        }

    def restore(self, snap: dict[str, Any]) -> None:
        with torch.no_grad():
            for n, p in self.named().items():
                p.copy_(snap["p"][n])
        self.m = {n: x.clone() for n, x in snap["m"].items()}
        self.v = {n: x.clone() for n, x in snap["v"].items()}
        self.t = snap["t"]

    def adam(self, grads: dict[str, torch.Tensor], lr: float) -> None:
        self.t += 1
        b1, b2 = _BETAS
        with torch.no_grad():
            for n, p in self.named().items():
                g = grads[n]
                m = self.m.setdefault(n, torch.zeros_like(p))
                v = self.v.setdefault(n, torch.zeros_like(p))
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2**self.t)).sqrt_().add_(_EPS)
                p.addcdiv_(m, denom, value=-lr / (1 - b1**self.t))

    def expert_vector(self, layer: int, e: int) -> torch.Tensor:
        """Weights, then Adam m and v, of one expert: what a transfer sends."""
        names = [f"x.{layer}.{e}.{k}" for k in EXPERT_KEYS]
        params = self.experts[(layer, e)]
        parts = [params[k].detach().reshape(-1) for k in EXPERT_KEYS]
        for moments in (self.m, self.v):
            parts += [
                moments.get(n, torch.zeros_like(params[k])).reshape(-1)
                for n, k in zip(names, EXPERT_KEYS, strict=True)
            ]
        return torch.cat(parts)

    def set_expert_vector(self, cfg: MoEConfig, layer: int, e: int, vec: torch.Tensor) -> None:
        template = init_expert(cfg, layer, e)
        pieces = iter(vec.split([template[k].numel() for k in EXPERT_KEYS] * 3))
        params = {
            k: next(pieces).reshape(template[k].shape).clone().requires_grad_() for k in EXPERT_KEYS
        }
        self.experts[(layer, e)] = params
        for moments in (self.m, self.v):
            for k in EXPERT_KEYS:
                moments[f"x.{layer}.{e}.{k}"] = next(pieces).reshape(params[k].shape).clone()

    def drop_expert(self, layer: int, e: int) -> None:
        self.experts.pop((layer, e), None)
        for k in EXPERT_KEYS:
            self.m.pop(f"x.{layer}.{e}.{k}", None)
            self.v.pop(f"x.{layer}.{e}.{k}", None)


# --------------------------------------------------------------------------- membership


def _base_store() -> tuple[str, int]:
    store = dist.distributed_c10d._get_default_store()
    while hasattr(store, "underlying_store"):
        store = store.underlying_store
    return store.host, store.port


def _client(host: str, port: int, namespace: str = "") -> dist.Store:
    """A new connection to the run's store; ``namespace`` keeps a restarted job's keys apart."""
    store = dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=120))
    return dist.PrefixStore(namespace, store) if namespace else store


def _heartbeat(host: str, port: int, namespace: str, rank: int, stop: threading.Event) -> None:
    store = _client(host, port, namespace)
    while not stop.is_set():
        try:
            store.add(f"hb/{rank}", 1)
        except RuntimeError:  # the store's host left (the run is over or it died): stop
            return
        time.sleep(_HEARTBEAT_S)


def _init_group(store: dist.Store, gen: int, rank: int, world: int, timeout: float) -> None:
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"lazarus/g{gen}", store),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )


def _agree_members(
    store: dist.Store, gen: int, members: list[int], me: int, window: float
) -> list[int]:
    before = {m: store.add(f"hb/{m}", 0) for m in members}
    time.sleep(window)
    alive = [m for m in members if store.add(f"hb/{m}", 0) > before[m]]
    agreed = store.compare_set(f"members/{gen}", "", json.dumps(alive))
    result = json.loads(agreed)
    store.set(f"ready/{gen}/{me}", "1")
    store.wait([f"ready/{gen}/{m}" for m in result if m != me])
    return result


# --------------------------------------------------------------------------- plan


def _plan(
    cfg: LazarusConfig,
    members: list[int],
    held: dict[int, list[set[int]]],
    loads: torch.Tensor,
) -> dict[str, Any]:
    """New placement over ``members`` (orig ranks) and the transfers that realise it."""
    nodes = len(members)
    layers: list[list[list[int]]] = []
    transfers: list[tuple[int, int, int, int]] = []  # (src, dst, layer, expert), orig ranks
    lost: list[tuple[int, int]] = []
    relaxed = False
    sends = dict.fromkeys(members, 0)
    replicas: list[list[int]] = []
    for layer in range(cfg.layers):
        alloc = allocate_replicas(loads[layer].tolist(), nodes, cfg.slots, cfg.min_replicas)
        relaxed |= alloc.relaxed
        replicas.append(list(alloc.replicas))
        placement = place_experts(alloc.replicas, nodes, cfg.slots, min_distinct=alloc.min_replicas)
        rows = [list(row) for row in placement.nodes]
        # Rows onto members, greatest overlap with what each holds first.
        assign: dict[int, list[int]] = {}
        free_rows = set(range(nodes))
        pairs = sorted(
            (-len(set(rows[i]) & held.get(m, [set()] * cfg.layers)[layer]), i, m)
            for i in range(nodes)
            for m in members
        )
        for _, i, m in pairs:
            if i in free_rows and m not in assign:
                assign[m] = rows[i]
                free_rows.discard(i)
        layers.append([assign[m] for m in members])
        for m in members:
            have = held.get(m, [set()] * cfg.layers)[layer]
            for e in sorted(set(assign[m]) - have):
                owners = [o for o in members if e in held.get(o, [set()] * cfg.layers)[layer]]
                if not owners:
                    lost.append((layer, e))
                    continue
                src = min(owners, key=lambda o: (sends[o], o))
                sends[src] += 1
                transfers.append((src, m, layer, e))
    return {
        "rows": layers,
        "transfers": transfers,
        "lost": sorted(set(lost)),
        "relaxed": relaxed,
        "replicas": replicas,
        "loads": loads.tolist(),
    }


def _replica_matrix(rows: list[list[int]], experts: int) -> torch.Tensor:
    out = torch.zeros(len(rows), experts, dtype=torch.int64)
    for node, row in enumerate(rows):
        for e in row:
            out[node, e] += 1
    return out


# --------------------------------------------------------------------------- checkpoints


def _save_checkpoint(state: _State, directory: Path, step: int, me: int) -> None:
    out = directory / f"step{step:06d}"
    out.mkdir(parents=True, exist_ok=True)
    snap = state.snapshot()
    tmp = out / f".rank{me}.tmp"
    torch.save({"step": step, **snap}, tmp)
    tmp.rename(out / f"rank{me}.pt")


def _load_checkpoint(
    cfg: LazarusConfig, state: _State, directory: Path, mine: list[list[int]]
) -> int | None:
    """Reload dense + this rank's new experts from the newest checkpoint that has them all."""
    need = {(layer, e) for layer in range(cfg.layers) for e in range(cfg.experts)}
    for step_dir in sorted(directory.glob("step*"), reverse=True):
        files = [torch.load(f) for f in sorted(step_dir.glob("rank*.pt"))]
        have = {
            (int(n.split(".")[1]), int(n.split(".")[2]))
            for f in files
            for n in f["p"]
            if n.startswith("x.")
        }
        if not files or not need <= have:
            continue
        merged: dict[str, dict[str, torch.Tensor]] = {"p": {}, "m": {}, "v": {}}
        for f in files:
            for key in merged:
                merged[key].update(f[key])
        for key in list(state.experts):
            state.drop_expert(*key)
        for layer, row in enumerate(mine):
            for e in set(row):
                state.experts[(layer, e)] = {
                    k: merged["p"][f"x.{layer}.{e}.{k}"].clone().requires_grad_()
                    for k in EXPERT_KEYS
                }
        names = state.named()
        state.restore(
            {
                "t": files[0]["t"],
                "p": {n: merged["p"][n] for n in names},
                "m": {n: merged["m"][n] for n in names if n in merged["m"]},
                "v": {n: merged["v"][n] for n in names if n in merged["v"]},
            }
        )
        return files[0]["step"]
    return None


# --------------------------------------------------------------------------- training


def _batch(corpus: torch.Tensor, cfg: LazarusConfig, step: int, rank: int, world: int) -> Any:
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    starts = torch.randint(0, corpus.numel() - cfg.seq_len - 1, (world * cfg.batch,), generator=g)
    mine = starts[rank * cfg.batch : (rank + 1) * cfg.batch]
    idx = torch.stack([corpus[s : s + cfg.seq_len + 1] for s in mine.tolist()])
    return idx[:, :-1], idx[:, 1:]


@dataclass
class _Run:
    """Where this rank's run stands; the same on every member after each reconfiguration."""

    me: int  # original rank id (what the store and the plans name)
    loads: torch.Tensor  # tokens routed per (layer, expert) so far
    mark: torch.Tensor  # ``loads`` at the last re-plan
    members: list[int] = field(default_factory=list)
    gen: int = -1
    rows: list[list[list[int]]] = field(default_factory=list)  # [layer][member] -> experts
    step: int = 0
    admitted: int = 0  # joiners admitted so far

    def alloc_loads(self) -> torch.Tensor:
        """Eq. 1's input: the loads since the last plan (all loads when none came since)."""
        recent = self.loads - self.mark
        return recent if float(recent.sum()) > 0 else self.loads


def _step(
    cfg: LazarusConfig, state: _State, run: _Run, corpus: torch.Tensor, store: dist.Store
) -> tuple[float, dict[str, torch.Tensor], int]:
    """Forward, backward and the one gradient all-reduce; returns (loss, grads, joins seen)."""
    mcfg = cfg.model
    rank, world = dist.get_rank(), dist.get_world_size()
    matrices = [_replica_matrix(layer_rows, cfg.experts) for layer_rows in run.rows]
    seen = torch.zeros_like(run.loads)

    def moe(layer: int, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        def expert(e: int, x: torch.Tensor) -> torch.Tensor:
            return expert_forward(state.experts[(layer, e)], x)

        y, table = moe_dispatch(h, ids, w, matrices[layer], expert)
        seen[layer] += table.sum(dim=0)
        return y

    x, y = _batch(corpus, cfg, run.step, rank, world)
    logits, balance = state.model(x, moe)
    loss = F.cross_entropy(logits.reshape(-1, mcfg.vocab), y.reshape(-1))
    if run.me in cfg.kill_ranks and run.step == cfg.kill_at_step:
        now = repr(time.time())
        store.set(f"killed_at/{run.me}", now)
        if cfg.checkpoint_dir:  # outlives the store, for a restarted job to read
            Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.checkpoint_dir) / f"killed{run.me}.txt").write_text(now)
        os.kill(os.getpid(), signal.SIGKILL)
    (loss + cfg.balance_coef * balance).backward()
    dense = [p for _, p in state.model.named_parameters()]
    table = torch.zeros(cfg.layers, cfg.experts, mcfg.expert_numel)
    for (layer, e), params in state.experts.items():
        table[layer, e] = torch.cat([_grad(params[k]).reshape(-1) for k in EXPERT_KEYS])
    # Rank 0's count of join requests rides along, so every member sees the same number.
    joins = float(store.add("joins", 0)) if rank == 0 else 0.0
    flat = torch.cat(
        [loss.detach().reshape(1), torch.tensor([joins])]
        + [_grad(p).reshape(-1) for p in dense]
        + [table.reshape(-1)]
    )
    dist.all_reduce(flat)
    seen_joins = int(flat[1])
    flat /= world
    grads: dict[str, torch.Tensor] = {}
    offset = 2
    for n, p in state.model.named_parameters():
        grads[f"d.{n}"] = flat[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    table = flat[offset:].reshape(cfg.layers, cfg.experts, -1)
    for (layer, e), params in state.experts.items():
        pieces = table[layer, e].split([params[k].numel() for k in EXPERT_KEYS])
        for k, g in zip(EXPERT_KEYS, pieces, strict=True):
            grads[f"x.{layer}.{e}.{k}"] = g.reshape(params[k].shape)
    run.loads += seen
    return float(flat[0]), grads, seen_joins


def _grad(p: torch.Tensor) -> torch.Tensor:
    """``p``'s gradient, zeros where backward never reached it (an expert no token chose)."""
    return p.grad if p.grad is not None else torch.zeros_like(p)


def _clear_grads(state: _State) -> None:
    for p in state.named().values():
        p.grad = None


def _held(rows: list[list[list[int]]], members: list[int]) -> dict[int, list[set[int]]]:
    return {m: [set(rows[layer][i]) for layer in range(len(rows))] for i, m in enumerate(members)}


def _move_experts(
    cfg: LazarusConfig, state: _State, plan: dict[str, Any], members: list[int], me: int
) -> tuple[int, int]:
    """Carry out ``plan["transfers"]`` point to point, then drop what the plan no longer puts here.

    A transfer is an expert's weights and Adam moments, so the receiver's
    replica is bit-identical to the sender's. Returns (replicas moved, bytes).
    """
    numel = 3 * cfg.model.expert_numel
    ops, outgoing, incoming = [], [], []
    for src, dst, layer, e in plan["transfers"]:
        tag = layer * cfg.experts + e
        if src == me:
            outgoing.append(state.expert_vector(layer, e))  # alive until the send completes
            ops.append(dist.isend(outgoing[-1], members.index(dst), tag=tag))
        elif dst == me:
            incoming.append((layer, e, torch.empty(numel)))
            ops.append(dist.irecv(incoming[-1][2], members.index(src), tag=tag))
    for op in ops:
        op.wait()
    for layer, e, buf in incoming:
        state.set_expert_vector(cfg.model, layer, e, buf)
    i = members.index(me)
    keep = {(layer, e) for layer, layer_rows in enumerate(plan["rows"]) for e in layer_rows[i]}
    for key in list(state.experts):
        if key not in keep:
            state.drop_expert(*key)
    moved = len(plan["transfers"])
    return moved, moved * numel * 4


def _sync_dense(state: _State, run: _Run) -> None:
    """Group rank 0's step, Adam clock, loads, dense weights and moments to every rank.

    Members already agree on all of it; a joiner has none of it.
    """
    named = list(state.model.named_parameters())
    moments = [
        (s.get(f"d.{n}", torch.zeros_like(p))).reshape(-1)
        for s in (state.m, state.v)
        for n, p in named
    ]
    flat = torch.cat(
        [torch.tensor([run.step, state.t], dtype=torch.float64), run.loads.double().reshape(-1)]
        + [p.detach().double().reshape(-1) for _, p in named]
        + [m.double() for m in moments]
    )
    dist.broadcast(flat, src=0)
    sizes = [2, run.loads.numel()] + [p.numel() for _, p in named] * 3
    pieces = list(flat.split(sizes))
    run.step, state.t = int(pieces[0][0]), int(pieces[0][1])
    run.loads = pieces[1].float().reshape(run.loads.shape)
    with torch.no_grad():
        for (_, p), piece in zip(named, pieces[2 : 2 + len(named)], strict=True):
            p.copy_(piece.reshape(p.shape))
    rest = pieces[2 + len(named) :]
    for i, (n, p) in enumerate(named):
        state.m[f"d.{n}"] = rest[i].float().reshape(p.shape).clone()
        state.v[f"d.{n}"] = rest[len(named) + i].float().reshape(p.shape).clone()


# --------------------------------------------------------------------------- reconfigurations


def _start(cfg: LazarusConfig, state: _State, store: dist.Store, run: _Run, ckpt: Path) -> None:
    """Generation 0: the first ``cfg.workers`` ranks, a placement from uniform loads."""
    run.members, run.gen = list(range(cfg.workers)), 0
    _init_group(store, 0, run.me, cfg.workers, cfg.collective_timeout)
    if run.me == 0:
        store.set("plan/0", json.dumps(_plan(cfg, run.members, {}, run.loads)))
    run.rows = json.loads(store.get("plan/0"))["rows"]
    mine = [run.rows[layer][run.me] for layer in range(cfg.layers)]
    for layer, row in enumerate(mine):
        for e in set(row):
            state.experts[(layer, e)] = {
                k: t.requires_grad_() for k, t in init_expert(cfg.model, layer, e, cfg.seed).items()
            }
    if cfg.resume:
        loaded = _load_checkpoint(cfg, state, ckpt, mine)
        if loaded is None:
            raise RuntimeError(f"resume=True but {ckpt} holds no complete checkpoint")
        run.step = loaded


def _rebalance(cfg: LazarusConfig, state: _State, store: dist.Store, run: _Run) -> dict[str, Any]:
    """Periodic re-plan at a step boundary: Eq. 1 on recent loads, placement, moves."""
    at = time.time()
    key = f"rebalance/{run.gen}/{run.step}"
    if dist.get_rank() == 0:
        plan = _plan(cfg, run.members, _held(run.rows, run.members), run.alloc_loads())
        store.set(key, json.dumps(plan))
    plan = json.loads(store.get(key))
    moved, nbytes = _move_experts(cfg, state, plan, run.members, run.me)
    dist.barrier()
    run.rows, run.mark = plan["rows"], run.loads.clone()
    return {
        "kind": "rebalance",
        "id": key,
        "step": run.step,
        "members_before": run.members,
        "members_after": run.members,
        "at": at,
        "regrouped_wall": at,
        "resumed_wall": time.time(),
        "replicas_moved": moved,
        "bytes_moved": nbytes,
        "replicas": plan["replicas"],
        "loads": plan["loads"],
        "checkpoint_reload": False,
        "lost_experts": [],
        "min_replicas_relaxed": plan["relaxed"],
    }


def _grow(
    cfg: LazarusConfig, state: _State, store: dist.Store, run: _Run, joins: int
) -> dict[str, Any]:
    """Admit joiners ``run.admitted + 1 .. joins`` at this step boundary (members' side)."""
    at = time.time()
    gen = run.gen + 1
    if dist.get_rank() == 0:
        ids = [int(store.get(f"joiner/{n}")) for n in range(run.admitted + 1, joins + 1)]
        members = run.members + ids
        plan = _plan(cfg, members, _held(run.rows, run.members), run.alloc_loads())
        plan.update(members=members, members_before=run.members, admitted=joins)
        store.set(f"plan/{gen}", json.dumps(plan))
        for joiner in ids:
            store.set(f"admit/{joiner}", str(gen))
    plan = json.loads(store.get(f"plan/{gen}"))
    dist.destroy_process_group()
    return _enter(cfg, state, store, run, plan, gen, at)


def _join(cfg: LazarusConfig, state: _State, store: dist.Store, run: _Run) -> dict[str, Any] | None:
    """A joiner: wait for the run to reach ``join_at_step``, ask in, and enter when admitted.

    Returns None when the run ended before admitting this rank.
    """

    def wait_for(key: str) -> bool:
        while not store.check([key]):
            if store.check(["done"]):
                return store.check([key])  # admitted just before the end
            time.sleep(0.02)
        return True

    if not wait_for("join_open"):
        return None
    store.set(f"joiner/{store.add('joins', 1)}", str(run.me))
    if not wait_for(f"admit/{run.me}"):
        return None
    at = time.time()  # the reconfiguration starts at admission, not at the request
    gen = int(store.get(f"admit/{run.me}"))
    plan = json.loads(store.get(f"plan/{gen}"))
    return _enter(cfg, state, store, run, plan, gen, at)


def _enter(
    cfg: LazarusConfig,
    state: _State,
    store: dist.Store,
    run: _Run,
    plan: dict[str, Any],
    gen: int,
    at: float,
) -> dict[str, Any]:
    """Members and joiners together: new group, dense state from rank 0, expert moves."""
    members = plan["members"]
    _init_group(store, gen, members.index(run.me), len(members), cfg.collective_timeout)
    regrouped = time.time()
    _sync_dense(state, run)
    moved, nbytes = _move_experts(cfg, state, plan, members, run.me)
    dist.barrier()
    run.members, run.gen, run.rows, run.admitted = members, gen, plan["rows"], plan["admitted"]
    run.mark = run.loads.clone()
    return {
        "kind": "join",
        "id": f"g{gen}",
        "step": run.step,
        "members_before": plan["members_before"],
        "members_after": members,
        "at": at,
        "regrouped_wall": regrouped,
        "resumed_wall": time.time(),
        "replicas_moved": moved,
        "bytes_moved": nbytes,
        "replicas": plan["replicas"],
        "loads": plan["loads"],
        "checkpoint_reload": False,
        "lost_experts": [],
        "min_replicas_relaxed": plan["relaxed"],
    }


def train_rank(corpus: torch.Tensor, cfg: LazarusConfig, namespace: str = "") -> dict[str, Any]:
    """One rank of a Lazarus run, inside an initialised default process group.

    The launcher owns the group: :func:`thrifty.lazarus.benchmark.train` starts
    local ranks, ``thrifty.lazarus.benchmark``'s torchrun entry point runs one
    under ``torchrun``. Ranks ``0..workers-1`` start the run;
    ranks from ``workers`` on are joiners that enter at a step boundary once
    the run reaches ``join_at_step``. ``namespace`` prefixes every store key
    (torchrun keeps its store across restarts).
    """
    me = dist.get_rank()
    host, port = _base_store()
    # Where rank 0 hosts the store (torchrun with an unshared store), this reference keeps
    # the server alive once the launcher's group, with its long timeout, is gone.
    anchor = dist.distributed_c10d._get_default_store()
    dist.destroy_process_group()
    store = _client(host, port, namespace)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(host, port, namespace, me, stop), daemon=True)
    beat.start()
    torch.manual_seed(cfg.seed)
    state = _State(MoEGPT(cfg.model), {})
    zeros = torch.zeros(cfg.layers, cfg.experts)
    run = _Run(me, loads=zeros.clone(), mark=zeros.clone())
    ckpt_dir = Path(cfg.checkpoint_dir or tempfile.mkdtemp(prefix="lazarus-ckpt-"))
    losses: dict[int, float] = {}
    step_walls: dict[int, float] = {}
    checkpoint_s: list[float] = []
    reconfigs: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    executed = 0
    started = time.perf_counter()
    try:
        if me < cfg.workers:
            _start(cfg, state, store, run, ckpt_dir)
        else:
            entered = _join(cfg, state, store, run)
            if entered is None:
                return {"rank": me, "joined": False}
            reconfigs.append(entered)
        saved = run.step if cfg.resume else -1

        def snapshot() -> dict[str, Any]:  # what a rollback restores, token loads included
            return {**state.snapshot(), "loads": run.loads.clone()}

        snap = prev_snap = snapshot()
        while run.step < cfg.steps:
            step_walls[run.step] = time.time()
            if dist.get_rank() == 0 and run.step == cfg.join_at_step:
                store.set("join_open", "1")
            if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step != saved:
                tic = time.perf_counter()
                _save_checkpoint(state, ckpt_dir, run.step, me)
                checkpoint_s.append(time.perf_counter() - tic)
                saved = run.step
            prev_snap, snap = snap, snapshot()
            try:
                loss, grads, joins = _step(cfg, state, run, corpus, store)
            except RuntimeError as exc:
                caught = time.time()
                log.info("rank %d: step %d failed: %s", me, run.step, str(exc).splitlines()[0])
                _clear_grads(state)
                planned = run.step == cfg.kill_at_step  # a later failure is not the planned kill
                killed = [float(store.get(k)) for k in _killed_keys(store, cfg)] if planned else []
                if cfg.on_failure == "abort":
                    with contextlib.suppress(RuntimeError):
                        dist.destroy_process_group()
                    store.set("done", "1")  # joiners still waiting give up
                    return {
                        "rank": me,
                        "aborted_at_step": run.step,
                        "caught": caught,
                        "killed": max(killed) if killed else None,
                        "step_walls": step_walls,
                    }
                outcome = _recover(cfg, state, store, run, snap, prev_snap, ckpt_dir)
                if outcome is None:
                    return {"rank": me, "evicted": True}
                report = outcome["report"]
                report.update(at=caught, killed_wall=max(killed) if killed else None)
                reconfigs.append(report)
                if cfg.return_states and "pre_failure" not in extra:
                    extra["pre_failure"] = outcome["pre_failure"]
                    extra["post_recovery"] = state.snapshot()
                snap = snapshot()
                saved = -1  # the rolled-back steps' checkpoints are written again
                continue
            _clear_grads(state)
            state.adam(grads, cfg.lr)
            losses[run.step] = loss
            executed += 1
            run.step += 1
            if run.step >= cfg.steps:
                break
            if joins > run.admitted:
                reconfigs.append(_grow(cfg, state, store, run, joins))
                snap = snapshot()
            elif cfg.reallocate_every and run.step % cfg.reallocate_every == 0:
                reconfigs.append(_rebalance(cfg, state, store, run))
                snap = snapshot()
        if dist.get_rank() == 0:
            store.set("done", "1")
    finally:
        stop.set()
        del anchor
    if cfg.return_states:
        extra["final"] = state.snapshot()
    return {
        "rank": me,
        "members": run.members,
        "losses": [losses[s] for s in sorted(losses)],
        "first_step": min(losses, default=run.step),
        "steps": run.step,
        "steps_executed": executed,
        "seconds": time.perf_counter() - started,
        "step_walls": step_walls,
        "checkpoint_s": checkpoint_s,
        "reconfigurations": reconfigs,
        "placement": run.rows,
        "held": sorted(state.experts),
        **extra,
    }


def _killed_keys(store: dist.Store, cfg: LazarusConfig) -> list[str]:
    keys = [f"killed_at/{r}" for r in cfg.kill_ranks]
    return [k for k in keys if store.check([k])]


def _recover(
    cfg: LazarusConfig,
    state: _State,
    store: dist.Store,
    run: _Run,
    snap: dict[str, Any],
    prev_snap: dict[str, Any],
    ckpt_dir: Path,
) -> dict[str, Any] | None:
    """Survivors of a failed step: agree, regroup, roll back, re-plan, move or reload."""
    me, members, gen = run.me, run.members, run.gen + 1
    with contextlib.suppress(RuntimeError):
        dist.destroy_process_group()
    survivors = _agree_members(store, gen, members, me, cfg.liveness_window)
    if me not in survivors:
        return None
    _init_group(store, gen, survivors.index(me), len(survivors), cfg.collective_timeout)
    # A rank whose all-reduce finished applied the step; everyone goes back to the minimum.
    done = torch.tensor([run.step], dtype=torch.int64)
    dist.all_reduce(done, op=dist.ReduceOp.MIN)
    target = int(done)
    pre_failure = prev_snap if target < run.step else snap
    state.restore(pre_failure)
    run.loads = pre_failure["loads"].clone()
    regrouped = time.time()
    if dist.get_rank() == 0:
        held = {m: h for m, h in _held(run.rows, members).items() if m in survivors}
        store.set(f"plan/{gen}", json.dumps(_plan(cfg, survivors, held, run.alloc_loads())))
    plan = json.loads(store.get(f"plan/{gen}"))
    mine = [plan["rows"][layer][survivors.index(me)] for layer in range(cfg.layers)]
    reloaded_step = None
    moved = nbytes = 0
    if plan["lost"]:
        reloaded_step = _load_checkpoint(cfg, state, ckpt_dir, mine)
        if reloaded_step is None:
            raise RuntimeError(f"experts {plan['lost']} lost every replica and no checkpoint")
        log.warning("experts %s lost every replica: reloaded step %d", plan["lost"], reloaded_step)
        target = reloaded_step
    else:
        moved, nbytes = _move_experts(cfg, state, plan, survivors, me)
    dist.barrier()
    report = {
        "kind": "failure",
        "id": f"g{gen}",
        "step": run.step,
        "resumed_at_step": target,
        "members_before": members,
        "members_after": survivors,
        "regrouped_wall": regrouped,
        "resumed_wall": time.time(),
        "replicas_moved": moved,
        "bytes_moved": nbytes,
        "replicas": plan["replicas"],
        "checkpoint_reload": reloaded_step is not None,
        "lost_experts": plan["lost"],
        "min_replicas_relaxed": plan["relaxed"],
    }
    run.members, run.gen, run.rows, run.step = survivors, gen, plan["rows"], target
    run.mark = run.loads.clone()
    return {"report": report, "pre_failure": pre_failure}


_STAMPS = ("at", "regrouped_wall", "resumed_wall", "killed_wall")


def summarize(cfg: LazarusConfig, results: list[Any], wall: float) -> dict[str, Any]:
    """The JSON report from the ranks' results.

    Killed ranks return None, evicted ones and joiners never admitted say so;
    the rest are the final members. Each reconfiguration's parts come from
    the ranks' wall-clock stamps, so they add up to ``total_s``: detection
    (kill to the last rank noticing), regroup (to the last rank in the new
    group), transfer (to the last rank training again). Joins and rebalances
    start when the first rank starts them.
    """
    alive = [r for r in results if r is not None and "members" in r]
    if not alive:
        raise RuntimeError("no rank survived")
    first = min(alive, key=lambda r: r["first_step"])  # an original member: it saw every step
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in alive:
        for rec in r["reconfigurations"]:
            by_id.setdefault(rec["id"], []).append(rec)
    reconfigs = []
    for copies in sorted(by_id.values(), key=lambda c: min(x["at"] for x in c)):
        merged = {k: v for k, v in copies[0].items() if k not in _STAMPS}
        noticed = max(c["at"] for c in copies)
        regrouped = max(c["regrouped_wall"] for c in copies)
        resumed = max(c["resumed_wall"] for c in copies)
        killed = copies[0].get("killed_wall")
        began = killed if killed is not None else min(c["at"] for c in copies)
        merged["detection_s"] = noticed - killed if killed is not None else None
        merged["regroup_s"] = regrouped - (noticed if killed is not None else began)
        merged["transfer_s"] = resumed - regrouped
        merged["total_s"] = resumed - began
        reconfigs.append(merged)
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k != "return_states"},
        "steps_done": first["steps"],
        "steps_executed": first["steps_executed"],
        "final_members": first["members"],
        "loss": first["losses"],
        "reconfigurations": reconfigs,
        "joins": sum(r["kind"] == "join" for r in reconfigs),
        "rebalances": sum(r["kind"] == "rebalance" for r in reconfigs),
        "replicas_moved": sum(r["replicas_moved"] for r in reconfigs),
        "checkpoint_reloads": sum(r["checkpoint_reload"] for r in reconfigs),
        "final_placement": first["placement"],
        "wall_s": wall,
    }
