"""``thrifty demo``: a short tour of every system that exists, one summary table.

Each stop is a function returning a :class:`TourStop` row; systems add their own
stop here as they land. The whole tour must stay under 5 minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from thrifty.bench.launch import run_ranks
from thrifty.bench.models import DigitsCNN, ResNetCNN, build_model, train_digits_shard
from thrifty.bench.netem import parse_rate
from thrifty.bench.results import results_dir
from thrifty.bench.training import BATCH, DEFAULT_OPTIONS, training_loss
from thrifty.bytecomp import decide, zero_cost_profile
from thrifty.comm import NetworkModel, Topology, collectives
from thrifty.lazarus.launch import LazarusJob, worker_pids
from thrifty.lazarus.train import TrainJob
from thrifty.marconi import sharegpt_trace, sweep
from thrifty.marconi.benchmark import engine_demo
from thrifty.mergecomp import optimal_partition, partition_time
from thrifty.sync import GradientSync, Strategy
from thrifty.sync.profile import profile_model
from thrifty.zen import measure_sparsity, predict_wire_bytes, sync_sparse

__all__ = ["TOUR", "TourStop", "bytecomp_decision"]


@dataclass
class TourStop:
    """One row of the tour's table: which system, what ran, what came out, how long."""

    system: str
    what: str
    result: str
    seconds: float = 0.0


