"""Lazarus in a user's own training loop: real processes, real kills, a tiny HF Mixtral.

Workers run :func:`_train` (the user's loop with :class:`Lazarus`) under
``run_ranks`` with every rank allowed to die; the membership store is a
:class:`Coordinator` in this test process, outside every worker. Failures
come from outside the workers: a killer process (:func:`_killer`, started
like the workers) SIGKILLs or SIGSTOPs them by pid, timed from what the
workers publish in the store (their pids, the committed step) and from the
manager's own agreement keys (to hit a recovery while it runs).
"""

from __future__ import annotations

import datetime
import os
import pickle
import random
import signal
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from thrifty.bench.launch import run_ranks
from thrifty.lazarus.coordinator import Coordinator
from thrifty.lazarus.manager import Lazarus, LazarusOptions
from thrifty.lazarus.replan import plan_slots

transformers = pytest.importorskip("transformers")

VOCAB, SEQ, BATCH, EXPERTS = 64, 16, 2, 4


def _mixtral() -> torch.nn.Module:
    config = transformers.MixtralConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


def _store(address: str) -> dist.TCPStore:
    host, port = address.rsplit(":", 1)
    return dist.TCPStore(host, int(port), None, False, datetime.timedelta(seconds=60))


def _optimizer(kind: str) -> Any:
    if kind == "sgd":
        return lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    return lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3)


def _train(
    address: str,
    steps: int,
    optimizer: str,
    options: dict[str, Any],
    hold_for_joiner_at: int | None = None,
) -> dict[str, Any]:
    """One worker: the user's loop. Token sequences count up mod VOCAB (learnable).

    ``hold_for_joiner_at``: between steps, at that step, wait until a joiner
    has asked to join, so a slow joiner cannot miss the job on a loaded machine.
    """
    model = _mixtral()
    test = _store(address)
    job = dist.PrefixStore(options.get("namespace", "lazarus"), _store(address))
    mgr = Lazarus(model, _optimizer(optimizer), LazarusOptions(**options), store=address)
    test.set(f"test/pid/{mgr.member_id}", str(os.getpid()))
    test.set(f"test/slots/{mgr.member_id}", repr(mgr.replica_experts()))
    losses: dict[int, float] = {}
    while mgr.committed_steps < steps:
        step = mgr.committed_steps
        if step == hold_for_joiner_at:
            while job.add("joins", 0) == 0:
                time.sleep(0.05)
        g = torch.Generator().manual_seed(1000 * step + mgr.rank)
        x = (torch.randint(0, VOCAB, (BATCH, 1), generator=g) + torch.arange(SEQ)) % VOCAB

        def closure(x: torch.Tensor = x) -> torch.Tensor:
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            return loss

        losses[step] = mgr.step(closure)
        if mgr.rank == 0:
            test.set("test/step", str(mgr.committed_steps))
        time.sleep(0.01)  # room for the killer to land anywhere in a step
    replicas: dict[tuple[int, int], Any] = {}
    state_elements = 0
    for li, layer in enumerate(mgr.layers):
        for slot, expert in enumerate(layer.replica_experts):
            state = mgr.slot_state(li, slot)
            replicas.setdefault((li, expert), []).append(state)
            state_elements += sum(
                v.numel() for s in state["optimizer"].values() for v in s.values()
            )
    result = {
        "member": mgr.member_id,
        "losses": [losses[s] for s in sorted(losses)],
        "report": mgr.report,
        "replicas": replicas,
        "dense": {n: p.detach().clone() for n, p in mgr.dense_parameters()},
        "slot_numel": sum(p.numel() for layer in mgr.layers for p in layer.replicas.parameters()),
        "slot_params": sum(1 for layer in mgr.layers for _ in layer.replicas.parameters()),
        "state_elements": state_elements,
        "committed": mgr.committed_steps,
    }
    mgr.close()
    return result


