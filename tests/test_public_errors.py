"""Errors for people: every public entry point rejects bad input and says what it expected.

One table over the public API of every package (the ``__all__`` of
``thrifty.compressors``, ``comm``, ``sync``, ``data``, ``mergecomp``,
``bytecomp``, ``zen``, ``lazarus``, ``marconi``, and the DDP hook). Each row is
a bad call, the exception it must raise, and a pattern its message must hold:
the bad value *and* what was expected. Wrong types, shapes and dtypes, NaN and
Inf, negative sizes, ratios outside their range, unknown names and world sizes
that do not match. A bare ``AttributeError`` from deep inside, an assertion or
a call that silently goes on does not pass.

Rows that need ``torch.distributed`` run on a one-rank gloo group of this
process (made once). The rows that need two ranks (ranks that disagree, state
saved by another world size) run together in one launch of two real gloo
processes; each rank reports what it raised, and the row checks that *every*
rank raised the same error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import thrifty.bytecomp as bytecomp
import thrifty.lazarus as lazarus
import thrifty.marconi as marconi
import thrifty.mergecomp as mergecomp
import thrifty.zen as zen
from thrifty.bench import run_ranks
from thrifty.comm import AlphaBeta, Measurement, NetworkModel, Topology, fit_network
from thrifty.compressors import default_memory, get_compressor, get_memory
from thrifty.data import ShareGPTReader, sharegpt_token_ids
from thrifty.sync import (
    GradientSync,
    Plan,
    RankMismatchError,
    Strategy,
    register_planner,
    register_sparse_scheme,
)
from thrifty.sync.ddp_hook import CompressionHookState
from thrifty.sync.profile import Profile, TensorProfile

NAN, INF = float("nan"), float("inf")
TWO_RANK_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- fixtures


class Env:
    """What rows need besides their arguments: a one-rank group and the two-rank outcomes.

    Both are made on first use, so a run of a few rows (``-k``) pays only for
    what it needs, and the two ranks are launched once for all their rows.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._outcomes: dict[str, Any] | None = None
        self._launch_error: BaseException | None = None  # a failed launch is not retried

    def world(self) -> None:
        """A gloo group of world size 1 in this process (a FileStore: no port to pick)."""
        if not dist.is_initialized():
            store = dist.FileStore(str(self.directory / "store"), 1)
            dist.init_process_group("gloo", store=store, rank=0, world_size=1)

    def two_ranks(self) -> dict[str, Any]:
        """Every two-rank case's outcome per rank, and the states rank 0 saved."""
        if self._launch_error is not None:
            raise self._launch_error
        if self._outcomes is None:
            self.world()
            saved = {
                "sync": _sync(_model()).state_dict(),
                "hook": CompressionHookState("topk", ratio=0.5).state_dict(),
            }
            try:
                results = run_ranks(_on_two_ranks, 2, saved, timeout=TWO_RANK_TIMEOUT_S)
            except BaseException as exc:
                self._launch_error = exc
                raise
            self._outcomes = {case: [r[case] for r in results] for case in results[0]}
        return self._outcomes

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    environment = Env(tmp_path_factory.mktemp("public-errors"))
    yield environment
    environment.close()


# --------------------------------------------------------------------------- helpers


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def _sync(model: Any, **kwargs: Any) -> GradientSync:
    kwargs.setdefault("compressor", "topk")
    if kwargs["compressor"] == "topk":
        kwargs.setdefault("ratio", 0.5)
    return GradientSync(model, **kwargs)


def _network() -> NetworkModel:
    return NetworkModel.analytic("1gbit", 1e9)


def _profile(world_size: int = 1) -> Profile:
    tensors = [
        TensorProfile("weight", 12, "float32", 1e-3),
        TensorProfile("bias", 3, "float32", 2e-3),
    ]
    return Profile(tensors, 0.01, 0.01, 1e-3, world_size)


def _sparse(values: list[float], size: int = 5) -> torch.Tensor:
    rows = torch.arange(len(values)).unsqueeze(0)
    return torch.sparse_coo_tensor(rows, torch.tensor(values), (size,), check_invariants=True)


def _cache() -> marconi.PrefixCache:
    return marconi.build_cache("marconi", 10**9, marconi.paper_hybrid_7b())


def _placement() -> lazarus.Placement:
    return lazarus.place_experts([2, 2], 2, 2)


def _topk() -> Any:
    return get_compressor("topk", ratio=0.5)


def _load_saved_by_two_ranks(env: Env, kind: str) -> None:
    """Load what rank 0 of the two-rank launch saved into this world of one."""
    state = env.two_ranks()[f"state:{kind}"][0]
    if kind == "sync":
        _sync(_model()).load_state_dict(state)
    else:
        CompressionHookState("topk", ratio=0.5).load_state_dict(state)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


# --------------------------------------------------------------------------- two ranks


def _outcome(call: Callable[[], object]) -> tuple[tuple[str, ...], str] | None:
    """None, or the raised error's class names (its MRO) and message."""
    try:
        call()
    except Exception as exc:
        return tuple(c.__name__ for c in type(exc).__mro__), str(exc)
    return None


