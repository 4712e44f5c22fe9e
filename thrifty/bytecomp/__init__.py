"""ByteComp (Espresso): choose a compression strategy per tensor with a timeline model.

* :func:`decide` - offline: ``decide(profile, "randomk", topology)`` returns a
  :class:`Decision` whose ``plan`` GradientSync runs.
* ``GradientSync(model, compressor="randomk", plan="bytecomp")`` - online: a few
  warm-up iterations profile the model, then every rank switches to the plan
  rank 0 decided.
"""

from __future__ import annotations

from thrifty.bytecomp.decide import Decision, decide, zero_cost_profile
from thrifty.bytecomp.online import ByteComp, ByteCompTuner, fit_topology
from thrifty.bytecomp.tree import Constraints
from thrifty.sync import register_planner

__all__ = [
    "ByteComp",
    "ByteCompTuner",
    "Constraints",
    "Decision",
    "decide",
    "fit_topology",
    "zero_cost_profile",
]

# GradientSync(model, compressor=..., plan="bytecomp"): profile, decide on rank 0, switch.
register_planner("bytecomp", ByteComp)
