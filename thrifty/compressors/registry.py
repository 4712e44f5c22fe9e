"""Compressors by name, and the error feedback each is usually paired with."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

from thrifty.compressors.base import Compressor
from thrifty.compressors.low_precision import BF16, FP16, NoCompression
from thrifty.compressors.memory import DGCMemory, Memory, NoMemory, ResidualMemory
from thrifty.compressors.powersgd import PowerSGD
from thrifty.compressors.quantizers import QSGD, TernGrad
from thrifty.compressors.sign import EFSignSGD, OneBit, SignSGD, Signum
from thrifty.compressors.sparsifiers import DGC, RandomK, TopK

COMPRESSORS: dict[str, type[Compressor]] = {
    cls.name: cls
    for cls in (
        NoCompression,
        FP16,
        BF16,
        TopK,
        RandomK,
        DGC,
        QSGD,
        TernGrad,
        SignSGD,
        EFSignSGD,
        Signum,
        OneBit,
        PowerSGD,
    )
}


def check_options(name: str, cls: type, options: Mapping[str, Any]) -> None:
    """Refuse keyword arguments ``cls`` does not take, naming the ones it does.

    Python's own error (``unexpected keyword argument``) names the typo but
    not the options there are; registries build by name, so the user may
    never have seen the class.
    """
    accepted = _options_of(cls)
    unknown = [k for k in options if accepted is not None and k not in accepted]
    if unknown:
        raise TypeError(
            f"{name} takes no option {', '.join(map(repr, unknown))}; its options: "
            f"{', '.join(accepted or ()) or 'none'}"
        )


@functools.cache
def _options_of(cls: type) -> tuple[str, ...] | None:
    """The keyword arguments ``cls(...)`` takes; None when it takes any (``**kwargs``)."""
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL)


def available_compressors() -> list[str]:
    """Registry names, sorted."""
    return sorted(COMPRESSORS)


def get_compressor(name: str, **kwargs: Any) -> Compressor:
    """A new compressor by registry name; ``kwargs`` go to its constructor."""
    try:
        cls = COMPRESSORS[name]
    except KeyError:
        raise ValueError(
            f"unknown compressor {name!r}; available: {', '.join(available_compressors())}"
        ) from None
    check_options(name, cls, kwargs)
    return cls(**kwargs)


def default_memory(name: str) -> Memory:
    """The error feedback Cupcake/MergeComp pairs with compressor ``name``.

    * none: ``none``, ``fp16``, ``bf16``, ``signsgd``, ``signum``, ``terngrad``
      (unbiased, no error feedback in the paper);
    * residual with ``beta=0.9`` (Cupcake's ``e <- 0.9 e + g``): ``efsignsgd``,
      ``qsgd``, ``onebit``;
    * residual with ``beta=1``: ``powersgd`` (Vogels et al.);
    * DGC memory: ``dgc`` (momentum 0.9), ``topk`` and ``randomk`` (momentum 0).
    """
    if name not in COMPRESSORS:
        raise ValueError(
            f"unknown compressor {name!r}; available: {', '.join(available_compressors())}"
        )
    if name in ("efsignsgd", "qsgd", "onebit"):
        return ResidualMemory(beta=0.9)
    if name == "powersgd":
        return ResidualMemory()
    if name == "dgc":
        return DGCMemory(momentum=0.9)
    if name in ("topk", "randomk"):
        return DGCMemory(momentum=0.0)
    return NoMemory()


MEMORIES: dict[str, type[Memory]] = {"none": NoMemory, "residual": ResidualMemory, "dgc": DGCMemory}


def get_memory(name: str, **kwargs: Any) -> Memory:
    """Error feedback by name (``none``, ``residual``, ``dgc``) with constructor ``kwargs``."""
    try:
        cls = MEMORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown memory {name!r}; available: {', '.join(sorted(MEMORIES))}"
        ) from None
    check_options(name, cls, kwargs)
    return cls(**kwargs)
