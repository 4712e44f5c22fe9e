"""Tests for thrifty.bench.models: sizes, shapes, causality, and that DigitsCNN learns."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from thrifty.bench.models import (
    GPT,
    MODEL_NAMES,
    DigitsCNN,
    ResNetCNN,
    build_model,
    count_parameters,
    load_digits_split,
)

torch.set_num_threads(2)


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [("cnn", 9.5e6, 10.5e6), ("gpt", 18e6, 22e6), ("digits", 10e3, 50e3)],
)
def test_default_parameter_counts(name: str, low: float, high: float) -> None:
    assert low <= count_parameters(build_model(name)) <= high


def test_gpt_lm_head_is_tied_and_counted_once() -> None:
    model = GPT(vocab_size=100, n_layer=1, n_head=2, n_embd=16, block_size=8)
    assert model.lm_head.weight is model.tok_emb.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_parameters(model) == sum(unique.values())


def test_build_model_passes_kwargs_and_rejects_unknown_names() -> None:
    assert set(MODEL_NAMES) == {"cnn", "gpt", "digits"}
    model = build_model("cnn", num_classes=7, width=8)
    assert isinstance(model, ResNetCNN) and model.head.out_features == 7
    with pytest.raises(ValueError, match="unknown model 'mlp'"):
        build_model("mlp")


def _check_backward(model: torch.nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.shape == param.shape, name
        assert torch.isfinite(param.grad).all(), name


def test_resnet_forward_backward_default_width() -> None:
    model = ResNetCNN()
    x, y = model.example_batch(2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and y.shape == (2,) and y.dtype == torch.int64
    logits = model(x)
    assert logits.shape == (2, 10)
    _check_backward(model, F.cross_entropy(logits, y))


def test_resnet_other_channels_and_classes() -> None:
    model = ResNetCNN(num_classes=5, width=8, in_channels=1)
    x, y = model.example_batch(3)
    assert x.shape == (3, 1, 32, 32)
    assert model(x).shape == (3, 5)
    assert int(y.max()) < 5


def test_gpt_forward_backward_default_config() -> None:
    model = GPT()
    idx, targets = model.example_batch(2, seq_len=32, generator=torch.Generator().manual_seed(0))
    assert idx.shape == targets.shape == (2, 32) and idx.dtype == torch.int64
    assert int(idx.max()) < model.vocab_size
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 32, 8192)
    assert loss is not None and loss.ndim == 0
    # At init (std 0.02) the prediction is near uniform: loss ~ ln(vocab).
    assert abs(loss.item() - torch.log(torch.tensor(8192.0)).item()) < 0.5
    _check_backward(model, loss)


def test_gpt_example_batch_targets_are_shifted_inputs() -> None:
    model = GPT(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8)
    idx, targets = model.example_batch(4)
    assert idx.shape == (4, 8)
    assert torch.equal(idx[:, 1:], targets[:, :-1])
    logits, loss = model(idx)
    assert logits.shape == (4, 8, 50) and loss is None


def test_gpt_rejects_bad_lengths_and_heads() -> None:
    model = GPT(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8)
    with pytest.raises(ValueError, match="exceeds block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="seq_len must be in"):
        model.example_batch(1, seq_len=9)
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPT(n_embd=10, n_head=3)


def test_gpt_is_causal() -> None:
    """Changing a token at position k changes no logits before k, and does change k."""
    torch.manual_seed(0)
    model = GPT(vocab_size=64, n_layer=2, n_head=4, n_embd=32, block_size=16).eval()
    idx = torch.randint(0, 64, (2, 16))
    k = 9
    changed = idx.clone()
    changed[:, k] = (changed[:, k] + 1) % 64
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    torch.testing.assert_close(before[:, :k], after[:, :k], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, k:], after[:, k:])


def test_load_digits_split_is_deterministic_and_disjoint() -> None:
    x_tr, y_tr, x_te, y_te = load_digits_split(test_fraction=0.25, seed=0)
    assert x_tr.shape[1:] == x_te.shape[1:] == (1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert len(x_tr) + len(x_te) == 1797 and len(x_te) == round(1797 * 0.25)
    assert float(x_tr.min()) >= 0.0 and float(x_tr.max()) <= 1.0
    assert set(y_te.tolist()) == set(range(10))

    again = load_digits_split(test_fraction=0.25, seed=0)
    for a, b in zip((x_tr, y_tr, x_te, y_te), again, strict=True):
        assert torch.equal(a, b)
    other = load_digits_split(test_fraction=0.25, seed=1)
    assert not torch.equal(x_te, other[2])

    # Disjoint: no test image (with its label) appears in the training set.
    # The digits data has no exact duplicate images, so this compares rows.
    train_rows = {tuple(row) for row in torch.cat([x_tr.flatten(1), y_tr[:, None]], 1).tolist()}
    test_rows = {tuple(row) for row in torch.cat([x_te.flatten(1), y_te[:, None]], 1).tolist()}
    assert len(test_rows) == len(x_te)
    assert not train_rows & test_rows


def test_load_digits_split_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=1.0)


def test_digits_cnn_learns() -> None:
    """Plain single-process Adam for a few epochs reaches >= 95% test accuracy."""
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits_split(seed=0)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch_size = 32
    # Over seeds 0..7 this setting reaches 0.967..0.989 (seed 0: 0.978).
    for _ in range(12):
        order = torch.randperm(len(y_tr))
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model(x_tr[batch]), y_tr[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_te).argmax(1) == y_te).float().mean().item()
    assert accuracy >= 0.95, accuracy


def test_load_digits_split_names_the_extra_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"thrifty\[dev\]"):
        load_digits_split()
