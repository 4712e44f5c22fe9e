"""ReplicatedExperts on Hugging Face MoE blocks: same outputs and gradients as the original block.

Models are tiny random configs (no downloads). World size 1 runs in process
(no process group: the layer then runs alone); the expert-parallel case runs
on 3 real gloo ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from thrifty.bench.launch import run_ranks
from thrifty.lazarus.moe_adapter import ExpertListAdapter, StackedExpertsAdapter, moe_adapter
from thrifty.lazarus.placement import Placement
from thrifty.lazarus.replicated_moe import ReplicatedExperts, replicate_moe_blocks

transformers = pytest.importorskip("transformers")

KINDS = ("mixtral", "qwen3_moe", "olmoe")
EXPERTS = 4
HIDDEN = 32
TOL = 1e-5
COMMON = {
    "hidden_size": HIDDEN,
    "intermediate_size": 64,
    "num_experts_per_tok": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}


def _model(kind: str, layers: int = 1, seed: int = 0) -> nn.Module:
    common = {**COMMON, "num_hidden_layers": layers}
    if kind == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=EXPERTS, **common)
        cls = transformers.MixtralForCausalLM
    elif kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            num_experts=EXPERTS, moe_intermediate_size=48, norm_topk_prob=True, **common
        )
        cls = transformers.Qwen3MoeForCausalLM
    else:
        config = transformers.OlmoeConfig(
            num_experts=EXPERTS, eos_token_id=None, pad_token_id=None, **common
        )
        cls = transformers.OlmoeForCausalLM
    torch.manual_seed(seed)
    return cls(config)


def _block(model: nn.Module) -> nn.Module:
    return model.model.layers[0].mlp


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item() if a.numel() else 0.0


# --------------------------------------------------------------------------- world size 1


@pytest.mark.parametrize("kind", KINDS)
def test_replaced_block_matches_original(kind: str) -> None:
    block = _block(_model(kind))
    # Every expert here, expert 1 twice: its tokens are split over two replicas.
    layer = ReplicatedExperts(block, [3, 2, 1, 0, 1])
    assert layer.replica_experts == (3, 2, 1, 0, 1)
    assert layer.gate is block.gate
    names = [name for name, _ in layer.named_parameters()]
    assert names[0] == "gate.weight" and "replicas.4.gate_up_proj" in names
    hidden = torch.randn(3, 7, HIDDEN)
    assert _max_diff(layer(hidden), block(hidden)) < TOL
    assert layer.last_token_counts.sum() == 3 * 7 * 2


@pytest.mark.parametrize("kind", KINDS)
def test_whole_model_logits_and_aux_loss_match(kind: str) -> None:
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    expected = _model(kind, layers=2)(ids, output_router_logits=True)
    model = _model(kind, layers=2)
    replaced = replicate_moe_blocks(model, lambda layer: [0, 1, 2, 3, layer])
    assert sorted(replaced) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert replaced["model.layers.1.mlp"].replica_experts == (0, 1, 2, 3, 1)
    got = model(ids, output_router_logits=True)
    assert _max_diff(got.logits, expected.logits) < TOL
    # transformers records router logits with hooks on the router: kept, so aux loss still works.
    assert _max_diff(got.aux_loss, expected.aux_loss) < TOL


def test_adapter_reads_runs_and_writes_one_expert() -> None:
    block = _block(_model("mixtral"))
    adapter = StackedExpertsAdapter(block)
    assert adapter.num_experts == EXPERTS
    state = adapter.expert_state(2)
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    assert shapes == {"gate_up_proj": (128, HIDDEN), "down_proj": (HIDDEN, 64)}
    assert state["down_proj"].is_contiguous() and not state["down_proj"].requires_grad
    x = torch.randn(6, HIDDEN)
    reference = block.experts(x, torch.full((6, 1), 2), torch.ones(6, 1))
    assert _max_diff(adapter.run_expert(state, x), reference) < TOL
    adapter.load_expert_state(0, state)  # expert 0 := expert 2
    assert torch.equal(block.experts.gate_up_proj[0], block.experts.gate_up_proj[2])
    with pytest.raises(ValueError, match="expected"):
        adapter.load_expert_state(0, {"gate_up_proj": state["gate_up_proj"]})
    layer = ReplicatedExperts(adapter, [0, 1, 2, 3])
    layer.load_replica_state(3, layer.replica_state(0))
    assert torch.equal(layer.replicas[3].down_proj, block.experts.down_proj[2])
    with pytest.raises(RuntimeError, match="detached"):
        layer._adapter.expert_state(0)


class _TopKRouter(nn.Module):
    """A router that follows the contract: (logits, top-k weights, top-k indices)."""

    def __init__(self, experts: int, k: int, banned: int | None = None) -> None:
        super().__init__()
        self.k = k
        self.banned = banned  # an expert no token is ever routed to
        self.proj = nn.Linear(HIDDEN, experts, bias=False)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.proj(hidden)
        scores = logits.softmax(dim=-1)
        if self.banned is not None:
            scores = scores.index_fill(1, torch.tensor([self.banned]), -1.0)
        weights, indices = scores.topk(self.k, dim=-1)
        return logits, weights, indices


def _expert_list(seed: int = 0, banned: int | None = None) -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(seed)
    router = _TopKRouter(EXPERTS, k=2, banned=banned)
    experts = [
        nn.Sequential(nn.Linear(HIDDEN, 48), nn.GELU(), nn.Linear(48, HIDDEN))
        for _ in range(EXPERTS)
    ]
    return router, experts


def _expert_list_reference(
    router: nn.Module, experts: list[nn.Module], x: torch.Tensor
) -> torch.Tensor:
    """The textbook top-k MoE, token by token: sum over k of weight * expert(token)."""
    _, weights, indices = router(x)
    return sum(
        weights[:, j, None] * torch.stack([experts[e](x[t]) for t, e in enumerate(indices[:, j])])
        for j in range(indices.shape[1])
    )


class _ListMoE(nn.Module):
    """The reference for a router and a list of experts, shaped like a transformers block."""

    def __init__(self, router: nn.Module, experts: list[nn.Module]) -> None:
        super().__init__()
        self.gate = router
        self.experts = nn.ModuleList(experts)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        return _expert_list_reference(self.gate, list(self.experts), flat).reshape(hidden.shape)


def test_expert_list_with_router_matches_reference() -> None:
    router, experts = _expert_list()
    layer = ReplicatedExperts(moe_adapter(router, experts), [0, 1, 1, 2, 3])
    assert "replicas.2.0.weight" in dict(layer.named_parameters())
    x = torch.randn(11, HIDDEN)
    assert _max_diff(layer(x), _expert_list_reference(router, experts, x)) < TOL


def test_bad_inputs_raise_clear_errors() -> None:
    block = _block(_model("olmoe"))
    with pytest.raises(ValueError, match=r"experts \[3\] have no replica"):
        ReplicatedExperts(block, [0, 1, 2, 2])
    with pytest.raises(ValueError, match=r"expert ids \[9\], out of range.*0\.\.3"):
        ReplicatedExperts(block, [0, 1, 2, 3, 9])
    with pytest.raises(ValueError, match="2 nodes; expected one per rank"):
        ReplicatedExperts(block, Placement.from_nodes([[0, 1], [2, 3]]))
    with pytest.raises(TypeError, match=r"Linear is not a supported MoE block.*`gate` router"):
        ReplicatedExperts(nn.Linear(4, 4), [0])
    # A gate and stacked experts, but also a shared expert: the structure alone would pass.
    qwen2 = transformers.Qwen2MoeConfig(
        num_experts=EXPERTS,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=40,
        num_hidden_layers=1,
        **COMMON,
    )
    with pytest.raises(TypeError, match="Qwen2MoeSparseMoeBlock's forward is not gate -> experts"):
        replicate_moe_blocks(transformers.Qwen2MoeForCausalLM(qwen2), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="no MoE block found in Sequential"):
        replicate_moe_blocks(nn.Sequential(nn.Linear(4, 4)), [0])
    router, experts = _expert_list()
    with pytest.raises(TypeError, match=r"experts\[1\].*identical modules"):
        ExpertListAdapter(router, [experts[0], nn.Linear(HIDDEN, HIDDEN)])
    layer = ReplicatedExperts(moe_adapter(nn.Linear(HIDDEN, EXPERTS), experts), [0, 1, 2, 3])
    with pytest.raises(TypeError, match="returned Tensor; expected a tuple"):
        layer(torch.randn(3, HIDDEN))


# --------------------------------------------------------------------------- 3 gloo ranks

PLACEMENT = ([0, 1], [1, 2, 2], [3])  # expert 1 on ranks 0 and 1, expert 2 twice on rank 1


def _grad(p: nn.Parameter) -> torch.Tensor:
    return p.grad.clone() if p.grad is not None else torch.zeros_like(p)


def _reference_expert_grads(reference: nn.Module) -> dict[str, torch.Tensor]:
    """The reference's expert gradients as ``{name: [E, ...]}``, summed over ranks."""
    if isinstance(reference.experts, nn.ModuleList):
        named = [dict(expert.named_parameters()) for expert in reference.experts]
        grads = {name: torch.stack([_grad(e[name]) for e in named]) for name in named[0]}
    else:  # transformers: already stacked
        grads = {name: _grad(p) for name, p in reference.experts.named_parameters()}
    for t in grads.values():
        dist.all_reduce(t)
    return grads


