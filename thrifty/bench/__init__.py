"""The benchmark harness: real multi-rank runs, network emulation, timed training, results.

Modules: :mod:`~thrifty.bench.launch` (:func:`run_ranks`, which tests use too),
:mod:`~thrifty.bench.netem` (rate-limited loopback), :mod:`~thrifty.bench.cluster`
(emulated nodes, torchrun), :mod:`~thrifty.bench.results`, :mod:`~thrifty.bench.models`,
:mod:`~thrifty.bench.training` (the one training runner), and the two substrate
benchmarks :mod:`~thrifty.bench.collectives` and :mod:`~thrifty.bench.kernels`.

The harness measures the substrates (:mod:`thrifty.sync`, :mod:`thrifty.comm`,
:mod:`thrifty.compressors`, :mod:`thrifty.data`) and never imports a system; a
system's ``benchmark`` module imports it. Library code never does (see the
import-linter contracts in ``pyproject.toml``).
"""

from __future__ import annotations

from thrifty.bench.launch import RankFailure, RanksTimedOut, run_ranks

__all__ = ["RankFailure", "RanksTimedOut", "run_ranks"]
