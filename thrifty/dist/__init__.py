"""Data-parallel substrate: collectives, network model, plans and the GradientSync engine."""

from __future__ import annotations

from thrifty.dist.collectives import CommLedger, count_bytes
from thrifty.dist.engine import GradientSync, register_planner
from thrifty.dist.network import AlphaBeta, Measurement, NetworkModel
from thrifty.dist.plan import Group, Plan, Strategy
from thrifty.dist.topology import Topology

__all__ = [
    "AlphaBeta",
    "CommLedger",
    "GradientSync",
    "Group",
    "Measurement",
    "NetworkModel",
    "Plan",
    "Strategy",
    "Topology",
    "count_bytes",
    "register_planner",
]
