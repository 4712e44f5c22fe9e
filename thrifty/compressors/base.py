"""The interface every gradient compressor implements.

Following GRACE (Xu et al., "GRACE: A Compressed Communication Framework for
Distributed Machine Learning", ICDCS 2021), a compressor decides only *what is
sent*. Error feedback lives in :mod:`thrifty.compressors.memory` and the
collective (all-reduce, all-gather, all-to-all) is chosen by the engine in
:mod:`thrifty.sync` and :mod:`thrifty.comm`. A compressor never communicates.

Two ways to move a compressed tensor, and what the engine may rely on:

* **All-gather path** (every compressor). Each rank calls :meth:`Compressor.compress`;
  the payload's shapes and dtypes depend only on ``numel`` (see
  :meth:`Compressor.payload_spec`), so fixed-size all-gather and all-to-all
  work. After the gather, :meth:`Compressor.aggregate` turns the payloads of all
  ranks into the *sum* of their contributions.
* **All-reduce path** (compressors with ``supports_allreduce_rounds``).
  :meth:`Compressor.allreduce_rounds` is a generator that yields
  :class:`Reduce` requests, one per sequential all-reduce; the driver answers each
  with the all-reduced tensor and the generator finally returns the sum over
  ranks. Single-round compressors (FP16, BF16, shared-seed Random-k) yield once;
  PowerSGD and TernGrad with scaler sharing yield twice.
  :func:`thrifty.compressors.rounds.run_allreduce_rounds_locally` drives several
  ranks in one process.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import zlib
from abc import ABC, abstractmethod
from collections.abc import Generator, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

ReduceOp = Literal["sum", "max"]
"""The reductions a :class:`Reduce` request may ask for."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one payload tensor; ``nbytes`` is what goes on the wire."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def matches(self, tensor: Tensor) -> bool:
        """True when ``tensor`` has exactly this shape and dtype."""
        return tuple(tensor.shape) == self.shape and tensor.dtype == self.dtype


@dataclass(frozen=True)
class Reduce:
    """One all-reduce requested by :meth:`Compressor.allreduce_rounds`.

    The driver all-reduces ``tensor`` across ranks with ``op`` (elementwise, in
    the tensor's own dtype, as NCCL and gloo do) and sends the result back into
    the generator. ``tensor`` is always a fresh tensor the driver may reduce in
    place.
    """

    tensor: Tensor
    op: ReduceOp = "sum"


@dataclass(frozen=True)
class RoundSpec:
    """Shape, dtype and reduction of one all-reduce round, known before compressing."""

    spec: TensorSpec
    op: ReduceOp


AllreduceRounds = Generator[Reduce, Tensor, Tensor]
"""``allreduce_rounds`` yields :class:`Reduce`, receives the reduced tensor, returns the sum."""

INDEX_DTYPE = torch.int32
"""Indices on the wire are int32 (4 bytes), so tensors must have fewer than 2**31 elements."""


def key_name(key: Hashable) -> str:
    """How a tensor key is named in messages."""
    return "<unnamed>" if key is None else repr(key)


def encode_key(key: Hashable) -> str:
    """A tensor key as text, for state dicts (their keys must be strings).

    Keys are ``None``, ints, strings and tuples of them (the engine uses a
    group index, ``(index, "shard", j)`` and ``(index, "reduced")``);
    :func:`decode_key` gives the key back.
    """

    def plain(k: Hashable) -> object:
        if isinstance(k, tuple):
            return [plain(part) for part in k]
        if k is None or isinstance(k, int | str | float | bool):
            return k
        raise TypeError(f"cannot save state of tensor key {k!r}: use ints, strings or tuples")

    return json.dumps(plain(key))


def decode_key(text: str) -> Hashable:
    """The key :func:`encode_key` wrote."""

    def hashable(value: object) -> Hashable:
        if isinstance(value, list):
            return tuple(hashable(v) for v in value)
        return value  # type: ignore[return-value]

    return hashable(json.loads(text))


def stable_key_hash(key: Hashable) -> int:
    """A 32-bit hash of ``key`` that is the same in every process.

    Python's ``hash()`` of ``str`` is salted per process, so shared seeds derive
    from the CRC-32 of ``repr(key)`` instead. Keys must therefore have a
    deterministic ``repr`` (strings, ints and tuples of them do; objects whose
    ``repr`` shows a memory address do not).
    """
    return zlib.crc32(repr(key).encode("utf-8"))


