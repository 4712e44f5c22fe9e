"""Radix tree: match semantics, splits and merges, invariants under random operations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.marconi.model import paper_hybrid_7b
from thrifty.marconi.policies import LRUEviction, UtilityEviction
from thrifty.marconi.states import SizedSource
from thrifty.marconi.tree import RadixTree, TreeNode

SRC = SizedSource(kv_bytes_per_token=10, checkpoint_bytes=1000)


def path_tokens(node: TreeNode) -> tuple[int, ...]:
    parts = []
    while node.parent is not None:
        parts.append(node.edge)
        node = node.parent
    return tuple(t for edge in reversed(parts) for t in edge)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_hit_only_at_checkpoints():
    tree = RadixTree()
    tree.insert([1, 2, 3, 4, 5, 6], [6], SRC)
    # Same prefix, but the only checkpoint is after token 6.
    m = tree.match_prefix([1, 2, 3, 4, 9])
    assert m.hit_length == 0 and m.hit_node is tree.root
    assert m.matched_length == 4 and m.branch_required
    m = tree.match_prefix([1, 2, 3, 4, 5, 6, 7])
    assert m.hit_length == 6 and m.matched_length == 6 and not m.branch_required
    # A checkpoint in the middle splits the edge; hits stop there.
    tree.insert([1, 2, 3, 4, 5, 6], [3], SRC)
    m = tree.match_prefix([1, 2, 3, 4, 9])
    assert m.hit_length == 3 and m.matched_length == 4
    assert [len(n.edge) for n in m.path] == [3]
    assert m.hit_path == m.path and sum(n.kv.num_tokens for n in m.hit_path) == 3
    assert m.partial_node is not None and m.partial_node.edge == [4, 5, 6]
    tree.check_invariants()


def test_max_hit_ignores_deeper_checkpoints():
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], [2, 4], SRC)
    assert tree.match_prefix([1, 2, 3, 4]).hit_length == 4
    assert tree.match_prefix([1, 2, 3, 4], max_hit=3).hit_length == 2


def test_insert_splits_and_accounts_bytes():
    tree = RadixTree()
    r1 = tree.insert([1, 2, 3, 4], [4], SRC)
    assert r1.new_nodes == 1 and r1.added_bytes == 4 * 10 + 1000
    # Diverge after 2 tokens, checkpoint at the branch and at the end.
    plan = tree.plan_insert([1, 2, 7, 8, 9], [2, 5])
    assert plan.matched_length == 2 and plan.new_checkpoints == (2, 5)
    assert plan.nbytes(SRC) == 3 * 10 + 2 * 1000
    r2 = tree.insert([1, 2, 7, 8, 9], [2, 5], SRC)
    assert r2.added_bytes == plan.nbytes(SRC)
    assert tree.nbytes == 4 * 10 + 1000 + 3 * 10 + 2 * 1000
    assert tree.num_nodes == 3 and tree.num_checkpoints == 3
    assert tree.match_prefix([1, 2, 3, 0]).hit_length == 2
    # Re-inserting what is there adds nothing.
    assert tree.insert([1, 2, 7, 8, 9], [2, 5], SRC).added_bytes == 0
    tree.check_invariants()


def test_split_without_checkpoint_leaves_a_branch_point():
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], [4], SRC)
    tree.insert([1, 2, 5, 6], [4], SRC)  # no checkpoint at the divergence
    (branch,) = tree.root.children.values()
    assert branch.edge == [1, 2] and branch.checkpoint is None and len(branch.children) == 2
    assert tree.match_prefix([1, 2, 9]).hit_length == 0
    tree.check_invariants()


def test_evict_leaf_merges_checkpointless_parent():
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], [4], SRC)
    tree.insert([1, 2, 5, 6], [4], SRC)
    leaf = tree.match_prefix([1, 2, 5, 6]).hit_node
    result = tree.evict(leaf)
    assert result.kind == "leaf" and result.freed_bytes == 2 * 10 + 1000
    # The branch point had no checkpoint and one child left: merged back.
    (only,) = tree.root.children.values()
    assert only.edge == [1, 2, 3, 4] and only.kv.num_tokens == 4
    assert tree.nbytes == 4 * 10 + 1000
    tree.check_invariants()


def test_evict_inner_checkpoint_merges_into_child_and_keeps_later_time():
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], [2, 4], SRC)
    upper = tree.match_prefix([1, 2]).hit_node
    lower = tree.match_prefix([1, 2, 3, 4]).hit_node
    tree.tick()
    tree.touch([upper])
    result = tree.evict(upper)
    assert result.kind == "checkpoint" and result.freed_bytes == 1000
    assert not upper.alive and lower.edge == [1, 2, 3, 4]
    assert lower.last_access == upper.last_access  # the later of the two
    assert tree.nbytes == 4 * 10 + 1000
    tree.check_invariants()


def test_pinned_nodes_are_not_merged_until_unpinned():
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], [4], SRC)
    tree.insert([1, 2, 5, 6], [4], SRC)
    branch = tree.match_prefix([1, 2, 9]).path[0]
    tree.pin([branch])
    tree.evict(tree.match_prefix([1, 2, 5, 6]).hit_node)
    assert branch.alive and len(branch.children) == 1
    tree.unpin([branch])
    assert not branch.alive
    tree.check_invariants()


def test_clone_sized_is_independent():
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], [2, 4], SRC)
    twin = tree.clone_sized()
    twin.insert([1, 2, 9], [3], SRC)
    assert tree.nbytes == 4 * 10 + 2 * 1000
    assert twin.nbytes == tree.nbytes + 10 + 1000
    twin.check_invariants()
    tree.check_invariants()


# --------------------------------------------------------------------------- property test

tokens = st.lists(st.integers(0, 3), min_size=1, max_size=12)
insert_op = st.tuples(
    st.just("insert"), tokens, st.lists(st.integers(1, 12), min_size=1, max_size=4)
)
match_op = st.tuples(st.just("match"), tokens, st.none())
evict_op = st.tuples(st.just("evict"), st.none(), st.none())
ops = st.lists(st.one_of(insert_op, insert_op, match_op, evict_op), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops, st.sampled_from(["lru", "utility"]))
def test_random_operations_keep_invariants(operations, policy):
    index = LRUEviction() if policy == "lru" else UtilityEviction(paper_hybrid_7b(), alpha=1.0)
    tree = RadixTree()
    index.attach(tree)
    stored: set[tuple[int, ...]] = set()  # every checkpointed prefix ever inserted
    for kind, seq, positions in operations:
        tree.tick()
        if kind == "insert":
            tree.insert(seq, positions, SRC)
            stored.update(tuple(seq[:p]) for p in positions if 0 < p <= len(seq))
        elif kind == "match":
            m = tree.match_prefix(seq)
            ckpts = [n for n in tree.nodes() if n.checkpoint is not None]
            want_hit = max(
                (n.depth for n in ckpts if tuple(seq[: n.depth]) == path_tokens(n)), default=0
            )
            want_matched = max(
                (common_prefix(seq, path_tokens(n)) for n in tree.nodes()), default=0
            )
            assert m.hit_length == want_hit
            assert m.matched_length == want_matched
            assert m.hit_node.depth == m.hit_length
            assert sum(len(n.edge) for n in m.hit_path) == m.hit_length
            tree.touch([m.hit_node])
        else:
            victim = index.select_victim()
            if victim is not None:
                before = tree.nbytes
                result = tree.evict(victim)
                assert tree.nbytes == before - result.freed_bytes
        tree.check_invariants()
        # The candidate index agrees with the tree.
        live = {n for n in tree.nodes() if index.is_candidate(n)}
        assert index.candidates == live
        # Every checkpoint in the tree is one that some insert asked for.
        for node in tree.nodes():
            if node.checkpoint is not None:
                assert path_tokens(node) in stored
