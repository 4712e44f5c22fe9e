"""Expert parallelism with replicated experts for an existing MoE block (Lazarus on real models).

:class:`ReplicatedExperts` takes the place of one MoE block on one rank of a
process group. It keeps the block's router (the same module object, so the
router's parameters, state-dict keys and forward hooks, through which
transformers records router logits for the load-balancing loss, stay as they
were) and holds trainable replicas of only the experts the placement gives
this rank. A forward:

1. runs the block's own pre-routing step and router on the local tokens;
2. all-gathers the (token, expert) pair counts and computes, with Lazarus
   Algorithm 1 (:mod:`thrifty.lazarus.dispatcher`), which rank serves each
   pair; within a rank an expert's pairs are split evenly over its replicas;
3. sends each pair's hidden state to its rank (all-to-all with variable
   splits), runs the replica's math (the block's own expert code, through
   :mod:`thrifty.lazarus.moe_adapter`), sends the outputs back;
4. combines them with the router weights as the transformers blocks do,
   ``sum_k (y_k * w_k).to(dtype)``.

Both all-to-alls are autograd functions whose backward is the reverse
all-to-all, so gradients reach the input, the router and every replica. A
replica's gradient covers the tokens it served, from every rank; summing an
expert's replica gradients over all ranks (see :meth:`ReplicatedExperts.named_replica_parameters`)
gives the gradient of the unreplicated model. That sum is not done here.

Collectives: the constructor all-gathers every rank's expert list (one
small collective; all ranks must construct their layers in the same order),
and each forward runs an all-gather of counts and two all-to-alls; its
backward runs two all-to-alls. So every rank must run forward (and
backward) of every layer, even with no tokens of its own. Without an
initialised process group the layer runs alone (world size 1). The backward
all-to-alls run inside autograd; if other collectives may run on the same
group during backward (DDP's gradient all-reduce of the dense part), give
the layers a process group of their own so the two cannot interleave
differently on different ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from thrifty.comm.collectives import all_gather, all_gather_v, all_to_all_v
from thrifty.lazarus.dispatcher import dispatch_local, plan_dispatch, token_counts
from thrifty.lazarus.moe_adapter import (
    SUPPORTED_BLOCKS,
    MoEAdapter,
    combine,
    is_moe_block,
    moe_adapter,
)
from thrifty.lazarus.placement import Placement

__all__ = ["ReplicatedExperts", "find_moe_blocks", "replicate_moe_blocks"]

LocalExperts = Sequence[int] | Placement


def _group_rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


class _ExchangeRows(torch.autograd.Function):
    """All-to-all of rows, ``send[j]`` of them to rank ``j``; backward sends gradients back.

    ``anchor`` is an empty tensor that requires grad. It makes the output
    require grad whenever grad is enabled, whatever this rank's inputs: the
    backward is a collective, so it must run on every rank or on none. A rank
    whose rows do not need gradients (a frozen input, or nothing received for
    a replica) would otherwise skip it and leave the others waiting.
    """

    @staticmethod
    def forward(
        ctx: Any,
        rows: torch.Tensor,
        anchor: torch.Tensor,
        send: list[int],
        recv: list[int],
        group: Any,
    ) -> torch.Tensor:
        ctx.exchange = (send, recv, group)
        return _exchange_rows(rows, send, recv, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        send, recv, group = ctx.exchange
        return _exchange_rows(grad, recv, send, group), None, None, None, None


def _exchange_rows(
    rows: torch.Tensor, send: Sequence[int], recv: Sequence[int], group: Any
) -> torch.Tensor:
    width = rows.shape[1]
    chunks = list(rows.contiguous().reshape(-1).split([s * width for s in send]))
    got = all_to_all_v(chunks, group=group, recv_sizes=[s * width for s in recv])
    return torch.cat(got).reshape(-1, width)  # type: ignore[arg-type]


class ReplicatedExperts(nn.Module):
    """One rank's part of an expert-parallel MoE block with replicated experts.

    Args:
        source: the MoE block to take over (transformers 5.x
            ``MixtralSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock``,
            ``OlmoeSparseMoeBlock``, or any block with a ``gate`` router and
            stacked ``experts`` whose forward is just gate -> experts: checked
            on random tokens), or an :class:`~thrifty.lazarus.moe_adapter.MoEAdapter`
            (e.g. ``moe_adapter(router, expert_modules)`` for a list of experts).
            Each replica starts as a copy of the source's expert, so every
            rank must build the source identically (same seed or checkpoint).
            The layer shares the source's router module and keeps nothing
            else of it: the full experts can be freed once it is replaced.
        local_experts: the expert of each replica this rank holds, in slot
            order (a placement column: an expert may repeat, here or on
            other ranks), or a :class:`~thrifty.lazarus.placement.Placement`
            with one node per rank (this rank takes ``nodes[rank]``). Every
            expert must be held by some rank.
        group: the process group (default: the world; none initialised:
            this process alone).

    Attributes:
        gate: the block's router (the same module object).
        replicas: ``replicas[slot]`` holds the replica in that slot; its
            parameters are named like the expert's state
            (``replicas.0.gate_up_proj`` for transformers blocks).
        replica_experts: the expert id of each slot.
        replica_counts: ``[world, E]`` int64, replicas of each expert on each rank.
        last_token_counts: ``[world, E]`` pairs each rank routed to each
            expert in the last forward (the load the allocator needs), or None.
    """

    def __init__(
        self,
        source: nn.Module | MoEAdapter,
        local_experts: LocalExperts,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        adapter = moe_adapter(source)
        self.group = group
        self.rank, self.world_size = _group_rank_world(group)
        self.num_experts = adapter.num_experts
        mine = _local_list(local_experts, self.rank, self.world_size, self.num_experts)
        everyone = self._gather_lists(mine)
        self.replica_counts = _replica_matrix(everyone, self.num_experts)
        self.replica_experts: tuple[int, ...] = tuple(mine)
        self.gate = adapter.router
        self.replicas = nn.ModuleList(adapter.make_replica(e) for e in mine)
        self._adapter = adapter.without_source()
        self._slots_of: dict[int, list[int]] = {}
        for slot, expert in enumerate(mine):
            self._slots_of.setdefault(expert, []).append(slot)
        self.last_token_counts: torch.Tensor | None = None
        self._anchor = torch.empty(0, requires_grad=True)  # see _ExchangeRows

    def _gather_lists(self, mine: list[int]) -> list[list[int]]:
        if self.world_size == 1:
            return [mine]
        parts = all_gather_v(torch.tensor(mine, dtype=torch.int64), group=self.group)
        return [p.tolist() for p in parts]  # type: ignore[union-attr]

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}/{self.world_size}, num_experts={self.num_experts}, "
            f"replica_experts={list(self.replica_experts)}"
        )

    # ------------------------------------------------------------------ replicas

    def named_replica_parameters(self) -> Iterator[tuple[int, int, str, nn.Parameter]]:
        """``(slot, expert, name, parameter)`` for every replica parameter on this rank.

        Summing ``parameter.grad`` over all ``(rank, slot)`` with the same
        ``expert`` and ``name`` gives the unreplicated model's gradient. A
        replica that served no tokens in a step has ``grad`` None (count it as zero).
        """
        for slot, replica in enumerate(self.replicas):
            for name, param in replica.named_parameters():
                yield slot, self.replica_experts[slot], name, param

    def replica_state(self, slot: int) -> dict[str, torch.Tensor]:
        """Slot ``slot``'s tensors as contiguous detached clones (to send it elsewhere)."""
        return {
            name: t.detach().clone().contiguous() for name, t in self._replica_tensors(slot).items()
        }

    def load_replica_state(self, slot: int, state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite slot ``slot`` with ``state`` (e.g. a replica received from another rank)."""
        tensors = self._replica_tensors(slot)
        if set(state) != set(tensors):
            raise ValueError(
                f"slot {slot}: state has keys {sorted(state)}; expected {sorted(tensors)}"
            )
        with torch.no_grad():
            for name, t in tensors.items():
                if state[name].shape != t.shape:
                    raise ValueError(
                        f"slot {slot}: state[{name!r}] has shape {tuple(state[name].shape)}; "
                        f"expected {tuple(t.shape)}"
                    )
                t.copy_(state[name])

    def _replica_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        if not 0 <= slot < len(self.replicas):
            raise IndexError(f"slot {slot}: this rank has slots 0..{len(self.replicas) - 1}")
        replica = self.replicas[slot]
        return {**dict(replica.named_parameters()), **dict(replica.named_buffers())}

    # ------------------------------------------------------------------ forward

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The block's output for this rank's tokens ``[..., H]``: same shape and dtype."""
        shape = hidden_states.shape
        h = self._adapter.prepare(hidden_states, self.training).reshape(-1, shape[-1])
        routing = self._adapter.route(h)
        ids = routing.indices.detach()
        counts = token_counts(ids, self.num_experts)
        table = self._gather_counts(counts)
        self.last_token_counts = table
        plan = plan_dispatch(table, self.replica_counts)
        local = dispatch_local(plan, self.rank, ids)
        k = ids.shape[1]
        pairs = h.unsqueeze(1).expand(-1, k, -1).reshape(-1, shape[-1])
        send_order = local.send_order.to(h.device)
        received = self._exchange(pairs[send_order], local.send_splits, local.recv_splits)
        served = self._serve(received, local.recv_experts, plan.replica_loads)
        back = self._exchange(served, local.recv_splits, local.send_splits)
        outputs = local.restore(back)  # [T, k, H]
        return combine(outputs, routing.weights, h.dtype).reshape(shape)

    def _gather_counts(self, counts: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return counts.unsqueeze(0)
        return torch.stack(all_gather(counts, group=self.group))  # type: ignore[arg-type]

    def _exchange(self, rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        if self.world_size == 1:
            return rows
        return _ExchangeRows.apply(rows, self._anchor, send, recv, self.group)

    def _serve(
        self,
        received: torch.Tensor,
        experts: torch.Tensor,
        replica_loads: Callable[[int, int], list[int]],
    ) -> torch.Tensor:
        """Every received row through a local replica of its expert, rows in received order.

        An expert's rows (in received order) are cut into consecutive runs,
        one per local replica in slot order, of the sizes the plan gives.
        """
        if received.shape[0] == 0:
            return received * 0  # keeps the graph connected: backward must still all-to-all
        experts = experts.to(received.device)
        order = torch.argsort(experts, stable=True)
        per_expert = torch.bincount(experts, minlength=self.num_experts).tolist()
        outputs, rows_served, start = [], [], 0
        for expert, count in enumerate(per_expert):
            if count == 0:
                continue
            rows = order[start : start + count]
            start += count
            loads = replica_loads(self.rank, expert)
            slots = self._slots_of.get(expert, [])
            if len(loads) != len(slots) or sum(loads) != count:
                raise RuntimeError(
                    f"rank {self.rank} received {count} pairs of expert {expert} for "
                    f"{len(slots)} local replicas, the plan split {loads}"
                )
            for slot, part in zip(slots, rows.split(loads), strict=True):
                if part.numel():
                    state = self._replica_tensors(slot)
                    outputs.append(self._adapter.run_expert(state, received[part]))
                    rows_served.append(part)
        result = torch.cat(outputs)
        inverse = torch.empty_like(order)
        inverse[torch.cat(rows_served)] = torch.arange(order.numel(), device=order.device)
        return result[inverse]


def _local_list(local_experts: LocalExperts, rank: int, world: int, num_experts: int) -> list[int]:
    if isinstance(local_experts, Placement):
        if local_experts.num_nodes != world:
            raise ValueError(
                f"placement has {local_experts.num_nodes} nodes; expected one per rank ({world})"
            )
        if local_experts.num_experts != num_experts:
            raise ValueError(
                f"placement is for {local_experts.num_experts} experts; the block has {num_experts}"
            )
        return list(local_experts.nodes[rank])
    if isinstance(local_experts, torch.Tensor):
        local_experts = local_experts.tolist()
    try:
        return [int(e) for e in local_experts]
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"local_experts must be a sequence of expert ids or a Placement, got {local_experts!r}"
        ) from exc


def _replica_matrix(lists: list[list[int]], num_experts: int) -> torch.Tensor:
    """``R[rank, e]`` from every rank's list, checked the same way on every rank.

    Every rank sees the same lists, so every rank raises the same error:
    none is left waiting in a collective.
    """
    for rank, experts in enumerate(lists):
        bad = sorted({e for e in experts if not 0 <= e < num_experts})
        if bad:
            raise ValueError(
                f"rank {rank} holds expert ids {bad}, out of range: the block has "
                f"{num_experts} experts (ids 0..{num_experts - 1})"
            )
    counts = torch.zeros(len(lists), num_experts, dtype=torch.int64)
    for rank, experts in enumerate(lists):
        for e in experts:
            counts[rank, e] += 1
    missing = (counts.sum(dim=0) == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"experts {missing} have no replica on any of the {len(lists)} ranks; every expert "
            f"needs at least one (placement: {lists})"
        )
    return counts


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The MoE blocks of ``model`` (``gate`` router + stacked ``experts``), in module order."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, ReplicatedExperts):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        if is_moe_block(module):
            found.append((name, module))
    return found


def replicate_moe_blocks(
    model: nn.Module,
    placement_for_layer: Callable[[int], LocalExperts] | LocalExperts,
    group: dist.ProcessGroup | None = None,
) -> dict[str, ReplicatedExperts]:
    """Replace every MoE block of ``model`` in place by a :class:`ReplicatedExperts`.

    ``placement_for_layer(i)`` gives this rank's experts for the ``i``-th MoE
    block (in module order, which is the same on every rank); a plain list
    or :class:`Placement` is used for every block. Returns the new layers by
    module name. Collective: every rank of ``group`` must call it on the
    same model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    blocks = find_moe_blocks(model)
    if not blocks:
        raise ValueError(
            f"no MoE block found in {type(model).__name__}: expected modules like "
            f"{SUPPORTED_BLOCKS} (a `gate` router and `experts` with stacked weights)"
        )
    replaced: dict[str, ReplicatedExperts] = {}
    for index, (name, block) in enumerate(blocks):
        local = placement_for_layer(index) if callable(placement_for_layer) else placement_for_layer
        layer = ReplicatedExperts(block, local, group)
        parent_name, _, child = name.rpartition(".")
        if not child:
            raise ValueError(f"{type(model).__name__} is itself an MoE block; wrap it instead")
        setattr(model.get_submodule(parent_name), child, layer)
        replaced[name] = layer
    return replaced
