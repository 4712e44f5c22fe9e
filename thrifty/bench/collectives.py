"""Measure all-reduce, all-gather and all-to-all vs message size; fit the NetworkModel.

For each network condition (plain loopback, and rate-limited loopback namespaces
such as 1 Gbit/s and 10 Gbit/s) and each world size, every primitive is timed
at message sizes from 4 KB to 64 MB on real gloo ranks. An alpha-beta model is
fitted per (primitive, world size) and written with the raw timings to
``results/collectives.json``; a plot goes beside it.

Message size follows nccl-tests: the tensor for all-reduce, the gathered result
for all-gather, one rank's whole send buffer for all-to-all.

Run with ``thrifty bench collectives`` or ``python benchmarks/collectives.py``.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from thrifty.bench import netem
from thrifty.bench.launch import run_ranks
from thrifty.bench.results import results_dir, write_json
from thrifty.comm import collectives
from thrifty.comm.network import LARGE_MESSAGE, PRIMITIVES, Measurement, NetworkModel

__all__ = ["DEFAULT_SIZES", "fit_report", "measure", "run_benchmark"]

log = logging.getLogger(__name__)

DEFAULT_SIZES = tuple(4096 * 4**i for i in range(8))  # 4 KB ... 64 MB
LOOPBACK = "loopback"
ACCURACY_FROM_BYTES = LARGE_MESSAGE  # the fit is judged on messages >= 1 MB


def _run_once(
    primitive: str,
    buf: torch.Tensor,
    out: torch.Tensor,
    n: int,
    group: dist.ProcessGroup | None = None,
) -> None:
    """One collective on ``buf``, receiving into ``out``: the network, not the allocator."""
    chunk = buf.numel() // n
    if primitive == "all_reduce":
        collectives.all_reduce(buf, group=group)
    elif primitive == "all_gather":
        collectives.all_gather(buf[:chunk], group=group, out=list(out[: chunk * n].split(chunk)))
    elif primitive == "all_to_all":
        collectives.all_to_all_v(list(buf[: chunk * n].split(chunk)), group=group,
                       recv_sizes=[chunk] * n, out=out[: chunk * n])  # fmt: skip
    else:
        raise ValueError(f"unknown primitive {primitive!r}")


def time_collectives(
    primitives: Sequence[str],
    sizes: Sequence[int],
    budget_s: float,
    label: str,
    progress: bool = True,
    group: dist.ProcessGroup | None = None,
    lockstep: dist.ProcessGroup | None = None,
) -> list[dict[str, Any]]:
    """Time each primitive at each size in ``group`` (call on every rank of it).

    Every rank gets the same rows: per size, the median over reps of the slowest
    rank's time. Also used by planners to fit a network model in place.

    Args:
        group: the process group the collectives run in; None is the world.
        lockstep: the group that synchronises the reps and takes the slowest
            time, by default ``group`` itself. To time disjoint groups running at
            the same time (every node's intra group, or all cross groups sharing
            the NICs), call this on every rank with ``lockstep`` spanning them
            all: the groups then start each rep together, run the same number of
            reps, and every rank gets the same rows.
    """
    n = dist.get_world_size(group)
    sync = group if lockstep is None else lockstep
    items = [(p, s) for p in primitives for s in sizes]
    # One bar, on global rank 0, also when several groups are timed at once.
    show = progress and dist.get_rank() == 0
    bar = tqdm(items, desc=label, disable=not show, leave=False, file=sys.stderr)
    out = []
    for primitive, nbytes in bar:
        buf = torch.ones(max(n, nbytes // 4), dtype=torch.float32)
        recv = torch.empty_like(buf)
        if nbytes <= 4 << 20:
            _run_once(primitive, buf, recv, n, group)  # warm-up: connections, allocator
        reps: list[float] = []
        # Decide on the all-reduced times, never a local clock: every rank must
        # run the same number of reps or the collectives mismatch.
        while len(reps) < 3 or (sum(reps) < budget_s and len(reps) < 20):
            dist.barrier(group=sync)
            start = time.perf_counter()
            _run_once(primitive, buf, recv, n, group)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=sync)
            reps.append(elapsed.item())
        out.append(
            {"primitive": primitive, "world_size": n, "nbytes": nbytes,
             "seconds": statistics.median(reps), "reps": reps}
        )  # fmt: skip
    return out


def measure(
    world_size: int,
    sizes: Sequence[int] = DEFAULT_SIZES,
    primitives: Sequence[str] = PRIMITIVES,
    budget_s: float = 0.5,
    label: str = "",
) -> list[dict[str, Any]]:
    """Time each primitive at each size on ``world_size`` ranks in this network namespace."""
    label = label or f"n={world_size}"
    args = (primitives, sizes, budget_s, label)
    return run_ranks(time_collectives, world_size, *args, timeout=900.0)[0]


def _measure_in_namespace(
    rate: str, world_size: int, sizes: Sequence[int], budget_s: float
) -> list[dict[str, Any]]:
    spec = {"world_size": world_size, "sizes": list(sizes), "budget_s": budget_s,
            "label": f"{rate} n={world_size}"}  # fmt: skip
    return netem.run_worker(rate, "thrifty.bench.collectives", spec)


def _measurement(row: dict[str, Any]) -> Measurement:
    return Measurement(row["primitive"], row["world_size"], row["nbytes"], row["seconds"])


def fit_report(model: NetworkModel, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Relative errors of the fit: all sizes, and sizes >= 1 MB (the accuracy target)."""
    ms = [_measurement(r) for r in rows]
    errors = model.relative_errors(ms)
    large = [abs(e) for m, e in zip(ms, errors, strict=True) if m.nbytes >= ACCURACY_FROM_BYTES]
    return {
        "max_abs_rel_error": max(abs(e) for e in errors),
        "max_abs_rel_error_ge_1MB": max(large) if large else None,
        "median_abs_rel_error_ge_1MB": statistics.median(large) if large else None,
    }


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
        mine = [r for r in rows if r["rate"] == rate]
        model = NetworkModel.fit(
            rate,
            [Measurement(r["primitive"], r["world_size"], r["nbytes"], r["seconds"]) for r in mine],
        )
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
        rows = time_collectives(PRIMITIVES, sizes, budget_s, f"torchrun n={dist.get_world_size()}")
        if dist.get_rank() != 0:
            return None
        name = f"torchrun-n{dist.get_world_size()}"
        rows = [{**r, "rate": name} for r in rows]
        model = NetworkModel.fit(name, [_measurement(r) for r in rows])
        payload = {
            "sizes": list(sizes), "world_sizes": [dist.get_world_size()], "rates": [name],
            "skipped_rates": {}, "models": [model.to_dict()],
            "fit_error": {name: fit_report(model, rows)}, "rows": rows,
        }  # fmt: skip
        payload["json_path"] = str(write_json("collectives", payload))
        payload["plot_path"] = str(plot_collectives(payload, results_dir() / "collectives.png"))
        return payload
    finally:
        if owns_group:
            dist.destroy_process_group()


