"""sparse_comm_hook: DDP with ``nn.Embedding(sparse=True)`` trains like a dense all-reduce.

One ``run_ranks`` launch (2 gloo ranks, different data on each) trains the
same small model from the same seed several times: once without DDP, syncing
by a plain ``dist.all_reduce`` of the densified gradients (the reference), and
once per hook configuration under ``DistributedDataParallel``. Every hooked
run must end within 1e-6 of the reference and bit-identical on both ranks;
the hook also records what DDP hands it, which pins down what the hook relies
on (a sparse gradient comes as a sparse bucket of its own; DDP does not divide
by the world size, or the result would be half the reference's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from thrifty.bench import run_ranks
from thrifty.comm import collectives
from thrifty.sync.ddp_hook import CompressionHookState, compression_hook
from thrifty.zen import AutoScheme, SparseHookState, make_scheme, sparse_comm_hook

VOCAB, DIM, STEPS, BATCH = 1000, 8, 4, 32


class EmbeddingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, DIM, sparse=True)
        self.head = nn.Linear(DIM, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(ids)).squeeze(-1)


def _batch(step: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    # Skewed ids: the ranks' rows overlap in part, and repeat within a batch
    # (so each rank's gradient is uncoalesced, with duplicates).
    ids = (torch.rand(BATCH, generator=gen) ** 2 * VOCAB).long()
    return ids.to(device), torch.randn(BATCH, generator=gen).to(device)


def _model(device: torch.device) -> EmbeddingNet:
    torch.manual_seed(0)
    return EmbeddingNet().to(device)


def _train(forward: nn.Module, model: EmbeddingNet, device: torch.device, sync: Any) -> list:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    rank = dist.get_rank()
    for step in range(STEPS):
        opt.zero_grad()
        ids, target = _batch(step, rank, device)
        (forward(ids) - target).square().mean().backward()
        sync(model)
        opt.step()
    return [p.detach().cpu().clone() for p in model.parameters()]


def _dense_allreduce(model: nn.Module) -> None:
    """The reference: every gradient densified, summed by all-reduce, divided by n."""
    n = dist.get_world_size()
    for p in model.parameters():
        dense = p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()
        dist.all_reduce(dense)
        p.grad = dense / n


def _recording_hook(state, bucket):  # unannotated: DDP rejects a string annotation
    """sparse_comm_hook, noting what DDP hands it: sparse_dim (None: dense), shape, parameters."""
    hook_state, seen = state
    buffer = bucket.buffer()
    sparse_dim = buffer.sparse_dim() if buffer.is_sparse else None
    seen.append((sparse_dim, tuple(buffer.shape), [id(p) for p in bucket.parameters()]))
    return sparse_comm_hook(hook_state, bucket)


def _hooked(make_state: Callable[[], SparseHookState], device: torch.device) -> dict[str, Any]:
    model = _model(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    state = make_state()
    seen: list = []
    ddp.register_comm_hook((state, seen), _recording_hook)
    params = _train(ddp, model, device, sync=lambda _: None)
    assert model.embedding.weight.grad.is_sparse, "DDP left a dense embedding gradient"
    names = {id(p): name for name, p in model.named_parameters()}
    dense_ledger = getattr(state.dense_state, "ledger", collectives.CommLedger())
    return {
        "params": params,
        "buckets": [(dim, shape, [names[i] for i in ids]) for dim, shape, ids in seen],
        "ops": set(state.ledger.ops),
        "dense_hook_ops": set(dense_ledger.ops),
    }


# Built inside the ranks (a state needs the process group). thrifty's own DDP
# hook without compression averages dense buckets exactly as the reference does.
CONFIGS: dict[str, Callable[[], SparseHookState]] = {
    "zen": lambda: SparseHookState("zen"),
    "agsparse": lambda: SparseHookState("agsparse"),
    "sparcml": lambda: SparseHookState("sparcml"),
    "AutoScheme object": lambda: SparseHookState(AutoScheme()),
    "zen seed 7, compression_hook for dense": lambda: SparseHookState(
        make_scheme("zen", seed=7),
        dense_hook=compression_hook,
        dense_state=CompressionHookState("none"),
    ),
}


def train_every_config(device_name: str, labels: Sequence[str]) -> dict[str, Any]:
    device = torch.device(device_name)
    reference = _model(device)
    out: dict[str, Any] = {"reference": _train(reference, reference, device, _dense_allreduce)}
    for label in labels:
        out[label] = _hooked(CONFIGS[label], device)
    return out


def _check(results: list[dict[str, Any]], labels: Sequence[str]) -> None:
    reference = results[0]["reference"]
    for label in labels:
        mine, theirs = results[0][label], results[1][label]
        for a, b in zip(mine["params"], theirs["params"], strict=True):
            assert torch.equal(a, b), f"{label}: the ranks' parameters differ"
        named = zip(("embedding", "weight", "bias"), mine["params"], reference, strict=True)
        for name, a, b in named:
            worst = float((a - b).abs().max())
            assert worst <= 1e-6, f"{label}: {name} is {worst} from the dense reference"
        sparse = [b for b in mine["buckets"] if b[0] is not None]
        dense = [b for b in mine["buckets"] if b[0] is None]
        # Every step: the embedding in a bucket of its own, sparse_dim 1, its own shape.
        assert sparse == [(1, (VOCAB, DIM), ["embedding.weight"])] * STEPS, sparse
        assert len(dense) == STEPS, dense
        assert all(sorted(b[2]) == ["head.bias", "head.weight"] for b in dense), dense
    assert {"all_reduce", "all_to_all_v"} <= results[0]["zen"]["ops"]  # dense; Zen's push


def test_hook_trains_like_dense_allreduce_on_gloo() -> None:
    labels = list(CONFIGS)
    results = run_ranks(train_every_config, 2, "cpu", labels)
    _check(results, labels)
    composed = results[0]["zen seed 7, compression_hook for dense"]
    assert "all_reduce" not in composed["ops"] and "all_to_all_v" in composed["ops"]
    assert "all_reduce" in composed["dense_hook_ops"]  # the dense buckets went there


def test_state_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown sparse scheme 'zenn'"):
        SparseHookState("zenn")
    with pytest.raises(TypeError, match="options"):
        SparseHookState(make_scheme("zen"), seed=3)
    with pytest.raises(TypeError, match="scheme name or a SparseScheme"):
        SparseHookState(42)  # type: ignore[arg-type]


def nccl_rank() -> dict[str, Any]:
    """One NCCL rank (no CPU backend): the hook makes a gloo group, dense stays on NCCL."""
    device = torch.device("cuda", 0)
    # The collectives allocate on the input's device (NCCL takes nothing else).
    sent = torch.arange(5, device=device, dtype=torch.float32)
    (gathered,) = collectives.all_gather_v(sent)
    (returned,) = collectives.all_to_all_v([sent])
    assert gathered.device == device and torch.equal(gathered, sent)
    assert returned.device == device and torch.equal(returned, sent)
    model = _model(device)
    reference = _train(model, model, device, _dense_allreduce)
    state = SparseHookState("zen")
    assert state.sparse_group is not None  # NCCL-only world: a gloo group of its own
    hooked = _hooked(lambda: state, device)
    return {"reference": reference, "params": hooked["params"]}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_hook_on_cuda_buckets() -> None:
    (nccl,) = run_ranks(nccl_rank, 1, backend="nccl")
    for a, b in zip(nccl["params"], nccl["reference"], strict=True):
        assert float((a - b).abs().max()) <= 1e-6
    # Two ranks on one GPU over gloo (NCCL refuses two ranks on one device):
    # CUDA buckets, averaged across ranks.
    labels = ["zen", "agsparse"]
    _check(run_ranks(train_every_config, 2, "cuda:0", labels), labels)
