"""Zen's workloads (real sparse gradients) and the analysis built on them."""

from __future__ import annotations

import math

import pytest
import torch

from thrifty.zen.analysis import analyze_index_sets, skewness_curve
from thrifty.zen.benchmark import GPT_MODEL
from thrifty.zen.workloads import (
    DEEPFM_FIELDS,
    DeepFM,
    FrequencyVocabulary,
    LSTMLanguageModel,
    ZipfFeatures,
    _first_distinct,
    index_sets_at_density,
    make_workload,
    simulate_index_sets,
)


def test_frequency_vocabulary_orders_by_count_and_keeps_every_id() -> None:
    tokens = torch.tensor([7, 3, 7, 9, 3, 7, 0])
    vocab = FrequencyVocabulary.fit(tokens, size=10)
    assert vocab.size == 10
    assert vocab.encode(torch.tensor([7, 3, 0, 9])).tolist() == [0, 1, 2, 3]  # ties: id order
    assert sorted(vocab.rank.tolist()) == list(range(10))  # a permutation: unseen ids kept
    assert vocab.rank[1].item() == 4  # the first unseen id comes right after the seen ones
    assert vocab.encode(torch.tensor([7, 9, 5]), max_id=2).tolist() == [0, 2, 2]


def test_first_distinct_is_the_shortest_prefix_with_that_many_rows() -> None:
    stream = torch.tensor([5, 5, 2, 9, 2, 1, 9, 0])
    assert _first_distinct(stream, 3, 10).tolist() == [2, 5, 9]
    assert _first_distinct(stream, 5, 10).tolist() == [0, 1, 2, 5, 9]
    assert _first_distinct(stream, 99, 10).tolist() == [0, 1, 2, 5, 9]


def test_lstm_embedding_gradient_rows_are_the_input_tokens() -> None:
    torch.manual_seed(0)
    model = LSTMLanguageModel(500, embed_dim=8, hidden_dim=16, cutoffs=(50, 200))
    x = torch.randint(0, 500, (3, 7))
    model(x, torch.randint(0, 500, (3, 7))).backward()
    grad = model.embedding.weight.grad
    assert grad is not None and grad.is_sparse
    assert torch.equal(torch.unique(grad.coalesce().indices()[0]), torch.unique(x))


def test_deepfm_gradient_rows_and_zipf_skew() -> None:
    fields = (1000, 300, 50)
    torch.manual_seed(0)
    model = DeepFM(fields, embed_dim=4, hidden=(8,))
    data = ZipfFeatures(fields, exponent=1.1, seed=3)
    values, labels = data.sample(256, torch.Generator().manual_seed(0))
    assert values.shape == (256, 3) and set(labels.unique().tolist()) == {0.0, 1.0}
    assert all(int(values[:, f].max()) < n for f, n in enumerate(fields))
    torch.nn.functional.binary_cross_entropy_with_logits(model(values), labels).backward()
    rows = torch.unique(model.embedding.weight.grad.coalesce().indices()[0])
    assert torch.equal(rows, torch.unique(values + torch.tensor([0, 1000, 1300])))
    # Zipf: the first tenth of the largest field's values draws most of its samples.
    assert (values[:, 0] < 100).float().mean() > 0.6


def test_skewness_curve() -> None:
    assert skewness_curve(torch.arange(100), 100, (2, 4)) == [1.0, 1.0]
    assert skewness_curve(torch.arange(10), 100, (2, 10)) == [2.0, 10.0]  # all in the first part


@pytest.fixture(scope="module")
def deepfm_steps() -> tuple[list[list[torch.Tensor]], int, torch.Tensor]:
    workload = make_workload("deepfm", batch=256)
    before = workload.model.embedding.weight.detach().clone()
    steps = simulate_index_sets(workload, workers=4, steps=2)
    moved = (workload.model.embedding.weight.detach() - before).abs().sum(1).nonzero()
    return steps, workload.num_rows, moved.squeeze(1)


def test_simulated_training_steps_the_rows_it_reports(deepfm_steps) -> None:
    steps, num_rows, moved = deepfm_steps
    assert len(steps) == 2 and all(len(s) == 4 for s in steps)
    union = torch.unique(torch.cat([s for step in steps for s in step]))
    assert num_rows == sum(DEEPFM_FIELDS)
    # SGD moved exactly the rows some worker's gradient touched (Adam-free, no weight decay).
    assert torch.equal(moved, union)
    for sets in steps:
        assert not torch.equal(sets[0], sets[1])  # workers see different data


def test_analysis_statistics_are_consistent(deepfm_steps) -> None:
    steps, num_rows, _ = deepfm_steps
    result = analyze_index_sets(steps, num_rows, 16, sizes=(2, 4))
    two, four = result["by_n"]["2"], result["by_n"]["4"]
    assert 1.0 < two["gamma"] < 2.0 and two["gamma"] < four["gamma"] < 4.0
    assert 0.0 < two["overlap"] < 1.0
    assert result["skewness"] == sorted(result["skewness"])  # finer parts, higher peaks
    assert math.isclose(sum(result["part_shares"]), 1.0)
    assert result["skewness"][2] >= 1.5  # Zipf ids by frequency: skewed
    bytes_4 = four["predicted_max_rank_bytes"]
    assert bytes_4["zen"] < bytes_4["agsparse"] < bytes_4["dense"]
    assert four["push_imbalance"] < 1.2 and four["pull_imbalance"] < 1.2


@pytest.mark.parametrize("name", ["deepfm", "uniform"])
def test_index_sets_at_density(name: str) -> None:
    sets, num_rows, row_numel = index_sets_at_density(name, 3, 0.01)
    want = round(0.01 * num_rows)
    for s in sets:
        assert s.numel() == want
        assert torch.equal(s, torch.unique(s)) and int(s.min()) >= 0 and int(s.max()) < num_rows
    overlap = torch.isin(sets[0], sets[1]).float().mean().item()
    if name == "uniform":
        assert row_numel == 1 and overlap < 0.05  # chance only
    else:
        assert row_numel == 16 and overlap > 0.3  # frequent values recur across workers


def test_gpt_dgc_selection_overlaps_far_beyond_chance(monkeypatch) -> None:
    tokens = torch.randint(0, 5000, (40_000,), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr("thrifty.zen.workloads.sharegpt_tokens", lambda *a, **k: tokens)
    small = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 2048}
    sets, numel, row_numel = index_sets_at_density(
        "gpt_dgc", 2, 0.01, batch=2, seq_len=16, gpt_config=small, gpt_model=GPT_MODEL
    )
    assert 200_000 < numel < 300_000
    assert row_numel == 1 and all(s.numel() == round(0.01 * numel) for s in sets)
    overlap = torch.isin(sets[0], sets[1]).float().mean().item()
    assert overlap > 0.1  # 10x the 1% a random selection would share


def test_gpt_dgc_needs_its_model_from_the_caller() -> None:
    with pytest.raises(ValueError, match="gpt_dgc workload needs gpt_model"):
        make_workload("gpt_dgc")


def test_lstm_on_sharegpt(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # the token cache goes there
    workload = make_workload("lstm", batch=2, seq_len=8, max_tokens=20_000)
    assert workload.num_rows == 100_277 and workload.row_numel == 64
    (sets,) = simulate_index_sets(workload, workers=2, steps=1)
    ranked = workload.state["ranked"]
    first_batch = ranked[: ranked.numel() // 2][: 2 * 9].view(2, 9)[:, :-1]
    assert torch.equal(sets[0], torch.unique(first_batch))
    assert int(ranked.max()) < 100_277 and (ranked < 1000).float().mean() > 0.5  # Zipf-like text
