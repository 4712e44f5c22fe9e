"""The Marconi engine on real transformers hybrids: identical outputs, real byte sizes."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from thrifty.marconi import ModelSpec, build_cache  # noqa: E402
from thrifty.marconi.engine import (  # noqa: E402
    ARCHITECTURES,
    HybridEngine,
    TensorKV,
    build_model,
)

VOCAB = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: threads only add overhead, and the test machine is shared.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def model(request):
    transformers.logging.set_verbosity_error()
    return build_model(request.param, vocab_size=VOCAB)


_REFERENCE: dict[tuple, tuple[object, list[int]]] = {}


def _reference(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy outputs without a cache (memoised: the tests reuse prompts across policies).

    The memo holds the model too: keyed by ``id`` alone, a freed model's address can be
    reused by the next architecture's, which then got the other model's outputs.
    """
    key = (id(model), tuple(prompt), new_tokens)
    if key not in _REFERENCE:
        _REFERENCE[key] = (model, HybridEngine(model).generate(prompt, new_tokens))
    return _REFERENCE[key][1]


def _words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def _assert_real_bytes(cache, spec: ModelSpec) -> None:
    """Every byte the cache charges is a byte some tensor owns, and vice versa."""
    cache.tree.check_invariants()
    total = 0
    for node in cache.tree.nodes():
        tensors = [*node.kv.keys, *node.kv.values]
        assert node.kv.nbytes == spec.kv_bytes_per_token * len(node.edge)
        if node.checkpoint is not None:
            assert node.checkpoint.nbytes == spec.checkpoint_bytes
            for _, _, conv, rec in node.checkpoint.states:
                tensors += [t for t in (conv, rec) if t is not None]
        for t in tensors:
            assert t.untyped_storage().nbytes() == t.nbytes, "a state holds a view of more bytes"
        total += sum(t.nbytes for t in tensors)
    assert total == cache.tree.nbytes <= cache.capacity_bytes


def test_reference_loop_matches_transformers_generate(model):
    rng = random.Random(1)
    ids = _words(rng, 24)
    ours = HybridEngine(model).generate(ids, 6)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert ours == out[0, len(ids) :].tolist()


def test_marconi_hits_are_token_identical_to_no_cache(model):
    spec = ModelSpec.from_hf_config(model.config)
    engine = HybridEngine(model, build_cache("marconi", 10**7, spec))
    assert engine.checkpoint_nbytes == spec.checkpoint_bytes
    rng = random.Random(0)
    system = _words(rng, 20)
    a = system + _words(rng, 7)
    b = system + _words(rng, 9)  # diverges from `a` after the system prompt
    c = system + _words(rng, 5)

    seen: set[int] = set()

    def serve(prompt: list[int]):
        result = engine.serve(prompt, 5)
        assert result.output_ids == _reference(model, prompt, 5)
        seen.update(result.output_ids)
        return result

    first = serve(a)
    assert first.hit_tokens == 0 and first.checkpoints_added == 1
    branch = serve(b)  # branch point found before prefill: two-piece prefill
    assert branch.hit_tokens == 0 and branch.prefill_pieces == 2
    assert branch.checkpoints_added == 2
    assert serve(c).hit_tokens == 20  # the branch-point checkpoint
    # The whole input is in the tree (a + its output); its last token must run
    # for the first output's logits, so the hit falls back to the branch point.
    whole = a + first.output_ids
    assert engine.cache.tree.match_prefix(whole).hit_length == len(whole)
    assert serve(whole).hit_tokens == 20
    # Input-and-output reuse: the next turn restores KV + state after `whole`'s output.
    assert serve(whole + _words(rng, 4)).hit_tokens == len(whole)
    assert len(seen) >= 3, "the model predicts (almost) one token: the check would be vacuous"
    _assert_real_bytes(engine.cache, spec)


@pytest.mark.parametrize("policy", ["vllm+", "sglang+", "marconi"])
def test_policies_under_eviction_stay_identical_and_within_budget(model, policy):
    spec = ModelSpec.from_hf_config(model.config)
    budget = 4 * spec.checkpoint_bytes + 40 * spec.kv_bytes_per_token
    cache = build_cache(policy, budget, spec, alpha=1.0, block_size=8)
    engine = HybridEngine(model, cache)
    rng = random.Random(2)
    system = _words(rng, 16)
    sessions = [system + _words(rng, 6) for _ in range(3)]
    hits = 0
    for _ in range(2):
        for s, prompt in enumerate(sessions):
            result = engine.serve(prompt, 3)
            assert result.output_ids == _reference(model, prompt, 3)
            assert cache.tree.nbytes <= budget
            hits += result.hit_tokens
            sessions[s] = prompt + result.output_ids + _words(rng, 3)
    assert cache.stats.evictions > 0 and hits > 0
    _assert_real_bytes(cache, spec)


def test_forced_output_is_stored_for_the_next_turn():
    transformers.logging.set_verbosity_error()
    model = build_model("nemotron_h", vocab_size=VOCAB, seed=1)
    spec = ModelSpec.from_hf_config(model.config)
    engine = HybridEngine(model, build_cache("vllm+", 10**7, spec, block_size=8))
    reference = HybridEngine(model)
    rng = random.Random(3)
    prompt, reply = _words(rng, 21), _words(rng, 11)
    first = engine.serve(prompt, forced_output=reply, repeats=2)
    assert first.output_ids == reference.generate(prompt, 1)
    assert first.fed_ids == reply and first.prefill_pieces == 3  # blocks end at 8 and 16
    follow = prompt + reply + _words(rng, 5)
    second = engine.serve(follow, 3)
    assert second.hit_tokens == 32  # the last whole block of prompt + reply
    assert second.output_ids == reference.generate(follow, 3)
    with pytest.raises(ValueError, match="token ids"):
        engine.serve([VOCAB], 1)


def test_tensor_kv_split_and_join_round_trip():
    keys = (torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(1, 2, 5, 3),)
    values = (-keys[0],)
    kv = TensorKV(keys, values, 5)
    head, tail = kv.split(2)
    assert (head.num_tokens, tail.num_tokens) == (2, 3)
    assert head.nbytes + tail.nbytes == kv.nbytes
    joined = head.join(tail)
    assert torch.equal(joined.keys[0], keys[0]) and torch.equal(joined.values[0], values[0])
    with pytest.raises(ValueError, match="strictly inside"):
        kv.split(5)