def _replica_expert_grads(
    layer: ReplicatedExperts, like: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every replica's gradient summed per expert over all ranks: ``{name: [E, ...]}``."""
    sums = {name: torch.zeros_like(t) for name, t in like.items()}
    for _, expert, name, param in layer.named_replica_parameters():
        if param.grad is not None:
            sums[name][expert] += param.grad
    for t in sums.values():
        dist.all_reduce(t)
    return sums


def _step(
    reference: nn.Module, layer: ReplicatedExperts, tokens: int, seed: int, train_input: bool = True
) -> dict[str, float]:
    """One forward/backward of ``layer`` and ``reference`` on this rank's tokens.

    Returns the largest differences (outputs, input and router gradients on
    this rank; expert gradients summed over ranks) and two sanity numbers.
    """
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randn(1, tokens, HIDDEN, generator=generator)
    upstream = torch.randn(1, tokens, HIDDEN, generator=generator)
    for module in (reference, layer):
        module.zero_grad(set_to_none=True)
    x_ref = x.clone().requires_grad_(train_input)
    x_got = x.clone().requires_grad_(train_input)
    out = layer(x_got)
    (out * upstream).sum().backward()
    result = {"pairs": float(layer.last_token_counts.sum())}
    if tokens:  # the transformers block cannot take zero tokens
        ref = reference(x_ref)
        (ref * upstream).sum().backward()
        result["output"] = _max_diff(out, ref)
        if train_input:
            result["input_grad"] = _max_diff(x_got.grad, x_ref.grad)
        for (name, got), want in zip(
            layer.gate.named_parameters(), reference.gate.parameters(), strict=True
        ):
            if want.requires_grad:
                result[f"router_grad.{name}"] = _max_diff(got.grad, want.grad)
    want = _reference_expert_grads(reference)
    got = _replica_expert_grads(layer, want)
    result["expert_grad"] = max(_max_diff(got[name], want[name]) for name in want)
    result["expert_grad_norm"] = sum(t.norm().item() for t in want.values())
    return result


def _distributed_rank() -> dict[str, object]:
    rank = dist.get_rank()
    results: dict[str, object] = {}
    # The same seed on every rank, so replicas start identical. The reference is a second
    # copy: the layer keeps its source's router module, whose gradients must stay apart.
    block = _block(_model("mixtral"))
    layer = ReplicatedExperts(_block(_model("mixtral")), PLACEMENT[rank])
    assert layer.replica_counts.tolist() == [[1, 1, 0, 0], [0, 1, 2, 0], [0, 0, 0, 1]]
    results["mixtral"] = _step(block, layer, tokens=5 + 4 * rank, seed=1)
    # Rank 2 has no tokens: it must still take part in both all-to-alls, both ways.
    results["mixtral, rank 2 idle"] = _step(block, layer, tokens=0 if rank == 2 else 6, seed=2)
    # A list of experts; a frozen input and router; nothing routed to expert 3, so rank 2
    # receives nothing: its backward all-to-alls must still run (else the others hang).
    router, experts = _expert_list(banned=3)
    router.requires_grad_(False)
    reference = _ListMoE(router, experts)
    router, experts = _expert_list(banned=3)
    router.requires_grad_(False)
    listed = ReplicatedExperts(moe_adapter(router, experts), PLACEMENT[rank])
    results["expert list, frozen input"] = _step(
        reference, listed, tokens=4 + rank, seed=3, train_input=False
    )
    try:  # every rank sees every list, so every rank raises (none is left in a collective)
        ReplicatedExperts(block, [[0], [1], [1]][rank])
        results["missing"] = ""
    except ValueError as exc:
        results["missing"] = str(exc)
    return results


def test_three_ranks_match_local_reference_outputs_and_gradients() -> None:
    results = run_ranks(_distributed_rank, 3, timeout=120)
    pairs = {"mixtral": (5 + 9 + 13) * 2, "mixtral, rank 2 idle": 12 * 2}
    pairs["expert list, frozen input"] = (4 + 5 + 6) * 2
    for rank, result in enumerate(results):
        assert "experts [2, 3] have no replica on any of the 3 ranks" in result.pop("missing")
        for phase, errors in result.items():
            assert errors.pop("pairs") == pairs[phase]
            assert errors.pop("expert_grad_norm") > 0
            assert "expert_grad" in errors and ("output" in errors or rank == 2)
            for key, value in errors.items():
                assert value < TOL, (rank, phase, key, value)
