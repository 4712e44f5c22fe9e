"""Token dispatcher: which replica serves each routed token (Lazarus Algorithm 1).

With replicated experts, a token routed to expert ``e`` can go to any rank
holding a replica of ``e``. Lazarus balances load by giving every replica the
same share of the expert's tokens, serving tokens on the rank where they
already are when that rank holds a replica, and sending the overflow to ranks
with spare capacity, in proportion to that capacity.

Every rank all-gathers the per-rank, per-expert counts ``T[rank, e]`` (``E``
integers per rank) and then computes the *whole* send matrix
``D[src, dst, e]`` itself. The computation is exact integer arithmetic with
fixed tie-breaks, so all ranks get the same matrix without further talk, and
each knows both what it sends and what it will receive: one all-to-all with
variable split sizes, no padding and no dropped tokens.

Per expert ``e``, with ``t_e = sum_j T[j, e]`` and ``r_e = sum_j R[j, e]``:

1. Capacity. Rank ``j``'s quota is ``t_e * R[j, e] / r_e`` (``p_e * R[j, e]``
   with ``p_e = t_e / r_e``). Integer capacities by largest remainder
   (Hamilton): floors first, the leftover units to the largest fractional
   parts; ties go to the rank with more local tokens beyond its floor (fewer
   tokens to move), then to the lower rank. Each capacity is the floor or the
   ceiling of its quota, so split evenly over the rank's replicas every
   replica serves ``floor(p_e)`` or ``ceil(p_e)`` tokens: within one token of
   the fair share.
2. Local first: ``D[i, i, e] = min(cap_i, T[i, e])``.
3. Overflow ``o_i = T[i, e] - D[i, i, e]`` and residual capacity
   ``P_j = cap_j - D[j, j, e]`` have equal sums (a rank has one or the other).
   Sources in rank order each split their overflow over the residuals left by
   the sources before them, proportionally, again by largest remainder (ties
   to the lower rank). Proportional to what is left is the paper's
   ``o_i * P_j / sum_k P_k`` up to rounding, and since ``o_i <= sum P`` no
   destination is ever asked for more than it has left.

Top-k gating: the unit is a (token, expert) pair; a token with ``k`` experts
contributes ``k`` pairs, each dispatched independently.

Memory: ``D`` is ``ranks x ranks x experts`` integers, fine for the tens to
hundreds of ranks this runs on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "DispatchPlan",
    "LocalDispatch",
    "dispatch_local",
    "plan_dispatch",
    "split_evenly",
    "token_counts",
]


def token_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """This rank's ``T[rank, :]``: (token, expert) pairs per expert, for the all-gather.

    ``expert_ids`` is the gate's top-k output, shape ``[tokens, k]`` (or
    ``[tokens]`` for top-1).
    """
    flat = expert_ids.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise ValueError(f"expert ids must lie in 0..{num_experts - 1}")
    return torch.bincount(flat, minlength=num_experts)


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` tokens over ``parts`` replicas on one rank: sizes differ by at most one."""
    if parts < 1:
        raise ValueError(f"parts={parts}: expected >= 1")
    base, extra = divmod(total, parts)
    return [base + 1] * extra + [base] * (parts - extra)


@dataclass(frozen=True)
class DispatchPlan:
    """The send matrix every rank computes from the all-gathered counts.

    Attributes:
        counts: ``D[src, dst, e]`` (int64): pairs of expert ``e`` that rank
            ``src`` sends to rank ``dst`` (``src == dst``: served locally).
        token_counts: ``T[rank, e]``, the input.
        replica_counts: ``R[rank, e]``, the input.
    """

    counts: torch.Tensor
    token_counts: torch.Tensor
    replica_counts: torch.Tensor

    @property
    def num_ranks(self) -> int:
        return self.counts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[2]

    def send_splits(self, rank: int) -> list[int]:
        """Pairs ``rank`` sends to each rank (the all-to-all's input split sizes)."""
        return self.counts[rank].sum(dim=1).tolist()

    def recv_splits(self, rank: int) -> list[int]:
        """Pairs ``rank`` receives from each rank (the all-to-all's output split sizes)."""
        return self.counts[:, rank].sum(dim=1).tolist()

    def load(self) -> torch.Tensor:
        """``[rank, e]``: pairs each rank serves for each expert (its capacity)."""
        return self.counts.sum(dim=0)

    def replica_loads(self, rank: int, expert: int) -> list[int]:
        """Pairs each of ``rank``'s replicas of ``expert`` serves, split evenly."""
        replicas = int(self.replica_counts[rank, expert])
        if replicas == 0:
            return []
        return split_evenly(int(self.load()[rank, expert]), replicas)