def plot_collectives(payload: dict[str, Any], path: Path) -> Path:
    """Measured points and fitted lines, one panel per primitive, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = {m["name"]: NetworkModel.from_dict(m) for m in payload["models"]}
    fig, axes = plt.subplots(1, len(PRIMITIVES), figsize=(5 * len(PRIMITIVES), 4), sharey=True)
    for ax, primitive in zip(axes, PRIMITIVES, strict=True):
        for i, (rate, model) in enumerate(models.items()):
            for j, n in enumerate(payload["world_sizes"]):
                pts = [r for r in payload["rows"] if (r["rate"], r["world_size"],
                       r["primitive"]) == (rate, n, primitive)]  # fmt: skip
                if not pts:
                    continue
                xs = [p["nbytes"] for p in pts]
                color = f"C{i}"
                ax.loglog(xs, [p["seconds"] for p in pts], "o" if j == 0 else "s",
                          color=color, label=f"{rate}, {n} ranks")  # fmt: skip
                ax.loglog(xs, [model.time(primitive, x, n) for x in xs], "--" if j == 0 else ":",
                          color=color)  # fmt: skip
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
                pts = [r for r in payload["rows"] if r["rate"] == model.name
                       and r["primitive"] == primitive and r["world_size"] == n]  # fmt: skip
                report = fit_report(model, pts)
                out.append({
                    "rate": model.name, "primitive": primitive, "world_size": n,
                    "floor_us": ab.floor * 1e6,
                    "alpha_us": ab.alpha * 1e6,
                    "GB_per_s": (1 / ab.beta / 1e9) if ab.beta > 0 else float("inf"),
                    "max_err_ge_1MB": report["max_abs_rel_error_ge_1MB"],
                })  # fmt: skip
    return out


def _worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Entry point inside a namespace (see :func:`thrifty.bench.netem.run_worker`)."""
    n, sizes, budget = spec["world_size"], spec["sizes"], spec["budget_s"]
    return measure(n, sizes, budget_s=budget, label=spec["label"])


if __name__ == "__main__":
    netem.worker_main(_worker)
