"""Communication substrate: collectives with a byte ledger, the network model, topology.

Everything here moves or prices bytes between ranks and knows nothing of gradients,
plans or any system: Zen and Lazarus need only this package, the gradient engine in
:mod:`thrifty.sync` builds on it.
"""

from __future__ import annotations

from thrifty.comm.collectives import CommLedger, count_bytes
from thrifty.comm.network import AlphaBeta, Measurement, NetworkModel
from thrifty.comm.topology import Topology

__all__ = ["AlphaBeta", "CommLedger", "Measurement", "NetworkModel", "Topology", "count_bytes"]
