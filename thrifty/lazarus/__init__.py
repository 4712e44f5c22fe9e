"""Lazarus: resilient and elastic MoE training with replicated experts (arXiv 2407.04656).

Entry points, with their config and result types:

* :class:`Lazarus` - the resilience manager for a user's own training loop
  (:class:`LazarusOptions`, :class:`LazarusReport`): it swaps the MoE blocks of a
  Hugging Face model for :class:`ReplicatedExperts`, and ``mgr.step(closure)``
  survives ranks that die or stop answering; membership lives in a
  :class:`Coordinator` process outside every worker.
* :class:`ReplicatedExperts` / :func:`replicate_moe_blocks` - an expert-parallel
  layer with replicated experts over a Mixtral, Qwen3-MoE or OLMoE block (or a
  router and a list of identical experts); :class:`ExpertGradSync` sums each
  expert's gradient over exactly its replicas.
* :func:`allocate_replicas` - Eq. 1: replicas per expert from token load, at
  least ``f`` each, every slot used (:class:`Allocation`).
* :func:`place_experts` / :func:`search_placement` - which node holds which
  replica, maximising the chance that every expert survives node failures
  (:class:`Placement`, :class:`PlacementResult`).
* :func:`recovery_probability` / :func:`recovery_estimate` - exact or Monte
  Carlo with a Hoeffding bound (:class:`RecoveryEstimate`).
* :func:`plan_dispatch` - Algorithm 1: which replica serves each (token,
  expert) pair, as all-to-all split sizes every rank computes identically
  (:class:`DispatchPlan`).
* :func:`train_rank` - one rank of a Lazarus run inside a process group
  (:class:`LazarusConfig`), on the :class:`MoEGPT` model (:class:`MoEConfig`);
  :func:`moe_dispatch` is one MoE layer across ranks.
* :func:`simulate` / :func:`simulate_all` - goodput under failure traces
  (:class:`SimConfig`).

Internals (the baseline placements, the search's pieces, the scorer, the
dispatcher's helpers) stay importable from their modules. Launching a run on
local processes, the torchrun baseline and the benchmarks live in
:mod:`thrifty.lazarus.benchmark`, which this package does not import: it needs
the benchmark harness (:mod:`thrifty.bench`), which training does not.
"""

from __future__ import annotations

from thrifty.lazarus.allocation import Allocation, allocate_replicas
from thrifty.lazarus.coordinator import Coordinator
from thrifty.lazarus.dispatcher import DispatchPlan, plan_dispatch
from thrifty.lazarus.expert_grads import ExpertGradSync
from thrifty.lazarus.manager import Lazarus, LazarusError, LazarusOptions, LazarusReport
from thrifty.lazarus.moe import MoEConfig, MoEGPT
from thrifty.lazarus.placement import Placement
from thrifty.lazarus.placement_search import PlacementResult, place_experts, search_placement
from thrifty.lazarus.recovery import RecoveryEstimate, recovery_estimate, recovery_probability
from thrifty.lazarus.replicated_moe import ReplicatedExperts, replicate_moe_blocks
from thrifty.lazarus.runtime import LazarusConfig, moe_dispatch, train_rank
from thrifty.lazarus.simulate import SimConfig, simulate, simulate_all

__all__ = [
    "Allocation",
    "Coordinator",
    "DispatchPlan",
    "ExpertGradSync",
    "Lazarus",
    "LazarusConfig",
    "LazarusError",
    "LazarusOptions",
    "LazarusReport",
    "MoEConfig",
    "MoEGPT",
    "Placement",
    "PlacementResult",
    "RecoveryEstimate",
    "ReplicatedExperts",
    "SimConfig",
    "allocate_replicas",
    "moe_dispatch",
    "place_experts",
    "plan_dispatch",
    "recovery_estimate",
    "recovery_probability",
    "replicate_moe_blocks",
    "search_placement",
    "simulate",
    "simulate_all",
    "train_rank",
]
