"""Read, write and run the experts of an existing MoE block, one expert at a time.

Lazarus moves single experts around (a replica is created, sent to a rank,
trained there, sent on after a failure), so it needs each expert as a small
dict of tensors, and it needs to run one expert on a batch of tokens given
such a dict. Real models do not store experts that way: Hugging Face
transformers 5.x keeps all of a layer's experts in stacked tensors
(``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``) next
to a router module ``gate``. An adapter gives both views of one block
without copying its code:

* :class:`StackedExpertsAdapter` - the transformers 5.x blocks
  (``MixtralSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock``,
  ``OlmoeSparseMoeBlock``, and any block with a ``gate`` router and an
  ``experts`` module whose parameters are all stacked ``[E, ...]``).
  Expert ``e``'s state is ``{name: param[e]}``. Its math is the experts
  module's *own* forward, run on a one-expert copy of the module whose
  stacked parameters are ``state[name][None]`` and with every token routed
  to that one expert with weight 1 (exact: ``y * 1.0 == y``, ``0 + y == y``).
  So whichever experts implementation the config selects (eager,
  ``grouped_mm``, ``batched_mm``), the activation, gating, bias and layout
  flags are HF's, not a re-implementation that could drift.
* :class:`ExpertListAdapter` - a router plus a list of identical expert
  modules (the generic case). Expert ``e``'s state is ``experts[e]``'s
  parameters and buffers; its math is ``torch.func.functional_call`` of a
  weightless copy of ``experts[0]`` with that state.

The router contract (both adapters; the transformers 5.x ``TopKRouter``
contract): ``router(hidden)`` with ``hidden [T, H]`` returns the tuple
``(router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])``, where
``top_k_index`` is an integer tensor of expert ids and ``top_k_weights`` are
the final weights the expert outputs are combined with (already normalised
if the model normalises them). The logits are not used here; they are
returned so that forward hooks on the router (transformers records them for
the load-balancing loss that way) keep working.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

__all__ = [
    "ExpertListAdapter",
    "MoEAdapter",
    "RouterOutput",
    "StackedExpertsAdapter",
    "combine",
    "is_moe_block",
    "moe_adapter",
]

# The stacked blocks this was written against, for error messages.
SUPPORTED_BLOCKS = "MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock, OlmoeSparseMoeBlock"


class RouterOutput(NamedTuple):
    """What a router returns: see the module docstring for the contract."""

    logits: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor


class MoEAdapter(ABC):
    """One MoE block seen as a router plus ``num_experts`` separately addressable experts.

    Attributes:
        router: the block's router module (called as a module, so its hooks fire).
        num_experts: number of experts ``E``; expert ids are ``0..E-1``.
    """

    router: nn.Module
    num_experts: int

    def route(self, hidden: torch.Tensor) -> RouterOutput:
        """Run the router on ``hidden [T, H]`` and check its output against the contract."""
        out = self.router(hidden)
        if not isinstance(out, tuple | list) or len(out) != 3:
            raise TypeError(
                f"router {type(self.router).__name__} returned {type(out).__name__}; expected "
                "a tuple (router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])"
            )
        logits, weights, indices = out
        tokens = hidden.shape[0]
        if indices.dim() != 2 or indices.shape[0] != tokens or indices.is_floating_point():
            raise TypeError(
                f"router {type(self.router).__name__} returned top_k_index of dtype "
                f"{indices.dtype} and shape {tuple(indices.shape)}; expected integer [{tokens}, k]"
            )
        if weights.shape != indices.shape:
            raise TypeError(
                f"router {type(self.router).__name__} returned top_k_weights of shape "
                f"{tuple(weights.shape)}; expected the shape of top_k_index, "
                f"{tuple(indices.shape)}"
            )
        return RouterOutput(logits, weights, indices)

    def prepare(self, hidden: torch.Tensor, training: bool) -> torch.Tensor:
        """What the block does to its input before routing (nothing, unless overridden)."""
        return hidden

    def local_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The whole MoE on this process, every expert from the source: ``[T, H]`` in and out.

        The single-process reference that :class:`ReplicatedExperts` must
        match, built from the same pieces (router, per-expert math, combine).
        """
        routing = self.route(hidden)
        k = routing.indices.shape[1]
        outputs = hidden.new_zeros(hidden.shape[0], k, hidden.shape[1])
        for expert in routing.indices.unique().tolist():
            rows, slots = (routing.indices == expert).nonzero(as_tuple=True)
            y = self.run_expert(self.expert_state(expert), hidden[rows])
            outputs = outputs.index_put((rows, slots), y)
        return combine(outputs, routing.weights, hidden.dtype)

    def check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range: expected 0..{self.num_experts - 1}")

    @abstractmethod
    def expert_state(self, expert: int) -> dict[str, torch.Tensor]:
        """Expert ``expert``'s tensors as contiguous detached clones (a replica to send)."""

    @abstractmethod
    def load_expert_state(self, expert: int, state: Mapping[str, torch.Tensor]) -> None:
        """Write ``state`` (as from :meth:`expert_state`) into the block's expert ``expert``."""

    @abstractmethod
    def make_replica(self, expert: int) -> nn.Module:
        """A module holding a trainable copy of expert ``expert``.

        Its ``named_parameters()`` (and ``named_buffers()``) have the keys of
        :meth:`expert_state`, so ``run_expert(dict(replica.named_parameters()), x)``
        trains the replica.
        """

    @abstractmethod
    def run_expert(self, state: Mapping[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        """One expert's output ``[T, H]`` for tokens ``hidden [T, H]``, unweighted.

        Differentiable in both ``state`` and ``hidden``.
        """

    @abstractmethod
    def without_source(self) -> MoEAdapter:
        """A copy that can route and run experts but holds no reference to the block's experts.

        A layer that keeps only some replicas must not keep all ``E`` experts
        alive through its adapter: that would cost the memory expert
        parallelism exists to save. The copy's :meth:`expert_state` and
        :meth:`load_expert_state` raise.
        """


def combine(outputs: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sum_k (outputs[:, k] * weights[:, k]).to(dtype)``: how the transformers blocks combine.

    Their eager experts forward multiplies each expert output by its weight
    (promoting to the weights' dtype, float32 for Mixtral's router), casts
    to the hidden dtype and adds. ``outputs`` is ``[T, k, H]``, ``weights``
    ``[T, k]``. The summation order over ``k`` may differ (bit-identical for
    k <= 2, within rounding otherwise).
    """
    return (outputs * weights.unsqueeze(-1)).to(dtype).sum(dim=1)


def _state_check(
    expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str
) -> None:
    if set(state) != set(expected):
        raise ValueError(f"{what}: state has keys {sorted(state)}; expected {sorted(expected)}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{what}: state[{name!r}] has shape {tuple(tensor.shape)}; expected "
                f"{tuple(expected[name].shape)}"
            )


def _weightless_copy(module: nn.Module, tensors: Sequence[torch.Tensor]) -> nn.Module:
    """``copy.deepcopy(module)`` with each of ``tensors`` replaced by an empty placeholder.

    The copy keeps the module's code, configuration and submodules (e.g. the
    activation) but none of the weights; ``functional_call`` supplies them.
    """
    memo: dict[int, object] = {}
    for t in tensors:
        placeholder = torch.empty(0, dtype=t.dtype, device=t.device)
        memo[id(t)] = (
            nn.Parameter(placeholder, requires_grad=False)
            if isinstance(t, nn.Parameter)
            else placeholder
        )
    return copy.deepcopy(module, memo)


class _ExpertWeights(nn.Module):
    """One stacked expert's slice as its own parameters, named like the stacked tensors."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in state.items():
            self.register_parameter(name, nn.Parameter(tensor))


class StackedExpertsAdapter(MoEAdapter):
    """A transformers 5.x MoE block: a ``gate`` router and ``experts`` with stacked weights.

    Every direct parameter of ``block.experts`` must be stacked along a
    leading expert dimension of size ``E`` (``gate_up_proj [E, 2I, H]``,
    ``down_proj [E, H, I]``, optional ``*_bias [E, ...]``), and the experts
    module must have no other parameters: anything shared by all experts
    (a post-expert norm) has no obvious owner among replicas, so it is
    rejected instead of silently duplicated. ``block.experts.forward`` must
    take ``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`` as in
    transformers 5.x.

    A block's ``jitter_noise`` (Mixtral) is applied in training as the block
    does, but out of place.

    With ``verify`` (the default) the block's own forward is run once on a
    few random tokens and compared with :meth:`local_forward`. Many
    transformers blocks have a ``gate`` and stacked ``experts`` but do more in
    their forward (shared experts, a routed scaling factor, score
    correction biases): the structure alone cannot tell, and reproducing
    such a block without those parts would be silently wrong.
    """

    def __init__(self, block: nn.Module, verify: bool = True) -> None:
        router, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        if not isinstance(router, nn.Module) or not isinstance(experts, nn.Module):
            raise TypeError(
                f"{type(block).__name__} is not a supported MoE block: expected a module with "
                f"a `gate` router and an `experts` module ({SUPPORTED_BLOCKS})"
            )
        stacked = dict(experts.named_parameters(recurse=False))
        leading = {p.shape[0] if p.dim() else None for p in stacked.values()}
        if not stacked or len(leading) != 1 or None in leading:
            shapes = {name: tuple(p.shape) for name, p in stacked.items()}
            raise TypeError(
                f"{type(block).__name__}.experts ({type(experts).__name__}) has parameters "
                f"{shapes}; expected stacked per-expert tensors [num_experts, ...] sharing "
                f"one leading size, as in {SUPPORTED_BLOCKS}"
            )
        (num_experts,) = leading
        shared = [name for name, _ in experts.named_parameters() if "." in name]
        if shared:
            raise TypeError(
                f"{type(block).__name__}.experts has parameters {shared} in submodules, shared "
                "by all experts; only stacked [num_experts, ...] parameters can be replicated"
            )
        gate_experts = getattr(router, "num_experts", num_experts)
        if gate_experts != num_experts:
            raise TypeError(
                f"{type(block).__name__}: router has num_experts={gate_experts} but the stacked "
                f"expert weights have {num_experts}"
            )
        self.router = router
        self.num_experts = int(num_experts)
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0) or 0.0)
        self.block_type = type(block).__name__
        self._experts: nn.Module | None = experts
        self._names = tuple(stacked)
        # A one-expert copy of the experts module: it runs HF's own forward on one replica.
        self._shell = _weightless_copy(experts, list(stacked.values()))
        if hasattr(self._shell, "num_experts"):
            self._shell.num_experts = 1
        if verify:
            self._verify(block)

    def _verify(self, block: nn.Module, tokens: int = 16) -> None:
        """Raise unless :meth:`local_forward` reproduces ``block.forward`` on random tokens.

        The probe is seeded, so every rank gets the same verdict.
        """
        weight = next(iter(self._source().values()))
        hidden_size = _hidden_size(self.router, block)
        generator = torch.Generator(device="cpu").manual_seed(0)
        probe = torch.randn(1, tokens, hidden_size, generator=generator).to(weight)
        modes = {module: module.training for module in block.modules()}
        try:
            block.eval()  # no jitter: the comparison must be deterministic
            with torch.no_grad():
                expected = block(probe.clone())
                got = self.local_forward(probe.reshape(tokens, hidden_size))
        finally:
            for module, mode in modes.items():
                module.training = mode
        if isinstance(expected, tuple):
            expected = expected[0]
        expected = expected.reshape(tokens, hidden_size)
        error = (got - expected).abs().max().item()
        scale = expected.abs().max().item()
        tolerance = torch.finfo(expected.dtype).eps ** 0.5 * max(scale, 1e-6)
        if not error <= tolerance:
            raise TypeError(
                f"{self.block_type}'s forward is not gate -> experts -> weighted sum: "
                f"on random tokens it differs from that by {error:.3g} (output scale "
                f"{scale:.3g}). It has parts ReplicatedExperts would drop (shared experts, "
                f"scaling, extra routing?); supported: {SUPPORTED_BLOCKS} and blocks like them"
            )

    def _source(self) -> dict[str, nn.Parameter]:
        if self._experts is None:
            raise RuntimeError(
                f"this adapter of a {self.block_type} was detached from the block's experts "
                "(without_source); read expert states from the block's own adapter"
            )
        return dict(self._experts.named_parameters(recurse=False))

    def prepare(self, hidden: torch.Tensor, training: bool) -> torch.Tensor:
        if training and self.jitter_noise > 0:
            noise = torch.empty_like(hidden).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
            return hidden * noise
        return hidden

    def expert_state(self, expert: int) -> dict[str, torch.Tensor]:
        self.check_expert(expert)
        return {name: p[expert].detach().clone().contiguous() for name, p in self._source().items()}

    def load_expert_state(self, expert: int, state: Mapping[str, torch.Tensor]) -> None:
        self.check_expert(expert)
        params = self._source()
        _state_check({name: p[expert] for name, p in params.items()}, state, self.block_type)
        with torch.no_grad():
            for name, p in params.items():
                p[expert].copy_(state[name])

    def make_replica(self, expert: int) -> nn.Module:
        replica = _ExpertWeights(self.expert_state(expert))
        for name, p in self._source().items():
            getattr(replica, name).requires_grad_(p.requires_grad)
        return replica

    def run_expert(self, state: Mapping[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        stacked = {name: state[name].unsqueeze(0) for name in self._names}
        tokens = hidden.shape[0]
        index = torch.zeros(tokens, 1, dtype=torch.int64, device=hidden.device)
        weight = torch.ones(tokens, 1, dtype=hidden.dtype, device=hidden.device)
        return torch.func.functional_call(self._shell, stacked, (hidden, index, weight))

    def without_source(self) -> StackedExpertsAdapter:
        detached = copy.copy(self)
        detached._experts = None
        return detached


class ExpertListAdapter(MoEAdapter):
    """A router and a list of identical expert modules (same class, same tensor names and shapes).

    ``experts[e](hidden [T, H])`` must return ``[T, H]``. The router must
    follow the contract in the module docstring.
    """

    def __init__(self, router: nn.Module, experts: Sequence[nn.Module]) -> None:
        if not isinstance(router, nn.Module):
            raise TypeError(f"router is a {type(router).__name__}; expected an nn.Module")
        experts = list(experts)
        if not experts:
            raise ValueError("experts is empty; expected at least one expert module")
        first = experts[0]
        if not isinstance(first, nn.Module):
            raise TypeError(f"experts[0] is a {type(first).__name__}; expected an nn.Module")
        signature = self._signature(first)
        for e, expert in enumerate(experts[1:], start=1):
            if type(expert) is not type(first) or self._signature(expert) != signature:
                raise TypeError(
                    f"experts[{e}] ({type(expert).__name__}) differs from experts[0] "
                    f"({type(first).__name__}) in class or tensor names/shapes; expected "
                    "identical modules"
                )
        self.router = router
        self.num_experts = len(experts)
        self._experts: list[nn.Module] | None = experts
        tensors = [*first.parameters(), *first.buffers()]
        self._template = _weightless_copy(first, tensors)

    @staticmethod
    def _signature(module: nn.Module) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in _tensors(module).items()}

    def _source(self, expert: int) -> nn.Module:
        self.check_expert(expert)
        if self._experts is None:
            raise RuntimeError(
                "this adapter was detached from its expert modules (without_source); read "
                "expert states from the original adapter"
            )
        return self._experts[expert]

    def expert_state(self, expert: int) -> dict[str, torch.Tensor]:
        return {
            name: t.detach().clone().contiguous()
            for name, t in _tensors(self._source(expert)).items()
        }

    def load_expert_state(self, expert: int, state: Mapping[str, torch.Tensor]) -> None:
        tensors = _tensors(self._source(expert))
        _state_check(tensors, state, f"expert {expert}")
        with torch.no_grad():
            for name, t in tensors.items():
                t.copy_(state[name])

    def make_replica(self, expert: int) -> nn.Module:
        return copy.deepcopy(self._source(expert))

    def run_expert(self, state: Mapping[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self._template, dict(state), (hidden,))

    def without_source(self) -> ExpertListAdapter:
        detached = copy.copy(self)
        detached._experts = None
        return detached


def _hidden_size(router: nn.Module, block: nn.Module) -> int:
    """The model width, from the router (``hidden_dim`` or a ``[E, H]`` weight)."""
    size = getattr(router, "hidden_dim", None)
    weight = getattr(router, "weight", None)
    if size is None and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        size = weight.shape[1]
    if size is None:
        raise TypeError(
            f"cannot tell the hidden size of {type(block).__name__}: its router "
            f"{type(router).__name__} has neither `hidden_dim` nor a 2-D `weight`"
        )
    return int(size)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters and buffers by name: everything one expert's math reads."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def is_moe_block(module: nn.Module) -> bool:
    """Whether ``module`` looks like a block :class:`StackedExpertsAdapter` can take."""
    router, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    if not isinstance(router, nn.Module) or not isinstance(experts, nn.Module):
        return False
    stacked = list(experts.parameters(recurse=False))
    return bool(stacked) and len({p.shape[0] if p.dim() else -1 for p in stacked}) == 1


def moe_adapter(
    source: nn.Module | MoEAdapter, experts: Sequence[nn.Module] | None = None
) -> MoEAdapter:
    """The adapter for a block, or for ``(router, experts)`` when ``experts`` is given.

    ``source`` may already be an adapter (returned as is).
    """
    if isinstance(source, MoEAdapter):
        if experts is not None:
            raise TypeError("experts must not be given with an adapter")
        return source
    if experts is not None:
        return ExpertListAdapter(source, experts)
    if not isinstance(source, nn.Module):
        raise TypeError(
            f"got a {type(source).__name__}; expected an MoE block ({SUPPORTED_BLOCKS}), "
            "a (router, experts) pair or an MoEAdapter"
        )
    return StackedExpertsAdapter(source)
