"""Measurement substrate: real multi-rank runs, network emulation, result files."""

from __future__ import annotations

from thrifty.bench.launch import RankFailure, RanksTimedOut, loopback_store, run_ranks

__all__ = ["RankFailure", "RanksTimedOut", "loopback_store", "run_ranks"]
