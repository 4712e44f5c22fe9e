"""Communication substrate: collectives with a byte ledger, the network model, topology.

:mod:`thrifty.comm.calibration` is the one place that times collectives on the
current process group and fits the network models (:func:`fit_network`,
:func:`measure_topology`).

Everything here moves or prices bytes between ranks and knows nothing of gradients,
plans or any system: Zen and Lazarus need only this package, the gradient engine in
:mod:`thrifty.sync` builds on it.
"""

from __future__ import annotations

from thrifty.comm.calibration import fit_network, measure_topology
from thrifty.comm.collectives import CommLedger, count_bytes
from thrifty.comm.network import AlphaBeta, Measurement, NetworkModel
from thrifty.comm.topology import Topology

__all__ = [
    "AlphaBeta",
    "CommLedger",
    "Measurement",
    "NetworkModel",
    "Topology",
    "count_bytes",
    "fit_network",
    "measure_topology",
]