def derive_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (deterministic across processes and machines)."""
    digest = hashlib.blake2b(repr(parts).encode("ascii"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(seed)


def as_float32(flat: Tensor, *, copy: bool = False) -> Tensor:
    """``flat`` as float32; with ``copy=True`` the result never aliases ``flat``."""
    return flat.to(torch.float32, copy=copy)


def ensure_finite(flat: Tensor, compressor_name: str, key: Hashable) -> None:
    """Raise ``ValueError`` naming ``key`` when ``flat`` holds NaN or +-Inf."""
    if flat.numel() == 0:
        return
    # One reduction without a temporary: NaN and Inf reach the sum. Only a
    # non-finite sum (which finite values can also cause, by overflow) pays
    # the full elementwise scan. This made the check ~10x cheaper at 16M.
    wide = torch.float32 if flat.dtype in (torch.float16, torch.bfloat16) else None
    if bool(torch.isfinite(flat.sum(dtype=wide))) or bool(torch.isfinite(flat).all()):
        return
    n_nan = int(torch.isnan(flat).sum())
    n_pos = int(torch.isposinf(flat).sum())
    n_neg = int(torch.isneginf(flat).sum())
    raise ValueError(
        f"{compressor_name}: tensor {key_name(key)} contains {n_nan} NaN, {n_pos} +Inf and "
        f"{n_neg} -Inf values out of {flat.numel()}; fix the gradient (e.g. loss scaling) or "
        "construct the compressor with check_finite=False to pass them through"
    )


def check_index_range(numel: int, compressor_name: str) -> None:
    """Indices are sent as int32; refuse tensors they cannot address."""
    if numel >= 2**31:
        raise ValueError(
            f"{compressor_name}: numel {numel} needs indices beyond int32; split the tensor "
            "into groups of fewer than 2**31 elements"
        )


class Compressor(ABC):
    """What one rank sends for one flat gradient tensor (or fused group of tensors).

    Subclasses implement ``payload_spec``, ``bits_per_element``, ``_compress`` and
    ``_decompress``; the public methods validate inputs and payloads around them.

    Class attributes:
        name: the registry name, e.g. ``"topk"``.
        allreduce_compatible: the payloads of all ranks may be summed elementwise
            by one all-reduce, and ``decompress`` of the summed payload is the sum
            of the contributions. Read it on an *instance*: Random-k overrides it
            with a property (True only with a shared seed).
        majority_vote: ``aggregate`` returns ``N`` times a vote (signSGD,
            Signum), not a sum: a result that is re-compressed (the engine's
            divisible scheme) re-compresses the vote, and is not divided by N.

    Args:
        check_finite: check every input for NaN/Inf and raise ``ValueError``
            naming the tensor; it costs one reduction (and, on GPU, one host sync)
            per call. With ``False`` nothing is checked: the casts (none, FP16,
            BF16) carry NaN/Inf through, other compressors give undefined output.
    """

    name: ClassVar[str]
    allreduce_compatible: ClassVar[bool] = False
    majority_vote: ClassVar[bool] = False

    def __init__(self, *, check_finite: bool = True) -> None:
        self.check_finite = check_finite

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_")
        )
        return f"{type(self).__name__}({fields})"

    # ------------------------------------------------------------------ sizes
    @property
    @abstractmethod
    def bits_per_element(self) -> float:
        """Nominal wire bits per input element, counting every payload tensor.

        It is the limit of ``8 * payload_nbytes(numel) / numel`` for large
        ``numel``: per-tensor scalars (norms, scales) are amortised away, indices
        count. Top-k at ratio 0.01 gives 0.64 (32-bit value + 32-bit index for 1%
        of the elements). Use :meth:`payload_nbytes` for the exact size.
        """

    @abstractmethod
    def payload_spec(self, numel: int) -> tuple[TensorSpec, ...]:
        """Shapes and dtypes of the payload for a tensor of ``numel`` elements.

        Depends only on ``numel`` (and the compressor's configuration), never on
        the values, so all ranks know each other's payload sizes in advance.
        """

    def payload_nbytes(self, numel: int) -> int:
        """Exact bytes sent per rank: the sum of ``payload_spec(numel)`` sizes."""
        check_numel(numel, self.name)
        return sum(spec.nbytes for spec in self.payload_spec(numel))

    # ------------------------------------------------------ compress/decompress
    @torch.no_grad()
    def compress(self, x: Tensor, key: Hashable = None) -> tuple[Tensor, ...]:
        """Compress ``x`` (any shape, contiguous or not; float32/16, bfloat16).

        ``key`` names the tensor or group: it selects per-tensor state (momentum,
        step counters, PowerSGD's Q) and names the tensor in errors. The payload
        matches ``payload_spec(x.numel())`` exactly and lies on ``x.device``.

        Raises:
            TypeError: ``x`` is not a floating-point tensor.
            ValueError: ``x`` contains NaN/Inf (when ``check_finite``).
        """
        flat = self._prepare(x, key)
        payload = tuple(self._compress(flat, key))
        self._check_payload(payload, flat.numel(), "compress produced")
        return payload

    @torch.no_grad()
    def decompress(self, payload: Sequence[Tensor], numel: int, key: Hashable = None) -> Tensor:
        """Rebuild the flat float32 tensor of ``numel`` elements this payload encodes.

        ``key`` is only needed by shared-seed Random-k (see there).
        """
        self._check_payload(payload, numel, "decompress got")
        return self._decompress(tuple(payload), numel, key)

    @torch.no_grad()
    def aggregate(
        self, payloads: Sequence[Sequence[Tensor]], numel: int, key: Hashable = None
    ) -> Tensor:
        """Combine the payloads of all ranks into the sum of their contributions.

        Returns a flat float32 tensor. The default is the sum of
        :meth:`decompress`; sign methods override it with a majority vote.
        """
        for payload in payloads:
            self._check_payload(payload, numel, "aggregate got")
        return self._aggregate([tuple(p) for p in payloads], numel, key)

    @abstractmethod
    def _compress(self, flat: Tensor, key: Hashable) -> tuple[Tensor, ...]:
        """Compress a validated flat tensor (its dtype is the caller's)."""

    @abstractmethod
    def _decompress(self, payload: tuple[Tensor, ...], numel: int, key: Hashable) -> Tensor:
        """Decompress a validated payload into flat float32."""

    def _aggregate(self, payloads: list[tuple[Tensor, ...]], numel: int, key: Hashable) -> Tensor:
        if not payloads:
            return torch.zeros(numel, dtype=torch.float32)
        total = self._decompress(payloads[0], numel, key).clone()
        for payload in payloads[1:]:
            total += self._decompress(payload, numel, key)
        return total

    # ------------------------------------------------------------- all-reduce
    @property
    def supports_allreduce_rounds(self) -> bool:
        """True when :meth:`allreduce_rounds` works for this instance."""
        return self.allreduce_compatible

    def allreduce_round_specs(self, numel: int) -> tuple[RoundSpec, ...]:
        """The all-reduces :meth:`allreduce_rounds` will request, in order.

        Their ``nbytes`` is what the all-reduce path moves per rank (as input
        to each all-reduce), which may differ from :meth:`payload_nbytes`.
        """
        self._require_allreduce()
        return tuple(RoundSpec(spec, "sum") for spec in self.payload_spec(numel))

    def allreduce_rounds(self, x: Tensor, key: Hashable = None) -> AllreduceRounds:
        """Generator protocol for all-reduce: yields :class:`Reduce`, returns the sum.

        The generator yields one :class:`Reduce` per sequential all-reduce and
        expects the reduced tensor back through ``send``; it returns the flat
        float32 *sum over ranks* of the decompressed contributions. Input
        validation happens here, before the first round.

        Raises:
            TypeError: the compressor cannot be all-reduced (use all-gather and
                :meth:`aggregate`).
        """
        self._require_allreduce()
        flat = self._prepare(x, key)
        return self._allreduce_rounds(flat, key)

    def _allreduce_rounds(self, flat: Tensor, key: Hashable) -> AllreduceRounds:
        payload = self._compress(flat, key)
        reduced = []
        for tensor in payload:
            reduced.append((yield Reduce(tensor, "sum")))
        return self.decompress(reduced, flat.numel(), key)

    def _require_allreduce(self) -> None:
        if not self.supports_allreduce_rounds:
            raise TypeError(
                f"{self!r} cannot be all-reduced: its payloads do not sum elementwise; "
                "all-gather them and call aggregate()"
            )

    # ------------------------------------------------------------------- state
    def reset_state(self, key: Hashable = None) -> None:  # noqa: B027 - stateless default
        """Forget per-tensor state for ``key`` (all keys when ``None``)."""

    def state_keys(self) -> list[Hashable]:
        """The keys this compressor keeps state for (none for stateless ones)."""
        return []

    def export_state(self, key: Hashable = None) -> dict[str, Tensor]:
        """The state kept for ``key``, as tensors (only what exists yet).

        Stateful compressors (PowerSGD's Q, Random-k's shared-seed step,
        Signum's momentum) override this, :meth:`import_state` and
        :meth:`state_template`, so that a checkpoint resumes them exactly.
        """
        return {}

    def import_state(self, key: Hashable, state: dict[str, Tensor]) -> None:  # noqa: B027
        """Install state in the format :meth:`export_state` returns."""

    def state_template(self, key: Hashable, numel: int) -> dict[str, Tensor]:
        """Zeros shaped like every state :meth:`export_state` may return for ``key``.

        For a tensor of ``numel`` elements. Checkpoint formats that load into
        a template (``torch.distributed.checkpoint``) need every entry to exist
        before the first step has created it.
        """
        return {}

    def extra_state(self) -> dict[str, Tensor]:
        """State not tied to a key (e.g. DGC's warm-up step), as tensors."""
        return {}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:  # noqa: B027
        """Install what :meth:`extra_state` returned."""

    def state_dict(self) -> dict[str, Any]:
        """Everything this compressor carries across steps: tensors and strings only.

        ``torch.save`` it with a checkpoint; ``torch.load(..., weights_only=True)``
        reads it back.
        """
        keys = {encode_key(k): self.export_state(k) for k in self.state_keys()}
        return {"keys": keys, "extra": self.extra_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (state of other keys is dropped)."""
        self.reset_state()
        for text, tensors in state.get("keys", {}).items():
            self.import_state(decode_key(text), tensors)
        self.load_extra_state(state.get("extra", {}))

    # -------------------------------------------------------------- internals
    def _prepare(self, x: Tensor, key: Hashable) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(
                f"{self.name}: tensor {key_name(key)} must be a torch.Tensor, got {type(x)!r}"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"{self.name}: tensor {key_name(key)} has dtype {x.dtype}; expected a "
                "floating-point dtype (float32, float16 or bfloat16)"
            )
        flat = x.reshape(-1)
        if self.check_finite:
            ensure_finite(flat, self.name, key)
        return flat

    def _check_payload(self, payload: Sequence[Tensor], numel: int, what: str) -> None:
        check_numel(numel, self.name)
        specs = self.payload_spec(numel)
        if len(payload) != len(specs):
            raise ValueError(
                f"{self.name}: {what} {len(payload)} payload tensors for numel {numel}, "
                f"expected {len(specs)}"
            )
        for i, (tensor, spec) in enumerate(zip(payload, specs, strict=True)):
            if not spec.matches(tensor):
                raise ValueError(
                    f"{self.name}: {what} payload tensor {i} with shape {tuple(tensor.shape)} "
                    f"and dtype {tensor.dtype} for numel {numel}, expected shape {spec.shape} "
                    f"and dtype {spec.dtype}"
                )


def sparse_count(ratio: float, numel: int) -> int:
    """k = max(1, ceil(ratio * numel)) for numel > 0, else 0 (float noise rounded away)."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(round(ratio * numel, 6))))


def check_numel(numel: int, compressor_name: str) -> None:
    """A size the caller passes must be an int >= 0; a negative one gives negative payloads."""
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral) or numel < 0:
        raise ValueError(f"{compressor_name}: numel must be an int >= 0, got {numel!r}")


def check_ratio(ratio: float, what: str = "ratio") -> float:
    """Validate a density in (0, 1]."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"{what} must be a number in (0, 1], got {ratio!r}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {ratio!r}")
    return float(ratio)
