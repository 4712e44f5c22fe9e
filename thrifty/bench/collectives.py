"""Measure all-reduce, all-gather and all-to-all vs message size; fit the NetworkModel.

For each network condition (plain loopback, and rate-limited loopback namespaces
such as 1 Gbit/s and 10 Gbit/s) and each world size, every primitive is timed
at message sizes from 4 KB to 64 MB on real gloo ranks. An alpha-beta model is
fitted per (primitive, world size) and written with the raw timings to
``results/collectives.json``; a plot goes beside it.

The timing and the fit are :mod:`thrifty.comm.calibration`'s, the same that the
planners run in place; this module adds the network conditions, the JSON and the
plot. Message size follows nccl-tests (see there).

Run with ``thrifty bench collectives`` or ``python benchmarks/collectives.py``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from tqdm import tqdm

from thrifty.bench import netem
from thrifty.bench.launch import run_ranks
from thrifty.bench.results import results_dir, write_json
from thrifty.comm.calibration import CollectiveTiming, fit_report, fit_timings, time_collectives
from thrifty.comm.network import PRIMITIVES, NetworkModel

__all__ = ["DEFAULT_SIZES", "measure", "run_benchmark", "run_from_env", "summary_rows"]

log = logging.getLogger(__name__)

DEFAULT_SIZES = tuple(4096 * 4**i for i in range(8))  # 4 KB ... 64 MB
LOOPBACK = "loopback"


def measure(
    world_size: int,
    sizes: Sequence[int] = DEFAULT_SIZES,
    primitives: Sequence[str] = PRIMITIVES,
    budget_s: float = 0.5,
    label: str = "",
) -> list[dict[str, Any]]:
    """Time each primitive at each size on ``world_size`` ranks in this network namespace.

    Returns JSON rows (:meth:`CollectiveTiming.to_dict`): they cross a process
    boundary when measured inside a rate-limited namespace.
    """
    label = label or f"n={world_size}"
    per_rank = run_ranks(
        time_collectives,
        world_size,
        primitives,
        sizes,
        budget_s=budget_s,
        label=label,
        progress=True,
        timeout=900.0,
    )
    return [t.to_dict() for t in per_rank[0]]


def _measure_in_namespace(
    rate: str, world_size: int, sizes: Sequence[int], budget_s: float
) -> list[dict[str, Any]]:
    label = f"{rate} n={world_size}"
    spec = {"world_size": world_size, "sizes": list(sizes), "budget_s": budget_s, "label": label}
    return netem.run_worker(rate, "thrifty.bench.collectives", spec)


def _timings(rows: Sequence[dict[str, Any]]) -> list[CollectiveTiming]:
    return [CollectiveTiming.from_dict(r) for r in rows]


def run_benchmark(
    rates: Sequence[str] = (LOOPBACK, "10gbit", "1gbit"),
    world_sizes: Sequence[int] = (2, 4),
    sizes: Sequence[int] = DEFAULT_SIZES,
    budget_s: float = 0.5,
    plot: bool = True,
) -> dict[str, Any]:
    """Measure every (rate, world size), fit one NetworkModel per rate, write JSON + PNG."""
    emulated = [r for r in rates if r != LOOPBACK]
    skipped: dict[str, str] = {}
    if emulated:
        try:
            netem.check_available()
        except netem.NetemUnavailable as exc:
            log.warning("skipping emulated rates %s: %s", emulated, exc)
            skipped = {r: str(exc) for r in emulated}
    runs = [(r, n) for r in rates if r not in skipped for n in world_sizes]
    rows: list[dict[str, Any]] = []
    for rate, n in tqdm(runs, desc="collectives", unit="run", file=sys.stderr):
        if rate == LOOPBACK:
            got = measure(n, sizes, budget_s=budget_s, label=f"{rate} n={n}")
        else:
            got = _measure_in_namespace(rate, n, sizes, budget_s)
        rows += [{**r, "rate": rate} for r in got]
    models, reports = [], {}
    for rate in dict.fromkeys(r for r, _ in runs):
        mine = _timings([r for r in rows if r["rate"] == rate])
        model = fit_timings(rate, mine)
        models.append(model.to_dict())
        reports[rate] = fit_report(model, mine)
    payload = {
        "sizes": list(sizes),
        "world_sizes": list(world_sizes),
        "rates": list(rates),
        "skipped_rates": skipped,
        "models": models,
        "fit_error": reports,
        "rows": rows,
    }
    path = write_json("collectives", payload)
    payload["json_path"] = str(path)
    if plot:
        payload["plot_path"] = str(plot_collectives(payload, results_dir() / "collectives.png"))
    return payload


def run_from_env(sizes: Sequence[int] = DEFAULT_SIZES, budget_s: float = 0.5) -> dict | None:
    """Measure in the process group that ``torchrun`` describes (one call per rank).

    This is how the model is fitted for a real cluster: every rank runs
    ``torchrun ... --no-python thrifty bench collectives --from-env``. Rank 0
    fits the model, named ``torchrun-n<world size>``, writes the JSON and returns
    the payload; other ranks return None.
    """
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo")
    try:
        n = dist.get_world_size()
        timings = time_collectives(
            PRIMITIVES, sizes, budget_s=budget_s, label=f"torchrun n={n}", progress=True
        )
        if dist.get_rank() != 0:
            return None
        name = f"torchrun-n{n}"
        model = fit_timings(name, timings)
        payload = {
            "sizes": list(sizes),
            "world_sizes": [n],
            "rates": [name],
            "skipped_rates": {},
            "models": [model.to_dict()],
            "fit_error": {name: fit_report(model, timings)},
            "rows": [{**t.to_dict(), "rate": name} for t in timings],
        }
        payload["json_path"] = str(write_json("collectives", payload))
        payload["plot_path"] = str(plot_collectives(payload, results_dir() / "collectives.png"))
        return payload
    finally:
        if owns_group:
            dist.destroy_process_group()


def _key(row: dict[str, Any]) -> tuple[str, int, str]:
    return row["rate"], row["world_size"], row["primitive"]


def plot_collectives(payload: dict[str, Any], path: Path) -> Path:
    """Measured points and fitted lines, one panel per primitive, log-log."""
    import matplotlib  # optional: [bench]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: [bench]

    models = {m["name"]: NetworkModel.from_dict(m) for m in payload["models"]}
    fig, axes = plt.subplots(1, len(PRIMITIVES), figsize=(5 * len(PRIMITIVES), 4), sharey=True)
    for ax, primitive in zip(axes, PRIMITIVES, strict=True):
        for i, (rate, model) in enumerate(models.items()):
            for j, n in enumerate(payload["world_sizes"]):
                key = (rate, n, primitive)
                pts = [r for r in payload["rows"] if _key(r) == key]
                if not pts:
                    continue
                xs = [p["nbytes"] for p in pts]
                color = f"C{i}"
                measured = [p["seconds"] for p in pts]
                fitted = [model.time(primitive, x, n) for x in xs]
                marker, line = ("o", "--") if j == 0 else ("s", ":")
                ax.loglog(xs, measured, marker, color=color, label=f"{rate}, {n} ranks")
                ax.loglog(xs, fitted, line, color=color)
        ax.set_title(primitive.replace("_", "-"))
        ax.set_xlabel("message size (bytes)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time (s): points measured, lines fitted")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary_rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (rate, primitive, world size): alpha, bandwidth, fit error >= 1 MB."""
    out = []
    for m in payload["models"]:
        model = NetworkModel.from_dict(m)
        for primitive, by_n in model.fits.items():
            for n, ab in sorted(by_n.items()):
                key = (model.name, n, primitive)
                report = fit_report(model, _timings([r for r in payload["rows"] if _key(r) == key]))
                out.append(
                    {
                        "rate": model.name,
                        "primitive": primitive,
                        "world_size": n,
                        "floor_us": ab.floor * 1e6,
                        "alpha_us": ab.alpha * 1e6,
                        "GB_per_s": (1 / ab.beta / 1e9) if ab.beta > 0 else float("inf"),
                        "max_err_ge_1MB": report["max_abs_rel_error_ge_1MB"],
                    }
                )
    return out


def _worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Entry point inside a namespace (see :func:`thrifty.bench.netem.run_worker`)."""
    n, sizes, budget = spec["world_size"], spec["sizes"], spec["budget_s"]
    return measure(n, sizes, budget_s=budget, label=spec["label"])


if __name__ == "__main__":
    netem.worker_main(_worker)
