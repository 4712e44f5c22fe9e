"""The decision tree: every valid way to synchronise one tensor (or merged group).

Espresso (our note, section 1.2) describes a tensor's options as paths through
a tree of four decisions. Here each path is one :class:`~thrifty.sync.Strategy`:

1. compress or not (and with which compressor: the user's, optionally FP16 too);
2. where (de)compression runs: on the thread that runs backward, or offloaded
   to a CPU worker thread (``offload``; chosen by Algorithm 2, not Algorithm 1);
3. the communication scheme, as step-1/step-2 pairs that the engine runs:

   - ``all_reduce`` (indivisible; only for payloads that sum elementwise:
     compressed tensors never use it unless the compressor is all-reduce
     compatible, because their aggregation is not associative);
   - ``all_gather`` (indivisible; compressed only: uncompressed it would send
     every rank's whole gradient to everyone);
   - ``all_to_all`` paired with ``all_gather`` (divisible: compressed, it is
     Espresso's alltoall + allgather with a second compression; uncompressed,
     reduce-scatter + all-gather);

4. flat, or hierarchical (reduce-scatter inside the node, the scheme across
   nodes on the shard, all-gather inside the node) when there are several
   nodes with several ranks each. Inside a node only divisible, uncompressed
   steps run, as in the paper.

Pairings the paper prunes (Gather with Allgather, Alltoall with Broadcast)
cannot be expressed: every scheme above is a valid Start->End path. User
constraints narrow the tree, e.g. ``max_compressions=1`` removes the schemes
that compress twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from thrifty.comm.topology import Topology
from thrifty.sync.plan import Strategy

__all__ = ["Constraints", "compressions", "gpu_options", "options"]


@dataclass(frozen=True)
class Constraints:
    """User limits on the tree.

    Args:
        max_compressions: compressions a tensor may go through (None: no limit).
            1 excludes the divisible compressed scheme, which compresses twice.
        offload: allow CPU offload of (de)compression.
        hierarchical: allow hierarchical schemes (when the topology has them).
        extra: other compressors to offer beside the user's, e.g. ``("fp16",)``.
    """

    max_compressions: int | None = None
    offload: bool = True
    hierarchical: bool = True
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        limit = self.max_compressions
        if limit is None:
            return
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"max_compressions must be None or an int >= 0, got {limit!r}")


def compressions(strategy: Strategy) -> int:
    """How many times a tensor is compressed under ``strategy``."""
    if strategy.compressor is None:
        return 0
    return 2 if strategy.collective == "all_to_all" else 1


def _schemes(base: Strategy) -> list[Strategy]:
    if base.compressor is None:
        return [Strategy(), Strategy(collective="all_to_all")]
    out = []
    compressor = base.build_compressor()
    assert compressor is not None
    if compressor.supports_allreduce_rounds:
        out.append(replace(base, collective="all_reduce"))
    out += [replace(base, collective="all_gather"), replace(base, collective="all_to_all")]
    return out


def gpu_options(
    compressors: Sequence[Strategy],
    topology: Topology,
    constraints: Constraints = Constraints(),
) -> list[Strategy]:
    """Options with (de)compression on the training thread: what Algorithm 1 picks from.

    ``compressors`` are the compressed bases (compressor, options, memory); the
    uncompressed options are always included, first.
    """
    bases = [Strategy(), *(replace(c, offload=False, hierarchical=False) for c in compressors)]
    out: list[Strategy] = []
    for base in bases:
        for scheme in _schemes(base):
            if (
                constraints.max_compressions is not None
                and compressions(scheme) > constraints.max_compressions
            ):
                continue
            variants = [scheme]
            if topology.hierarchical and constraints.hierarchical:
                variants.append(replace(scheme, hierarchical=True))
            out += [v for v in variants if v not in out]
    for s in out:
        s.validate()
    return out


def options(
    compressors: Sequence[Strategy],
    topology: Topology,
    constraints: Constraints = Constraints(),
) -> list[Strategy]:
    """Every path through the tree: the GPU options and, when allowed, their offloaded twins."""
    gpu = gpu_options(compressors, topology, constraints)
    if not constraints.offload:
        return gpu
    return gpu + [replace(s, offload=True) for s in gpu if s.compressor is not None]
