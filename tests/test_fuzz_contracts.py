"""Fuzzed contracts of every compressor and every Zen scheme (issue 19, item 6).

Random shapes (empty, one element, several dims), non-contiguous inputs,
fp16/bf16/fp32 values from tiny to huge, and for the engine frozen and unused
parameters. The property everywhere: the synchronised sum (or mean) equals the
dense sum within the compressor's *own* error bound (:data:`ERROR_BOUNDS`, one
line of reason each), exactly for the lossless path.

* Single-process properties (no group) use ``@given`` in the test process:
  payloads, ``decompress``, ``aggregate``, ``allreduce_rounds`` driven locally,
  and error feedback.
* Multi-rank properties run on two real gloo ranks (``run_ranks``), started
  once per test; each rank runs the same derandomised hypothesis loop (no
  shrinking, which could desynchronise the ranks) and draws its own data from
  the example's seed and its rank. Every example ends with every rank's verdict
  gathered (:func:`_agree`), so a failure raises on every rank at once and no
  rank is left waiting in a collective.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from thrifty.bench import run_ranks
from thrifty.compressors import Compressor, available_compressors, default_memory, get_compressor
from thrifty.compressors.memory import DGCMemory, Memory, NoMemory, ResidualMemory
from thrifty.compressors.rounds import run_allreduce_rounds_locally
from thrifty.sync import GradientSync, Plan, Strategy
from thrifty.sync.plan import has_feedback
from thrifty.zen import SCHEMES, make_scheme, sync_sparse

# ---------------------------------------------------------------------- rounding

# Unit roundoff (round to nearest) and the smallest subnormal of each dtype: a
# cast or an addition in ``dtype`` errs by at most ``U * |value| + TINY``.
U: dict[torch.dtype, float] = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}
TINY: dict[torch.dtype, float] = {
    torch.float64: 0.0,
    torch.float32: 2.0**-149,
    torch.float16: 2.0**-24,
    torch.bfloat16: 2.0**-133,
}
U32 = U[torch.float32]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _f64(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).to(torch.float64)


def _within(got: Tensor, want: Tensor, tol: Tensor | float, what: str) -> None:
    """Elementwise ``|got - want| <= tol``; the message names the first element that is not."""
    got, want = _f64(got), _f64(want)
    tol = torch.as_tensor(tol, dtype=torch.float64)
    tol = (tol.reshape(-1) if tol.dim() else tol).expand_as(got)
    bad = ((got - want).abs() > tol) | (got.isnan() != want.isnan())
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: element {i} of {got.numel()} is {got[i].item()!r}, expected "
            f"{want[i].item()!r} within {tol[i].item()!r} ({int(bad.sum())} elements off)"
        )


def _amax(x: Tensor) -> Tensor:
    """Largest |x| (0 for an empty tensor)."""
    return x.abs().max() if x.numel() else torch.zeros((), dtype=torch.float64)


def _vote(xs: Sequence[Tensor]) -> Tensor:
    """``sign(sum_i sign(x_i))`` with the sign methods' convention: 0 counts as +1."""
    return torch.sign(sum(torch.where(_f64(x) >= 0, 1.0, -1.0) for x in xs))  # type: ignore[arg-type]


# ------------------------------------------------------------- the bounds table

# A check of one rank: (compressor, x = what it compressed, flat float32,
# sent = its decompressed payload, slack = extra elementwise tolerance for
# a ``sent`` recovered from error feedback). Raises AssertionError.
OneCheck = Callable[[Compressor, Tensor, Tensor, Tensor], None]
# A check of the sum over ranks: (compressor, xs = every rank's input,
# total = what the sum came out as, slack). Raises AssertionError.
TotalCheck = Callable[[Compressor, Sequence[Tensor], Tensor, Tensor], None]


@dataclass(frozen=True)
class ErrorBound:
    """A compressor's own error bound, for one rank's payload and for the sum over ranks."""

    reason: str
    one: OneCheck
    total: TotalCheck


def _one_exact(c: Compressor, x: Tensor, sent: Tensor, slack: Tensor) -> None:
    _within(sent, x, slack, f"{c.name}: sent")


def _total_fp32_sum(c: Compressor, xs: Sequence[Tensor], total: Tensor, slack: Tensor) -> None:
    abs_sum = sum(_f64(x).abs() for x in xs)
    tol = (len(xs) - 1) * U32 * abs_sum + slack
    _within(total, sum(_f64(x) for x in xs), tol, f"{c.name}: sum")  # type: ignore[arg-type]


def _cast(wire: torch.dtype) -> tuple[OneCheck, TotalCheck]:
    """A cast to ``wire``: each value within ``U|x| + TINY``; the sum, summed in ``wire``, too."""
    # TINY doubled: the engine casts x / n and multiplies back by n (n = 2).
    u, tiny = U[wire], 2 * TINY[wire]

    def one(c: Compressor, x: Tensor, sent: Tensor, slack: Tensor) -> None:
        _within(sent, x, u * _f64(x).abs() + tiny + slack, f"{c.name}: sent")

    def total(c: Compressor, xs: Sequence[Tensor], t: Tensor, slack: Tensor) -> None:
        n = len(xs)
        abs_sum = sum(_f64(x).abs() for x in xs)
        tol = 2 * n * u * abs_sum + n * tiny + slack
        _within(t, sum(_f64(x) for x in xs), tol, f"{c.name}: sum")  # type: ignore[arg-type]

    return one, total


def _sparsified(by_magnitude: bool) -> tuple[OneCheck, TotalCheck]:
    """Each entry sent exactly (times numel/k when scaled) or not at all; at most k sent."""

    def factor(c: Compressor, numel: int) -> float:
        k = c.k_for(numel)  # type: ignore[attr-defined]
        return numel / k if getattr(c, "scale", False) and k else 1.0

    def one(c: Compressor, x: Tensor, sent: Tensor, slack: Tensor) -> None:
        x, sent, slack = _f64(x), _f64(sent), _f64(slack)
        f = factor(c, x.numel())
        rounding = (2 * U32 * f * x.abs() if f != 1.0 else 0.0) + slack
        dropped = sent.abs() <= slack
        exact = (sent - f * x).abs() <= rounding
        assert bool((dropped | exact).all()), f"{c.name}: sent values that are not inputs: {sent}"
        kept = ~dropped & (x != 0)
        k = c.k_for(x.numel())  # type: ignore[attr-defined]
        assert int(kept.sum()) <= k, f"{c.name}: sent {int(kept.sum())} entries, k = {k}"
        left = dropped & ~exact  # non-zero inputs that were not sent
        if by_magnitude and bool(left.any()):
            assert int(kept.sum()) == k, f"{c.name}: sent {int(kept.sum())} < k = {k} entries"
            biggest_left = x[left].abs().max()
            assert biggest_left <= x[kept].abs().min(), (
                f"{c.name}: left out |x| = {biggest_left.item()} but sent smaller entries"
            )

    def total(c: Compressor, xs: Sequence[Tensor], t: Tensor, slack: Tensor) -> None:
        numel = xs[0].numel()
        f = factor(c, numel)
        abs_sum = sum(_f64(x).abs() for x in xs)
        tol = max(f - 1.0, 1.0) * abs_sum * (1 + 4 * U32) + slack
        _within(t, sum(_f64(x) for x in xs), tol, f"{c.name}: sum")  # type: ignore[arg-type]
        sent = int((_f64(t).abs() > _f64(slack)).sum())
        limit = len(xs) * c.k_for(numel)  # type: ignore[attr-defined]
        assert sent <= limit, f"{c.name}: {sent} non-zero sums, at most {limit} entries were sent"

    return one, total


