"""ExpertGradSync: every replica gets its expert's summed gradient; ranks send only their own.

The 4-rank case runs on real gloo ranks, two layers of tiny ``nn.Linear``
experts (router + expert list form). Gradients are deterministic functions of
(trial, layer, rank, slot, parameter), so the reference is computed here,
in the test process, without any communication. Integer-valued gradients
make every summation order exact, so "equal to the reference" is ``torch.equal``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from thrifty.bench.launch import run_ranks
from thrifty.comm.collectives import count_bytes
from thrifty.lazarus.expert_grads import (
    _SUBGROUPS,
    METHODS,
    ExpertGradSync,
    SyncBytes,
    table_allreduce_bytes,
)
from thrifty.lazarus.moe_adapter import moe_adapter
from thrifty.lazarus.replicated_moe import ReplicatedExperts

WORLD = 4
# Per layer, per rank: the expert of each slot.
#   layer 0: expert 1 on ranks 0,1,2; expert 2 on 0,2,3; expert 4 on 2,3; experts 0, 3, 5 on one
#            rank each, expert 3 twice on rank 1.
#   layer 1: expert 1 twice on rank 0 and once on rank 1 (pre-summed before sending).
PLACEMENTS = (
    ([0, 1, 2], [1, 3, 3], [2, 4, 1], [5, 4, 2]),
    ([0, 1, 1], [1, 2], [3, 0], [2, 3]),
)
SHAPES = ((4, 3), (3, 5))  # nn.Linear(in, out) experts of each layer: 15 and 20 parameters
# (layer, rank, slot, parameter index or None for all) whose grad is None: expert 5 of layer
# 0 has no gradient anywhere (ends as zeros); layer 1 expert 0 lacks only its bias on rank 2.
NONE = {(0, 1, 1, None), (0, 3, 0, None), (1, 0, 2, None), (1, 2, 1, 1)}
TRIALS = ("int", "normal")


def _layers(rank: int, group: dist.ProcessGroup | None = None) -> list[ReplicatedExperts]:
    layers = []
    for li, (nodes, (fan_in, fan_out)) in enumerate(zip(PLACEMENTS, SHAPES, strict=True)):
        torch.manual_seed(li)
        experts = max(max(slots) for slots in nodes) + 1
        modules = [nn.Linear(fan_in, fan_out) for _ in range(experts)]
        adapter = moe_adapter(nn.Linear(fan_in, experts), modules)
        layers.append(ReplicatedExperts(adapter, nodes[rank], group=group))
    return layers


def _fake_grad(trial: str, li: int, rank: int, slot: int, index: int) -> torch.Tensor | None:
    if (li, rank, slot, None) in NONE or (li, rank, slot, index) in NONE:
        return None
    fan_in, fan_out = SHAPES[li]
    shape = (fan_out, fan_in) if index == 0 else (fan_out,)
    seed = (((TRIALS.index(trial) * 7 + li) * 11 + rank) * 13 + slot) * 17 + index
    generator = torch.Generator().manual_seed(seed)
    if trial == "int":
        return torch.randint(-8, 8, shape, generator=generator).float()
    return torch.randn(shape, generator=generator)


def _set_grads(layers: list[ReplicatedExperts], trial: str, rank: int) -> None:
    for li, layer in enumerate(layers):
        for slot, replica in enumerate(layer.replicas):
            for index, p in enumerate(replica.parameters()):
                p.grad = _fake_grad(trial, li, rank, slot, index)


def _grads(layers: list[ReplicatedExperts]) -> dict[tuple[int, int, int], torch.Tensor]:
    return {
        (li, slot, index): p.grad.clone()
        for li, layer in enumerate(layers)
        for slot, replica in enumerate(layer.replicas)
        for index, p in enumerate(replica.parameters())
    }


def _reference(trial: str) -> dict[tuple[int, int, int], torch.Tensor]:
    """``{(layer, expert, parameter index): sum over every replica on every rank}``."""
    sums: dict[tuple[int, int, int], torch.Tensor] = {}
    for li, nodes in enumerate(PLACEMENTS):
        fan_in, fan_out = SHAPES[li]
        for rank, slots in enumerate(nodes):
            for slot, expert in enumerate(slots):
                for index, shape in enumerate([(fan_out, fan_in), (fan_out,)]):
                    total = sums.setdefault((li, expert, index), torch.zeros(shape))
                    grad = _fake_grad(trial, li, rank, slot, index)
                    if grad is not None:
                        total += grad
    return sums


def _sync_rank() -> dict[str, object]:
    rank = dist.get_rank()
    layers = _layers(rank)
    out: dict[str, object] = {}
    for method in METHODS:
        sync = ExpertGradSync(layers, method=method)
        grads = {}
        for trial in TRIALS:
            _set_grads(layers, trial, rank)
            with count_bytes() as ledger:
                sync.sync()
            grads[trial] = _grads(layers)
        out[method] = {
            "grads": grads,
            "measured": SyncBytes(ledger.payload_bytes, ledger.wire_bytes),
            "expected": sync.bytes_per_step(),
            "expected_all": [sync.bytes_per_step(r) for r in range(WORLD)],
            "table": sync.table_bytes(),
            "replica_numel": sync.replica_numel,
            "total_numel": sync.total_numel,
        }
    # Rebuilding (as after a re-placement) reuses the cached subgroups: none is created.
    groups = len(_SUBGROUPS.groups)
    ExpertGradSync(layers, method="subgroups")
    out["subgroups_cached"] = (groups, len(_SUBGROUPS.groups))
    # average=True divides by the group size (DDP-style mean).
    averaged = ExpertGradSync(layers, average=True)
    _set_grads(layers, "int", rank)
    averaged.sync()
    out["averaged"] = _grads(layers)
    # Subgroups need every process of the world: a group of 3 of 4 ranks is refused.
    part = dist.new_group([0, 1, 2])
    if rank < 3:
        layer = ReplicatedExperts(
            moe_adapter(nn.Linear(2, 2), [nn.Linear(2, 2)] * 2), [rank % 2], group=part
        )
        with pytest.raises(ValueError, match="needs a group spanning the world"):
            ExpertGradSync([layer], method="subgroups")
    return out


@pytest.fixture(scope="module")
def results() -> list[dict[str, object]]:
    return run_ranks(_sync_rank, WORLD, timeout=90)


@pytest.mark.parametrize("method", METHODS)
def test_every_replica_gets_the_reference_sum(results: list[dict], method: str) -> None:
    for trial in TRIALS:
        reference = _reference(trial)
        for rank, result in enumerate(results):
            for (li, slot, index), grad in result[method]["grads"][trial].items():
                expected = reference[(li, PLACEMENTS[li][rank][slot], index)]
                if trial == "int":  # integer sums are exact in any order
                    assert torch.equal(grad, expected), (method, rank, li, slot, index)
                else:
                    torch.testing.assert_close(grad, expected)
    # Random floats: every replica of an expert, on every rank, has the very same bits.
    for li, nodes in enumerate(PLACEMENTS):
        for expert in {e for slots in nodes for e in slots}:
            for index in (0, 1):
                copies = [
                    result[method]["grads"]["normal"][(li, slot, index)]
                    for rank, result in enumerate(results)
                    for slot, e in enumerate(nodes[rank])
                    if e == expert
                ]
                assert all(torch.equal(c, copies[0]) for c in copies), (method, li, expert)


def test_average_divides_by_world(results: list[dict]) -> None:
    reference = _reference("int")
    for rank, result in enumerate(results):
        for (li, slot, index), grad in result["averaged"].items():
            expected = reference[(li, PLACEMENTS[li][rank][slot], index)] / WORLD
            assert torch.equal(grad, expected)


@pytest.mark.parametrize("method", ["alltoall", "subgroups"])
def test_each_rank_sends_only_its_replicas(results: list[dict], method: str) -> None:
    for rank, result in enumerate(results):
        got, table = result[method], result["table"]
        assert got["measured"] == got["expected"] == results[0][method]["expected_all"][rank]
        assert table["measured"] == table["expected"] == got["table"]
        own = got["replica_numel"] * 4  # float32
        assert got["measured"].wire_bytes <= 2 * own
        assert got["measured"].payload_bytes <= (own if method == "subgroups" else 2 * own)
        assert 0 < got["measured"].wire_bytes < table["measured"].wire_bytes
        # The goal: at most c/E of the table's bytes (here: this rank's share of all numel).
        share = got["replica_numel"] / got["total_numel"]
        assert got["measured"].wire_bytes / table["measured"].wire_bytes <= share
        if method == "subgroups":  # alltoall's payload counts both rounds; the table's one
            assert got["measured"].payload_bytes / table["measured"].payload_bytes <= share
    # The table sends the same whatever a rank holds; 6*15 + 4*20 float32 parameters.
    assert results[0]["table"]["measured"] == table_allreduce_bytes(170, WORLD, 4)
    assert table_allreduce_bytes(170, WORLD, 4) == SyncBytes(680, 1020)


def test_rebuilding_reuses_subgroups(results: list[dict]) -> None:
    for result in results:
        before, after = result["subgroups_cached"]
        assert before == after == 6  # the shared rank sets of PLACEMENTS


# --------------------------------------------------------------------------- one process


def _single_layer(slots: list[int]) -> ReplicatedExperts:
    torch.manual_seed(0)
    modules = [nn.Linear(3, 2) for _ in range(3)]
    return ReplicatedExperts(moe_adapter(nn.Linear(3, 3), modules), slots)


def test_one_process_sums_replicas_on_the_same_rank() -> None:
    layer = _single_layer([0, 1, 1, 2, 1])
    ones = [torch.ones(2, 3), torch.ones(2)]
    for slot, replica in enumerate(layer.replicas):
        for p, g in zip(replica.parameters(), ones, strict=True):
            p.grad = None if slot == 3 else g * (slot + 1)
    sync = ExpertGradSync([layer])
    sync.sync()
    sums = {0: 1.0, 1: 2.0 + 3.0 + 5.0, 2: 0.0}  # slot 3 (expert 2) had no grad: zeros
    for slot, expert in enumerate(layer.replica_experts):
        for p, g in zip(layer.replicas[slot].parameters(), ones, strict=True):
            assert torch.equal(p.grad, g * sums[expert])
    assert sync.bytes_per_step() == SyncBytes(0, 0) == sync.table_bytes()


def test_bad_inputs_raise_clear_errors() -> None:
    layer = _single_layer([0, 1, 2])
    with pytest.raises(ValueError, match="method 'ring' is unknown"):
        ExpertGradSync([layer], method="ring")
    with pytest.raises(ValueError, match="layers is empty"):
        ExpertGradSync([])
    with pytest.raises(TypeError, match="layers\\[0\\] is a Linear"):
        ExpertGradSync([nn.Linear(2, 2)])  # type: ignore[list-item]
    layer.replicas[1].double()
    with pytest.raises(ValueError, match="expected one dtype"):
        ExpertGradSync([layer])
