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

from thrifty.dist.collectives import all_to_all_v
from thrifty.lazarus.allocation import allocate_replicas
from thrifty.lazarus.dispatcher import dispatch_local, plan_dispatch, token_counts
from thrifty.lazarus.moe import (
    EXPERT_KEYS,
    MoEConfig,
    MoEGPT,
    expert_forward,
    init_expert,
    sharegpt_corpus,
)
from thrifty.lazarus.placement_search import place_experts

__all__ = ["LazarusConfig", "moe_dispatch", "train", "train_rank"]

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
            forward of that step (a real process death mid-step).
        collective_timeout: seconds before a collective waiting for a dead
            rank gives up; bounds detection for ranks not directly connected.
        liveness_window: seconds a heartbeat counter must stand still to
            declare its rank dead.
        checkpoint_every: periodic checkpoint interval in steps (0: never),
            used only when some expert lost every replica.
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
            parts += [moments.get(n, torch.zeros_like(params[k])).reshape(-1) for n, k in
                      zip(names, EXPERT_KEYS, strict=True)]  # fmt: skip
        return torch.cat(parts)

    def set_expert_vector(self, cfg: MoEConfig, layer: int, e: int, vec: torch.Tensor) -> None:
        template = init_expert(cfg, layer, e)
        pieces = iter(vec.split([template[k].numel() for k in EXPERT_KEYS] * 3))
        params = {k: next(pieces).reshape(template[k].shape).clone().requires_grad_() for k in
                  EXPERT_KEYS}  # fmt: skip
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


def _client(host: str, port: int) -> dist.TCPStore:
    return dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=120))


def _heartbeat(host: str, port: int, rank: int, stop: threading.Event) -> None:
    store = _client(host, port)
    while not stop.is_set():
        store.add(f"hb/{rank}", 1)
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
    for layer in range(cfg.layers):
        alloc = allocate_replicas(loads[layer].tolist(), nodes, cfg.slots, cfg.min_replicas)
        relaxed |= alloc.relaxed
        placement = place_experts(alloc.replicas, nodes, cfg.slots, min_distinct=alloc.min_replicas)
        rows = [list(row) for row in placement.nodes]
        # Rows onto members, greatest overlap with what each holds first.
        assign: dict[int, list[int]] = {}
        free_rows = set(range(nodes))
        pairs = sorted(
            (-len(set(rows[i]) & held.get(m, [set()] * cfg.layers)[layer]), i, m)
             for i in range(nodes) for m in members
        )  # fmt: skip
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
    return {"rows": layers, "transfers": transfers, "lost": sorted(set(lost)), "relaxed": relaxed}


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
            (int(n.split(".")[1]), int(n.split(".")[2])) for f in files for n in f["p"] if
            n.startswith("x.")
        }  # fmt: skip
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


