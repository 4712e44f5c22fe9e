"""MergeComp (Cupcake): compress merged groups of gradient tensors, partitioned for speed.

* :func:`schedule` - offline: the timeline-optimal partition as a Plan.
* ``GradientSync(model, compressor="dgc", plan="mergecomp")`` - online: the
  hybrid search (model-based candidates, then a few measured iterations).
"""

from __future__ import annotations

from thrifty.mergecomp.online import MergeComp, MergeCompTuner
from thrifty.mergecomp.search import Partition, optimal_partition, partition_time
from thrifty.mergecomp.search import schedule_plan as schedule
from thrifty.sync import register_planner

__all__ = [
    "MergeComp",
    "MergeCompTuner",
    "Partition",
    "optimal_partition",
    "partition_time",
    "schedule",
]

# GradientSync(model, compressor=..., plan="mergecomp"): the hybrid search, defaults.
register_planner("mergecomp", MergeComp)
