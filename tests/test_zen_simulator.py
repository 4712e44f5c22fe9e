"""The Zen simulator: its bytes agree with the analytic model, its fits recover what made the data.

The per-node bytes of every scheme, times the nodes, must equal the total the
byte model (:func:`thrifty.zen.predict_wire_bytes`) gives, and that model is
checked against the ledger of real runs in tests/test_zen_schemes.py and the
benchmark. Eq. 1 and Eq. 2 are the simulator without latency, control
messages or compute. The validation against real emulated-NIC runs is in
tests/test_bench_smoke_zen_marconi.py (netem) and in the README's table.
"""

from __future__ import annotations

import math

import pytest

from thrifty.zen.analytic import (
    SCHEME_NAMES,
    SparsityStats,
    eq1_bp_volume,
    eq2_hc_volume,
    predict_wire_bytes,
)
from thrifty.zen.scaling import measure_source, stats_from_record, stats_record, sweep_source
from thrifty.zen.simulator import (
    ComputeModel,
    ComputeSample,
    NicNetwork,
    PrimitiveTiming,
    crossover,
    fit_compute,
    fit_network,
    scheme_steps,
    simulate,
)

RATE = 125e6  # 1 Gbit/s in bytes


def _stats(n: int, gamma_of_k=lambda k: k**0.7, density: float = 0.01, skew: float = 1.0):
    sizes = sorted({1 << i for i in range(n.bit_length()) if 1 << i <= n} | {n})
    return SparsityStats(
        num_rows=1_000_000,
        world_size=n,
        density=density,
        gammas={k: gamma_of_k(k) for k in sizes},
        block_density=density * 3,
        block_union_density=min(1.0, density * 3 * gamma_of_k(n)),
        skewness=skew,
    )


