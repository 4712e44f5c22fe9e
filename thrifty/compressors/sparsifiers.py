"""Sparsifiers: Top-k, Random-k and DGC.

Each sends ``k = max(1, ceil(ratio * numel))`` entries of a non-empty tensor as
float32 values plus int32 indices, ``8 * k`` bytes, i.e. ``64 * ratio`` bits per
element; shared-seed Random-k sends the values only (``4 * k`` bytes). Indices
in a payload are sorted ascending. Sparsifiers are biased (except scaled
Random-k) and are meant to be paired with error feedback (DGC memory, see
:mod:`thrifty.compressors.memory`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from thrifty.compressors.base import (
    INDEX_DTYPE,
    AllreduceRounds,
    Compressor,
    Reduce,
    TensorSpec,
    as_float32,
    check_index_range,
    check_ratio,
    derive_seed,
    key_name,
    seeded_generator,
    sparse_count,
    stable_key_hash,
)
from thrifty.compressors.bitpacking import STREAM_CHUNK, stream_chunks

logger = logging.getLogger(__name__)


def _scatter(values: Tensor, indices: Tensor, numel: int) -> Tensor:
    """Dense float32 tensor with ``values`` added at ``indices`` (duplicates add up)."""
    out = torch.zeros(numel, dtype=torch.float32, device=values.device)
    return out.index_add_(0, indices.to(torch.int64), values.to(torch.float32))


class _IndexedSparsifier(Compressor):
    """Payload ``(values float32 (k,), indices int32 (k,))``; aggregation is one scatter-add."""

    def __init__(self, ratio: float, *, check_finite: bool = True) -> None:
        super().__init__(check_finite=check_finite)
        self.ratio = check_ratio(ratio)

    def k_for(self, numel: int) -> int:
        """Entries sent for a tensor of ``numel`` elements."""
        return sparse_count(self.ratio, numel)

    @property
    def bits_per_element(self) -> float:
        return 64.0 * self.ratio

    def payload_spec(self, numel: int) -> tuple[TensorSpec, ...]:
        k = self.k_for(numel)
        return TensorSpec((k,), torch.float32), TensorSpec((k,), INDEX_DTYPE)

    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        values, indices = payload
        return _scatter(values, indices, numel)

    def _aggregate(self, payloads: list[tuple[Tensor, ...]], numel: int, key: Hashable) -> Tensor:
        if not payloads:
            return torch.zeros(numel, dtype=torch.float32)
        values = torch.cat([p[0] for p in payloads])
        indices = torch.cat([p[1] for p in payloads])
        return _scatter(values, indices, numel)


class TopK(_IndexedSparsifier):
    """Top-k sparsification (Aji & Heafield, EMNLP 2017; Stich et al., NeurIPS 2018).

    Sends exactly the ``k`` entries of largest magnitude (ties broken
    arbitrarily), ``k = max(1, ceil(ratio * numel))``: ``8 * k`` bytes,
    ``64 * ratio`` bits per element. Not all-reduce compatible (each rank picks
    different indices): all-gather the payloads.

    Selection is exact but avoids a full ``torch.topk`` (~10 clones of the
    input): a threshold from a strided sample of ~1% of the entries, aimed
    three standard deviations low, then one streaming pass keeps every
    ``|x| >= threshold`` and a top-k over those candidates picks the ``k``
    largest. Every entry left out is below the threshold, hence below every
    candidate, so the result is the exact top-k. When the sample aims too high
    (fewer than ``k`` candidates) it falls back to ``torch.topk``. The sample is
    a fixed stride, so TopK draws no random numbers.

    Args:
        ratio: density in (0, 1], e.g. 0.01 sends 1% of the entries.
    """

    name: ClassVar[str] = "topk"

    def __init__(self, ratio: float = 0.01, *, check_finite: bool = True) -> None:
        super().__init__(ratio, check_finite=check_finite)

    def _compress(self, flat: Tensor, key: Hashable) -> tuple[Tensor, ...]:
        check_index_range(flat.numel(), self.name)
        values = as_float32(flat)
        numel, k = values.numel(), self.k_for(flat.numel())
        num_samples = math.ceil(TOPK_SAMPLE_RATIO * numel)
        if num_samples < TOPK_MIN_SAMPLES or k == 0:
            indices = _top_indices(values, k)
        else:
            stride = numel // num_samples
            sample = values[stride // 2 :: stride].abs()
            threshold = _sampled_threshold(sample, k / numel, TOPK_THRESHOLD_MARGIN)
            indices = _select_above(values, k, threshold)
            if indices is None:
                indices = _top_indices(values, k)
        return values[indices], indices.to(INDEX_DTYPE)


TOPK_SAMPLE_RATIO = 0.01
"""Fraction of entries TopK samples for its threshold."""
TOPK_MIN_SAMPLES = 1024
"""Tensors whose sample would be smaller use ``torch.topk`` directly."""
TOPK_THRESHOLD_MARGIN = 3.0
"""Standard deviations the sampled threshold aims low (as DGC's default)."""


def _top_indices(values: Tensor, k: int) -> Tensor:
    """Sorted int64 indices of the ``k`` largest ``|values|``."""
    indices = torch.topk(values.abs(), k, sorted=False).indices
    return indices.sort().values


def _sampled_threshold(sample: Tensor, density: float, margin: float) -> Tensor:
    """The ``j``-th largest of ``sample``, ``j = ceil(e + margin * sqrt(e))``.

    ``e = density * sample.numel()`` is the expected number of sampled entries
    in the top ``density`` fraction; aiming ``margin`` standard deviations past
    it makes at least ``k`` entries pass almost always.
    """
    num_samples = sample.numel()
    expected = density * num_samples
    j = min(num_samples, max(1, math.ceil(expected + margin * math.sqrt(expected))))
    return torch.kthvalue(sample, num_samples - j + 1).values


def _select_above(values: Tensor, k: int, threshold: Tensor) -> Tensor | None:
    """Sorted indices of the ``k`` largest ``|values|``, given that at least ``k`` pass
    ``|x| >= threshold``; ``None`` when fewer pass.

    One streaming pass: per cached chunk, ``|x|``, the comparison and its non-zeros,
    never a ``numel``-sized temporary.
    """
    numel = values.numel()
    if values.device.type == "cpu":
        size = min(numel, STREAM_CHUNK)
        magnitude = torch.empty(size)
        passed = torch.empty(size, dtype=torch.bool)
        found = []
        for start, end in stream_chunks(numel):
            a, p = magnitude[: end - start], passed[: end - start]
            torch.ge(torch.abs(values[start:end], out=a), threshold, out=p)
            hits = torch.nonzero(p).squeeze(1)
            if hits.numel():
                found.append(hits.add_(start))
        candidates = torch.cat(found) if found else torch.empty(0, dtype=torch.int64)
    else:
        candidates = torch.nonzero(values.abs() >= threshold).squeeze(1)
    if candidates.numel() < k:
        return None
    if candidates.numel() > k:
        keep = torch.topk(values[candidates].abs(), k, sorted=False).indices
        candidates = candidates[keep].sort().values
    return candidates


def sample_indices(
    numel: int, k: int, generator: torch.Generator | None, device: torch.device | str
) -> Tensor:
    """``k`` distinct indices of ``range(numel)``, uniformly at random, sorted.

    A full ``randperm`` costs O(numel) (6.7 s for 64M elements on one core here).
    For sparse ``k`` draw with replacement and deduplicate until ``k`` distinct
    remain, then keep a random ``k`` of them: O(k log k). Conditioned on its size
    the set of distinct draws is a uniform subset, and a uniform subset of it is
    uniform too, so the result is an unbiased k-subset. Deterministic for a
    seeded ``generator`` (shared-seed Random-k relies on that).
    """
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    if 4 * k > numel:  # dense: the permutation is cheaper than rejection
        return torch.randperm(numel, generator=generator, device=device)[:k].sort().values
    got = torch.empty(0, dtype=torch.int64, device=device)
    while got.numel() < k:
        extra = int((k - got.numel()) * 1.1) + 16
        draw = torch.randint(numel, (extra,), generator=generator, device=device)
        got = torch.unique(torch.cat([got, draw]))
    if got.numel() > k:
        keep = torch.randperm(got.numel(), generator=generator, device=device)[:k]
        got = got[keep].sort().values
    return got


class RandomK(_IndexedSparsifier):
    """Random-k sparsification (Stich et al., NeurIPS 2018; Wangni et al., NeurIPS 2018).

    Sends ``k = max(1, ceil(ratio * numel))`` entries chosen uniformly at random
    without replacement.

    * Private indices (``shared_seed=None``): drawn from torch's default
      generator on the input's device; payload ``values float32 (k,) + indices
      int32 (k,)``, ``8 * k`` bytes, ``64 * ratio`` bits per element; not
      all-reduce compatible.
    * Shared indices (``shared_seed`` set): every rank draws the same indices
      from a generator seeded by ``(shared_seed, crc32(repr(key)), step)``,
      where ``step`` counts this key's calls on this instance. The payload is
      then the values only, ``4 * k`` bytes, ``32 * ratio`` bits per element,
      and it is all-reduce compatible (BytePS PR #299). Ranks must call it in
      lockstep per key, on the same device type. The indices depend on the
      device type's generator, not on the values.

    Decompressing in shared mode needs the indices: ``decompress``/``aggregate``
    take them from this instance's latest ``compress`` of ``key`` (pass ``key=``;
    without it, the latest ``compress`` of any key is used when its ``numel``
    matches). ``allreduce_rounds`` carries the key itself.

    Args:
        ratio: density in (0, 1].
        scale: multiply the sent values by ``numel / k`` so that
            ``E[decompress(compress(x))] = x`` (unbiased). Leave it off with error
            feedback: the residual of a scaled value is ``(1 - numel/k) x``.
        shared_seed: seed of the shared index stream, or ``None`` for private
            indices.
    """

    name: ClassVar[str] = "randomk"

    def __init__(
        self,
        ratio: float = 0.01,
        *,
        scale: bool = False,
        shared_seed: int | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__(ratio, check_finite=check_finite)
        self.scale = scale
        self.shared_seed = shared_seed
        self._steps: dict[Hashable, int] = {}
        self._shared_indices: dict[Hashable, Tensor] = {}
        self._latest_key: Hashable = None

    @property
    def allreduce_compatible(self) -> bool:  # type: ignore[override]
        """True with a shared seed: all ranks send values at the same indices."""
        return self.shared_seed is not None

    @property
    def bits_per_element(self) -> float:
        return (32.0 if self.allreduce_compatible else 64.0) * self.ratio

    def payload_spec(self, numel: int) -> tuple[TensorSpec, ...]:
        if self.allreduce_compatible:
            return (TensorSpec((self.k_for(numel),), torch.float32),)
        return super().payload_spec(numel)

    def _compress(self, flat: Tensor, key: Hashable) -> tuple[Tensor, ...]:
        numel = flat.numel()
        check_index_range(numel, self.name)
        values = as_float32(flat)
        k = self.k_for(numel)
        if self.shared_seed is None:
            indices = sample_indices(numel, k, None, flat.device)
        else:
            indices = self._draw_shared(key, numel, flat.device)
        sent = values[indices]
        if self.scale and k > 0:
            sent = sent * (numel / k)
        if self.shared_seed is None:
            return sent, indices.to(INDEX_DTYPE)
        return (sent,)

    def _draw_shared(self, key: Hashable, numel: int, device: torch.device) -> Tensor:
        assert self.shared_seed is not None
        step = self._steps.get(key, 0)
        self._steps[key] = step + 1
        generator = seeded_generator(
            derive_seed(self.shared_seed, stable_key_hash(key), step), device
        )
        indices = sample_indices(numel, self.k_for(numel), generator, device)
        self._shared_indices[key] = indices
        self._latest_key = key
        return indices

    def _indices_for(self, key: Hashable, numel: int) -> Tensor:
        if key is None:
            key = self._latest_key
        indices = self._shared_indices.get(key)
        if indices is None:
            raise ValueError(
                f"{self.name}: no shared indices for tensor {key_name(key)}; in shared-seed "
                "mode decompress/aggregate must follow compress of the same key on this "
                "instance (or use allreduce_rounds)"
            )
        if indices.numel() != self.k_for(numel):
            raise ValueError(
                f"{self.name}: the latest shared indices for tensor {key_name(key)} are for "
                f"another size ({indices.numel()} entries, numel {numel} needs "
                f"{self.k_for(numel)}); pass key= to decompress/aggregate"
            )
        return indices

    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        if self.shared_seed is None:
            return super()._decompress(payload, numel, key)
        return _scatter(payload[0], self._indices_for(key, numel), numel)

    def _aggregate(self, payloads: list[tuple[Tensor, ...]], numel: int, key: Hashable) -> Tensor:
        if self.shared_seed is None:
            return super()._aggregate(payloads, numel, key)
        if not payloads:
            return torch.zeros(numel, dtype=torch.float32)
        summed = torch.stack([p[0] for p in payloads]).sum(dim=0)
        return _scatter(summed, self._indices_for(key, numel), numel)

    def _allreduce_rounds(self, flat: Tensor, key: Hashable) -> AllreduceRounds:
        (values,) = self._compress(flat, key)
        summed = yield Reduce(values, "sum")
        return _scatter(summed, self._indices_for(key, flat.numel()), flat.numel())

    # The shared indices live from compress to decompress of one step: only the
    # step counter (which draw comes next) is carried across steps.
    def state_keys(self) -> list[Hashable]:
        return list(self._steps)

    def export_state(self, key: Hashable = None) -> dict[str, Tensor]:
        if key not in self._steps:
            return {}
        return {"step": torch.tensor(self._steps[key], dtype=torch.int64)}

    def import_state(self, key: Hashable, state: dict[str, Tensor]) -> None:
        if "step" in state:
            self._steps[key] = int(state["step"])

    def state_template(self, key: Hashable, numel: int) -> dict[str, Tensor]:
        return {"step": torch.zeros((), dtype=torch.int64)}

    def reset_state(self, key: Hashable = None) -> None:
        if key is None:
            self._steps.clear()
            self._shared_indices.clear()
        else:
            self._steps.pop(key, None)
            self._shared_indices.pop(key, None)


DGC_WARMUP_DENSITIES: tuple[float, ...] = (0.25, 0.0625, 0.015625, 0.004)
"""Densities of DGC's warm-up stages: sparsity 75%, 93.75%, 98.4375%, 99.6% (then 99.9%)."""


@dataclass(frozen=True)
class SparsityWarmup:
    """DGC's warm-up schedule (Lin et al., ICLR 2018, section 3.3).

    Sparsity rises exponentially over the first stages: 75%, 93.75%, 98.4375%,
    99.6%, then the final density. Stages denser than the final density are
    kept; the others are skipped. ``steps_per_stage`` is in whatever unit the
    caller advances with :meth:`DGC.set_step`: with epochs as the unit and
    ``steps_per_stage=1`` it is the paper's four warm-up epochs.
    """

    steps_per_stage: int
    densities: tuple[float, ...] = DGC_WARMUP_DENSITIES

    def __post_init__(self) -> None:
        if self.steps_per_stage < 1:
            raise ValueError(f"steps_per_stage must be >= 1, got {self.steps_per_stage}")

    def density(self, step: int, final: float) -> float:
        """Density at ``step`` for a compressor whose final density is ``final``."""
        stages = [d for d in self.densities if d > final]
        stage = max(step, 0) // self.steps_per_stage
        return stages[stage] if stage < len(stages) else final


class DGC(_IndexedSparsifier):
    """Deep Gradient Compression's selection (Lin et al., ICLR 2018).

    1. Sample ``ceil(sample_ratio * numel)`` entries (at least ``min_samples``)
       uniformly with replacement.
    2. Threshold = the ``j``-th largest sampled magnitude, with
       ``j = ceil(e + threshold_margin * sqrt(e))`` for ``e = density * samples``
       expected hits: it aims ``threshold_margin`` standard deviations of the
       sampled count low, so that at least ``k`` entries pass almost always.
    3. Select every entry with ``|x| >= threshold``. If more than ``k`` pass,
       keep the ``k`` largest of them: a top-k over roughly
       ``(1 + threshold_margin / sqrt(e)) * k`` candidates instead of the whole
       tensor. If fewer pass (the sample overestimated the threshold), fall back
       to an exact top-k. Either way the payload has exactly ``k`` entries, all
       at least the k-th largest magnitude, so its size depends only on ``numel``.

    Tensors with no more than ``min_samples`` elements use an exact top-k.
    Payload and bytes as :class:`TopK`: ``8 * k`` bytes, ``64 * density`` bits
    per element. Momentum correction, local gradient clipping and
    momentum-factor masking are in :class:`thrifty.compressors.memory.DGCMemory`.

    Warm-up: with ``warmup_steps_per_stage`` set, the density starts at 25% and
    follows :class:`SparsityWarmup`; call :meth:`set_step` on every rank at the
    same point. The payload size then depends on ``numel`` and the current stage.

    Args:
        ratio: final density (the paper uses 0.001).
        sample_ratio: fraction of entries sampled for the threshold (0.1%–1%).
        min_samples: smallest sample; smaller tensors are selected exactly.
        threshold_margin: how many standard deviations the threshold aims low;
            0 aims at exactly ``k`` and falls back to exact top-k about half the time.
        warmup_steps_per_stage: steps per warm-up stage, or 0 for no warm-up.
    """

    name: ClassVar[str] = "dgc"

    def __init__(
        self,
        ratio: float = 0.001,
        *,
        sample_ratio: float = 0.01,
        min_samples: int = 1024,
        threshold_margin: float = 3.0,
        warmup_steps_per_stage: int = 0,
        check_finite: bool = True,
    ) -> None:
        super().__init__(ratio, check_finite=check_finite)
        self.sample_ratio = check_ratio(sample_ratio, "sample_ratio")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        if threshold_margin < 0.0:
            raise ValueError(f"threshold_margin must be >= 0, got {threshold_margin}")
        self.min_samples = min_samples
        self.threshold_margin = threshold_margin
        self.warmup = SparsityWarmup(warmup_steps_per_stage) if warmup_steps_per_stage > 0 else None
        self._exact_fallbacks = 0
        self._step = 0

    @property
    def exact_fallbacks(self) -> int:
        """How often the sampled threshold passed fewer than k entries (exact top-k used)."""
        return self._exact_fallbacks

    @property
    def density(self) -> float:
        """The density in force now (the warm-up stage's, or ``ratio``)."""
        if self.warmup is None:
            return self.ratio
        return self.warmup.density(self._step, self.ratio)

    def set_step(self, step: int) -> None:
        """Advance the warm-up schedule to ``step`` (call on all ranks alike)."""
        self._step = step

    def k_for(self, numel: int) -> int:
        return sparse_count(self.density, numel)

    def extra_state(self) -> dict[str, Tensor]:
        return {
            "step": torch.tensor(self._step, dtype=torch.int64),
            "exact_fallbacks": torch.tensor(self._exact_fallbacks, dtype=torch.int64),
        }

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if "step" in state:
            self._step = int(state["step"])
        if "exact_fallbacks" in state:
            self._exact_fallbacks = int(state["exact_fallbacks"])

    @property
    def bits_per_element(self) -> float:
        return 64.0 * self.density

    def _compress(self, flat: Tensor, key: Hashable) -> tuple[Tensor, ...]:
        numel = flat.numel()
        check_index_range(numel, self.name)
        values = as_float32(flat)
        indices = self._select(values, self.k_for(numel), key)
        return values[indices], indices.to(INDEX_DTYPE)

    def _select(self, values: Tensor, k: int, key: Hashable) -> Tensor:
        numel = values.numel()
        num_samples = max(math.ceil(self.sample_ratio * numel), self.min_samples)
        if num_samples >= numel or k == 0:
            return _top_indices(values, k)
        picks = torch.randint(numel, (num_samples,), device=values.device)
        sample = values[picks].abs()
        threshold = _sampled_threshold(sample, self.density, self.threshold_margin)
        candidates = _select_above(values, k, threshold)
        if candidates is None:
            self._exact_fallbacks += 1
            logger.debug(
                "dgc: sampled threshold passed fewer than k=%d entries of %s; exact top-k",
                k,
                key_name(key),
            )
            return _top_indices(values, k)
        return candidates
