"""Zen's fourth real sparse-gradient source (a Hugging Face Llama's embedding) and lean gpt_dgc.

The ``transformer`` rows are the distinct raw cl100k ids of each worker's
shortest prefix; the library checks them against a real backward of the
Llama, and these tests check both the rows and that the check has teeth. The
``gpt_dgc`` sets at many workers come from a path that keeps no gradients and
must give exactly the sets of the cached path.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

import thrifty.zen.workloads as workloads
from thrifty.bench.models import build_model
from thrifty.zen.workloads import (
    CL100K_VOCAB,
    DENSITY_SOURCES,
    TRANSFORMER_CONFIG,
    WORKLOADS,
    FrequencyVocabulary,
    _shard,
    _transformer_model,
    _transformer_prefix_rows,
    index_sets_at_density,
    make_workload,
    sharegpt_tokens,
    simulate_index_sets,
)

TOKENS = 100_000  # ShareGPT tokens: 25k per worker at 4 workers, tokenised in about a second


@pytest.fixture
def token_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the token cache goes there


def _shortest_prefix(shard: torch.Tensor, count: int) -> int:
    """Shortest prefix length with ``count`` distinct ids, by numpy (not the library's code)."""
    _, first = np.unique(shard.numpy(), return_index=True)
    first.sort()
    return int(first[count - 1]) + 1 if count <= first.size else shard.numel()


def test_transformer_rows_are_each_prefix_distinct_raw_ids(token_cache, one_thread) -> None:
    workers, density = 4, 0.01
    count = round(density * CL100K_VOCAB)
    sets, num_rows, row_numel = index_sets_at_density(
        "transformer", workers, density, max_tokens=TOKENS
    )
    assert (num_rows, row_numel, len(sets)) == (CL100K_VOCAB, 64, workers)
    tokens = sharegpt_tokens(TOKENS)
    for w, rows in enumerate(sets):
        shard = _shard(tokens, w, workers)
        length = _shortest_prefix(shard, count)
        assert rows.dtype == torch.int64 and torch.equal(rows, torch.unique(rows))
        assert rows.numel() == min(count, torch.unique(shard).numel())
        assert torch.equal(rows, torch.unique(shard[:length]))
    assert all(s.numel() == count for s in sets)  # 25k-token shards reach 1% of cl100k

    # The same prefixes as `lstm`, whose ids are renumbered by frequency: same rows, other ids.
    lstm, _, _ = index_sets_at_density("lstm", workers, density, max_tokens=TOKENS)
    rank = FrequencyVocabulary.fit(tokens).rank
    for raw, ranked in zip(sets, lstm, strict=True):
        assert torch.equal(torch.sort(rank[raw]).values, ranked)
        assert not torch.equal(raw, ranked)
    with pytest.raises(ValueError, match="'transformer', 'uniform'"):
        index_sets_at_density("bert", 2, density)
    assert "transformer" in DENSITY_SOURCES and "transformer" not in WORKLOADS


def test_llama_embedding_gradient_rows_are_the_prefix_tokens(token_cache, one_thread) -> None:
    shard = sharegpt_tokens(TOKENS)[:150]
    model = _transformer_model(seed=0)
    assert type(model).__name__ == "LlamaForCausalLM"
    # 2 full sequences of 64 and a tail of 22 whose target wraps to the shard's start.
    for length in (150, 100, 64):
        rows = _transformer_prefix_rows(model, shard, length)
        assert torch.equal(rows, torch.unique(shard[:length])), length
    # Tied to the output layer, the softmax touches every row: the library's check would fail.
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(**{**TRANSFORMER_CONFIG, "tie_word_embeddings": True}))
    assert _transformer_prefix_rows(tied, shard, 100).numel() == CL100K_VOCAB


def test_transformer_workload_steps_the_rows_its_gradient_reports(token_cache, one_thread) -> None:
    workload = make_workload("transformer", batch=2, seq_len=8, max_tokens=TOKENS)
    embedding = workload.model.get_input_embeddings().weight
    before = embedding.detach().clone()
    (sets,) = simulate_index_sets(workload, workers=2, steps=1)
    tokens = workload.state["tokens"]
    for w, rows in enumerate(sets):
        first_batch = _shard(tokens, w, 2)[: 2 * 9].view(2, 9)[:, :-1]
        assert torch.equal(rows, torch.unique(first_batch))  # raw cl100k ids
    moved = (embedding.detach() - before).abs().sum(1).nonzero().squeeze(1)
    assert torch.equal(moved, torch.unique(torch.cat(sets)))


def test_gpt_dgc_lean_path_gives_the_cached_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = torch.randint(0, 5000, (40_000,), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(workloads, "sharegpt_tokens", lambda *a, **k: tokens)
    options = {
        "batch": 2,
        "seq_len": 16,
        "gpt_config": {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 2048},
        "gpt_model": functools.partial(build_model, "gpt"),
    }
    workers = 3
    cached = {d: index_sets_at_density("gpt_dgc", workers, d, **options) for d in (0.01, 0.05)}
    assert len(workloads._GPT_GRADIENTS) == 1  # kept for the next density
    workloads._GPT_GRADIENTS.clear()
    monkeypatch.setattr(workloads, "GPT_CACHED_WORKERS", workers - 1)
    for density, (sets, numel, row_numel) in cached.items():
        lean, lean_numel, lean_row_numel = index_sets_at_density(
            "gpt_dgc", workers, density, **options
        )
        assert not workloads._GPT_GRADIENTS  # nothing kept
        assert (lean_numel, lean_row_numel) == (numel, row_numel) == (numel, 1)
        assert len(lean) == len(sets) == workers
        for a, b in zip(lean, sets, strict=True):
            assert a.numel() == round(density * numel) and torch.equal(a, b)
    assert not torch.equal(cached[0.01][0][0], cached[0.01][0][1])  # workers differ