@pytest.mark.parametrize("n", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("scheme", [s for s in SCHEME_NAMES if s != "omnireduce"])
def test_per_node_bytes_times_nodes_equal_the_byte_models_total(scheme: str, n: int) -> None:
    """Balanced schemes: every node sends the same, so n x one node's egress is the total."""
    stats = _stats(n)
    steps = scheme_steps(scheme, stats, values_per_index=16)
    sent = sum(s.out_bytes for s in steps)
    # HC with a fold: folded ranks send less than core ranks, so the busiest is a core rank.
    volume = predict_wire_bytes(scheme, stats, values_per_index=16)
    if scheme == "sparcml" and n & (n - 1):
        assert sent * n >= volume.total_bytes
    else:
        assert sent * n == pytest.approx(volume.total_bytes, rel=1e-8)  # dense: ceil per rank


@pytest.mark.parametrize("n", [2, 4, 8, 16, 64])
def test_without_latency_and_control_the_model_is_eq1_and_eq2(n: int) -> None:
    stats = _stats(n, density=1e-4)  # COO pull is smaller than the hash bitmap here
    network = NicNetwork(rate=RATE)
    entry = 4 + 4
    exchanges = 2 * (n - 1) * 8  # BP's two size exchanges
    bp = simulate("zen", stats, network, checked=False).seconds * RATE - exchanges
    assert bp == pytest.approx(eq1_bp_volume(stats.gamma, n, 1e-4, 1_000_000, entry), rel=1e-9)
    stages = n.bit_length() - 1
    hc = simulate("sparcml", stats, network, checked=False).seconds * RATE - stages * (n - 1) * 8
    assert hc == pytest.approx(eq2_hc_volume(stats.gammas, n, 1e-4, 1_000_000, entry), rel=1e-9)


def test_incast_at_the_owner_of_a_skewed_range_costs_time_at_equal_bytes() -> None:
    """OmniReduce's total bytes do not depend on skew; its busiest owner's ingress does."""
    network = NicNetwork(rate=RATE)
    flat, skewed = _stats(8, skew=1.0), _stats(8, skew=6.0)
    total = [predict_wire_bytes("omnireduce", s).payload_bytes for s in (flat, skewed)]
    assert total[0] == total[1]
    times = [simulate("omnireduce", s, network).network_s for s in (flat, skewed)]
    assert times[1] > 4 * times[0]
    # Zen's owners come from a hash: the same skew costs it nothing.
    zen = [simulate("zen", s, network).network_s for s in (flat, skewed)]
    assert zen[0] == zen[1]


def test_latency_and_compute_add_up() -> None:
    stats = _stats(8)
    bare = simulate("agsparse", stats, NicNetwork(rate=RATE))
    slow = simulate("agsparse", stats, NicNetwork(rate=RATE, alpha=1e-3, alpha_peer=1e-4))
    calls = len(scheme_steps("agsparse", stats))
    assert slow.network_s - bare.network_s == pytest.approx(calls * 1e-3 + 3 * 7 * 1e-4)
    compute = ComputeModel({"agsparse": (1e-3, 1e-8)}, cores=2)
    shared = simulate("agsparse", stats, NicNetwork(rate=RATE), compute)
    own = simulate("agsparse", stats, NicNetwork(rate=RATE), ComputeModel(compute.coefficients))
    assert shared.compute_s == pytest.approx(4 * own.compute_s)  # 8 ranks on 2 cores
    assert shared.seconds == shared.network_s + shared.compute_s


def test_network_fit_recovers_alpha_alpha_peer_rate_and_ring_efficiency() -> None:
    truth = NicNetwork(rate=RATE, alpha=2e-4, alpha_peer=3e-5, ring_efficiency=0.6)
    timings = []
    for n in (2, 4, 8):
        for size in (256, 16 << 10, 1 << 20):
            node = size * (n - 1)
            seconds = truth.alpha + truth.alpha_peer * (n - 1) + node / truth.rate
            timings.append(PrimitiveTiming("all_to_all", n, n - 1, node, seconds))
        node = 2 * (n - 1) / n * (8 << 20)
        ring = truth.alpha + truth.alpha_peer * 2 * (n - 1) + node / (truth.rate * 0.6)
        timings.append(PrimitiveTiming("all_reduce", n, 2 * (n - 1), node, ring))
    fitted = fit_network(timings)
    for field in ("rate", "alpha", "alpha_peer", "ring_efficiency"):
        assert getattr(fitted, field) == pytest.approx(getattr(truth, field), rel=1e-6), field
    with pytest.raises(ValueError, match="needs >= 3 all_to_all"):
        fit_network(timings[-1:])


def test_compute_fit_recovers_coefficients_under_core_sharing() -> None:
    truth = {"zen": (2e-3, 5e-9), "dense": (1e-3, 2e-9)}
    samples = [
        ComputeSample(s, n, work, max(1, n / 2) * (a + b * work))
        for s, (a, b) in truth.items()
        for n in (2, 4, 8)
        for work in (1e4, 1e6, 1e7)
    ]
    fitted = fit_compute(samples, cores=2)
    for scheme, (a, b) in truth.items():
        assert fitted.coefficients[scheme] == pytest.approx((a, b), rel=1e-6)


def test_crossover_is_where_the_speedup_holds_from_there_on() -> None:
    nodes = [2, 4, 8, 16, 32]
    zen = [1.0] * 5
    assert crossover(nodes, zen, [1.0, 2.5, 1.5, 2.0, 3.0]) == 16  # the lucky n=4 does not count
    assert crossover(nodes, zen, [1.0, 1.0, 1.0, 1.0, 1.9]) is None
    assert crossover(nodes, zen, [3.0] * 5) == 2


def test_bad_networks_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="rate"):
        NicNetwork(rate=0.0)
    with pytest.raises(ValueError, match="alpha"):
        NicNetwork(rate=1.0, alpha=math.nan)
    with pytest.raises(ValueError, match="unknown scheme 'ring'"):
        simulate("ring", _stats(4), NicNetwork(rate=RATE))


def test_sweep_on_real_deepfm_sparsity_finds_where_zen_wins() -> None:
    """DeepFM's Zipf rows to 32 ranks: gamma grows far slower than n, so Zen pulls ahead."""
    measured = measure_source("deepfm", 0.01, [2, 4, 8, 16, 32])
    gammas = {int(k): v for k, v in measured["stats"]["32"]["gammas"].items()}
    assert gammas[2] < gammas[4] < gammas[8] < gammas[16] < gammas[32] < 32 / 2
    record = measured["stats"]["8"]
    assert stats_record(stats_from_record(record), 1.0, 1.0)["gammas"] == record["gammas"]
    sweep = sweep_source(measured, NicNetwork.from_bits(1e9, 30e-6, 5e-6))
    speedup = sweep["zen_speedup"]["agsparse"]
    assert speedup == sorted(speedup)  # the more nodes, the more Zen saves over AGsparse
    # Zen >= 2x AGsparse exactly where n / (1 + gamma(n)) reaches about 2 (Eq. 1 vs AGsparse).
    first = sweep["crossover_2x"]["agsparse"]
    assert first is not None and first / (1 + gammas[first]) >= 1.8
