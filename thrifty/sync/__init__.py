"""Gradient-sync substrate: plans, the GradientSync engine, profiles, the timeline, the DDP hook.

A :class:`Plan` says how each group of gradients is compressed and which collective
carries it; :class:`GradientSync` runs a plan during ``backward()``. Planners
(MergeComp, ByteComp) and sparse schemes (Zen) live in the systems above and reach
the engine as objects or through the registries they fill.
"""

from __future__ import annotations

from thrifty.sync.engine import GradientSync, register_planner
from thrifty.sync.plan import Group, Plan, Strategy

__all__ = ["GradientSync", "Group", "Plan", "Strategy", "register_planner"]