def _one_qsgd(c: Compressor, x: Tensor, sent: Tensor, slack: Tensor) -> None:
    s = c.levels  # type: ignore[attr-defined]
    x, sent = _f64(x), _f64(sent)
    norm = float(x.norm())
    rounding = 4 * U32 * norm + _f64(slack)
    _within(sent, x, norm / s + rounding, f"qsgd(levels={s}): sent")
    assert bool((sent * x >= -rounding).all()), "qsgd: a sent value has the wrong sign"
    if norm > 0 and not bool(_f64(slack).any()):
        level = sent * s / norm
        off_grid = (level - level.round()).abs().max() if level.numel() else 0.0
        assert off_grid <= 1e-3, f"qsgd: a value is {off_grid} off the grid of {s} levels"


def _total_per_rank(per_rank: Callable[[Compressor, Tensor], Tensor]) -> TotalCheck:
    """The sum errs by at most the sum of each rank's largest error ``per_rank(c, x)``."""

    def total(c: Compressor, xs: Sequence[Tensor], t: Tensor, slack: Tensor) -> None:
        tol = sum(per_rank(c, _f64(x)) for x in xs) * (1 + 1e-5) + slack
        _within(t, sum(_f64(x) for x in xs), tol, f"{c.name}: sum")  # type: ignore[arg-type]

    return total


def _one_terngrad(c: Compressor, x: Tensor, sent: Tensor, slack: Tensor) -> None:
    x, sent = _f64(x), _f64(sent)
    top = _amax(x)
    ternary = (sent.abs() <= _f64(slack)) | ((sent - torch.sign(x) * top).abs() <= _f64(slack))
    assert bool(ternary.all()), f"terngrad: sent {sent} is not in {{-m, 0, m}}·sign(x), m = {top}"


def _total_terngrad(c: Compressor, xs: Sequence[Tensor], total: Tensor, slack: Tensor) -> None:
    # Each rank's t_i * s_i errs by at most s_i <= the largest |x| of any rank.
    top = max((float(_f64(x).abs().max()) for x in xs if x.numel()), default=0.0)
    tol = len(xs) * top * (1 + 4 * U32) + _f64(slack)
    _within(total, sum(_f64(x) for x in xs), tol, "terngrad: sum")  # type: ignore[arg-type]


def _one_sign(c: Compressor, x: Tensor, sent: Tensor, slack: Tensor) -> None:
    # Signum on its first step: the momentum (1 - beta) x has the sign of x.
    _within(sent, torch.where(_f64(x) >= 0, 1.0, -1.0), slack, f"{c.name}: sent")


def _total_vote(c: Compressor, xs: Sequence[Tensor], total: Tensor, slack: Tensor) -> None:
    _within(total, len(xs) * _vote(xs), slack, f"{c.name}: majority vote")


def _one_efsign(c: Compressor, x: Tensor, sent: Tensor, slack: Tensor) -> None:
    x = _f64(x)
    scale = x.abs().sum() / max(x.numel(), 1)
    want = torch.where(x >= 0, scale, -scale)
    _within(sent, want, 2 * x.numel() * U32 * scale + _f64(slack), "efsignsgd: sent")


def _one_onebit(c: Compressor, x: Tensor, sent: Tensor, slack: Tensor) -> None:
    x = _f64(x)
    positive = x >= 0
    mean_pos = x[positive].mean() if bool(positive.any()) else torch.zeros(())
    mean_neg = x[~positive].mean() if bool((~positive).any()) else torch.zeros(())
    want = torch.where(positive, mean_pos, mean_neg)
    biggest = _amax(x)
    _within(sent, want, 2 * x.numel() * U32 * biggest + _f64(slack), "onebit: sent")


def _total_onebit(c: Compressor, xs: Sequence[Tensor], total: Tensor, slack: Tensor) -> None:
    # Each side's sum is kept: the sum of every element of the total is the true one.
    want = sum(float(_f64(x).sum()) for x in xs)
    scale = sum(float(_f64(x).abs().sum()) for x in xs) + float(_f64(total).abs().sum())
    tol = 4 * max(total.numel(), 1) * U32 * scale + float(_f64(slack).sum())
    got = float(_f64(total).sum())
    assert abs(got - want) <= tol, f"onebit: the total sums to {got}, the inputs to {want}"
    _total_per_rank(lambda c, x: x.abs() + _amax(x))(c, xs, total, slack)


def _one_powersgd(c: Compressor, x: Tensor, sent: Tensor, slack: Tensor) -> None:
    if not c.compresses(x.numel()):  # type: ignore[attr-defined]
        _within(sent, x, slack, "powersgd: a small tensor is sent raw")
        return
    # decompress = P_hat P_hat^T M: an orthogonal projection, so it never adds error.
    x, sent = _f64(x), _f64(sent)
    err, size = float((x - sent).norm()), float(x.norm())
    tol = size * 1e-4 + float(_f64(slack).norm())
    assert err <= size + tol, f"powersgd: ||x - sent|| = {err} > ||x|| = {size}"


def _total_powersgd(c: Compressor, xs: Sequence[Tensor], total: Tensor, slack: Tensor) -> None:
    # All-reduce: a projection of the sum; all-gather: a sum of projections.
    want = sum(_f64(x) for x in xs)
    err = float((_f64(total) - want).norm())  # type: ignore[operator]
    bound = sum(float(_f64(x).norm()) for x in xs)
    tol = bound * 1e-4 + float(_f64(slack).norm())
    assert err <= bound + tol, f"powersgd: ||sum - total|| = {err} > sum ||x_i|| = {bound}"


ERROR_BOUNDS: dict[str, ErrorBound] = {
    "none": ErrorBound(
        "lossless: float32 as it is; only the sum rounds", _one_exact, _total_fp32_sum
    ),
    "fp16": ErrorBound(
        "IEEE half: relative 2**-11 plus half a subnormal (|x| < 65504, as documented)",
        *_cast(torch.float16),
    ),
    "bf16": ErrorBound("bfloat16: relative 2**-8, float32's range", *_cast(torch.bfloat16)),
    "topk": ErrorBound("exactly the k largest |x|, sent exactly; nothing else", *_sparsified(True)),
    "randomk": ErrorBound(
        "k entries sent exactly (times numel/k when scaled); nothing else", *_sparsified(False)
    ),
    "dgc": ErrorBound(
        "k entries, all at least the k-th largest |x|, sent exactly", *_sparsified(True)
    ),
    "qsgd": ErrorBound(
        "stochastic rounding to the grid ||x||_2 * j / s: one grid step off at most, same sign",
        _one_qsgd,
        _total_per_rank(lambda c, x: x.norm() / c.levels + 4 * U32 * x.norm()),  # type: ignore[attr-defined]
    ),
    "terngrad": ErrorBound(
        "sign(x) * max|x| or 0 per element: off by at most max|x| (the shared max on all-reduce)",
        _one_terngrad,
        _total_terngrad,
    ),
    "signsgd": ErrorBound(
        "the sign (+1 for 0); the sum is N times the majority vote", _one_sign, _total_vote
    ),
    "signum": ErrorBound(
        "first step: the momentum's sign is the input's; N times the majority vote",
        _one_sign,
        _total_vote,
    ),
    "efsignsgd": ErrorBound(
        "sign(x) times the mean |x|", _one_efsign, _total_per_rank(lambda c, x: 2 * _amax(x))
    ),
    "onebit": ErrorBound(
        "each side of 0 sent as its mean: both sides' sums kept", _one_onebit, _total_onebit
    ),
    "powersgd": ErrorBound(
        "orthogonal projection onto rank r (raw when too small): ||x - sent|| <= ||x||",
        _one_powersgd,
        _total_powersgd,
    ),
}
"""Each registered compressor's own error bound, the tolerance of every property below."""