def _killer(address: str, plan: list[dict[str, Any]], seed: int) -> None:
    """Kill (or stop) workers from outside, as ``plan`` says; note each time in the store.

    Each entry: ``{"after_step": s}`` or ``{"in_recovery": g}`` (once the
    members of generation ``g`` are agreed, i.e. during that recovery),
    then ``delay`` seconds (seeded uniform in ``[lo, hi]``), then
    ``signal`` to ``member`` (or to the two holders of some expert: ``"holders"``).
    """
    store = _store(address)
    rng = random.Random(seed)
    for entry in plan:
        if "after_step" in entry:
            while not (
                store.check(["test/step"]) and int(store.get("test/step")) >= entry["after_step"]
            ):
                time.sleep(0.005)
        else:
            while not store.check([f"lazarus/members/{entry['in_recovery']}"]):
                time.sleep(0.001)
        lo, hi = entry.get("delay", (0.0, 0.0))
        time.sleep(rng.uniform(lo, hi))
        victims = entry["members"]
        if victims == "holders":  # every holder of one expert of layer 0 (all replicas lost)
            slots = {m: eval(store.get(f"test/slots/{m}").decode()) for m in entry["of"]}
            for expert in range(EXPERTS):
                holders = [m for m, s in slots.items() if expert in s[0]]
                if len(holders) < len(slots):
                    victims = holders
                    break
        for member in victims:
            pid = int(store.get(f"test/pid/{member}"))
            store.set(f"test/killed/{member}", repr(time.time()))
            os.kill(pid, getattr(signal, entry.get("signal", "SIGKILL")))
        if entry.get("then_kill_after_generation") is not None:
            while not store.check([f"lazarus/members/{entry['then_kill_after_generation']}"]):
                time.sleep(0.005)
            for member in victims:
                os.kill(int(store.get(f"test/pid/{member}")), signal.SIGKILL)


def _run(
    world: int,
    steps: int,
    plan: list[dict[str, Any]],
    optimizer: str = "adamw",
    seed: int = 0,
    **options: Any,
) -> list[dict[str, Any]]:
    with Coordinator() as coordinator:
        killer = mp.get_context("forkserver").Process(
            target=_killer, args=(coordinator.address, plan, seed), daemon=True
        )
        killer.start()
        try:
            results = run_ranks(
                _train,
                world,
                coordinator.address,
                steps,
                optimizer,
                options,
                timeout=150,
                may_die=range(world),
            )
        finally:
            killer.join(timeout=5)
            if killer.is_alive():
                killer.kill()
    return [r for r in results if r is not None]


def _check_consistent(survivors: list[dict[str, Any]], steps: int) -> None:
    """Every expert present, its replicas bit-identical (weights + optimizer state), dense equal."""
    experts: dict[tuple[int, int], list[Any]] = {}
    for r in survivors:
        assert r["committed"] == steps
        for key, states in r["replicas"].items():
            experts.setdefault(key, []).extend(states)
    assert sorted(experts) == [(layer, e) for layer in range(2) for e in range(EXPERTS)]
    for key, states in experts.items():
        first = states[0]
        for other in states[1:]:
            for name, w in first["weights"].items():
                assert torch.equal(w, other["weights"][name]), key
            assert first["optimizer"].keys() == other["optimizer"].keys()
            for name, state in first["optimizer"].items():
                assert state.keys() == other["optimizer"][name].keys(), (key, name)
                for k, v in state.items():
                    assert torch.equal(v, other["optimizer"][name][k]), (key, name, k)
    for r in survivors[1:]:
        for name, p in r["dense"].items():
            assert torch.equal(p, survivors[0]["dense"][name]), name


def _lost(survivors: list[dict[str, Any]]) -> set[int]:
    return {m for rec in survivors[0]["report"].reconfigurations for m in rec.lost_members}


# --------------------------------------------------------------------------- pure planning


def test_plan_slots_keeps_held_replicas_and_spreads_sources() -> None:
    held = {0: [[0, 1]], 2: [[2, 3]], 3: [[0, 3]]}  # member 1 died holding [1, 2]
    plan = plan_slots([[0, 0, 0, 0]], (0, 2, 3), held, 2, 2)
    assert not plan.lost
    for i, m in enumerate(plan.members):  # what a survivor holds and still needs stays put
        kept = sum(a == b for a, b in zip(plan.slots[0][i], held[m][0], strict=True))
        assert kept == len(plan.slots[0][i]) - sum(mv.dst == m for mv in plan.moves)
    for mv in plan.moves:
        assert held[mv.src][0][mv.src_slot] == mv.expert
    lost = plan_slots([[1, 1, 1, 1]], (0,), {0: [[0, 1, 0, 1]]}, 4, 1)
    assert lost.lost == ((0, 2), (0, 3))


# --------------------------------------------------------------------------- processes


