"""ByteComp (Espresso): choose a compression strategy per tensor with a timeline model.

* :func:`decide` - offline: ``decide(profile, "randomk", topology)`` returns a
  :class:`Decision` whose ``plan`` GradientSync runs.
* ``GradientSync(model, compressor="randomk", plan="bytecomp")`` - online: a few
  warm-up iterations profile the model, then every rank switches to the plan
  rank 0 decided.
"""

from __future__ import annotations

from thrifty.bytecomp.decide import (
    AUTO_BUCKETS,
    Decision,
    Unit,
    brute_force,
    decide,
    iteration_times,
    make_units,
    zero_cost_profile,
)
from thrifty.bytecomp.online import ByteComp, ByteCompTuner, fit_topology
from thrifty.bytecomp.tree import Constraints, compressions, gpu_options, options
from thrifty.sync import register_planner

__all__ = [
    "AUTO_BUCKETS",
    "ByteComp",
    "ByteCompTuner",
    "Constraints",
    "Decision",
    "Unit",
    "brute_force",
    "compressions",
    "decide",
    "fit_topology",
    "gpu_options",
    "iteration_times",
    "make_units",
    "options",
    "zero_cost_profile",
]

# GradientSync(model, compressor=..., plan="bytecomp"): profile, decide on rank 0, switch.
register_planner("bytecomp", ByteComp)