VOTE_COMPRESSORS = ("signsgd", "signum")  # aggregate is N * the majority vote, not a sum


# ------------------------------------------------------------------ strategies

OPTIONS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "none": st.just({}),
    "fp16": st.just({}),
    "bf16": st.just({}),
    "topk": st.fixed_dictionaries({"ratio": st.sampled_from([0.01, 0.1, 0.5, 1.0])}),
    "randomk": st.fixed_dictionaries(
        {
            "ratio": st.sampled_from([0.01, 0.3, 1.0]),
            "scale": st.booleans(),
            "shared_seed": st.sampled_from([None, 7]),
        }
    ),
    "dgc": st.fixed_dictionaries(
        {
            "ratio": st.sampled_from([0.01, 0.2, 1.0]),
            "min_samples": st.sampled_from([1, 16, 1024]),  # small: the sampled threshold
            "threshold_margin": st.sampled_from([0.0, 3.0]),
        }
    ),
    "qsgd": st.fixed_dictionaries({"levels": st.sampled_from([1, 3, 127, 255])}),
    "terngrad": st.just({}),
    "signsgd": st.just({}),
    "efsignsgd": st.just({}),
    "signum": st.fixed_dictionaries({"momentum": st.sampled_from([0.0, 0.9])}),
    "onebit": st.just({}),
    "powersgd": st.fixed_dictionaries(
        {"rank": st.sampled_from([1, 2, 4]), "min_compression_rate": st.sampled_from([1.0, 2.0])}
    ),
}
"""Each compressor's options to fuzz (with its defaults among them)."""

PATTERNS = ("normal", "zeros", "ties", "sparse")


def _values(shape: Sequence[int], seed: int, scale: float, pattern: str) -> Tensor:
    """float32 values of ``shape``: random normal, all zero, +-scale ties, or mostly zero."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=gen) * scale
    if pattern == "zeros":
        return torch.zeros(*shape)
    if pattern == "ties":
        return torch.where(base >= 0, scale, -scale)
    if pattern == "sparse":
        return base * (torch.rand(*shape, generator=gen) < 0.2)
    return base


def _laid_out(t: Tensor, layout: str) -> Tensor:
    """``t`` (same values) as a contiguous, a transposed or a strided (every other) tensor."""
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout in ("transposed", "strided"):
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


SHAPES = st.one_of(
    st.lists(st.integers(0, 5), min_size=1, max_size=3).map(tuple),
    st.sampled_from([(0,), (1,), (1, 1), (7,), (40, 33), (300,), (2, 0, 3)]),
)


def _scales(dtype: torch.dtype) -> list[float]:
    # fp16 holds neither 1e-30 nor 1e20; float32 and bfloat16 hold both.
    return [1e-6, 1.0, 1e3] if dtype == torch.float16 else [1e-30, 1e-6, 1.0, 1e3, 1e20]


@st.composite
def rank_inputs(draw: st.DrawFn, compressor: str = "") -> tuple[list[Tensor], int]:
    """Inputs of 1-4 ranks: one shape and dtype, each rank's own values and layout."""
    shape = draw(SHAPES)
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    scales = _scales(dtype)
    if compressor == "fp16":  # documented: beyond +-65504 FP16 saturates to Inf
        scales = [s for s in scales if s <= 1e3]
    scale = draw(st.sampled_from(scales))
    world = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31))
    pattern = draw(st.sampled_from(PATTERNS))
    xs = []
    for rank in range(world):
        layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
        values = _values(shape, seed + rank, scale, pattern).to(dtype)
        xs.append(_laid_out(values, layout))
    return xs, seed


def _flat32(x: Tensor) -> Tensor:
    return x.reshape(-1).to(torch.float32)


LOCAL = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------- single process


def test_every_compressor_has_a_bound_and_options() -> None:
    assert set(ERROR_BOUNDS) == set(available_compressors())
    assert set(OPTIONS) == set(available_compressors())


@pytest.mark.parametrize("name", available_compressors())
@LOCAL
@given(data=st.data())
def test_payloads_obey_the_bound_and_aggregate_to_their_sum(name: str, data: st.DataObject) -> None:
    """Each rank's decompressed payload obeys the bound; ``aggregate`` is their sum (or vote)."""
    options = data.draw(OPTIONS[name])
    xs, seed = data.draw(rank_inputs(name))
    torch.manual_seed(seed)
    bound = ERROR_BOUNDS[name]
    compressors = [get_compressor(name, **options) for _ in xs]
    numel = xs[0].numel()
    payloads, sents = [], []
    for c, x in zip(compressors, xs, strict=True):
        before = x.clone()
        payload = c.compress(x, key="w")
        assert torch.equal(x, before), f"{name}: compress changed its input"
        specs = c.payload_spec(numel)
        assert len(payload) == len(specs) and all(
            s.matches(p) for s, p in zip(specs, payload, strict=True)
        ), f"{name}: payload {[(p.shape, p.dtype) for p in payload]} is not {specs}"
        sent = c.decompress(payload, numel, key="w")
        assert sent.dtype == torch.float32 and sent.shape == (numel,)
        bound.one(c, _flat32(x), sent, torch.zeros(numel))
        payloads.append(payload)
        sents.append(sent)
    total = compressors[0].aggregate(payloads, numel, key="w")
    if name in VOTE_COMPRESSORS:
        _within(total, len(xs) * _vote(sents), 0.0, f"{name}: aggregate")
    else:
        tol = (len(xs) - 1) * U32 * sum(_f64(s).abs() for s in sents)
        _within(total, sum(_f64(s) for s in sents), tol, f"{name}: aggregate")  # type: ignore[arg-type]
    bound.total(compressors[0], [_flat32(x) for x in xs], total, torch.zeros(numel))


ALLREDUCE_NAMES = [
    n
    for n in available_compressors()
    if n == "randomk" or get_compressor(n).supports_allreduce_rounds
]