def _collectives_rank(nbytes: int, reps: int) -> dict[str, tuple[float, int]]:
    """Median time and wire bytes of each primitive on a ``nbytes`` message."""
    n = dist.get_world_size()
    x = torch.ones(nbytes // 4)
    ops = {
        "all-reduce": lambda: collectives.all_reduce(x),
        "all-gather": lambda: collectives.all_gather(x[: x.numel() // n]),
        "all-to-all (v)": lambda: collectives.all_to_all_v(list(x.chunk(n))),
    }
    out = {}
    for name, op in ops.items():
        op()  # warm-up
        times = []
        with collectives.count_bytes() as ledger:
            for _ in range(reps):
                dist.barrier()
                start = time.perf_counter()
                op()
                times.append(time.perf_counter() - start)
        out[name] = (sorted(times)[reps // 2], ledger.wire_bytes // reps)
    return out


def collectives_stop() -> TourStop:
    start = time.perf_counter()
    nbytes = 16 << 20
    timings = run_ranks(_collectives_rank, 2, nbytes, 5)[0]
    parts = [
        f"{name} {t * 1e3:.1f} ms, {wire / 2**20:.1f} MiB sent/rank"
        for name, (t, wire) in timings.items()
    ]
    return TourStop(
        "collectives (foundation)",
        "16 MiB on 2 gloo ranks, plain loopback, bytes counted",
        "; ".join(parts),
        time.perf_counter() - start,
    )


def _compressed_training_rank(compressor: str, steps: int) -> dict[str, float]:
    """Train the digits CNN on this rank's shard with compressed gradient sync."""
    n = dist.get_world_size()
    torch.manual_seed(0)
    model = DigitsCNN()
    sync = GradientSync(model, compressor=compressor, plan="whole", ratio=0.05)
    accuracy = train_digits_shard(model, torch.optim.Adam(model.parameters(), lr=3e-3), steps)
    dense = sum(p.numel() for p in model.parameters()) * 4 * 2 * (n - 1) / n * steps
    return {"accuracy": accuracy, "sent": sync.ledger.wire_bytes, "dense": dense}


def gradient_sync_stop() -> TourStop:
    start = time.perf_counter()
    steps = 150
    result = run_ranks(_compressed_training_rank, 2, "topk", steps)[0]
    return TourStop(
        "GradientSync (compressors)",
        f"digits CNN, 2 ranks, {steps} steps, Top-k 5% + error feedback, whole-model group",
        f"test accuracy {result['accuracy']:.1%}; sent {result['sent'] / 2**20:.2f} MiB/rank "
        f"vs {result['dense'] / 2**20:.2f} MiB for fp32 all-reduce "
        f"({result['dense'] / result['sent']:.1f}x less)",
        time.perf_counter() - start,
    )


def mergecomp_stop() -> TourStop:
    """Profile the ResNet-style CNN here and let MergeComp's model choose its groups."""
    start = time.perf_counter()
    torch.manual_seed(0)
    model = ResNetCNN()
    batch = model.example_batch(8)
    strategy = Strategy.make("dgc", ratio=0.01)
    profile = profile_model(
        model,
        lambda: training_loss("cnn", model, batch),
        iters=2,
        warmup=1,
        compressors=[strategy],
        world_size=2,
    )
    fitted = results_dir() / "collectives.json"
    try:
        network = NetworkModel.load(fitted, "1gbit")
        source = "fitted 1 Gbit/s model"
    except (OSError, KeyError):
        network = NetworkModel.analytic("1gbit", 1e9, latency=5e-4)
        source = "ideal 1 Gbit/s link (run `thrifty bench collectives` to fit one)"
    best = optimal_partition(profile, strategy, network)
    n = len(profile.tensors)
    layer = partition_time(profile, strategy, network, (1,) * n)
    whole = partition_time(profile, strategy, network, (n,))
    return TourStop(
        "MergeComp",
        f"ResNet CNN ({n} tensors) profiled here, DGC 1%, 2 workers, {source}",
        f"{len(best.lengths)} groups of {list(best.lengths)} tensors: predicted "
        f"{best.predicted:.2f} s/iter vs layer-wise {layer:.2f}, whole-model "
        f"{whole:.2f} (searched in {best.search_seconds * 1e3:.0f} ms)",
        time.perf_counter() - start,
    )


def bytecomp_decision(
    model_name: str = "cnn",
    compressor: str = "randomk",
    nodes: int = 2,
    ranks_per_node: int = 2,
    rate: str = "1gbit",
) -> str:
    """Profile ``model_name`` here and describe ByteComp's decision on an analytic topology.

    The links are ideal: each node's NIC at ``rate``, shared by its ranks (flat
    collectives and the cross-node groups), and 20x that inside a node.
    """
    torch.manual_seed(0)
    model = build_model(model_name)
    batch = model.example_batch(**BATCH[model_name])
    strategy = Strategy.make(compressor, **DEFAULT_OPTIONS.get(compressor, {}))
    k, n = ranks_per_node, nodes * ranks_per_node
    profile = profile_model(
        model,
        lambda: training_loss(model_name, model, batch),
        iters=2,
        warmup=1,
        compressors=[strategy],
        world_size=n,
    )
    bits = parse_rate(rate)
    shared = NetworkModel.analytic(rate, bits / k, latency=5e-4)
    inside = NetworkModel.analytic("intra", 20 * bits, latency=2e-4)
    if nodes > 1 and k > 1:
        topology = Topology(nodes, k, shared, inside, shared)
    else:
        topology = Topology(nodes, k, shared)
    decision = decide(profile, strategy, topology)
    bound = decide(zero_cost_profile(profile), strategy, topology).predicted
    counts: dict[str, int] = {}
    for g in decision.plan.groups:
        counts[g.strategy.label()] = counts.get(g.strategy.label(), 0) + len(g.names)
    chosen = ", ".join(
        f"{c} x {label}" for label, c in sorted(counts.items(), key=lambda kv: -kv[1])
    )
    return (
        f"{model_name} ({len(profile.tensors)} tensors, {compressor}) on {nodes}x{k} ranks at "
        f"{rate}: {len(decision.plan.groups)} units ({decision.bucket_bytes // 1024} KiB buckets): "
        f"{chosen}. Predicted {decision.predicted:.2f} s/iter vs {decision.baseline:.2f} fp32 "
        f"all-reduce ({decision.speedup:.2f}x); zero-cost compression bound {bound:.2f}"
    )


def bytecomp_stop() -> TourStop:
    start = time.perf_counter()
    text = bytecomp_decision("cnn", "randomk", 2, 2, "200mbit")
    return TourStop(
        "ByteComp",
        "ResNet CNN profiled here, Random-k 1%, 2 nodes x 2 ranks, ideal 200 Mbit/s NICs",
        text,
        time.perf_counter() - start,
    )


def _zipf_tokens(vocab: int, tokens: int, worker: int) -> torch.Tensor:
    zipf = torch.arange(1, vocab + 1, dtype=torch.float64) ** -1.1
    gen = torch.Generator().manual_seed(worker)
    return torch.multinomial(zipf.float(), tokens, replacement=True, generator=gen)


def _zen_rank(vocab: int, tokens: int) -> dict[str, object]:
    """An embedding gradient of Zipf-distributed tokens, synced by AGsparse, Zen and dense."""
    torch.manual_seed(0)
    embedding = nn.Embedding(vocab, 64, sparse=True)
    embedding(_zipf_tokens(vocab, tokens, dist.get_rank())).square().mean().backward()
    grad = embedding.weight.grad
    assert grad is not None
    out: dict[str, object] = {"rows": grad.coalesce().indices().shape[1]}
    results = {}
    for scheme in ("agsparse", "zen", "dense"):
        with collectives.count_bytes() as ledger:
            start = time.perf_counter()
            results[scheme] = sync_sparse(grad, scheme, output="dense")
            out[f"{scheme}_s"] = time.perf_counter() - start
        out[f"{scheme}_bytes"] = ledger.wire_bytes
    scale = results["dense"].abs().max().item() or 1.0
    out["max_diff"] = max(
        (results[s] - results["dense"]).abs().max().item() / scale for s in ("agsparse", "zen")
    )
    return out


def zen_stop() -> TourStop:
    start = time.perf_counter()
    n, vocab, tokens = 4, 100_277, 2048
    ranks = run_ranks(_zen_rank, n, vocab, tokens)
    mib = 2**20

    def sent(scheme: str) -> str:
        per_rank = [r[f"{scheme}_bytes"] for r in ranks]
        return f"{max(per_rank) / mib:.2f}"  # type: ignore[operator]

    worst = max(r["max_diff"] for r in ranks)  # type: ignore[type-var]
    density = sum(r["rows"] for r in ranks) / n / vocab  # type: ignore[misc]
    # The same data on 16 workers, priced by the analytic model (AGsparse grows with n).
    sets = [torch.unique(_zipf_tokens(vocab, tokens, w)) for w in range(16)]
    stats = measure_sparsity(sets, vocab)
    volumes = {s: predict_wire_bytes(s, stats, values_per_index=64) for s in ("agsparse", "zen")}
    at16 = {scheme: volume.max_rank_bytes / mib for scheme, volume in volumes.items()}
    return TourStop(
        "Zen (sparse sync)",
        f"embedding gradient ({vocab} x 64, Zipf tokens, {density:.2%} of rows per rank), "
        f"{n} gloo ranks, plain loopback",
        f"MiB sent by the busiest rank: AGsparse {sent('agsparse')}, Zen {sent('zen')}, "
        f"dense all-reduce {sent('dense')}; both equal dense within {worst:.0e} (relative). "
        f"Model, same data on 16 ranks: AGsparse {at16['agsparse']:.2f}, Zen {at16['zen']:.2f}",
        time.perf_counter() - start,
    )


def marconi_stop() -> TourStop:
    """Simulate ShareGPT at one cache size, then serve a few real cached requests."""
    start = time.perf_counter()
    try:
        import transformers  # optional: [marconi]
    except ImportError as exc:
        why = f"needs {exc.name} (pip install 'thrifty[marconi]')"
        return TourStop("Marconi (hybrid prefix cache)", "skipped", why, 0.0)
    transformers.logging.set_verbosity_error()  # the reference-kernel fallback notices
    trace = sharegpt_trace(num_sessions=20)
    rates = {r.policy: r.token_hit_rate for r in sweep(trace, capacities_gb=(1,), progress=False)}
    demo = engine_demo()
    if not demo["identical"]:
        raise AssertionError("Marconi engine: cached outputs differ from uncached generation")
    return TourStop(
        "Marconi (hybrid prefix cache)",
        f"ShareGPT, 20 sessions ({len(trace)} requests), paper's 7B hybrid, 1 GB, simulated; "
        f"then {demo['requests']} requests (shared system prompt, 2 turns) on a tiny random "
        f"{demo['arch']} on CPU",
        f"token hit rate vLLM+ {rates['vllm+']:.1%}, SGLang+ {rates['sglang+']:.1%}, Marconi "
        f"{rates['marconi']:.1%}. Engine: outputs identical to no cache, hit rate "
        f"{demo['hit_rate']:.0%}, mean TTFT {demo['ttft_cached_ms']:.0f} ms vs "
        f"{demo['ttft_plain_ms']:.0f} ms uncached "
        f"({demo['ttft_plain_ms'] / demo['ttft_cached_ms']:.1f}x)",
        time.perf_counter() - start,
    )


def lazarus_stop() -> TourStop:
    """4 workers as users launch them (coordinator + torchrun each); kill -9 one from outside."""
    start = time.perf_counter()
    if importlib.util.find_spec("transformers") is None:  # optional: [lazarus]
        why = "needs transformers (pip install 'thrifty[lazarus]')"
        return TourStop("Lazarus (resilient MoE)", "skipped", why, 0.0)
    job = TrainJob(model="mixtral", steps=30, experts=4, slots=3)
    # No restart here, to keep the tour short: `thrifty lazarus train` restarts a dead
    # worker (it rejoins and receives replicas), and its test shows that.
    tmp = tempfile.TemporaryDirectory(prefix="thrifty-demo-lazarus-")
    with tmp, LazarusJob(job, 4, tmp.name, max_restarts=0, timeout_s=300) as running:
        while running.committed_step() < 3 or len(worker_pids(tmp.name)) < 4:
            if not any(p.poll() is None for p in running.agents):
                break  # wait() says why
            time.sleep(0.05)
        victim, pid = sorted(worker_pids(tmp.name).items())[2]
        os.kill(pid, signal.SIGKILL)  # from outside: nothing in the job knows when
        report = running.wait()
    failure = next(r for r in report["reconfigurations"] if r["kind"] == "failure")
    loss = report["loss"]
    return TourStop(
        "Lazarus (resilient MoE)",
        "tiny HF Mixtral (2 layers x 4 experts, top-2) on ShareGPT, 4 workers x 3 slots, each "
        f"under its own torchrun; worker {victim} SIGKILLed from outside at step "
        f"{failure['step']}",
        f"recovered on {failure['members_after']} in {failure['total_s']:.2f} s (detect "
        f"{failure['detection_s'] or 0:.3f} s), {failure['replicas_moved']} replicas moved, "
        f"{report['checkpoint_reloads']} checkpoint reloads; loss {loss[0]:.2f} -> "
        f"{loss[-1]:.2f} over {report['steps']} steps",
        time.perf_counter() - start,
    )


TOUR: list[Callable[[], TourStop]] = [
    collectives_stop,
    gradient_sync_stop,
    mergecomp_stop,
    bytecomp_stop,
    zen_stop,
    marconi_stop,
    lazarus_stop,
]