def test_chaos_three_sigkills_one_during_recovery() -> None:
    """5 workers; 3 SIGKILLs from outside at seeded random times, the second mid-recovery."""
    steps = 30
    plan = [
        {"after_step": 6, "delay": (0.0, 0.3), "members": [1]},
        {"in_recovery": 1, "delay": (0.0, 0.02), "members": [3]},
        {"after_step": 18, "delay": (0.0, 0.3), "members": [4]},
    ]
    survivors = _run(5, steps, plan, seed=7, slots_per_rank=3)
    assert sorted(r["member"] for r in survivors) == [0, 2]
    _check_consistent(survivors, steps)
    assert _lost(survivors) == {1, 3, 4}
    records = survivors[0]["report"].reconfigurations
    # The kill during a recovery either made it start over or was folded into it.
    assert any(r.attempts > 1 or len(r.lost_members) > 1 for r in records)
    for rec in records:
        assert rec.total_s < 10, rec  # no collective timeout, no hang
    losses = survivors[0]["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    for r in survivors:  # shown with -s: the measured recovery times and heartbeat gaps
        print(f"member {r['member']}: max heartbeat gap {r['report'].max_heartbeat_gap_s:.3f}s")
        for rec in r["report"].reconfigurations:
            print(f"  {rec}")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_replica_moves_carry_optimizer_state(optimizer: str) -> None:
    """After a kill, moved replicas equal their sources bit for bit, optimizer state included."""
    steps = 14
    plan = [{"after_step": 6, "delay": (0.0, 0.1), "members": [1]}]
    survivors = _run(4, steps, plan, optimizer=optimizer, slots_per_rank=2)
    _check_consistent(survivors, steps)
    records = [rec for r in survivors for rec in r["report"].reconfigurations]
    assert sum(rec.replicas_moved for rec in records) > 0
    # No optimizer element lost: every slot parameter has its full state.
    # momentum_buffer | exp_avg + exp_avg_sq + a scalar step per parameter
    for r in survivors:
        if optimizer == "sgd":
            assert r["state_elements"] == r["slot_numel"]
        else:
            assert r["state_elements"] == 2 * r["slot_numel"] + r["slot_params"]
    if optimizer == "adamw":  # the step counter moved with the replica too
        for r in survivors:
            for states in r["replicas"].values():
                for state in states:
                    assert all(int(s["step"]) == steps for s in state["optimizer"].values())


def test_sigstopped_member_is_excluded_within_the_failure_timeout() -> None:
    timeout = 1.0
    plan = [
        {
            "after_step": 5,
            "members": [2],
            "signal": "SIGSTOP",
            "then_kill_after_generation": 1,
        }
    ]
    survivors = _run(4, 12, plan, slots_per_rank=2, failure_timeout_s=timeout)
    _check_consistent(survivors, 12)
    (rec,) = survivors[0]["report"].reconfigurations
    assert rec.lost_members == (2,)
    assert rec.detection_s is not None and rec.detection_s < timeout + 0.5, rec
    assert rec.total_s < timeout + 2, rec


def test_all_replicas_lost_reloads_the_checkpoint(tmp_path: Any) -> None:
    steps = 14
    plan = [{"after_step": 7, "members": "holders", "of": [0, 1, 2, 3]}]
    survivors = _run(
        4,
        steps,
        plan,
        slots_per_rank=2,
        fault_tolerance=1,
        checkpoint_dir=str(tmp_path),
        checkpoint_every=4,
    )
    _check_consistent(survivors, steps)
    (rec,) = survivors[0]["report"].reconfigurations
    assert rec.lost_experts and rec.checkpoint_reload in (4, 8), rec


def _joiner(address: str, steps: int, after_step: int, results: Any) -> None:
    """A process that starts once the job runs (e.g. a restarted worker) and joins it."""
    store = _store(address)
    while not (store.check(["test/step"]) and int(store.get("test/step")) >= after_step):
        time.sleep(0.01)
    os.environ.update(RANK="0", WORLD_SIZE="1")  # ignored: the job runs, so this one joins
    results.put(pickle.dumps(_train(address, steps, "adamw", {"slots_per_rank": 2})))


def test_joiner_enters_at_a_step_boundary_with_state() -> None:
    steps = 50
    ctx = mp.get_context("forkserver")
    with Coordinator() as coordinator:
        results = ctx.Queue()
        joiner = ctx.Process(
            target=_joiner, args=(coordinator.address, steps, 5, results), daemon=True
        )
        joiner.start()
        members = run_ranks(
            _train, 3, coordinator.address, steps, "adamw", {"slots_per_rank": 2}, 10, timeout=150
        )
        joined = pickle.loads(results.get(timeout=30))
        joiner.join(timeout=5)
    _check_consistent([*members, joined], steps)
    (rec,) = members[0]["report"].reconfigurations
    assert rec.kind == "join" and rec.members_after == (0, 1, 2, 3)
    assert joined["report"].reconfigurations[0].replicas_moved > 0