def _on_two_ranks(saved: dict[str, Any]) -> dict[str, Any]:
    """One rank of the single two-rank launch: run every case, report what each raised."""
    rank = dist.get_rank()
    nan_on_rank_1 = [1.0, NAN] if rank == 1 else [1.0, 2.0]
    cases: dict[str, Callable[[], object]] = {
        "model_width": lambda: _sync(nn.Linear(8, 4 + rank), plan="whole"),
        "name_on_one_rank": lambda: _sync(_model(), compressor="topk" if rank == 0 else "nope"),
        "sync_state_of_world_1": lambda: _sync(_model()).load_state_dict(saved["sync"]),
        "hook_state_of_world_1": lambda: CompressionHookState("topk", ratio=0.5).load_state_dict(
            saved["hook"]
        ),
        "sparse_shape_differs": lambda: zen.sync_sparse(_sparse([1.0, 2.0], size=5 + rank)),
        "sparse_nan_on_rank_1": lambda: zen.sync_sparse(_sparse(nan_on_rank_1)),
    }
    report: dict[str, Any] = {name: _outcome(call) for name, call in cases.items()}
    # The state this world of two saves, for the rows that load it into a world of one.
    report["state:sync"] = _sync(_model()).state_dict()  # every rank builds: a collective
    report["state:hook"] = CompressionHookState("topk", ratio=0.5).state_dict()
    return report


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    """``call(env)`` must raise ``error`` whose message matches ``match`` (``re.search``).

    A row with ``case`` instead checks the two-rank outcome of that case:
    every rank raised ``error`` with the same message.
    """

    call: Callable[[Env], object] | None
    error: type[Exception]
    match: str
    case: str | None = None


def row(call: Callable[[Env], object], error: type[Exception], match: str, name: str) -> Any:
    return pytest.param(Row(call, error, match), id=name)


def on_every_rank(case: str, error: type[Exception], match: str) -> Any:
    return pytest.param(Row(None, error, match, case), id=f"two_ranks-{case}")


