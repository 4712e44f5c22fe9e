"""Lazarus: resilient and elastic MoE training with replicated experts (arXiv 2407.04656).

The algorithmic core, pure functions the runtime builds on:

* :func:`allocate_replicas` - Eq. 1: replicas per expert from token load, at
  least ``f`` each, every slot used.
* :func:`place_experts` / :func:`search_placement` - which node holds which
  replica, maximising the chance that every expert survives node failures
  (MRO, its distinct-node repair, rotation, local search, exact search).
* :func:`recovery_probability` - exact or Monte Carlo with a Hoeffding bound.
* :func:`plan_dispatch` / :func:`dispatch_local` - Algorithm 1: which replica
  serves each (token, expert) pair, as all-to-all split sizes every rank
  computes identically.
"""

from __future__ import annotations

from thrifty.lazarus.allocation import Allocation, allocate_replicas
from thrifty.lazarus.dispatcher import (
    DispatchPlan,
    LocalDispatch,
    dispatch_local,
    plan_dispatch,
    split_evenly,
    token_counts,
)
from thrifty.lazarus.moe import MoEConfig, MoEGPT
from thrifty.lazarus.placement import (
    Placement,
    compact_placement,
    enforce_distinct_nodes,
    mro_placement,
    rotation_placement,
)
from thrifty.lazarus.placement_search import (
    PlacementResult,
    default_failures,
    improve_placement,
    optimal_placement,
    place_experts,
    search_placement,
)
from thrifty.lazarus.recovery import (
    RecoveryEstimate,
    RecoveryScorer,
    hoeffding_half_width,
    hoeffding_samples,
    recoverable_counts,
    recovery_estimate,
    recovery_probability,
)
from thrifty.lazarus.runtime import LazarusConfig, moe_dispatch, train
from thrifty.lazarus.simulate import SimConfig, simulate, simulate_all

__all__ = [
    "Allocation",
    "DispatchPlan",
    "LazarusConfig",
    "LocalDispatch",
    "MoEConfig",
    "MoEGPT",
    "Placement",
    "PlacementResult",
    "RecoveryEstimate",
    "RecoveryScorer",
    "SimConfig",
    "allocate_replicas",
    "compact_placement",
    "default_failures",
    "dispatch_local",
    "enforce_distinct_nodes",
    "hoeffding_half_width",
    "hoeffding_samples",
    "improve_placement",
    "moe_dispatch",
    "mro_placement",
    "optimal_placement",
    "place_experts",
    "plan_dispatch",
    "recoverable_counts",
    "recovery_estimate",
    "recovery_probability",
    "rotation_placement",
    "search_placement",
    "simulate",
    "simulate_all",
    "split_evenly",
    "token_counts",
    "train",
]