def plan_dispatch(
    token_counts: torch.Tensor | np.ndarray, replica_counts: torch.Tensor | np.ndarray
) -> DispatchPlan:
    """Algorithm 1: the send matrix ``D[src, dst, e]`` from all-gathered counts.

    Args:
        token_counts: ``T[rank, e]``, (token, expert) pairs each rank routed
            to each expert this step (all-gathered; identical on every rank).
        replica_counts: ``R[rank, e]``, replicas of ``e`` on ``rank`` (from
            the placement: ``Placement.replica_matrix()`` when ranks are nodes).

    Raises when an expert has tokens but no replica anywhere.
    """
    tokens = _as_int_matrix(token_counts, "token_counts")
    replicas = _as_int_matrix(replica_counts, "replica_counts")
    if tokens.shape != replicas.shape:
        raise ValueError(
            f"token_counts has shape {tuple(tokens.shape)} and replica_counts "
            f"{tuple(replicas.shape)}: both must be [ranks, experts]"
        )
    ranks, experts = tokens.shape
    total = tokens.sum(axis=0)
    replica_total = replicas.sum(axis=0)
    orphaned = np.nonzero((total > 0) & (replica_total == 0))[0]
    if orphaned.size:
        raise ValueError(f"experts {orphaned.tolist()} have tokens but no replica on any rank")
    counts = np.zeros((ranks, ranks, experts), dtype=np.int64)
    for e in range(experts):
        if total[e] == 0:
            continue
        capacity = _capacities(int(total[e]), replicas[:, e], tokens[:, e])
        local = np.minimum(capacity, tokens[:, e])
        counts[np.arange(ranks), np.arange(ranks), e] = local
        overflow = tokens[:, e] - local
        residual = capacity - local
        left = int(overflow.sum())
        for src in np.nonzero(overflow)[0].tolist():
            share = _largest_remainder(int(overflow[src]), residual, left)
            counts[src, :, e] += share
            residual -= share
            left -= int(overflow[src])
    return DispatchPlan(
        torch.from_numpy(counts), torch.from_numpy(tokens), torch.from_numpy(replicas)
    )


def _as_int_matrix(values: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    array = (
        values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    )
    if array.ndim != 2:
        raise ValueError(f"{name} must be a [ranks, experts] matrix, got shape {array.shape}")
    integral = np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array))
    if array.size and not integral:
        fractional = array[array != np.round(array)]
        example = fractional.flat[0] if fractional.size else array.dtype
        raise ValueError(f"{name} must hold integer counts, got {example}")
    array = array.astype(np.int64)
    if (array < 0).any():
        raise ValueError(f"{name} must be non-negative")
    return array