@pytest.mark.parametrize("name", ALLREDUCE_NAMES)
@LOCAL
@given(data=st.data())
def test_allreduce_rounds_obey_the_bound_and_agree(name: str, data: st.DataObject) -> None:
    """``allreduce_rounds`` of every rank, reduced as gloo does: one result, within the bound."""
    options = data.draw(OPTIONS[name])
    if name == "randomk":
        options["shared_seed"] = 7  # the all-reducible form
    xs, seed = data.draw(rank_inputs(name))
    torch.manual_seed(seed)
    compressors = [get_compressor(name, **options) for _ in xs]
    results = run_allreduce_rounds_locally(compressors, xs, key="w")
    for r in results[1:]:
        assert torch.equal(r, results[0]), f"{name}: ranks got different sums"
    numel = xs[0].numel()
    ERROR_BOUNDS[name].total(
        compressors[0], [_flat32(x) for x in xs], results[0], torch.zeros(numel)
    )


def _residual(memory: Memory, key: str) -> Tensor | None:
    state = memory.export_state(key)
    return state.get("residual", state.get("velocity"))


@pytest.mark.parametrize("name", available_compressors())
@LOCAL
@given(data=st.data(), steps=st.integers(1, 4), lossless_memory=st.booleans())
def test_error_feedback_loses_nothing(
    name: str, data: st.DataObject, steps: int, lossless_memory: bool
) -> None:
    """Residual + sent = what was compressed, every step; without decay, over all steps too.

    ``lossless_memory`` uses ``ResidualMemory()`` (beta = 1) or, for the
    sparsifiers, their DGC memory without momentum: then the inputs of all
    steps add up to everything sent plus the final residual.
    """
    options = data.draw(OPTIONS[name])
    xs, seed = data.draw(rank_inputs(name))
    torch.manual_seed(seed)
    compressor = get_compressor(name, **options)
    memory = default_memory(name)
    if lossless_memory:
        memory = DGCMemory(momentum=0.0) if isinstance(memory, DGCMemory) else ResidualMemory()
    inputs, sents = [], []
    work = torch.zeros(xs[0].numel(), dtype=torch.float64)
    for step in range(steps):
        g = xs[step % len(xs)] * (step + 1)
        compensated = memory.compensate(g, "w")
        if isinstance(memory, NoMemory):
            assert torch.equal(compensated, g.reshape(-1)), "NoMemory changed the gradient"
        payload = compressor.compress(compensated, "w")
        sent = compressor.decompress(payload, compensated.numel(), "w")
        memory.update("w", compensated, sent)
        residual = _residual(memory, "w")
        if residual is not None:  # nothing lost in this step
            tol = U32 * (_f64(compensated).abs() + _f64(sent).abs() + _f64(residual).abs())
            _within(_f64(residual) + _f64(sent), compensated, tol, f"{name}: residual + sent")
            work = work + _f64(compensated).abs() + _f64(residual).abs()
        inputs.append(_flat32(g))
        sents.append(sent)
    residual = _residual(memory, "w")
    if lossless_memory and residual is not None:
        total_in = sum(_f64(g) for g in inputs)
        total_out = sum(_f64(s) for s in sents) + _f64(residual)
        _within(total_out, total_in, 2 * U32 * work, f"{name}: inputs vs sent + residual")


# ---------------------------------------------------------------- many ranks

IN_RANKS: dict[str, Any] = {
    "derandomize": True,  # every rank draws the same examples
    "database": None,
    "phases": [Phase.explicit, Phase.generate],  # no shrinking: it could desynchronise ranks
    "deadline": None,
    "suppress_health_check": list(HealthCheck),  # timing-based checks could differ by rank
}


def _agree(problem: str | None) -> None:
    """Gather every rank's verdict on this example; raise the same AssertionError on all if any."""
    verdicts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, problem)
    bad = [f"rank {r}: {v}" for r, v in enumerate(verdicts) if v]
    if bad:
        raise AssertionError("; ".join(bad))


def _verdict(check: Callable[[], None]) -> str | None:
    """None when ``check()`` passes, else what went wrong (any exception, not only asserts)."""
    try:
        check()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of the fuzzed model: its shape, dtype, memory layout and role."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str  # contiguous, transposed or strided
    role: str  # used (on every rank), unused (on some ranks, by the rank's draw), frozen


PARAM_SHAPES = st.one_of(
    st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple),
    st.sampled_from([(1,), (9, 7), (2, 0), (0, 3), (30,)]),
)
PARAM_SPECS = st.builds(
    ParamSpec,
    shape=PARAM_SHAPES,
    dtype=st.sampled_from(FLOAT_DTYPES),
    layout=st.sampled_from(["contiguous", "transposed", "strided"]),
    role=st.sampled_from(["used", "used", "unused", "frozen"]),
)


