"""Marconi: prefix caching for hybrid (attention + SSM) LLMs (MLSys 2025).

A radix tree over token ids holds, per edge, the attention KV of its tokens and
at most one SSM checkpoint at its end; a hit is the deepest matched node with a
checkpoint. Admission decides where to checkpoint (Marconi: after the last
decoded token and at the branch point; vLLM+: every block), eviction what to
free (Marconi: recency + alpha x FLOP efficiency; SGLang+/vLLM+: LRU leaves).
States are objects that know their size, so the simulator (sizes only) and an
engine (real tensors) share the same tree and policies.

Modules: ``states`` (state protocols), ``model`` (FLOP/byte model from HF
configs), ``tree`` (radix tree), ``policies`` (admission, eviction),
``cache`` (PrefixCache), ``tuner`` (online alpha), ``traces``/``sharegpt``
(trace formats), ``simulate`` (replay and sweeps), ``engine`` (a real serving
loop over a transformers hybrid: tensor states, restore, prefill, decode;
imports torch, so it is not imported here) and ``benchmark`` (the sweep and
the engine's TTFT measurement, as ``thrifty marconi simulate|serve-trace``).
"""

from __future__ import annotations

from thrifty.marconi.cache import (
    POLICIES,
    AdmitResult,
    CacheStats,
    PrefixCache,
    RequestOutcome,
    build_cache,
)
from thrifty.marconi.model import (
    LayerCost,
    ModelSpec,
    attention_kv_shape,
    kv_bytes_per_token,
    paper_hybrid_7b,
    ssm_state_bytes,
    ssm_state_shapes,
)
from thrifty.marconi.policies import (
    BlockAdmission,
    LRUEviction,
    MarconiAdmission,
    UtilityEviction,
)
from thrifty.marconi.sharegpt import ShareGPTReader, cl100k_tokenizer, sharegpt_trace
from thrifty.marconi.simulate import GB, SimResult, TTFTModel, hit_rate_table, simulate, sweep
from thrifty.marconi.states import (
    Checkpoint,
    KVSegment,
    SizedCheckpoint,
    SizedKV,
    SizedSource,
    StateSource,
)
from thrifty.marconi.traces import (
    Request,
    Trace,
    TraceFormatError,
    build_sessions,
    read_jsonl,
    synthetic_trace,
    write_jsonl,
)
from thrifty.marconi.tree import InsertResult, MatchResult, RadixTree, TreeNode
from thrifty.marconi.tuner import PaperAlphaTuner, WindowAlphaTuner

__all__ = [
    "GB",
    "POLICIES",
    "AdmitResult",
    "BlockAdmission",
    "CacheStats",
    "Checkpoint",
    "InsertResult",
    "KVSegment",
    "LRUEviction",
    "LayerCost",
    "MarconiAdmission",
    "MatchResult",
    "ModelSpec",
    "PaperAlphaTuner",
    "PrefixCache",
    "RadixTree",
    "Request",
    "RequestOutcome",
    "ShareGPTReader",
    "SimResult",
    "SizedCheckpoint",
    "SizedKV",
    "SizedSource",
    "StateSource",
    "TTFTModel",
    "Trace",
    "TraceFormatError",
    "TreeNode",
    "UtilityEviction",
    "WindowAlphaTuner",
    "attention_kv_shape",
    "build_cache",
    "build_sessions",
    "cl100k_tokenizer",
    "hit_rate_table",
    "kv_bytes_per_token",
    "paper_hybrid_7b",
    "read_jsonl",
    "sharegpt_trace",
    "simulate",
    "ssm_state_bytes",
    "ssm_state_shapes",
    "sweep",
    "synthetic_trace",
    "write_jsonl",
]