def _capacities(total: int, replicas: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Hamilton apportionment of ``total`` over ranks by replica count (see the module doc)."""
    r = int(replicas.sum())
    quota_floor, remainder = np.divmod(total * replicas, r)
    leftover = total - int(quota_floor.sum())
    capacity = quota_floor.copy()
    if leftover:
        excess = local - quota_floor  # local tokens beyond the floor: prefer serving them here
        # lexsort: last key is primary. Largest remainder, then largest excess, then lowest rank.
        order = np.lexsort((np.arange(len(replicas)), -excess, -remainder))
        capacity[order[:leftover]] += 1
    return capacity


def _largest_remainder(amount: int, weights: np.ndarray, weight_total: int) -> np.ndarray:
    """Split ``amount <= weight_total`` over ``weights`` proportionally, never above a weight."""
    floor, remainder = np.divmod(amount * weights, weight_total)
    leftover = amount - int(floor.sum())
    if leftover:
        order = np.lexsort((np.arange(len(weights)), -remainder))
        floor[order[:leftover]] += 1
    return floor


@dataclass(frozen=True)
class LocalDispatch:
    """One rank's part of the plan, applied to its gate output.

    Send ``pairs[send_order]`` with ``send_splits``; the received rows are
    grouped by source rank, then expert (``recv_experts`` names each row's
    expert). Send the expert outputs back with the splits swapped; then
    :meth:`restore` puts the returned rows back in (token, k) order.

    Attributes:
        destination: per (token, expert) pair, in ``expert_ids.reshape(-1)``
            order, the rank that serves it.
        send_order: permutation of the pairs into the send buffer, grouped by
            destination rank, then expert, then original order.
        send_splits / recv_splits: the all-to-all's input / output split sizes.
        recv_experts: the expert of each received row.
    """

    destination: torch.Tensor
    send_order: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    recv_experts: torch.Tensor
    shape: tuple[int, ...] = field(default=())

    def restore(self, returned: torch.Tensor) -> torch.Tensor:
        """Rows returned in send order back to pair order, shaped ``[*expert_ids.shape, ...]``."""
        if returned.shape[0] != self.send_order.numel():
            raise ValueError(
                f"returned has {returned.shape[0]} rows, {self.send_order.numel()} were sent"
            )
        out = torch.empty_like(returned)
        out[self.send_order] = returned
        return out.reshape(*self.shape, *returned.shape[1:])


def dispatch_local(plan: DispatchPlan, rank: int, expert_ids: torch.Tensor) -> LocalDispatch:
    """Where each of ``rank``'s (token, expert) pairs goes, and the all-to-all's splits.

    Pairs of expert ``e`` are taken in order: the first ``D[rank, rank, e]``
    stay on this rank, the next ``D[rank, j, e]`` go to each other rank ``j``
    in rank order. ``expert_ids`` must match the counts this rank contributed
    to the plan.
    """
    if not 0 <= rank < plan.num_ranks:
        raise ValueError(f"rank={rank}: expected 0 <= rank < {plan.num_ranks}")
    experts = plan.num_experts
    flat = expert_ids.reshape(-1).to(torch.int64).cpu()
    mine = token_counts(flat, experts)
    if not torch.equal(mine, plan.token_counts[rank]):
        raise ValueError(
            f"rank {rank}'s expert_ids count {mine.tolist()} pairs per expert, the plan was "
            f"built from {plan.token_counts[rank].tolist()}"
        )
    counts = plan.counts[rank]  # [dst, e]
    ranks = plan.num_ranks
    # Destination order per expert: this rank first (local tokens first), then the others.
    dst_order = torch.tensor([rank] + [j for j in range(ranks) if j != rank], dtype=torch.int64)
    ordered_counts = counts[dst_order]  # [position, e]
    bounds = ordered_counts.cumsum(dim=0)  # [position, e]: end of each destination's run
    # Position of each pair among the pairs of its expert (stable, in pair order).
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    starts = torch.zeros(experts, dtype=torch.int64)
    starts[1:] = mine.cumsum(dim=0)[:-1]
    rank_in_expert = torch.empty_like(flat)
    rank_in_expert[order] = torch.arange(flat.numel()) - starts[sorted_ids]
    # The destination run that position falls in.
    runs = bounds.t().contiguous()  # [e, position]
    position = torch.searchsorted(runs[flat], rank_in_expert.unsqueeze(1), right=True).squeeze(1)
    destination = dst_order[position]
    send_order = torch.argsort(destination * experts + flat, stable=True)
    recv = plan.counts[:, rank]  # [src, e]
    recv_experts = torch.repeat_interleave(torch.arange(experts).repeat(ranks), recv.reshape(-1))
    return LocalDispatch(
        destination=destination,
        send_order=send_order,
        send_splits=plan.send_splits(rank),
        recv_splits=plan.recv_splits(rank),
        recv_experts=recv_experts,
        shape=tuple(expert_ids.shape),
    )
