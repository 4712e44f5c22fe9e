"""Gradient-sync substrate: plans, the GradientSync engine, profiles, the timeline, the DDP hook.

A :class:`Plan` says how each group of gradients is compressed and which collective
carries it; :class:`GradientSync` runs a plan during ``backward()``. Planners
(MergeComp, ByteComp) and sparse schemes (Zen) live in the systems above and reach
the engine as objects, or by name through the registries those systems fill when
imported (:func:`register_planner`, :func:`register_sparse_scheme`); the engine
never imports a system. Ranks that disagree about the model, compressor or plan
get the same :class:`RankMismatchError` on every rank, at construction.
"""

from __future__ import annotations

from thrifty.comm.agreement import NonFiniteGradientError, RankMismatchError
from thrifty.comm.collectives import CollectiveError, SyncTimeoutError
from thrifty.sync.engine import (
    GradientSync,
    Planner,
    SparseSync,
    register_planner,
    register_sparse_scheme,
)
from thrifty.sync.plan import Group, Plan, Strategy

__all__ = [
    "CollectiveError",
    "GradientSync",
    "Group",
    "NonFiniteGradientError",
    "Plan",
    "Planner",
    "RankMismatchError",
    "SparseSync",
    "Strategy",
    "SyncTimeoutError",
    "register_planner",
    "register_sparse_scheme",
]
