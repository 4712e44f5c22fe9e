"""Topology: how the ranks sit on nodes, and what each kind of link costs.

Ranks are numbered node by node, as ``torchrun`` numbers them: node ``i`` holds
ranks ``i*k ... i*k + k - 1`` for ``k = ranks_per_node``. Three network models
describe the links:

* ``flat``: collectives over all ranks at once (the only one on a single node);
* ``intra``: collectives among the ``k`` ranks of one node (fast, no NIC);
* ``inter``: collectives among the ranks with the same local index on each
  node, all ``k`` such groups running at once, as the hierarchical scheme runs
  them. They share every node's NIC, so the model must be fitted that way
  (:func:`thrifty.comm.calibration.measure_topology` does), not with one group alone.

Example::

    topo = Topology(nodes=2, ranks_per_node=2, flat=m4, intra=m_lo, inter=m_nic)
    topo.node_ranks(1)    # [2, 3]
    topo.cross_ranks(0)   # [0, 2]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from thrifty.comm.network import NetworkModel

__all__ = ["NodeGroups", "Topology", "split_groups"]


@dataclass(frozen=True)
class Topology:
    nodes: int
    ranks_per_node: int
    flat: NetworkModel
    intra: NetworkModel | None = None
    inter: NetworkModel | None = None

    def __post_init__(self) -> None:
        for name in ("flat", "intra", "inter"):
            network = getattr(self, name)
            if not isinstance(network, NetworkModel) and (name == "flat" or network is not None):
                kind = "a NetworkModel" if name == "flat" else "a NetworkModel or None"
                raise TypeError(f"{name} must be {kind}, got {type(network).__name__} {network!r}")
        if self.nodes < 1 or self.ranks_per_node < 1:
            raise ValueError(
                f"need at least one node and one rank per node, got nodes={self.nodes}, "
                f"ranks_per_node={self.ranks_per_node}"
            )
        if self.hierarchical and (self.intra is None or self.inter is None):
            raise ValueError(
                f"{self.nodes} nodes x {self.ranks_per_node} ranks: the hierarchical scheme "
                "needs both an intra-node and an inter-node network model"
            )

    @classmethod
    def single_node(cls, network: NetworkModel, world_size: int) -> Topology:
        """All ranks behind one link (what a plain NetworkModel describes)."""
        return cls(1, world_size, network)

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    @property
    def hierarchical(self) -> bool:
        """Whether a hierarchical scheme differs from a flat one here."""
        return self.nodes > 1 and self.ranks_per_node > 1

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def local_rank(self, rank: int) -> int:
        return rank % self.ranks_per_node

    def node_ranks(self, node: int) -> list[int]:
        k = self.ranks_per_node
        return list(range(node * k, node * k + k))

    def cross_ranks(self, local_rank: int) -> list[int]:
        return [node * self.ranks_per_node + local_rank for node in range(self.nodes)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "ranks_per_node": self.ranks_per_node,
            "flat": self.flat.to_dict(),
            "intra": self.intra.to_dict() if self.intra else None,
            "inter": self.inter.to_dict() if self.inter else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Topology:
        def model(key: str) -> NetworkModel | None:
            return NetworkModel.from_dict(data[key]) if data.get(key) else None

        flat = model("flat")
        if flat is None:
            raise ValueError("topology JSON lacks the 'flat' network model")
        return cls(data["nodes"], data["ranks_per_node"], flat, model("intra"), model("inter"))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Topology:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class NodeGroups:
    """This rank's two sub-groups for hierarchical collectives."""

    ranks_per_node: int
    nodes: int
    intra: dist.ProcessGroup  # the ranks of this rank's node
    cross: dist.ProcessGroup  # the ranks with this rank's local index, one per node
    local_rank: int
    node: int


def split_groups(ranks_per_node: int | None = None) -> NodeGroups:
    """Create the intra-node and cross-node groups of the world (call on every rank).

    ``new_group`` is collective over the whole world, so every rank creates every
    group in the same order and keeps its own two. ``ranks_per_node`` defaults
    to torchrun's ``LOCAL_WORLD_SIZE``.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    k = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if k < 1 or world % k:
        raise ValueError(
            f"ranks_per_node={k} does not divide the world size {world}: every node must "
            "hold the same number of ranks"
        )
    nodes = world // k
    shape = Topology(nodes, k, NetworkModel("unused"), NetworkModel("unused"), NetworkModel("x"))
    intra = cross = None
    for node in range(nodes):
        group = dist.new_group(shape.node_ranks(node))
        if node == shape.node_of(rank):
            intra = group
    for local in range(k):
        group = dist.new_group(shape.cross_ranks(local))
        if local == shape.local_rank(rank):
            cross = group
    assert intra is not None and cross is not None
    return NodeGroups(k, nodes, intra, cross, shape.local_rank(rank), shape.node_of(rank))