ROWS = [
    # ---------------------------------------------------------------- thrifty.compressors
    row(
        lambda env: get_compressor("nope"),
        ValueError,
        r"unknown compressor 'nope'; available: .*topk",
        "get_compressor-unknown_name",
    ),
    row(
        lambda env: get_compressor("topk", ratio=1.5),
        ValueError,
        r"ratio must be in \(0, 1\], got 1\.5",
        "get_compressor-ratio_above_1",
    ),
    row(
        lambda env: get_compressor("topk", ratio=-0.1),
        ValueError,
        r"ratio must be in \(0, 1\], got -0\.1",
        "get_compressor-ratio_negative",
    ),
    row(
        lambda env: get_compressor("dgc", ratio=NAN),
        ValueError,
        r"ratio must be in \(0, 1\], got nan",
        "get_compressor-ratio_nan",
    ),
    row(
        lambda env: get_compressor("randomk", ratio="0.1"),
        TypeError,
        r"ratio must be a number in \(0, 1\], got '0\.1'",
        "get_compressor-ratio_string",
    ),
    row(
        lambda env: get_compressor("topk", rato=0.1),
        TypeError,
        r"topk takes no option 'rato'; its options: .*ratio",
        "get_compressor-misspelt_option",
    ),
    row(
        lambda env: get_compressor("powersgd", rank=2.5),
        TypeError,
        r"rank must be an int >= 1, got 2\.5",
        "get_compressor-powersgd_rank_float",
    ),
    row(
        lambda env: get_compressor("powersgd", rank=0),
        ValueError,
        r"rank must be >= 1, got 0",
        "get_compressor-powersgd_rank_0",
    ),
    row(
        lambda env: get_compressor("qsgd", levels="8"),
        TypeError,
        r"levels must be an int in \[1, 32767\], got '8'",
        "get_compressor-qsgd_levels_string",
    ),
    row(
        lambda env: get_compressor("signum", momentum=NAN),
        ValueError,
        r"momentum must be in \[0, 1\), got nan",
        "get_compressor-signum_momentum_nan",
    ),
    row(
        lambda env: _topk().compress("abc"),
        TypeError,
        r"must be a torch\.Tensor, got <class 'str'>",
        "compress-string",
    ),
    row(
        lambda env: _topk().compress(torch.arange(4)),
        TypeError,
        r"has dtype torch\.int64; expected a floating-point dtype",
        "compress-int_tensor",
    ),
    row(
        lambda env: _topk().compress(torch.tensor([1.0, NAN, 2.0]), key="fc.weight"),
        ValueError,
        r"tensor 'fc\.weight' contains 1 NaN, 0 \+Inf and 0 -Inf values out of 3",
        "compress-nan",
    ),
    row(
        lambda env: _topk().compress(torch.tensor([1.0, -INF])),
        ValueError,
        r"contains 0 NaN, 0 \+Inf and 1 -Inf values out of 2",
        "compress-inf",
    ),
    row(
        lambda env: _topk().decompress((torch.zeros(3), torch.zeros(3, dtype=torch.int32)), 4),
        ValueError,
        r"payload tensor 0 with shape \(3,\) .* expected shape \(2,\)",
        "decompress-wrong_payload_shape",
    ),
    row(
        lambda env: _topk().decompress((torch.zeros(1), torch.zeros(1, dtype=torch.int32)), -4),
        ValueError,
        r"numel must be an int >= 0, got -4",
        "decompress-negative_numel",
    ),
    row(
        lambda env: _topk().payload_nbytes(-4),
        ValueError,
        r"numel must be an int >= 0, got -4",
        "payload_nbytes-negative_numel",
    ),
    row(
        lambda env: _topk().aggregate([(torch.zeros(2),)], 4),
        ValueError,
        r"aggregate got 1 payload tensors for numel 4, expected 2",
        "aggregate-wrong_payload_count",
    ),
    row(
        lambda env: get_memory("nope"),
        ValueError,
        r"unknown memory 'nope'; available: dgc, none, residual",
        "get_memory-unknown_name",
    ),
    row(
        lambda env: default_memory("nope"),
        ValueError,
        r"unknown compressor 'nope'; available: .*topk",
        "default_memory-unknown_name",
    ),
    row(
        lambda env: get_memory("residual", beta=NAN),
        ValueError,
        r"beta must be a finite number, got nan",
        "get_memory-residual_beta_nan",
    ),
    row(
        lambda env: get_memory("dgc", momentum=1.5),
        ValueError,
        r"momentum must be in \[0, 1\), got 1\.5",
        "get_memory-dgc_momentum",
    ),
    row(
        lambda env: get_memory("dgc", gradient_clipping=NAN),
        ValueError,
        r"gradient_clipping must be a positive number, got nan",
        "get_memory-dgc_clipping_nan",
    ),
    row(
        lambda env: get_memory("dgc", momentun=0.5),
        TypeError,
        r"dgc takes no option 'momentun'; its options: .*momentum",
        "get_memory-misspelt_option",
    ),
    row(
        lambda env: get_memory("residual").compensate("abc", key="fc.weight"),
        TypeError,
        r"tensor 'fc\.weight' must be a torch\.Tensor, got str",
        "memory_compensate-string",
    ),
    # ---------------------------------------------------------------- thrifty.comm
    row(
        lambda env: NetworkModel.analytic("link", 0),
        ValueError,
        r"rate_bits must be a finite number > 0 bits/s, got 0",
        "NetworkModel.analytic-zero_rate",
    ),
    row(
        lambda env: NetworkModel.analytic("link", NAN),
        ValueError,
        r"rate_bits must be a finite number > 0 bits/s, got nan",
        "NetworkModel.analytic-nan_rate",
    ),
    row(
        lambda env: NetworkModel.analytic("link", 1e9, latency=-1e-3),
        ValueError,
        r"latency must be a finite number >= 0 seconds, got -0\.001",
        "NetworkModel.analytic-negative_latency",
    ),
    row(
        lambda env: _network().time("all_reduce", -100, 2),
        ValueError,
        r"nbytes must be >= 0, got -100",
        "NetworkModel.time-negative_size",
    ),
    row(
        lambda env: _network().time("all_reduce", NAN, 2),
        ValueError,
        r"nbytes must be >= 0, got nan",
        "NetworkModel.time-nan_size",
    ),
    row(
        lambda env: _network().time("all_reduce", 100, 0),
        ValueError,
        r"world_size must be an int >= 1, got 0",
        "NetworkModel.time-world_size_0",
    ),
    row(
        lambda env: _network().time("broadcast", 100, 2),
        ValueError,
        r"unknown primitive 'broadcast'; expected all_reduce, all_gather, all_to_all",
        "NetworkModel.time-unknown_primitive",
    ),
    row(
        lambda env: NetworkModel.fit(
            "link",
            [Measurement("all_reduce", 2, 1000, NAN), Measurement("all_reduce", 2, 2000, 0.1)],
        ),
        ValueError,
        r"seconds must be a finite time > 0 .*nan",
        "NetworkModel.fit-nan_time",
    ),
    row(
        lambda env: AlphaBeta(NAN, 1e-9),
        ValueError,
        r"alpha must be a finite number >= 0, got nan",
        "AlphaBeta-nan",
    ),
    row(
        lambda env: AlphaBeta(1e-5, -1e-9),
        ValueError,
        r"beta must be a finite number >= 0, got -1e-09",
        "AlphaBeta-negative",
    ),
    row(
        lambda env: Topology(0, 1, _network()),
        ValueError,
        r"need at least one node and one rank per node, got nodes=0",
        "Topology-zero_nodes",
    ),
    row(
        lambda env: Topology(1, 2, "1gbit"),
        TypeError,
        r"flat must be a NetworkModel, got str '1gbit'",
        "Topology-string_network",
    ),
    row(
        lambda env: (env.world(), fit_network("link", primitives=("broadcast",))),
        ValueError,
        r"unknown primitives \['broadcast'\]; expected some of",
        "fit_network-unknown_primitive",
    ),
    # ---------------------------------------------------------------- thrifty.sync
    row(
        lambda env: (env.world(), GradientSync("model")),
        TypeError,
        r"model must be a torch\.nn\.Module, got str",
        "GradientSync-string_model",
    ),
    row(
        lambda env: (env.world(), GradientSync(torch.zeros(3))),
        TypeError,
        r"model must be a torch\.nn\.Module, got Tensor",
        "GradientSync-tensor_model",
    ),
    row(
        lambda env: (env.world(), _sync(_model(), compressor="nope")),
        ValueError,
        r"unknown compressor 'nope'; available: .*topk",
        "GradientSync-unknown_compressor",
    ),
    row(
        lambda env: (env.world(), _sync(_model(), ratio=1.5)),
        ValueError,
        r"ratio must be in \(0, 1\], got 1\.5",
        "GradientSync-ratio_above_1",
    ),
    row(
        lambda env: (env.world(), _sync(_model(), plan="nope")),
        ValueError,
        r"unknown plan 'nope': not 'layerwise', 'whole' nor a registered planner",
        "GradientSync-unknown_plan",
    ),
    row(
        lambda env: (env.world(), _sync(_model(), collective="broadcast")),
        ValueError,
        r"unknown collective 'broadcast'; expected one of \('all_reduce'",
        "GradientSync-unknown_collective",
    ),
    row(
        lambda env: (env.world(), _sync(_model(), memory="nope")),
        ValueError,
        r"unknown memory 'nope'; expected one of \('default', 'dgc', 'none', 'residual'\)",
        "GradientSync-unknown_memory",
    ),
    row(
        lambda env: (env.world(), _sync(_model(), nonfinite="ignore")),
        ValueError,
        r"nonfinite must be one of .*'raise'.*, got 'ignore'",
        "GradientSync-unknown_nonfinite",
    ),
    row(
        lambda env: (env.world(), _sync(_model(), timeout=NAN)),
        ValueError,
        r"timeout must be > 0 seconds \(or None\), got nan",
        "GradientSync-timeout_nan",
    ),
    row(
        lambda env: (env.world(), _sync(_model(), timeout="5")),
        TypeError,
        r"timeout must be a number of seconds, a timedelta or None, got '5'",
        "GradientSync-timeout_string",
    ),
    row(
        lambda env: (env.world(), _sync(_model(), sparse_scheme=42)),
        TypeError,
        r"sparse_scheme must be a registered name, .*got int",
        "GradientSync-sparse_scheme_int",
    ),
    row(
        lambda env: (env.world(), _sync(_model(), sparse_scheme="nope")),
        ValueError,
        r"unknown sparse scheme 'nope' \(registered: \[.*'zen'",
        "GradientSync-unknown_sparse_scheme",
    ),
    row(
        lambda env: (env.world(), _sync(_model(), ranks_per_node=0)),
        ValueError,
        r"ranks_per_node must be >= 1, got 0",
        "GradientSync-ranks_per_node_0",
    ),
    row(
        lambda env: (env.world(), _sync(_model(), process_group="world")),
        TypeError,
        r"process_group must be a torch\.distributed\.ProcessGroup or None, got str 'world'",
        "GradientSync-string_process_group",
    ),
    row(
        lambda env: (env.world(), _sync(_model(), plan=Plan.layer_wise(["weight"]))),
        ValueError,
        r"plan does not cover .* missing \['bias'\]",
        "GradientSync-plan_missing_parameter",
    ),
    row(
        lambda env: (env.world(), _sync(_model()).set_plan("whole")),
        TypeError,
        r"set_plan needs a Plan, got str 'whole'",
        "GradientSync.set_plan-string",
    ),
    row(
        lambda env: (env.world(), _sync(_model()).load_state_dict({"weights": 1})),
        ValueError,
        r"not a GradientSync state dict \(format 'thrifty\.GradientSync/1' expected, got None\)",
        "GradientSync.load_state_dict-foreign_dict",
    ),
    row(
        lambda env: _load_saved_by_two_ranks(env, "sync"),
        ValueError,
        r"GradientSync state was saved by 2 ranks, this job has 1",
        "GradientSync.load_state_dict-world_2_into_1",
    ),
    row(
        lambda env: Strategy.make("topk", memory="nope", ratio=0.1),
        ValueError,
        r"unknown memory 'nope'; expected one of .*'residual'",
        "Strategy.make-unknown_memory",
    ),
    row(
        lambda env: Plan.contiguous(["weight", "bias"], [1, 2]),
        ValueError,
        r"group lengths \[1, 2\] must be positive and sum to 2",
        "Plan.contiguous-bad_lengths",
    ),
    row(
        lambda env: register_planner("mine", 42),
        TypeError,
        r"planner factory for 'mine' must be callable, got int 42",
        "register_planner-not_callable",
    ),
    row(
        lambda env: register_sparse_scheme("mine", "zen"),
        TypeError,
        r"sparse scheme factory for 'mine' must be callable, got str 'zen'",
        "register_sparse_scheme-not_callable",
    ),
    row(
        lambda env: CompressionHookState("nope"),
        ValueError,
        r"unknown compressor 'nope'; available: .*topk",
        "CompressionHookState-unknown_compressor",
    ),
    row(
        lambda env: CompressionHookState("topk", ratio=0.5, timeout="5"),
        TypeError,
        r"timeout must be a number of seconds, a timedelta or None, got '5'",
        "CompressionHookState-timeout_string",
    ),
    row(
        lambda env: _load_saved_by_two_ranks(env, "hook"),
        ValueError,
        r"CompressionHookState was saved by 2 ranks, this job has 1",
        "CompressionHookState.load_state_dict-world_2_into_1",
    ),
    # ---------------------------------------------------------------- thrifty.data
    row(
        lambda env: sharegpt_token_ids(-1),
        ValueError,
        r"max_tokens must be >= 1, got -1",
        "sharegpt_token_ids-negative",
    ),
    row(
        lambda env: ShareGPTReader(chunk_chars=0),
        ValueError,
        r"chunk_chars must be an int >= 1, got 0",
        "ShareGPTReader-chunk_0",
    ),
    # ---------------------------------------------------------------- thrifty.mergecomp
    row(
        lambda env: mergecomp.MergeComp(mode="offline"),
        ValueError,
        r"mode must be 'hybrid' or 'online', got 'offline'",
        "MergeComp-unknown_mode",
    ),
    row(
        lambda env: mergecomp.MergeComp(warmup=0),
        ValueError,
        r"warmup and trial_iters must be >= 1, got warmup=0 and trial_iters=3",
        "MergeComp-warmup_0",
    ),
    row(
        lambda env: mergecomp.MergeComp(network="1gbit"),
        TypeError,
        r"network must be a NetworkModel or None, got str '1gbit'",
        "MergeComp-string_network",
    ),
    row(
        lambda env: mergecomp.schedule(_profile(), "nope", _network()),
        ValueError,
        r"unknown compressor 'nope'; available: .*topk",
        "schedule-unknown_compressor",
    ),
    row(
        lambda env: mergecomp.schedule(_profile(), "topk", "1gbit", ratio=0.1),
        TypeError,
        r"network must be a NetworkModel, got str '1gbit'",
        "schedule-string_network",
    ),
    row(
        lambda env: mergecomp.optimal_partition(_profile(), Strategy.make(), _network(), -2),
        ValueError,
        r"world_size must be an int >= 1 \(or None for the profile's\), got -2",
        "optimal_partition-negative_world_size",
    ),
    row(
        lambda env: mergecomp.partition_time(_profile(), Strategy.make(), _network(), [1, 5]),
        ValueError,
        r"lengths \[1, 5\] do not cover 2 tensors",
        "partition_time-bad_lengths",
    ),
    # ---------------------------------------------------------------- thrifty.bytecomp
    row(
        lambda env: bytecomp.decide(_profile(), "nope", _network()),
        ValueError,
        r"unknown compressor 'nope'; available: .*topk",
        "decide-unknown_compressor",
    ),
    row(
        lambda env: bytecomp.decide(_profile(2), None, Topology(1, 4, _network())),
        ValueError,
        r"profile was taken for 2 ranks, topology has 4",
        "decide-world_size_mismatch",
    ),
    row(
        lambda env: bytecomp.decide(_profile(), None, _network(), bucket_bytes=-1),
        ValueError,
        r"bucket_bytes must be 'auto' or a byte count >= 0, got -1",
        "decide-negative_bucket",
    ),
    row(
        lambda env: bytecomp.ByteComp(warmup=0),
        ValueError,
        r"warmup must be >= 1, got 0",
        "ByteComp-warmup_0",
    ),
    row(
        lambda env: bytecomp.ByteComp(bucket_bytes=-5),
        ValueError,
        r"bucket_bytes must be 'auto' or a byte count >= 0, got -5",
        "ByteComp-negative_bucket",
    ),
    row(
        lambda env: bytecomp.ByteComp(offload_end="middle"),
        ValueError,
        r"offload_end must be 'output' or 'input', got 'middle'",
        "ByteComp-unknown_offload_end",
    ),
    row(
        lambda env: bytecomp.Constraints(max_compressions=-1),
        ValueError,
        r"max_compressions must be None or an int >= 0, got -1",
        "Constraints-negative",
    ),
    row(
        lambda env: (
            env.world(),
            _sync(
                _model(),
                compressor="randomk",
                ratio=0.5,
                plan=bytecomp.ByteComp(
                    profile=_profile(2), topology=Topology.single_node(_network(), 2)
                ),
            ),
        ),
        ValueError,
        r"ByteComp was given a profile of 2 ranks and a topology of 2 ranks, this job has 1",
        "ByteComp-world_size_mismatch",
    ),
    # ---------------------------------------------------------------- thrifty.zen
    row(
        lambda env: (env.world(), zen.sync_sparse(torch.zeros(5))),
        zen.SparseSyncError,
        r"expected a sparse COO tensor .* got a dense \(strided\) tensor",
        "sync_sparse-dense_tensor",
    ),
    row(
        lambda env: (env.world(), zen.sync_sparse("abc")),
        zen.SparseSyncError,
        r"expected a torch sparse COO tensor, got something that is not a tensor",
        "sync_sparse-string",
    ),
    row(
        lambda env: (
            env.world(),
            zen.sync_sparse(
                torch.sparse_coo_tensor(
                    torch.tensor([[0]]), torch.tensor([1]), (5,), check_invariants=True
                )
            ),
        ),
        zen.SparseSyncError,
        r"values must be floating point \(.*\), got torch\.int64",
        "sync_sparse-int_values",
    ),
    row(
        lambda env: (env.world(), zen.sync_sparse(_sparse([1.0, NAN]))),
        zen.SparseSyncError,
        r"rank 0: 1 value\(s\) are NaN or Inf",
        "sync_sparse-nan",
    ),
    row(
        lambda env: (env.world(), zen.sync_sparse(_sparse([INF, -INF]))),
        zen.SparseSyncError,
        r"rank 0: 2 value\(s\) are NaN or Inf",
        "sync_sparse-inf",
    ),
    row(
        lambda env: (env.world(), zen.sync_sparse(_sparse([1.0]), scheme="nope")),
        zen.SparseSyncError,
        r"unknown sparse scheme 'nope'; expected one of \[.*'zen'\]",
        "sync_sparse-unknown_scheme",
    ),
    row(
        lambda env: (env.world(), zen.sync_sparse(_sparse([1.0]), output="coo")),
        zen.SparseSyncError,
        r"output must be 'sparse' or 'dense', got 'coo'",
        "sync_sparse-unknown_output",
    ),
    row(
        lambda env: zen.make_scheme("nope"),
        ValueError,
        r"unknown sparse scheme 'nope'; expected one of \[.*'zen'\]",
        "make_scheme-unknown_name",
    ),
    row(
        lambda env: zen.make_scheme("zen", sed=3),
        TypeError,
        r"zen takes no option 'sed'; its options: .*seed",
        "make_scheme-misspelt_option",
    ),
    row(
        lambda env: zen.AutoScheme(criterion="fastest"),
        ValueError,
        r"criterion must be one of \('paper', 'bytes', 'time', 'model'\), got 'fastest'",
        "AutoScheme-unknown_criterion",
    ),
    row(
        lambda env: zen.AutoScheme(profile_steps=0),
        ValueError,
        r"profile_steps must be >= 1, got 0",
        "AutoScheme-profile_steps_0",
    ),
    row(
        lambda env: zen.measure_sparsity([torch.tensor([0, 1])], num_rows=-1),
        ValueError,
        r"num_rows must be an int >= 1, got -1",
        "measure_sparsity-negative_rows",
    ),
    row(
        lambda env: zen.measure_sparsity([torch.tensor([0.5, 1.0])], num_rows=4),
        TypeError,
        r"index_sets\[0\] must be a 1-D integer tensor of row indices, got torch\.float32",
        "measure_sparsity-float_indices",
    ),
    row(
        lambda env: zen.measure_sparsity([torch.tensor([0, 1]), torch.tensor([0, 9])], num_rows=4),
        ValueError,
        r"index_sets\[1\] holds row 9, outside 0\.\.3 \(num_rows=4\)",
        "measure_sparsity-index_out_of_range",
    ),
    row(
        lambda env: zen.predict_wire_bytes(
            "nope", zen.measure_sparsity([torch.tensor([0])], num_rows=4)
        ),
        ValueError,
        r"unknown scheme 'nope'; expected one of",
        "predict_wire_bytes-unknown_scheme",
    ),
    # ---------------------------------------------------------------- thrifty.lazarus
    row(
        lambda env: lazarus.allocate_replicas([1.0, NAN], 2, 2),
        ValueError,
        r"loads\[1\]=nan is not finite",
        "allocate_replicas-nan_load",
    ),
    row(
        lambda env: lazarus.allocate_replicas([1.0, "a"], 2, 2),
        TypeError,
        r"loads\[1\]='a' is not a number",
        "allocate_replicas-string_load",
    ),
    row(
        lambda env: lazarus.allocate_replicas([1.0, -1.0], 2, 2),
        ValueError,
        r"loads\[1\]=-1\.0 is negative: token loads are counts >= 0",
        "allocate_replicas-negative_load",
    ),
    row(
        lambda env: lazarus.allocate_replicas([1.0, 1.0], 0, 2),
        ValueError,
        r"nodes=0: need at least one node",
        "allocate_replicas-zero_nodes",
    ),
    row(
        lambda env: lazarus.Placement((), 2),
        ValueError,
        r"a placement needs at least one node",
        "Placement-no_nodes",
    ),
    row(
        lambda env: lazarus.recovery_probability(_placement(), -1),
        ValueError,
        r"failed=-1: expected 0 <= failed <= 2 nodes",
        "recovery_probability-negative_failed",
    ),
    row(
        lambda env: lazarus.recovery_probability(
            _placement(), 1, method="monte_carlo", tolerance=1.5
        ),
        ValueError,
        r"tolerance=1\.5: expected 0 < tolerance < 1",
        "recovery_probability-tolerance",
    ),
    row(
        lambda env: lazarus.recovery_estimate(_placement(), 1, confidence=NAN),
        ValueError,
        r"confidence=nan: expected 0 < confidence < 1",
        "recovery_estimate-nan_confidence",
    ),
    row(
        lambda env: lazarus.place_experts([2, 2], 0, 2),
        ValueError,
        r"need nodes >= 1 and slots_per_node >= 1, got 0 and 2",
        "place_experts-zero_nodes",
    ),
    row(
        lambda env: lazarus.place_experts([2, 2], 2, 1),
        ValueError,
        r"replicas sum to 4 but 2 nodes x 1 slots = 2",
        "place_experts-slots_mismatch",
    ),
    row(
        lambda env: lazarus.search_placement([2, 2], 2, 2, min_distinct=0),
        ValueError,
        r"min_distinct=0: expected >= 1",
        "search_placement-min_distinct_0",
    ),
    row(
        lambda env: lazarus.plan_dispatch(torch.tensor([[1.5, 2.0]]), torch.tensor([[1, 1]])),
        ValueError,
        r"token_counts must hold integer counts, got 1\.5",
        "plan_dispatch-fractional_counts",
    ),
    row(
        lambda env: lazarus.plan_dispatch(torch.tensor([[1, 2]]), torch.tensor([[1, 1, 1]])),
        ValueError,
        r"token_counts has shape \(1, 2\) and replica_counts \(1, 3\)",
        "plan_dispatch-shape_mismatch",
    ),
    row(
        lambda env: lazarus.plan_dispatch(torch.tensor([1, 2]), torch.tensor([1, 1])),
        ValueError,
        r"token_counts must be a \[ranks, experts\] matrix, got shape \(2,\)",
        "plan_dispatch-1d",
    ),
    row(
        lambda env: lazarus.SimConfig(nodes=0),
        ValueError,
        r"nodes=0: expected an integer >= 1",
        "SimConfig-zero_nodes",
    ),
    row(
        lambda env: lazarus.SimConfig(step_s=NAN),
        ValueError,
        r"step_s=nan: expected a finite number > 0",
        "SimConfig-nan_step",
    ),
    row(
        lambda env: lazarus.simulate(lazarus.SimConfig(), [], "torchrun"),
        ValueError,
        r"system='torchrun': expected one of \('lazarus'",
        "lazarus.simulate-unknown_system",
    ),
    row(
        lambda env: lazarus.simulate(lazarus.SimConfig(), [(NAN, 1)], "lazarus"),
        ValueError,
        r"trace\[0\]=\(nan, 1\): time must be a finite number of seconds",
        "lazarus.simulate-nan_trace_time",
    ),
    row(
        lambda env: lazarus.simulate_all(lazarus.SimConfig(), mtbf_s=-1),
        ValueError,
        r"mtbf_s=-1: expected > 0 seconds",
        "simulate_all-negative_mtbf",
    ),
    row(
        lambda env: lazarus.LazarusOptions(slots_per_rank=0),
        ValueError,
        r"slots_per_rank=0, fault_tolerance=2: expected >= 1",
        "LazarusOptions-zero_slots",
    ),
    row(
        lambda env: lazarus.LazarusOptions(failure_timeout_s=NAN),
        ValueError,
        r"failure_timeout_s=nan: expected 0 < interval < timeout",
        "LazarusOptions-nan_timeout",
    ),
    row(
        lambda env: lazarus.MoEGPT(lazarus.MoEConfig(d_model=64, heads=3)),
        ValueError,
        r"d_model=64 must be divisible by heads=3",
        "MoEConfig-heads",
    ),
    row(
        lambda env: lazarus.MoEGPT("small"),
        TypeError,
        r"cfg must be a MoEConfig, got str 'small'",
        "MoEGPT-string_config",
    ),
    row(
        lambda env: lazarus.LazarusConfig(workers=0),
        ValueError,
        r"workers=0: expected >= 1",
        "LazarusConfig-zero_workers",
    ),
    row(
        lambda env: lazarus.Lazarus("model", _sgd),
        TypeError,
        r"model must be a torch\.nn\.Module, got str",
        "Lazarus-string_model",
    ),
    row(
        lambda env: lazarus.Lazarus(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters())),
        TypeError,
        r"optimizer must be a factory",
        "Lazarus-optimizer_instance",
    ),
    row(
        lambda env: lazarus.ExpertGradSync([], method="allreduce"),
        ValueError,
        r"method 'allreduce' is unknown; expected one of \('alltoall'",
        "ExpertGradSync-unknown_method",
    ),
    row(
        lambda env: lazarus.replicate_moe_blocks("model", [0]),
        TypeError,
        r"model must be a torch\.nn\.Module, got str",
        "replicate_moe_blocks-string_model",
    ),
    # ---------------------------------------------------------------- thrifty.marconi
    row(
        lambda env: marconi.build_cache("lru", 10**9, marconi.paper_hybrid_7b()),
        ValueError,
        r"unknown policy 'lru'; expected one of \('vllm\+', 'sglang\+', 'marconi'",
        "build_cache-unknown_policy",
    ),
    row(
        lambda env: marconi.build_cache("marconi", 0, marconi.paper_hybrid_7b()),
        ValueError,
        r"capacity_bytes must be a finite number > 0, got 0",
        "build_cache-zero_capacity",
    ),
    row(
        lambda env: marconi.build_cache("marconi", NAN, marconi.paper_hybrid_7b()),
        ValueError,
        r"capacity_bytes must be a finite number > 0, got nan",
        "build_cache-nan_capacity",
    ),
    row(
        lambda env: marconi.build_cache("sglang+", "1GB", marconi.paper_hybrid_7b()),
        TypeError,
        r"capacity_bytes must be a number of bytes, got str '1GB'",
        "build_cache-string_capacity",
    ),
    row(
        lambda env: marconi.build_cache("marconi", 10**9, marconi.paper_hybrid_7b(), alpha=-1),
        ValueError,
        r"alpha must be a finite number >= 0, got -1",
        "build_cache-negative_alpha",
    ),
    row(
        lambda env: marconi.build_cache("marconi", 10**9, marconi.paper_hybrid_7b(), alpha=NAN),
        ValueError,
        r"alpha must be a finite number >= 0, got nan",
        "build_cache-nan_alpha",
    ),
    row(
        lambda env: marconi.build_cache("vllm+", 10**9, marconi.paper_hybrid_7b(), block_size=0),
        ValueError,
        r"block_size must be >= 1, got 0",
        "build_cache-block_size_0",
    ),
    row(
        lambda env: marconi.build_cache("marconi", 10**9, "hybrid-7b"),
        TypeError,
        r"spec must be a ModelSpec .*, got str 'hybrid-7b'",
        "build_cache-string_spec",
    ),
    row(
        lambda env: marconi.PrefixCache(10**9, marconi.paper_hybrid_7b(), "marconi", "lru"),
        TypeError,
        r"admission must be an admission policy .*, got str 'marconi'",
        "PrefixCache-string_policies",
    ),
    row(
        lambda env: _cache().lookup(torch.tensor([1, 2, 3])),
        TypeError,
        r"input_tokens must be a list of token ids \(ints >= 0\), got Tensor; .*tolist",
        "PrefixCache.lookup-tensor_tokens",
    ),
    row(
        lambda env: _cache().serve("hello world", [1]),
        TypeError,
        r"input_tokens must be a list of token ids \(ints >= 0\), got str",
        "PrefixCache.serve-string_tokens",
    ),
    row(
        lambda env: marconi.Request(1, 0, 0.0, [5, -1], [2]),
        ValueError,
        r"input_tokens\[1\]=-1: token ids must be ints >= 0",
        "Request-negative_token_id",
    ),
    row(
        lambda env: marconi.Request(1, 0, 0.0, [5], [2.5]),
        ValueError,
        r"output_tokens\[0\]=2\.5: token ids must be ints >= 0",
        "Request-float_token_id",
    ),
    row(
        lambda env: marconi.simulate(marconi.synthetic_trace(num_sessions=1), "lru", 10**9),
        ValueError,
        r"unknown policy 'lru'; expected one of",
        "marconi.simulate-unknown_policy",
    ),
    row(
        lambda env: marconi.simulate(marconi.synthetic_trace(num_sessions=1), "marconi", -1),
        ValueError,
        r"capacity_bytes must be a finite number > 0, got -1",
        "marconi.simulate-negative_capacity",
    ),
    row(
        lambda env: marconi.simulate("sharegpt", "marconi", 10**9),
        TypeError,
        r"trace must be a Trace .*, got str 'sharegpt'",
        "marconi.simulate-string_trace",
    ),
    row(
        lambda env: marconi.sweep(marconi.synthetic_trace(num_sessions=1), ["lru"]),
        ValueError,
        r"unknown policy 'lru'; expected one of",
        "sweep-unknown_policy",
    ),
    row(
        lambda env: marconi.synthetic_trace(num_sessions=-1),
        ValueError,
        r"num_sessions must be an int >= 1, got -1",
        "synthetic_trace-negative_sessions",
    ),
    row(
        lambda env: marconi.synthetic_trace(agent_fraction=1.5),
        ValueError,
        r"agent_fraction must be in \[0, 1\], got 1\.5",
        "synthetic_trace-fraction_above_1",
    ),
    row(
        lambda env: marconi.load_trace(source="arxiv"),
        ValueError,
        r"unknown trace source 'arxiv'; expected one of \('sharegpt', 'synthetic'\)",
        "load_trace-unknown_source",
    ),
    row(
        lambda env: marconi.TTFTModel(intercept_ms=NAN),
        ValueError,
        r"intercept_ms must be a finite number of milliseconds, got nan",
        "TTFTModel-nan",
    ),
    row(
        lambda env: marconi.read_jsonl(_write(env, "bad.jsonl", {"session_id": 1})),
        marconi.TraceFormatError,
        r"bad\.jsonl:1: missing field\(s\) turn_id, ts, input_tokens, output_tokens",
        "read_jsonl-missing_fields",
    ),
    # ---------------------------------------------------------------- two ranks, one launch
    on_every_rank(
        "model_width",
        RankMismatchError,
        r"parameter 'weight': shape differs across ranks: rank 0 \(4, 8\), rank 1 \(5, 8\)",
    ),
    on_every_rank(
        "name_on_one_rank",
        RankMismatchError,
        r"an error on some ranks only: rank 0 none, rank 1 ValueError: unknown compressor 'nope'",
    ),
    on_every_rank(
        "sync_state_of_world_1",
        ValueError,
        r"GradientSync state was saved by 1 ranks, this job has 2",
    ),
    on_every_rank(
        "hook_state_of_world_1",
        ValueError,
        r"CompressionHookState was saved by 1 ranks, this job has 2",
    ),
    on_every_rank(
        "sparse_shape_differs",
        zen.SparseSyncError,
        r"same shape.*rank 0: torch\.float32 \(5,\).*rank 1: torch\.float32 \(6,\)",
    ),
    on_every_rank(
        "sparse_nan_on_rank_1",
        zen.SparseSyncError,
        r"bad input on rank 1: 1 value\(s\) are NaN or Inf",
    ),
]


def _write(env: Env, name: str, obj: dict[str, Any]) -> Path:
    path = env.directory / name
    path.write_text(json.dumps(obj) + "\n")
    return path


@pytest.mark.parametrize("bad", ROWS)
def test_public_entry_point_rejects_bad_input_and_names_it(bad: Row, env: Env) -> None:
    if bad.case is None:
        assert bad.call is not None
        with pytest.raises(bad.error) as info:
            bad.call(env)
        message = str(info.value)
    else:
        outcomes = env.two_ranks()[bad.case]
        assert all(o is not None for o in outcomes), f"a rank raised nothing: {outcomes}"
        assert len(set(outcomes)) == 1, f"ranks raised different errors: {outcomes}"
        mro, message = outcomes[0]
        assert bad.error.__name__ in mro, f"expected {bad.error.__name__}, got {mro[0]}: {message}"
    assert re.search(bad.match, message), f"{message!r} does not match {bad.match!r}"