class FuzzNet(nn.Module):
    """An ``anchor`` (used on every rank, so every rank runs backward) and the drawn parameters."""

    def __init__(self, specs: Sequence[ParamSpec]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.weights = nn.ParameterList(
            nn.Parameter(
                _laid_out(torch.zeros(s.shape, dtype=s.dtype), s.layout),
                requires_grad=s.role != "frozen",
            )
            for s in specs
        )


def _trainable_order(model: nn.Module) -> list[str]:
    """GradientSync's backward order: trainable parameters, last registered first."""
    return [n for n, p in reversed(list(model.named_parameters())) if p.requires_grad]


@st.composite
def sync_strategies(draw: st.DrawFn) -> Strategy:
    """Any compressor (or none) on any collective it allows, any memory, offloaded or not.

    The divisible scheme (``all_to_all``) compresses twice; its check needs the
    error feedback of both compressions, so compressed ``all_to_all`` groups
    get a memory with feedback (see :func:`test_vote_on_the_divisible_path`
    for the vote compressors without one).
    """
    name = draw(st.sampled_from([None, *available_compressors()]))
    if name is None:
        collective = draw(st.sampled_from(["all_reduce", "all_to_all"]))
        return Strategy(None, (), collective, hierarchical=draw(st.booleans()))  # type: ignore[arg-type]
    options = draw(OPTIONS[name])
    memory = draw(st.sampled_from(["default", "none", "residual", "dgc"]))
    probe = Strategy.make(name, "all_gather", memory, **options)
    collectives = ["all_gather"]
    if get_compressor(name, **options).supports_allreduce_rounds:
        collectives.append("all_reduce")
    if has_feedback(probe.build_memory()):
        collectives.append("all_to_all")
    collective = draw(st.sampled_from(collectives))
    return Strategy.make(name, collective, memory, offload=draw(st.booleans()), **options)


def _group_compressor(strategy: Strategy, params: Sequence[Tensor]) -> Compressor:
    """The compressor as the engine builds it for a group (PowerSGD sees a lone weight's shape)."""
    c = strategy.build_compressor()
    assert c is not None
    lone = params[0] if len(params) == 1 else None
    if (
        lone is not None
        and lone.dim() >= 2
        and getattr(c, "shape", "absent") is None
        and strategy.collective != "all_to_all"
    ):
        c.shape = (lone.shape[0], lone.numel() // lone.shape[0])  # type: ignore[attr-defined]
    return c


def _reports_own_sent(c: Compressor, numel: int) -> bool:
    """On all-reduce, error feedback sees this rank's own payload (else the mean, by convention)."""
    specs = c.payload_spec(numel)
    rounds = c.allreduce_round_specs(numel)
    return len(specs) == 1 and len(rounds) == 1 and rounds[0].spec == specs[0]


def _memory_residual(state: dict[str, Any], slot: str) -> Tensor:
    """The residual (or DGC velocity) a group's ``slot`` holds in a GradientSync state dict."""
    entry = state[slot]
    kind = "residual" if "residual" in entry else "velocity"
    assert bool(entry[f"set_{kind}"]), f"{slot}: no {kind} after a step"
    return entry[kind].to(torch.float32)


def _check_group(
    strategy: Strategy,
    params: Sequence[nn.Parameter],
    xs: Sequence[Tensor],
    got: Tensor,
    states: Sequence[dict[str, Any]],
    dense_sum: Tensor,
) -> None:
    """The averaged gradient of one plan group against the dense all-reduce ``dense_sum``.

    ``xs`` holds every rank's input gradient (flat fp32, zeros where unused),
    ``got`` the mean written to ``.grad`` (identical on every rank, checked
    before), ``states`` every rank's GradientSync state of this group.
    """
    n, numel = len(xs), got.numel()
    # .grad is written in the parameter's dtype: one more rounding.
    cast_slack = torch.cat(
        [
            U[p.dtype] * _f64(got[o : o + p.numel()]).abs() + TINY[p.dtype]
            for p, o in zip(params, _offsets(params), strict=True)
        ]
        or [torch.zeros(0, dtype=torch.float64)]
    )
    if strategy.compressor is None:  # lossless: bit for bit the dense mean, cast
        want = torch.cat(
            [
                (dense_sum[o : o + p.numel()] / n).to(p.dtype).float()
                for p, o in zip(params, _offsets(params), strict=True)
            ]
            or [torch.zeros(0)]
        )
        assert torch.equal(got, want), f"{strategy.label()}: {got} != dense mean {want}"
        return
    name = strategy.compressor
    c = _group_compressor(strategy, params)
    bound = ERROR_BOUNDS[name]
    feedback = has_feedback(strategy.build_memory())
    if strategy.collective == "all_to_all":
        _check_divisible(c, xs, got, states, cast_slack)
        return
    if feedback and (strategy.collective != "all_reduce" or _reports_own_sent(c, numel)):
        # What each rank sent is what its error feedback did not keep.
        residuals = [_memory_residual(s, "memory") for s in states]
        sents = [x - r for x, r in zip(xs, residuals, strict=True)]
        slacks = [U32 * (_f64(x).abs() + _f64(r).abs()) for x, r in zip(xs, residuals, strict=True)]
        for x, sent, slack in zip(xs, sents, slacks, strict=True):
            bound.one(c, x, sent, slack)
        if name in VOTE_COMPRESSORS:
            _within(got, _vote(xs), cast_slack, f"{strategy.label()}: the vote")
            return
        wire = torch.float32
        if strategy.collective == "all_reduce":
            wire = c.allreduce_round_specs(numel)[0].spec.dtype
        abs_sent = sum(_f64(s).abs() for s in sents)
        tol = ((n - 1) * U[wire] * abs_sent + sum(slacks)) / n + cast_slack
        want = sum(_f64(s) for s in sents) / n  # type: ignore[operator]
        _within(got, want, tol, f"{strategy.label()}: mean of what was sent")
        return
    if strategy.collective == "all_reduce" and c.allreduce_compatible:  # payloads of x / n
        bound.total(c, [x / n for x in xs], got, cast_slack)
    else:
        bound.total(c, xs, got * n, cast_slack * n)


def _check_divisible(
    c: Compressor,
    xs: Sequence[Tensor],
    got: Tensor,
    states: Sequence[dict[str, Any]],
    cast_slack: Tensor,
) -> None:
    """All-to-all of compressed shards, then the re-compressed sums: nothing is lost.

    Rank ``i`` sent ``sent_i`` (its input less its residual) shard by shard;
    rank ``j`` summed shard ``j`` of all of them, re-compressed the sum and
    kept the rest in its second residual. So ``n * mean + second residuals``
    must give back the sum of what was sent.
    """
    n, numel = len(xs), got.numel()
    shard = math.ceil(numel / n) if numel else 0
    padded = [torch.cat([x, torch.zeros(shard * n - numel)]) for x in xs]
    residuals = [_memory_residual(s, "memory") for s in states]
    sents = [x - r for x, r in zip(padded, residuals, strict=True)]
    slacks = [U32 * (_f64(x).abs() + _f64(r).abs()) for x, r in zip(padded, residuals, strict=True)]
    for x, sent, slack in zip(padded, sents, slacks, strict=True):
        for j in range(n):
            part = slice(j * shard, (j + 1) * shard)
            ERROR_BOUNDS[c.name].one(c, x[part], sent[part], slack[part])
    vote = c.name in VOTE_COMPRESSORS
    summed = n * _vote(sents) if vote else sum(_f64(s) for s in sents)
    second = torch.cat([_memory_residual(s, "second_memory") for s in states])
    scale = (
        n * _f64(got).abs()
        + _f64(second[:numel]).abs()
        + _f64(sum(_f64(s).abs() for s in sents))[:numel]
    )
    tol = 4 * U32 * scale + sum(slacks)[:numel] + n * cast_slack
    _within(n * _f64(got) + _f64(second[:numel]), summed[:numel], tol, f"{c.name}/all_to_all")


def _offsets(params: Sequence[Tensor]) -> list[int]:
    out, offset = [], 0
    for p in params:
        out.append(offset)
        offset += p.numel()
    return out


@st.composite
def sync_cases(draw: st.DrawFn) -> dict[str, Any]:
    """A model, a plan over its trainable parameters (a strategy per group) and the data."""
    specs = draw(st.lists(PARAM_SPECS, min_size=0, max_size=4))
    trainable = 1 + sum(s.role != "frozen" for s in specs)
    cuts = draw(st.sets(st.integers(1, trainable - 1))) if trainable > 1 else set()
    bounds = [0, *sorted(cuts), trainable]
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    strategies = [draw(sync_strategies()) for _ in lengths]
    uses_fp16 = any(s.compressor == "fp16" for s in strategies)
    scales = [1e-6, 1.0, 1e3] if uses_fp16 else _scales(torch.float32)
    return {
        "specs": specs,
        "lengths": lengths,
        "strategies": strategies,
        "seed": draw(st.integers(0, 2**31)),
        "scale": draw(st.sampled_from(scales)),
        "pattern": draw(st.sampled_from(PATTERNS)),
    }


def _run_sync_case(case: dict[str, Any]) -> None:
    """Build, backward once, then check every group on every rank (raises AssertionError)."""
    rank = dist.get_rank()
    torch.manual_seed(case["seed"] + rank)  # the stochastic compressors' own draws
    model = FuzzNet(case["specs"])
    plan = Plan.contiguous(_trainable_order(model), case["lengths"], case["strategies"])
    sync = GradientSync(model, plan=plan)
    gen = torch.Generator().manual_seed(case["seed"] * 8 + rank)
    roles = {"anchor": "used"} | {f"weights.{i}": s.role for i, s in enumerate(case["specs"])}
    inputs: dict[str, Tensor] = {}
    loss = torch.zeros(())
    for i, (name, p) in enumerate(model.named_parameters()):
        role = roles[name]
        if role == "frozen" or (role == "unused" and bool(torch.rand((), generator=gen) < 0.5)):
            inputs[name] = torch.zeros(p.numel())
            continue
        scale = min(case["scale"], 1e3) if p.dtype == torch.float16 else case["scale"]
        target = _values(p.shape, case["seed"] * 64 + 2 * i + rank, scale, case["pattern"])
        target = target.to(p.dtype)
        loss = loss + (p * target).sum().float()  # d loss / d p = target, exactly
        inputs[name] = target.reshape(-1).float()
    loss.backward()
    params = dict(model.named_parameters())
    grads = {k: p.grad.float().reshape(-1) for k, p in params.items() if p.grad is not None}
    order = plan.names
    dense_sum = torch.cat([inputs[k] for k in order])
    dist.all_reduce(dense_sum)  # the reference: a plain dense all-reduce
    # Every collective comes before any check, so a failed check leaves no rank waiting.
    everyone, xs_by_rank = _gather(grads), _gather(inputs)
    states = _gather(sync.state_dict()["ranks"][str(rank)])
    sync.remove()
    frozen = [k for k, p in params.items() if not p.requires_grad]
    assert not set(frozen) & set(grads), f"frozen parameters got gradients: {sorted(grads)}"
    assert set(grads) == set(order), f"gradients of {sorted(grads)}, expected {sorted(order)}"
    for k, g in grads.items():
        assert all(torch.equal(e[k], g) for e in everyone), f"{k}: ranks got different grads"
    for gi, group in enumerate(plan.groups):
        names = group.names
        offset = sum(params[k].numel() for k in order[: order.index(names[0])])
        size = sum(params[k].numel() for k in names)
        _check_group(
            group.strategy,
            [params[k] for k in names],
            [torch.cat([x[k] for k in names]) for x in xs_by_rank],
            torch.cat([grads[k] for k in names]),
            [s[str(gi)] for s in states],
            dense_sum[offset : offset + size],
        )


def fuzz_gradient_sync(max_examples: int) -> int:
    """On every rank: ``max_examples`` drawn models and plans, each checked on every rank."""
    count = 0

    @settings(max_examples=max_examples, **IN_RANKS)
    @given(case=sync_cases())
    def example(case: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        _agree(_verdict(lambda: _run_sync_case(case)))

    example()
    return count


def test_gradient_sync_equals_the_dense_allreduce_within_each_bound() -> None:
    counts = run_ranks(fuzz_gradient_sync, 2, 100, timeout=240)
    assert counts[0] == counts[1] >= 50


# ------------------------------------------------------------------ Zen schemes

SCHEME_OPTIONS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "zen": st.fixed_dictionaries(
        {
            "seed": st.sampled_from([0, 12345]),
            "pull_format": st.sampled_from(["auto", "coo", "bitmap"]),
            "partitioner": st.sampled_from(["sort", "hierarchical"]),
        }
    ),
    "dense": st.just({}),
    "agsparse": st.just({}),
    "sparcml": st.fixed_dictionaries({"dense_threshold": st.sampled_from([None, 0.0, 0.3, 1.0])}),
    "omnireduce": st.fixed_dictionaries({"block_size": st.sampled_from([1, 4, 256])}),
    "auto": st.fixed_dictionaries(
        {
            "criterion": st.sampled_from(["paper", "bytes", "time"]),
            "profile_steps": st.sampled_from([1, 2]),
        }
    ),
}
"""Each Zen scheme's settings to fuzz (its defaults among them)."""

SPARSE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def test_every_zen_scheme_has_options() -> None:
    assert set(SCHEME_OPTIONS) == set(SCHEMES)


@dataclass(frozen=True)
class SparseCase:
    """A sparse COO input: its shape, sparse dims, dtype and how each rank fills it."""

    shape: tuple[int, ...]
    sparse_dim: int
    dtype: torch.dtype
    max_nnz: int
    seed: int
    scale: float
    pattern: str

    def tensor(self, rank: int, call: int = 0) -> Tensor:
        """This rank's uncoalesced input: indices drawn with replacement (duplicates)."""
        gen = torch.Generator().manual_seed(self.seed * 16 + rank * 4 + call)
        sizes = self.shape[: self.sparse_dim]
        nnz = int(torch.randint(0, self.max_nnz + 1, (), generator=gen)) if min(sizes) else 0
        indices = torch.stack([torch.randint(0, max(d, 1), (nnz,), generator=gen) for d in sizes])
        seed = self.seed * 16 + rank * 4 + call + 1
        values = _values((nnz, *self.shape[self.sparse_dim :]), seed, self.scale, self.pattern)
        return torch.sparse_coo_tensor(
            indices, values.to(self.dtype), self.shape, check_invariants=True
        )


@st.composite
def sparse_cases(draw: st.DrawFn) -> SparseCase:
    layout = draw(st.sampled_from(["vector", "rows", "matrix"]))
    if layout == "vector":
        shape, sparse_dim = (draw(st.integers(0, 40)),), 1
    elif layout == "rows":  # an embedding's gradient: sparse rows of dense values
        shape = (draw(st.integers(0, 30)), *draw(st.sampled_from([(1,), (3,), (2, 2)])))
        sparse_dim = 1
    else:
        shape = (
            draw(st.integers(0, 6)),
            draw(st.integers(0, 6)),
            *draw(st.sampled_from([(), (2,)])),
        )
        sparse_dim = 2
    dtype = draw(st.sampled_from(SPARSE_DTYPES))
    # fp16 sums of up to ~60 entries of 1e2 stay far below its 65504 limit.
    scales = [1e-3, 1.0, 1e2] if dtype == torch.float16 else [1e-30, 1.0, 1e3, 1e20]
    return SparseCase(
        shape,
        sparse_dim,
        dtype,
        max_nnz=draw(st.integers(0, 30)),
        seed=draw(st.integers(0, 2**31)),
        scale=draw(st.sampled_from(scales)),
        pattern=draw(st.sampled_from(PATTERNS)),
    )


def _dense_reference(local: Tensor, average: bool) -> tuple[Tensor, Tensor]:
    """Plain ``dist.all_reduce`` of the densified inputs (float64), and a rounding tolerance.

    A scheme sums in the values' dtype: per element, at most one rounding per
    entry it adds, each within ``U`` of the running sum of magnitudes.
    """
    wide = local.to(torch.float64)
    total = wide.to_dense()

    def densified(values: Tensor) -> Tensor:  # duplicates add up; no coalescing first
        return torch.sparse_coo_tensor(
            wide._indices(), values, wide.shape, check_invariants=True
        ).to_dense()

    magnitude = densified(wide._values().abs())  # sparse abs() would coalesce first
    count = densified(torch.ones_like(wide._values()))
    for t in (total, magnitude, count):
        dist.all_reduce(t)
    n = dist.get_world_size()
    u, tiny = U[local.dtype], TINY[local.dtype]
    tol = u * count * magnitude + tiny * count
    if average:
        total, tol = total / n, tol / n + u * (total / n).abs() + tiny
    return total, tol


def _check_sparse_result(result: Tensor, like: Tensor, output: str) -> Tensor:
    """Layout, dtype, shape and (for sparse output) true coalescedness; the dense values."""
    assert result.dtype == like.dtype, f"result dtype {result.dtype}, input {like.dtype}"
    assert result.shape == like.shape, f"result shape {tuple(result.shape)}, input {like.shape}"
    if output == "dense":
        assert result.layout == torch.strided, f"output='dense' gave {result.layout}"
        return result
    assert result.is_sparse and result.is_coalesced(), "output='sparse' is not coalesced COO"
    sizes = like.shape[: like.sparse_dim()]
    assert result.sparse_dim() == len(sizes), f"sparse dims {result.sparse_dim()} != {len(sizes)}"
    linear = torch.zeros(result._nnz(), dtype=torch.int64)
    for dim, size in enumerate(sizes):
        linear = linear * size + result._indices()[dim]
    assert bool((linear[1:] > linear[:-1]).all()), "indices flagged coalesced are not sorted/unique"
    return result.to_dense()


def _run_sparse_case(
    case: SparseCase, scheme: str, options: dict[str, Any], calls: int, average: bool, output: str
) -> None:
    rank = dist.get_rank()
    synced = make_scheme(scheme, **options)  # one object across calls: auto profiles on them
    for call in range(calls):
        local = case.tensor(rank, call)
        before = local.clone()
        result = sync_sparse(local, synced, average=average, output=output)
        want, tol = _dense_reference(local, average)
        everyone = _gather(result.to_dense() if result.is_sparse else result)
        assert torch.equal(local._values(), before._values()), "sync_sparse changed its input"
        dense = _check_sparse_result(result, local, output)
        assert all(torch.equal(e, everyone[0]) for e in everyone), "ranks got different sums"
        _within(dense, want, tol, f"{scheme}{options} {case.dtype} {tuple(case.shape)}")


class EmbeddingNet(nn.Module):
    """Two sparse embeddings (one unused on some ranks), a frozen one and a dense weight."""

    def __init__(self, rows: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.used = nn.Embedding(rows, dim, sparse=True, dtype=dtype)
        self.sometimes = nn.Embedding(rows + 1, 2, sparse=True, dtype=dtype)
        self.frozen = nn.Embedding(3, dim, sparse=True, dtype=dtype)
        self.frozen.weight.requires_grad_(False)
        self.dense = nn.Parameter(torch.zeros(2))


def _run_embedding_case(case: SparseCase, scheme: str, options: dict[str, Any], calls: int) -> None:
    """GradientSync with ``sparse_scheme``: each sparse .grad is the mean of every rank's."""
    rank = dist.get_rank()
    rows, dim = max(case.shape[0], 1), 3
    model = EmbeddingNet(rows, dim, case.dtype)
    prototype = make_scheme(scheme, **options)
    sync = GradientSync(model, sparse_scheme=prototype if options else scheme)
    for call in range(calls):
        gen = torch.Generator().manual_seed(case.seed * 16 + rank * 4 + call)
        model.zero_grad(set_to_none=True)
        loss = model.dense.sum()
        locals_: dict[str, Tensor] = {}
        for name, emb in (("used", model.used), ("sometimes", model.sometimes)):
            if name == "sometimes" and bool(torch.rand((), generator=gen) < 0.5):
                locals_[name] = torch.sparse_coo_tensor(
                    torch.zeros(1, 0, dtype=torch.int64),
                    torch.zeros(0, emb.embedding_dim, dtype=case.dtype),
                    emb.weight.shape,
                    check_invariants=True,
                )
                continue
            count = int(torch.randint(0, case.max_nnz + 1, (), generator=gen))
            idx = torch.randint(0, emb.num_embeddings, (count,), generator=gen)
            seed = case.seed * 16 + rank * 4 + call + 1
            weight = _values((count, emb.embedding_dim), seed, case.scale, case.pattern)
            weight = weight.to(case.dtype)
            loss = loss + (emb(idx) * weight).sum().float()
            locals_[name] = torch.sparse_coo_tensor(
                idx.reshape(1, -1), weight, emb.weight.shape, check_invariants=True
            )
        loss.backward()
        grads = {k: getattr(model, k).weight.grad for k in ("used", "sometimes", "frozen")}
        refs = {k: _dense_reference(v, average=True) for k, v in locals_.items()}
        everyone = _gather({k: g.to_dense() for k, g in grads.items() if g is not None})
        assert grads["frozen"] is None, "a frozen embedding got a gradient"
        for k in ("used", "sometimes"):
            g = grads[k]
            assert g is not None and g.is_sparse, f"{k}: .grad is {g!r}, expected sparse"
            dense = _check_sparse_result(g, locals_[k], "sparse")
            assert all(torch.equal(e[k], dense) for e in everyone), f"{k}: ranks differ"
            _within(dense, *refs[k], f"GradientSync({scheme}{options}) {k} {case.dtype}")
    sync.remove()


def fuzz_zen(max_examples: int) -> int:
    """On every rank: ``sync_sparse`` examples, then GradientSync examples with sparse schemes."""
    count = 0

    @settings(max_examples=max_examples, **IN_RANKS)
    @given(
        case=sparse_cases(),
        scheme_and_options=st.sampled_from(sorted(SCHEMES)).flatmap(
            lambda s: st.tuples(st.just(s), SCHEME_OPTIONS[s])
        ),
        calls=st.integers(1, 3),
        average=st.booleans(),
        output=st.sampled_from(["sparse", "dense"]),
        engine=st.booleans(),
    )
    def example(
        case: SparseCase,
        scheme_and_options: tuple[str, dict[str, Any]],
        calls: int,
        average: bool,
        output: str,
        engine: bool,
    ) -> None:
        nonlocal count
        count += 1
        scheme, options = scheme_and_options
        if engine:
            _agree(_verdict(lambda: _run_embedding_case(case, scheme, options, calls)))
        else:
            _agree(
                _verdict(lambda: _run_sparse_case(case, scheme, options, calls, average, output))
            )

    example()
    return count


def test_every_zen_scheme_equals_the_dense_allreduce() -> None:
    counts = run_ranks(fuzz_zen, 2, 80, timeout=240)
    assert counts[0] == counts[1] >= 40


# ------------------------------------------------------------ ranks that disagree

MODEL_MISMATCHES = ("shape", "numel", "dtype", "requires_grad", "extra", "missing")
SETUP_MISMATCHES = ("option", "compressor", "plan")
SPARSE_MISMATCHES = ("sparse_shape", "sparse_dtype", "sparse_dims", "scheme", "dense", "nan")


def _mutated(specs: list[ParamSpec], kind: str, which: int) -> list[ParamSpec]:
    """``specs`` with parameter ``which`` changed as ``kind`` says (what rank 1 builds)."""
    specs = list(specs)
    s = specs[which]
    if kind == "shape":  # same numel, other shape
        alt = (1, *s.shape) if len(s.shape) == 1 else (math.prod(s.shape),)
        specs[which] = ParamSpec(alt, s.dtype, s.layout, s.role)
    elif kind == "numel":
        specs[which] = ParamSpec((s.shape[0] + 1, *s.shape[1:]), s.dtype, s.layout, s.role)
    elif kind == "dtype":
        other = FLOAT_DTYPES[(FLOAT_DTYPES.index(s.dtype) + 1) % len(FLOAT_DTYPES)]
        specs[which] = ParamSpec(s.shape, other, s.layout, s.role)
    elif kind == "requires_grad":
        specs[which] = ParamSpec(
            s.shape, s.dtype, s.layout, "used" if s.role == "frozen" else "frozen"
        )
    elif kind == "extra":
        specs.insert(which, ParamSpec((2,), torch.float32, "contiguous", "used"))
    elif kind == "missing":
        del specs[which]
    return specs


def _raised(run: Callable[[], Any]) -> tuple[str, str] | None:
    try:
        run()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def _sync_mismatch(
    specs: list[ParamSpec], kind: str, which: int, name: str
) -> tuple[str, str] | None:
    """What GradientSync (then a backward) raised here; rank 1 disagrees as ``kind`` says."""
    rank = dist.get_rank()
    options: dict[str, Any] = {}
    plan = "layerwise"
    if rank == 1:
        if kind in MODEL_MISMATCHES:
            specs = _mutated(specs, kind, which)
        elif kind == "option":
            name, options = "topk", {"ratio": 0.25}
        elif kind == "compressor":
            name = "bf16" if name != "bf16" else "fp16"
        elif kind == "plan":
            plan = "whole"
    if kind == "option" and rank == 0:
        name, options = "topk", {"ratio": 0.5}

    def run() -> None:
        model = FuzzNet(specs)
        GradientSync(model, compressor=None if name == "none" else name, plan=plan, **options)
        model.anchor.sum().backward()

    return _raised(run)


def _sparse_mismatch(case: SparseCase, kind: str, scheme: str) -> tuple[str, str] | None:
    """What ``sync_sparse`` raised on this rank (rank 1 disagrees as ``kind`` says)."""
    rank = dist.get_rank()
    local = case.tensor(rank)
    options: dict[str, Any] = {}
    if rank == 1:
        if kind == "sparse_shape":
            local = torch.sparse_coo_tensor(
                local._indices(), local._values(), (local.shape[0] + 1, *local.shape[1:])
            )
        elif kind == "sparse_dtype":
            other = SPARSE_DTYPES[(SPARSE_DTYPES.index(local.dtype) + 1) % len(SPARSE_DTYPES)]
            local = local.to(other)
        elif kind == "sparse_dims":  # same shape, another split into sparse and dense dims
            dims = local.sparse_dim() - 1 if local.sparse_dim() > 1 else local.dim()
            local = local.to_dense().to_sparse(sparse_dim=dims)
        elif kind == "scheme":
            scheme, options = "zen", {"seed": 99}
        elif kind == "dense":
            local = local.to_dense()
        elif kind == "nan":
            local = torch.sparse_coo_tensor(
                torch.zeros(local.sparse_dim(), 1, dtype=torch.int64),
                torch.full((1, *local.shape[local.sparse_dim() :]), math.nan, dtype=local.dtype),
                local.shape,
            )
    if kind == "scheme" and rank == 0:
        scheme, options = "zen", {"seed": 98}
    return _raised(lambda: sync_sparse(local, make_scheme(scheme, **options)))


@st.composite
def mismatch_cases(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(MODEL_MISMATCHES + SETUP_MISMATCHES + SPARSE_MISMATCHES))
    if kind in SPARSE_MISMATCHES:
        case = draw(sparse_cases())
        no_split = kind == "sparse_dims" and len(case.shape) == 1  # one way only
        if no_split or (kind in ("sparse_dims", "nan") and 0 in case.shape):
            case = SparseCase((4, 3), 1, case.dtype, 5, case.seed, 1.0, "normal")
        return {"kind": kind, "case": case, "scheme": draw(st.sampled_from(sorted(SCHEMES)))}
    specs = draw(st.lists(PARAM_SPECS, min_size=1, max_size=3))
    which = draw(st.integers(0, len(specs) - 1))
    if kind == "plan":  # two trainable parameters at least, so "whole" is not "layerwise"
        s = specs[0]
        specs[0] = ParamSpec(s.shape, s.dtype, s.layout, "used")
    name = draw(st.sampled_from(available_compressors()))
    return {"kind": kind, "specs": specs, "which": which, "name": name}


def fuzz_mismatches(max_examples: int) -> int:
    """Rank 1 disagrees with rank 0; every rank must raise the same clear error, none hang."""
    count = 0

    @settings(max_examples=max_examples, **IN_RANKS)
    @given(case=mismatch_cases())
    def example(case: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        kind = case["kind"]
        if kind in SPARSE_MISMATCHES:
            outcome = _sparse_mismatch(case["case"], kind, case["scheme"])
            expected = "SparseSyncError"
        else:
            outcome = _sync_mismatch(case["specs"], kind, case["which"], case["name"])
            expected = "RankMismatchError"
        everyone = _gather(outcome)

        def check() -> None:
            assert outcome is not None, f"{kind}: no error on rank {dist.get_rank()}: {everyone}"
            assert all(e == outcome for e in everyone), (
                f"{kind}: ranks raised differently: {everyone}"
            )
            assert outcome[0] == expected, f"{kind}: raised {outcome}, expected {expected}"
            if kind in MODEL_MISMATCHES:
                assert "weights" in outcome[1] or "parameters" in outcome[1], outcome[1]

        _agree(_verdict(check))

    example()
    return count


def test_ranks_that_disagree_get_the_same_error_on_every_rank() -> None:
    counts = run_ranks(fuzz_mismatches, 2, 60, timeout=240)
    assert counts[0] == counts[1] >= 30


# ------------------------------------------------------- engine bugs found here

# Two bugs this fuzzing found in thrifty/sync/engine.py, fixed: the divisible
# scheme divided the re-compressed majority vote by the world size (+-1/n), and
# a lone PowerSGD weight of shape (0, k) raised ZeroDivisionError.


def known_engine_cases() -> dict[str, Any]:
    """The vote through the divisible scheme, and PowerSGD on a weight with no rows."""
    rank = dist.get_rank()
    out: dict[str, Any] = {}
    for name in VOTE_COMPRESSORS:
        model = nn.Module()
        model.w = nn.Parameter(torch.zeros(8))
        strategy = Strategy.make(name, "all_to_all", "none")
        GradientSync(model, plan=Plan.whole_model(["w"], strategy))
        grad = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, 6.0, -7.0, 8.0]) * (1 - 2 * rank)
        grad[:4] = grad[:4].abs()  # ranks agree on the first half, tie on the second
        (model.w * grad).sum().backward()
        # The vote is re-compressed to one bit per element, so a tie (0) travels
        # as +1, the sign methods' convention for a zero (the engine says so).
        want = _vote(_gather(grad)).where(_vote(_gather(grad)) != 0, 1.0)
        out[name] = (model.w.grad.tolist(), want.tolist())
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(0, 3))  # e.g. nn.Linear(3, 0).weight
    model.b = nn.Parameter(torch.zeros(2))
    outcome = _raised(lambda: GradientSync(model, compressor="powersgd", plan="layerwise"))
    out["powersgd_no_rows"] = outcome
    return out


@functools.cache
def _known_engine_results() -> dict[str, Any]:
    return run_ranks(known_engine_cases, 2, timeout=120)[0]


@pytest.mark.parametrize("name", VOTE_COMPRESSORS)
def test_vote_on_the_divisible_path(name: str) -> None:
    got, want = _known_engine_results()[name]
    assert got == want


def test_powersgd_takes_a_weight_with_no_rows() -> None:
    assert _known_engine_results()["powersgd_no_rows"] is None
