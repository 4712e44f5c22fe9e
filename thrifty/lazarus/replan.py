"""Where every expert replica goes after a membership change, slot by slot (pure, no I/O).

Each member has ``c`` fixed slots per MoE layer (the slots are fixed
``nn.Parameter`` objects, so the user's optimizer keeps working; only slot
*contents* change). Given the token loads, the members and what each
member's slots hold now, :func:`plan_slots` computes

1. replicas per expert (Eq. 1, :func:`~thrifty.lazarus.allocation.allocate_replicas`)
   and a placement over the members (:func:`~thrifty.lazarus.placement_search.place_experts`);
2. which member takes which placement row: greatest overlap with what it
   holds first, so survivors keep their replicas;
3. which slot takes which expert: a slot already holding a wanted expert
   keeps it; the others are filled in order;
4. a source for every slot that must change: the same member when it holds
   the expert already (a local copy), otherwise the holder with the fewest
   sends so far, so the work is spread over all owners (as the paper does);
5. the experts no member holds any more (``lost``): only a checkpoint helps.

Everything is deterministic, so every member computes the same plan from the
same inputs (all-gathered, so identical) without a round trip through the store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from thrifty.lazarus.allocation import allocate_replicas
from thrifty.lazarus.placement_search import place_experts

__all__ = ["Move", "SlotPlan", "plan_slots"]


@dataclass(frozen=True)
class Move:
    """Copy ``expert`` of ``layer`` from ``(src, src_slot)`` to ``(dst, dst_slot)`` (member ids)."""

    layer: int
    expert: int
    src: int
    src_slot: int
    dst: int
    dst_slot: int


@dataclass(frozen=True)
class SlotPlan:
    """The outcome of :func:`plan_slots`.

    Attributes:
        slots: ``slots[layer][i]`` the experts of ``members[i]``'s slots, in slot order.
        moves: the copies that realise it (local copies included).
        lost: ``(layer, expert)`` held by no member: the plan needs a checkpoint.
        replicas: replicas per expert per layer (Eq. 1).
        relaxed: True when some layer had too few slots to give every expert ``f`` replicas.
    """

    members: tuple[int, ...]
    slots: tuple[tuple[tuple[int, ...], ...], ...]
    moves: tuple[Move, ...]
    lost: tuple[tuple[int, int], ...]
    replicas: tuple[tuple[int, ...], ...]
    relaxed: bool

    def counts(self, layer: int, experts: int) -> list[list[int]]:
        """``R[i][e]``: replicas of expert ``e`` on ``members[i]`` in ``layer``."""
        out = [[0] * experts for _ in self.members]
        for i, row in enumerate(self.slots[layer]):
            for e in row:
                out[i][e] += 1
        return out


def _overlap(a: Sequence[int], b: Sequence[int]) -> int:
    return sum((Counter(a) & Counter(b)).values())


def _fill(current: Sequence[int] | None, row: Sequence[int]) -> tuple[int, ...]:
    """Row ``row`` laid onto slots holding ``current``: matching slots keep their expert."""
    want = Counter(row)
    slots: list[int | None] = [None] * len(row)
    if current is not None:
        for i, e in enumerate(current):
            if want[e] > 0:
                slots[i] = e
                want[e] -= 1
    rest = iter(sorted(want.elements()))
    return tuple(e if e is not None else next(rest) for e in slots)


def plan_slots(
    loads: Sequence[Sequence[int]],
    members: Sequence[int],
    held: dict[int, Sequence[Sequence[int]] | None],
    slots_per_member: int,
    min_replicas: int,
) -> SlotPlan:
    """The slot plan for ``members`` (ids, group order). See the module docstring.

    Args:
        loads: ``loads[layer][expert]`` tokens routed so far (all zero: uniform).
        held: ``held[member][layer]`` the experts in that member's slots now,
            or None for a member with no state (a joiner).
        slots_per_member: ``c``.
        min_replicas: ``f``.
    """
    members = tuple(members)
    n = len(members)
    layer_slots, moves, lost, replicas = [], [], [], []
    relaxed = False
    sends: Counter[int] = Counter()
    for layer, layer_loads in enumerate(loads):
        alloc = allocate_replicas(list(layer_loads), n, slots_per_member, min_replicas)
        relaxed |= alloc.relaxed
        replicas.append(alloc.replicas)
        rows = [
            list(r)
            for r in place_experts(
                alloc.replicas, n, slots_per_member, min_distinct=alloc.min_replicas
            ).nodes
        ]

        def now(m: int, layer: int = layer) -> Sequence[int] | None:
            h = held.get(m)
            return None if h is None else h[layer]

        pairs = sorted(
            (-_overlap(rows[r], now(m) or ()), r, i)
            for r in range(n)
            for i, m in enumerate(members)
        )
        row_of: dict[int, int] = {}
        taken: set[int] = set()
        for _, r, i in pairs:
            if r not in taken and i not in row_of:
                row_of[i] = r
                taken.add(r)
        assigned = tuple(_fill(now(m), rows[row_of[i]]) for i, m in enumerate(members))
        layer_slots.append(assigned)
        holders: dict[int, list[tuple[int, int]]] = {}
        for m in members:
            for slot, e in enumerate(now(m) or ()):
                holders.setdefault(e, []).append((m, slot))
        for i, m in enumerate(members):
            current = now(m)
            for slot, e in enumerate(assigned[i]):
                if current is not None and current[slot] == e:
                    continue
                owners = holders.get(e, [])
                if not owners:
                    lost.append((layer, e))
                    continue
                local = [o for o in owners if o[0] == m]
                src = local[0] if local else min(owners, key=lambda o: (sends[o[0]], o))
                if src[0] != m:
                    sends[src[0]] += 1
                moves.append(Move(layer, e, src[0], src[1], m, slot))
    return SlotPlan(
        members,
        tuple(layer_slots),
        tuple(moves),
        tuple(sorted(set(lost))),
        tuple(replicas),
        relaxed,
    )