def _step(
    cfg: LazarusConfig,
    state: _State,
    rows: list[list[int]],
    corpus: torch.Tensor,
    step: int,
    loads: torch.Tensor,
    me: int,
    store: dist.Store,
) -> tuple[float, dict[str, torch.Tensor]]:
    mcfg = cfg.model
    rank, world = dist.get_rank(), dist.get_world_size()
    matrices = [_replica_matrix(layer_rows, cfg.experts) for layer_rows in rows]
    seen = torch.zeros_like(loads)

    def moe(layer: int, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        def run(e: int, x: torch.Tensor) -> torch.Tensor:
            return expert_forward(state.experts[(layer, e)], x)

        y, table = moe_dispatch(h, ids, w, matrices[layer], run)
        seen[layer] += table.sum(dim=0)
        return y

    x, y = _batch(corpus, cfg, step, rank, world)
    logits = state.model(x, moe)
    loss = F.cross_entropy(logits.reshape(-1, mcfg.vocab), y.reshape(-1))
    if me in cfg.kill_ranks and step == cfg.kill_at_step:
        store.set(f"killed_at/{me}", repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    loss.backward()
    dense = [p for _, p in state.model.named_parameters()]
    table = torch.zeros(cfg.layers, cfg.experts, mcfg.expert_numel)
    for (layer, e), params in state.experts.items():
        table[layer, e] = torch.cat(
            [(params[k].grad if params[k].grad is not None else torch.zeros_like(params[k]))
             .reshape(-1) for k in EXPERT_KEYS]
        )  # fmt: skip
    flat = torch.cat(
        [loss.detach().reshape(1)]
        + [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in dense]
        + [table.reshape(-1)]
    )
    dist.all_reduce(flat)
    flat /= world
    grads: dict[str, torch.Tensor] = {}
    offset = 1
    for n, p in state.model.named_parameters():
        grads[f"d.{n}"] = flat[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    table = flat[offset:].reshape(cfg.layers, cfg.experts, -1)
    for (layer, e), params in state.experts.items():
        pieces = table[layer, e].split([params[k].numel() for k in EXPERT_KEYS])
        for k, g in zip(EXPERT_KEYS, pieces, strict=True):
            grads[f"x.{layer}.{e}.{k}"] = g.reshape(params[k].shape)
    loads += seen
    return float(flat[0]), grads


def _clear_grads(state: _State) -> None:
    for p in state.named().values():
        p.grad = None


def _held(rows: list[list[int]], members: list[int]) -> dict[int, list[set[int]]]:
    return {m: [set(rows[layer][i]) for layer in range(len(rows))] for i, m in enumerate(members)}


def train_rank(corpus: torch.Tensor, cfg: LazarusConfig) -> dict[str, Any]:
    """One rank of a Lazarus run (called inside :func:`thrifty.bench.launch.run_ranks`)."""
    me, world = dist.get_rank(), dist.get_world_size()
    host, port = _base_store()
    dist.destroy_process_group()  # the harness's group has a long timeout; ours is short
    store = _client(host, port)
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(host, port, me, stop), daemon=True).start()
    members = list(range(world))
    gen = 0
    _init_group(store, gen, me, world, cfg.collective_timeout)
    mcfg = cfg.model
    torch.manual_seed(cfg.seed)
    model = MoEGPT(mcfg)
    loads = torch.zeros(cfg.layers, cfg.experts)
    if me == 0:
        plan = _plan(cfg, members, {}, loads)
        store.set("plan/0", json.dumps(plan["rows"]))
    rows = json.loads(store.get("plan/0"))
    experts = {}
    for layer in range(cfg.layers):
        for e in set(rows[layer][me]):
            experts[(layer, e)] = {
                k: t.requires_grad_() for k, t in init_expert(mcfg, layer, e, cfg.seed).items()
            }
    state = _State(model, experts)
    ckpt_dir = Path(cfg.checkpoint_dir or tempfile.mkdtemp(prefix="lazarus-ckpt-"))
    losses: dict[int, float] = {}
    reconfigs: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    executed = 0
    step = 0
    snap = prev_snap = state.snapshot()
    started = time.perf_counter()
    try:
        while step < cfg.steps:
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                _save_checkpoint(state, ckpt_dir, step, me)
            prev_snap, snap = snap, state.snapshot()
            try:
                loss, grads = _step(cfg, state, rows, corpus, step, loads, me, store)
            except RuntimeError as exc:
                caught = time.time()
                log.info("rank %d: step %d failed: %s", me, step, str(exc).splitlines()[0])
                _clear_grads(state)
                outcome = _recover(
                    cfg, state, store, members, gen, rows, loads, step, snap, prev_snap, ckpt_dir
                )
                if outcome is None:
                    return {"rank": me, "evicted": True}
                killed = [float(store.get(k)) for k in _killed_keys(store, cfg)]
                outcome["report"]["detection_s"] = caught - max(killed) if killed else None
                outcome["report"]["regroup_s"] = outcome["regrouped"] - caught
                members, rows, step = outcome["members"], outcome["rows"], outcome["step"]
                gen += 1
                reconfigs.append(outcome["report"])
                if cfg.return_states and "pre_failure" not in extra:
                    extra["pre_failure"] = outcome["pre_failure"]
                    extra["post_recovery"] = state.snapshot()
                snap = state.snapshot()
                continue
            _clear_grads(state)
            state.adam(grads, cfg.lr)
            losses[step] = loss
            executed += 1
            step += 1
    finally:
        stop.set()
    return {
        "rank": me,
        "members": members,
        "losses": [losses[s] for s in sorted(losses)],
        "steps": step,
        "steps_executed": executed,
        "seconds": time.perf_counter() - started,
        "reconfigurations": reconfigs,
        "placement": rows,
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
    members: list[int],
    gen: int,
    rows: list[list[int]],
    loads: torch.Tensor,
    step: int,
    snap: dict[str, Any],
    prev_snap: dict[str, Any],
    ckpt_dir: Path,
) -> dict[str, Any] | None:
    me = members[dist.get_rank()]
    with contextlib.suppress(RuntimeError):
        dist.destroy_process_group()
    survivors = _agree_members(store, gen + 1, members, me, cfg.liveness_window)
    if me not in survivors:
        return None
    _init_group(store, gen + 1, survivors.index(me), len(survivors), cfg.collective_timeout)
    # A rank whose all-reduce finished applied the step; everyone goes back to the minimum.
    done = torch.tensor([step], dtype=torch.int64)
    dist.all_reduce(done, op=dist.ReduceOp.MIN)
    target = int(done)
    if target < step:
        state.restore(prev_snap)
        pre_failure = prev_snap
    else:
        state.restore(snap)
        pre_failure = snap
    regrouped = time.time()
    start = time.perf_counter()
    held = _held(rows, members)
    held = {m: h for m, h in held.items() if m in survivors}
    if dist.get_rank() == 0:
        plan = _plan(cfg, survivors, held, loads)
        store.set(f"plan/{gen + 1}", json.dumps(plan))
    plan = json.loads(store.get(f"plan/{gen + 1}"))
    new_rows = plan["rows"]
    mine = [new_rows[layer][survivors.index(me)] for layer in range(cfg.layers)]
    reloaded_step = None
    moved = 0
    nbytes = 0
    if plan["lost"]:
        reloaded_step = _load_checkpoint(cfg, state, ckpt_dir, mine)
        if reloaded_step is None:
            raise RuntimeError(f"experts {plan['lost']} lost every replica and no checkpoint")
        log.warning("experts %s lost every replica: reloaded step %d", plan["lost"], reloaded_step)
        target = reloaded_step
    else:
        ops = []
        incoming: list[tuple[int, int, torch.Tensor]] = []
        for src, dst, layer, e in plan["transfers"]:
            tag = layer * cfg.experts + e
            if src == me:
                ops.append(dist.isend(state.expert_vector(layer, e), survivors.index(dst), tag=tag))
            elif dst == me:
                buf = torch.empty(3 * cfg.model.expert_numel)
                ops.append(dist.irecv(buf, survivors.index(src), tag=tag))
                incoming.append((layer, e, buf))
            moved += 1
            nbytes += 3 * cfg.model.expert_numel * 4
        for op in ops:
            op.wait()
        for layer, e, buf in incoming:
            state.set_expert_vector(cfg.model, layer, e, buf)
        keep = {(layer, e) for layer in range(cfg.layers) for e in mine[layer]}
        for key in list(state.experts):
            if key not in keep:
                state.drop_expert(*key)
    dist.barrier()
    report = {
        "step": step,
        "resumed_at_step": target,
        "members_before": members,
        "members_after": survivors,
        "transfer_s": time.perf_counter() - start,
        "replicas_moved": moved,
        "bytes_moved": nbytes,
        "checkpoint_reload": reloaded_step is not None,
        "lost_experts": plan["lost"],
        "min_replicas_relaxed": plan["relaxed"],
    }
    return {
        "members": survivors,
        "rows": new_rows,
        "step": target,
        "regrouped": regrouped,
        "report": report,
        "pre_failure": pre_failure,
    }


def train(cfg: LazarusConfig, corpus: torch.Tensor | None = None) -> dict[str, Any]:
    """Run Lazarus on ``cfg.workers`` local gloo ranks; return the report (no tensors)."""
    from thrifty.bench.launch import run_ranks

    if corpus is None:
        corpus = sharegpt_corpus(cfg.corpus_tokens, cfg.vocab)
    with tempfile.TemporaryDirectory(prefix="lazarus-ckpt-") as tmp:
        cfg_run = cfg if cfg.checkpoint_dir else _replace(cfg, checkpoint_dir=tmp)
        started = time.perf_counter()
        results = run_ranks(
            train_rank,
            cfg.workers,
            corpus,
            cfg_run,
            may_die=cfg.kill_ranks,
            timeout=max(120.0, cfg.steps * 3.0),
        )
        wall = time.perf_counter() - started
    return summarize(cfg, results, wall)


def _replace(cfg: LazarusConfig, **changes: Any) -> LazarusConfig:
    return LazarusConfig(**{**asdict(cfg), **changes})


def summarize(cfg: LazarusConfig, results: list[Any], wall: float) -> dict[str, Any]:
    """The JSON report from the ranks' results (survivors only; killed ranks return None)."""
    alive = [r for r in results if r is not None and not r.get("evicted")]
    if not alive:
        raise RuntimeError("no rank survived")
    first = alive[0]
    reconfigs = []
    for i, rec in enumerate(first["reconfigurations"]):
        per_rank = [r["reconfigurations"][i] for r in alive]
        merged = dict(rec)
        for key in ("detection_s", "regroup_s", "transfer_s"):
            values = [p[key] for p in per_rank if p[key] is not None]
            merged[key] = max(values) if values else None
        merged["total_s"] = sum(
            merged[k] or 0.0 for k in ("detection_s", "regroup_s", "transfer_s")
        )
        reconfigs.append(merged)
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k != "return_states"},
        "steps_done": first["steps"],
        "steps_executed": first["steps_executed"],
        "final_members": first["members"],
        "loss": first["losses"],
        "reconfigurations": reconfigs,
        "replicas_moved": sum(r["replicas_moved"] for r in reconfigs),
        "checkpoint_reloads": sum(r["checkpoint_reload"] for r in reconfigs),
        "final_placement": first["placement"],
        "wall_s": wall,
    }
