"""How many replicas each expert gets: Lazarus's Eq. 1.

Hot experts need more replicas (each replica serves a share of the expert's
tokens, so more replicas balance the load), and every expert needs at least
``f`` replicas so that any ``f - 1`` node failures leave a live copy. Eq. 1 of
the paper does both in one pass over the experts sorted by load, least loaded
first:

    r_e = max(floor(t_e / sum_{e' >= e} t_e' * (N*c - sum_{e' < e} r_e')), f)

The least loaded experts take the floor of their proportional share (or ``f``
when that is smaller); what rounding leaves over flows to the busier experts,
and the busiest takes all remaining slots. Properties (checked by the tests):

* ``sum(r) == N * c``: every slot holds a replica;
* ``r_e >= f`` for every expert;
* monotone: a strictly busier expert never gets fewer replicas;
* ``r_e / sum(r)`` tracks ``t_e / sum(t)``.

Why it never runs out: if the ``m`` experts still to place share ``S >= m*f``
slots, the least loaded of them has at most ``1/m`` of their load, so it takes
``max(floor(S/m), f) <= S/m`` slots and leaves ``>= (m-1)*f`` for the rest.

The arithmetic is exact (``fractions.Fraction`` for float loads), so every
rank that runs it on the same loads gets the same answer, with no float
rounding that could differ between machines.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["Allocation", "allocate_replicas"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Allocation:
    """Replicas per expert, in the caller's expert order.

    Attributes:
        replicas: ``replicas[e]`` slots hold expert ``e``; they sum to ``nodes * slots_per_node``.
        min_replicas: the minimum actually enforced (``f``, or less when relaxed).
        requested_min_replicas: the ``f`` the caller asked for.
    """

    replicas: tuple[int, ...]
    min_replicas: int
    requested_min_replicas: int

    @property
    def relaxed(self) -> bool:
        """True when there were too few slots (or nodes) to give every expert ``f`` replicas."""
        return self.min_replicas < self.requested_min_replicas

    def __len__(self) -> int:
        return len(self.replicas)

    def __getitem__(self, expert: int) -> int:
        return self.replicas[expert]


def allocate_replicas(
    loads: Sequence[float],
    nodes: int,
    slots_per_node: int,
    min_replicas: int = 2,
) -> Allocation:
    """Eq. 1: replicas per expert from token loads; at least ``min_replicas`` each.

    Args:
        loads: tokens routed to each expert (``t_e``), e.g. counted over the
            last K steps; non-negative ints or floats. All zero means "no
            information" and allocates as if the loads were equal.
        nodes: ``N``, the number of live nodes.
        slots_per_node: ``c``, expert replica slots per node (memory bound).
        min_replicas: ``f``, the fault-tolerance threshold: with ``f`` replicas
            on distinct nodes any ``f - 1`` node failures are survivable.

    When ``N * c < f * E`` (or ``N < f``, where ``f`` distinct nodes cannot
    exist) the minimum is relaxed to the largest feasible value and a warning
    is logged: Lazarus keeps training with fewer replicas rather than stop
    (paper §6.2). Ties in load are broken by expert index, so the result is
    deterministic.

    Example::

        >>> allocate_replicas([10, 20, 30, 40], nodes=5, slots_per_node=4).replicas
        (2, 4, 6, 8)
    """
    experts = len(loads)
    if experts == 0:
        raise ValueError("loads is empty: need at least one expert")
    if nodes < 1:
        raise ValueError(f"nodes={nodes}: need at least one node")
    if slots_per_node < 1:
        raise ValueError(f"slots_per_node={slots_per_node}: need at least one slot per node")
    if min_replicas < 1:
        raise ValueError(f"min_replicas={min_replicas}: every expert needs at least 1 replica")
    exact_loads = [_exact_load(e, t) for e, t in enumerate(loads)]
    total_slots = nodes * slots_per_node
    if experts > total_slots:
        raise ValueError(
            f"{experts} experts do not fit in {nodes} nodes x {slots_per_node} slots "
            f"= {total_slots} slots: every expert needs at least one replica"
        )

    feasible = min(min_replicas, total_slots // experts, nodes)
    if feasible < min_replicas:
        log.warning(
            "relaxing the replica minimum from f=%d to f=%d: %d experts, %d nodes x %d slots "
            "(f*E=%d slots needed, f <= N nodes required)",
            min_replicas,
            feasible,
            experts,
            nodes,
            slots_per_node,
            min_replicas * experts,
        )
    f = feasible

    if all(t == 0 for t in exact_loads):
        exact_loads = [Fraction(1)] * experts
    order = sorted(range(experts), key=lambda e: (exact_loads[e], e))
    replicas = [0] * experts
    remaining_slots = total_slots
    remaining_load = sum(exact_loads)
    for position, e in enumerate(order):
        if position == experts - 1:
            replicas[e] = remaining_slots
            break
        # remaining_load > 0: loads are sorted ascending and not all zero.
        share = math.floor(exact_loads[e] * remaining_slots / remaining_load)
        replicas[e] = max(share, f)
        remaining_slots -= replicas[e]
        remaining_load -= exact_loads[e]
    return Allocation(tuple(replicas), f, min_replicas)


def _exact_load(expert: int, load: float) -> Fraction:
    if isinstance(load, bool) or not isinstance(load, int | float | Fraction):
        try:  # numpy / torch scalars: integers stay exact
            load = int(load) if hasattr(load, "__index__") else float(load)
        except (TypeError, ValueError):
            raise TypeError(f"loads[{expert}]={load!r} is not a number") from None
    if isinstance(load, float) and not math.isfinite(load):
        raise ValueError(f"loads[{expert}]={load} is not finite")
    if load < 0:
        raise ValueError(f"loads[{expert}]={load} is negative: token loads are counts >= 0")
    return Fraction(load)
