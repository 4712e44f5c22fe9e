"""Marconi: prefix caching for hybrid (attention + SSM) LLMs (MLSys 2025).

A radix tree over token ids holds, per edge, the attention KV of its tokens and
at most one SSM checkpoint at its end; a hit is the deepest matched node with a
checkpoint. Admission decides where to checkpoint (Marconi: after the last
decoded token and at the branch point; vLLM+: every block), eviction what to
free (Marconi: recency + alpha x FLOP efficiency; SGLang+/vLLM+: LRU leaves).
Today's engines are baselines too: SGLang's ``MambaRadixCache`` ("sglang"),
SegLen ("seglen") and vLLM's align mode ("vllm"). States are objects that know
their size, so the simulator (sizes only) and an engine (real tensors) share
the same tree and policies, and both pass a request through the cache with one
handle (:meth:`PrefixCache.begin`, :meth:`CacheRequest.finish`).

Exported here: the cache (:func:`build_cache`, :class:`PrefixCache`, the
request handle and what a request returns), the model it sizes states with
(:class:`ModelSpec`), traces (:func:`load_trace` and the formats), and the
simulator (:func:`simulate`, :func:`sweep`, :class:`SimResult`, :class:`TTFTModel`).

Modules: ``states`` (state protocols), ``model`` (FLOP/byte model from HF
configs), ``tree`` (radix tree), ``policies`` (admission, eviction),
``cache`` (PrefixCache), ``tuner`` (online alpha), ``traces``/``sharegpt``
(trace formats), ``simulate`` (replay and sweeps), ``engine`` (a real serving
loop over a transformers hybrid: tensor states, restore, prefill, decode;
needs the optional ``transformers``, so it is not imported here) and
``benchmark`` (the sweep and the engine's TTFT measurement, as ``thrifty
marconi simulate|serve-trace``; the only module that imports the benchmark
harness). Marconi imports no training substrate (``thrifty.comm``,
``thrifty.sync``, ``thrifty.compressors``).
"""

from __future__ import annotations

from thrifty.marconi.cache import (
    BASELINES,
    PAPER_POLICIES,
    POLICIES,
    AdmitResult,
    CacheRequest,
    CacheStats,
    PrefixCache,
    RequestOutcome,
    build_cache,
)
from thrifty.marconi.model import ModelSpec, paper_hybrid_7b
from thrifty.marconi.sharegpt import load_trace, sharegpt_trace
from thrifty.marconi.simulate import SimResult, TTFTModel, simulate, sweep
from thrifty.marconi.traces import (
    Request,
    Trace,
    TraceFormatError,
    read_jsonl,
    synthetic_trace,
    with_resends,
    write_jsonl,
)

__all__ = [
    "BASELINES",
    "PAPER_POLICIES",
    "POLICIES",
    "AdmitResult",
    "CacheRequest",
    "CacheStats",
    "ModelSpec",
    "PrefixCache",
    "Request",
    "RequestOutcome",
    "SimResult",
    "TTFTModel",
    "Trace",
    "TraceFormatError",
    "build_cache",
    "load_trace",
    "paper_hybrid_7b",
    "read_jsonl",
    "sharegpt_trace",
    "simulate",
    "sweep",
    "synthetic_trace",
    "with_resends",
    "write_jsonl",
]
