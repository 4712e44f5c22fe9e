"""GradientSync with ``sparse_scheme``: an LSTM LM with a sparse embedding trains like dense.

One ``run_ranks`` call (2 ranks) trains the same LSTM language model from the
same seeds with every configuration and compares each with a reference that
does not use GradientSync at all: plain ``dist.all_reduce`` of the densified
gradients. Starting ranks costs more than the training, so the checks share it.
Schemes reach GradientSync by name (``import thrifty.zen`` registers them), as
an object, or as a factory; the substrate itself never imports Zen (checked in
a fresh interpreter).
"""

from __future__ import annotations

import functools
import subprocess
import sys
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import thrifty.zen  # registers Zen's schemes with GradientSync: sparse_scheme="zen" works
from thrifty.bench import run_ranks
from thrifty.sync import GradientSync
from thrifty.sync.engine import _sparse_parameter_names
from thrifty.zen import AutoScheme, make_scheme
from thrifty.zen.workloads import LSTMLanguageModel

VOCAB, STEPS = 5000, 6
SCHEMES = tuple(thrifty.zen.SCHEMES)  # zen, dense, agsparse, sparcml, omnireduce, auto


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    # Skewed like text: low ids are frequent, so the ranks' rows overlap in part.
    tokens = (torch.rand(8, 21, generator=gen) ** 3 * VOCAB).long()
    tokens[0, 0] = 0  # row 0 is never special
    return tokens[:, :-1], tokens[:, 1:]


def _model() -> LSTMLanguageModel:
    torch.manual_seed(0)
    return LSTMLanguageModel(VOCAB, embed_dim=32, hidden_dim=48, cutoffs=None)


def _optimizer(model: nn.Module, kind: str) -> list[torch.optim.Optimizer]:
    if kind == "sgd":
        return [torch.optim.SGD(model.parameters(), lr=0.5)]
    emb = [model.embedding.weight]  # type: ignore[union-attr]
    rest = [p for p in model.parameters() if p is not emb[0]]
    return [torch.optim.SparseAdam(emb, lr=0.01), torch.optim.Adam(rest, lr=0.01)]


def _reference_sync(model: nn.Module, sparse_out: bool) -> None:
    """Plain all-reduce of densified gradients, averaged; rows with a zero sum dropped."""
    n = dist.get_world_size()
    for p in model.parameters():
        was_sparse = p.grad.is_sparse
        dense = p.grad.to_dense() if was_sparse else p.grad.clone()
        dist.all_reduce(dense)
        dense /= n
        p.grad = dense.to_sparse(sparse_dim=1).coalesce() if was_sparse and sparse_out else dense


def _train(scheme: Any, optimizer: str = "sgd", plan: str = "layerwise") -> dict[str, Any]:
    rank = dist.get_rank()
    model = _model()
    sync = None
    if scheme != "reference":
        sync = GradientSync(model, plan=plan, sparse_scheme=scheme)
    opts = _optimizer(model, optimizer)
    losses, grad_layouts = [], set()
    for step in range(STEPS):
        for opt in opts:
            opt.zero_grad()
        loss = model(*_batch(step, rank))
        loss.backward()
        if sync is None:
            _reference_sync(model, sparse_out=optimizer != "sgd")
        grad = model.embedding.weight.grad
        grad_layouts.add((grad.layout, grad.is_coalesced() if grad.is_sparse else None))
        for opt in opts:
            opt.step()
        losses.append(loss.item())
    return {
        "losses": losses,
        "params": [p.detach().clone() for p in model.parameters()],
        "grad_layouts": sorted(str(x) for x in grad_layouts),
        "wire_bytes": sync.ledger.wire_bytes if sync is not None else None,
    }


