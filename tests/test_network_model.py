"""NetworkModel: the fit recovers known coefficients; the benchmark writes a usable model."""

from __future__ import annotations

import json
import random

import pytest

from thrifty.bench import netem
from thrifty.bench.collectives import run_benchmark
from thrifty.comm.collectives import wire_bytes
from thrifty.comm.network import AlphaBeta, Measurement, NetworkModel

SIZES = [4096 * 4**i for i in range(8)]


def _synthetic(alpha: float, beta: float, noise: float, seed: int = 0) -> list[Measurement]:
    rng = random.Random(seed)
    out = []
    for primitive in ("all_reduce", "all_gather", "all_to_all"):
        for n in (2, 4):
            for s in SIZES:
                t = (alpha + beta * wire_bytes(primitive, s, n)) * (1 + rng.uniform(-noise, noise))
                out.append(Measurement(primitive, n, s, t))
    return out


def test_fit_recovers_exact_coefficients() -> None:
    model = NetworkModel.fit("ideal", _synthetic(2e-4, 8e-9, noise=0.0))
    for by_n in model.fits.values():
        for ab in by_n.values():
            assert ab.alpha == pytest.approx(2e-4, rel=1e-6)
            assert ab.beta == pytest.approx(8e-9, rel=1e-6)


def test_fit_is_within_noise_and_coefficients_never_negative() -> None:
    data = _synthetic(1e-4, 8e-9, noise=0.05, seed=3)
    model = NetworkModel.fit("noisy", data)
    errors = model.relative_errors(data)
    large = [abs(e) for m, e in zip(data, errors, strict=True) if m.nbytes >= 1 << 20]
    smallest = [abs(e) for m, e in zip(data, errors, strict=True) if m.nbytes == SIZES[0]]
    assert max(large) < 0.11  # two noisy points either side of the line: 2 x 5% at most
    assert max(smallest) < 0.11  # the floor is the smallest call's time
    assert max(abs(e) for e in errors) < 0.5  # mid sizes: between floor and line
    # Pure bandwidth data: a free intercept would go negative; it is clamped to 0.
    flat = [Measurement("all_reduce", 2, s, 1e-9 * s * (0.9 if s < 1e5 else 1.0)) for s in SIZES]
    ab = NetworkModel.fit("bw", flat).coefficients("all_reduce", 2)
    assert ab.alpha >= 0 and ab.beta > 0


def test_latency_floor_and_bandwidth_line_are_fitted_separately() -> None:
    # Small calls cost 2 ms (ranks sharing cores), large ones 1 ms + 1 ns/byte.
    data = [Measurement("all_reduce", 4, s, max(2e-3, 1e-3 + 1e-9 * 1.5 * s)) for s in SIZES]
    ab = NetworkModel.fit("shared-cores", data).coefficients("all_reduce", 4)
    assert ab.floor == pytest.approx(2e-3)
    assert ab.alpha == pytest.approx(1e-3, rel=1e-6)
    assert ab.beta == pytest.approx(1e-9, rel=1e-6)


def test_unmeasured_world_size_borrows_nearest_and_serialises() -> None:
    model = NetworkModel("m", {"all_reduce": {2: AlphaBeta(1e-3, 1e-9), 8: AlphaBeta(5e-3, 2e-9)}})
    assert model.coefficients("all_reduce", 3) == AlphaBeta(1e-3, 1e-9)
    assert model.coefficients("all_reduce", 6) == AlphaBeta(5e-3, 2e-9)
    assert model.time("all_reduce", 10**6, 1) == 0.0
    again = NetworkModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again == model
    with pytest.raises(KeyError, match="no fit"):
        model.time("all_to_all", 1, 2)
    with pytest.raises(ValueError, match=">= 2 sizes"):
        NetworkModel.fit("x", [Measurement("all_reduce", 2, 1, 1.0)])


def test_analytic_model_is_bytes_over_rate() -> None:
    model = NetworkModel.analytic("1gbit", 1e9, latency=0.0)
    # 2 ranks, 125 MB all-reduce: each rank sends 125 MB at 125 MB/s.
    assert model.time("all_reduce", 125_000_000, 2) == pytest.approx(1.0)


def test_benchmark_writes_json_and_loadable_model(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("THRIFTY_RESULTS", str(tmp_path))
    rates = ["loopback"]
    try:
        netem.check_available()
        rates.append("1gbit")
    except netem.NetemUnavailable:
        pass
    payload = run_benchmark(rates, world_sizes=[2], sizes=[4096, 1 << 20], budget_s=0.0, plot=True)
    doc = json.loads((tmp_path / "collectives.json").read_text())
    assert (tmp_path / "collectives.png").stat().st_size > 0
    assert doc["machine"]["torch"] and doc["machine"]["cpu_count"]
    assert len(doc["rows"]) == len(rates) * 3 * 2
    assert all(len(r["reps"]) >= 3 and r["seconds"] > 0 for r in doc["rows"])
    for rate in rates:
        model = NetworkModel.load(tmp_path / "collectives.json", rate)
        for primitive in ("all_reduce", "all_gather", "all_to_all"):
            assert model.time(primitive, 1 << 20, 2) > 0
    assert set(payload["fit_error"]) == set(rates)