class TwoTables(nn.Module):
    """Two sparse embeddings; the second is used on rank 0 only."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Embedding(300, 4, sparse=True)
        self.b = nn.Embedding(200, 4, sparse=True)
        self.out = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = self.a(x) + (self.b(x % 200) if use_b else 0.0)
        return self.out(h).square().mean()


def _unused_table(scheme: str | None) -> list[torch.Tensor]:
    rank = dist.get_rank()
    torch.manual_seed(1)
    model = TwoTables()
    if scheme is not None:
        GradientSync(model, sparse_scheme=scheme)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for step in range(3):
        opt.zero_grad()
        x = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(step * 10 + rank))
        model(x, use_b=rank == 0).backward()
        if scheme is None:
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            _reference_sync(model, sparse_out=False)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def suite() -> dict[str, Any]:
    out: dict[str, Any] = {"reference": _train("reference"), "densified": _train(None)}
    for scheme in SCHEMES:
        out[scheme] = _train(scheme)
    out["whole_plan_zen"] = _train("zen", plan="whole")
    out["object_zen"] = _train(make_scheme("zen", seed=7))  # a prototype, copied per parameter
    out["factory_auto"] = _train(lambda: AutoScheme(criterion="time", profile_steps=1))
    out["reference_sparseadam"] = _train("reference", "sparseadam")
    out["zen_sparseadam"] = _train("zen", "sparseadam")
    out["unused_reference"] = _unused_table(None)
    out["unused_zen"] = _unused_table("zen")
    out["unused_agsparse"] = _unused_table("agsparse")
    try:
        GradientSync(_model(), sparse_scheme="zenn")
    except ValueError as exc:
        out["bad_scheme"] = str(exc)
    return out


@functools.cache
def _results() -> list[dict[str, Any]]:
    return run_ranks(suite, 2, timeout=120)


def _assert_same_params(got: list[torch.Tensor], want: list[torch.Tensor], where: str) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        worst = (g - w).abs().max().item()
        assert torch.allclose(g, w, rtol=1e-4, atol=2e-6), f"{where}: param {i} off by {worst:g}"


@pytest.mark.parametrize(
    "config", ["densified", *SCHEMES, "whole_plan_zen", "object_zen", "factory_auto"]
)
def test_training_matches_dense_allreduce(config: str) -> None:
    for rank, result in enumerate(_results()):
        ref, got = result["reference"], result[config]
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4, abs=1e-6), (config, rank)
        _assert_same_params(got["params"], ref["params"], f"{config}, rank {rank}")
    first, second = (r[config]["params"] for r in _results())
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True)), "replicas drifted"


def test_sparse_schemes_write_coalesced_sparse_grads() -> None:
    result = _results()[0]
    for scheme in SCHEMES:
        assert result[scheme]["grad_layouts"] == ["(torch.sparse_coo, True)"], scheme
    # Without a sparse scheme, or in a group with dense parameters, the gradient is densified.
    assert result["densified"]["grad_layouts"] == ["(torch.strided, None)"]
    assert result["whole_plan_zen"]["grad_layouts"] == ["(torch.strided, None)"]


def test_zen_sends_less_than_the_densified_embedding() -> None:
    result = _results()[0]
    dense, zen = result["densified"]["wire_bytes"], result["zen"]["wire_bytes"]
    embedding_bytes = VOCAB * 32 * 4  # one all-reduce of it sends this per rank on 2 ranks
    assert dense - zen > 0.8 * embedding_bytes * STEPS, (dense, zen)


def test_sparse_adam_trains_like_dense_reference() -> None:
    for result in _results():
        ref, got = result["reference_sparseadam"], result["zen_sparseadam"]
        assert got["grad_layouts"] == ["(torch.sparse_coo, True)"]
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4)
        _assert_same_params(got["params"], ref["params"], "SparseAdam")
        assert got["losses"][-1] < got["losses"][0]


def test_embedding_unused_on_one_rank() -> None:
    for result in _results():
        for scheme in ("zen", "agsparse"):
            _assert_same_params(result[f"unused_{scheme}"], result["unused_reference"], scheme)


def test_unknown_scheme_is_a_clear_error() -> None:
    message = _results()[0]["bad_scheme"]
    assert "unknown sparse scheme 'zenn'" in message
    assert "'agsparse'" in message and "import thrifty.zen" in message


def _fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a new interpreter: what a module imports, without this process's imports."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_substrate_finds_zen_only_through_its_registry() -> None:
    code = """
import sys
import thrifty.sync
from thrifty.sync.engine import get_sparse_scheme
assert not [m for m in sys.modules if m.startswith("thrifty.zen")], "thrifty.sync imported zen"
try:
    get_sparse_scheme("zen")
except ValueError as exc:
    print("before:", exc)
import thrifty.zen
print("after:", get_sparse_scheme("zen").__name__)
"""
    done = _fresh_python(code)
    assert done.returncode == 0, done.stderr
    assert "before: unknown sparse scheme 'zen' (registered: none)" in done.stdout
    assert "import thrifty.zen to register its schemes" in done.stdout
    assert "after: BalancedParallelism" in done.stdout


def test_zen_library_imports_no_benchmark_code() -> None:
    """What sync_sparse, a scheme and GradientSync run never loads the benchmark side."""
    code = """
import sys
import thrifty.zen, thrifty.zen.sync, thrifty.zen.selection, thrifty.zen.analytic
import thrifty.zen.schemes, thrifty.zen.hash_bitmap, thrifty.zen.hierarchical_hashing
import thrifty.sync
import thrifty.zen.workloads, thrifty.zen.analysis
benchmark_side = ("thrifty.bench", "thrifty.zen.benchmark", "thrifty.mergecomp",
                  "thrifty.bytecomp", "thrifty.lazarus", "thrifty.marconi")
print(sorted(m for m in sys.modules if m.startswith(benchmark_side)))
"""
    done = _fresh_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_sparse_parameters_are_found_from_the_modules() -> None:
    model = TwoTables()
    model.dense_table = nn.Embedding(10, 4)  # sparse=False: stays on the dense path
    names = _sparse_parameter_names(model, dict(model.named_parameters()))
    assert names == {"a.weight", "b.weight"}
