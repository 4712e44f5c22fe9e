"""A radix tree over token ids whose nodes hold attention KV and SSM checkpoints.

Each non-root node owns one edge: a run of token ids, the KV of those tokens
(every attention layer) and, optionally, one SSM checkpoint: the SSM state
after the edge's last token. Attention KV can be cut at any token, an SSM
state cannot, so a cached prefix is usable only up to the deepest matched node
that holds a checkpoint (:attr:`MatchResult.hit_length`).

Shape invariant, kept after every mutation: a non-root node holds a
checkpoint or has at least two children (it is a branch point). A node with
no checkpoint and one child is merged into that child; one with neither is
useless (its KV can never be reached by a hit) and is removed. Pinned nodes
are exempt until unpinned: the cache pins a request's matched path while it
evicts, so the bytes it planned for stay right.

The tree does not decide anything; an eviction policy listening through
:class:`TreeListener` keeps its own index of candidates, and the cache decides
whom to touch, what to checkpoint and what to evict. Every mutation tells the
listener which nodes changed, so the policy never rescans the tree. A node has
two timestamps: ``last_access`` (its KV was used) and ``state_access`` (its
checkpoint was used); Marconi's policies read only the first, SGLang's keep
the two on separate LRU lists. Attaching or removing a checkpoint also tells
the listener about the nodes below, down to the next checkpoint on each branch:
their distance to the nearest checkpoint above them (what a hit would replay)
has changed.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from thrifty.marconi.states import Checkpoint, KVSegment, SizedCheckpoint, SizedKV, StateSource

__all__ = [
    "EvictResult",
    "InsertPlan",
    "InsertResult",
    "MatchResult",
    "RadixTree",
    "TreeListener",
    "TreeNode",
]


class TreeNode:
    """One edge of the tree (the root has an empty edge and no states).

    ``depth`` is the number of tokens from the root to the end of the edge, so
    the edge spans token positions ``[depth - len(edge), depth)`` and the
    checkpoint, if any, is the SSM state after ``depth`` tokens.
    ``last_access`` is the clock when the edge's KV was last used,
    ``state_access`` when the checkpoint was (stored or restored).
    """

    __slots__ = (
        "alive",
        "checkpoint",
        "children",
        "depth",
        "edge",
        "id",
        "kv",
        "last_access",
        "parent",
        "pins",
        "state_access",
        "version",
    )

    def __init__(
        self,
        node_id: int,
        parent: TreeNode | None,
        edge: list[int],
        kv: KVSegment | None,
        checkpoint: Checkpoint | None,
        depth: int,
        last_access: int,
    ) -> None:
        self.id = node_id
        self.parent = parent
        self.children: dict[int, TreeNode] = {}
        self.edge = edge
        self.kv = kv
        self.checkpoint = checkpoint
        self.depth = depth
        self.last_access = last_access
        self.state_access = last_access
        self.pins = 0
        self.version = 0
        self.alive = True

    @property
    def start(self) -> int:
        """Token position where this node's edge begins (its parent's depth)."""
        return self.depth - len(self.edge)

    @property
    def nbytes(self) -> int:
        kv = self.kv.nbytes if self.kv is not None else 0
        return kv + (self.checkpoint.nbytes if self.checkpoint is not None else 0)

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def __repr__(self) -> str:
        ckpt = "ckpt" if self.checkpoint is not None else "-"
        return (
            f"TreeNode(id={self.id}, span=[{self.start},{self.depth}), {ckpt}, "
            f"children={len(self.children)}, t={self.last_access})"
        )


class TreeListener(Protocol):
    """Told about every node whose shape, states, pins or timestamp changed."""

    def node_changed(self, node: TreeNode) -> None: ...

    def node_removed(self, node: TreeNode) -> None: ...


@dataclass(frozen=True)
class MatchResult:
    """What the tree holds of a token sequence.

    Attributes:
        hit_length: tokens reusable: the depth of ``hit_node``.
        hit_node: deepest matched node holding a checkpoint (the root if none).
        matched_length: longest common prefix with the tree, mid-edge included.
        path: fully matched nodes, root excluded, top-down.
        partial_node: the node whose edge matched only partly, if any.
    """

    hit_length: int
    hit_node: TreeNode
    matched_length: int
    path: tuple[TreeNode, ...]
    partial_node: TreeNode | None = None

    @property
    def hit_path(self) -> tuple[TreeNode, ...]:
        """Nodes whose KV an engine restores for the hit (root excluded, top-down);
        the SSM state to restore is ``hit_node.checkpoint``."""
        if self.hit_node.is_root:
            return ()
        return self.path[: self.path.index(self.hit_node) + 1]

    @property
    def branch_required(self) -> bool:
        """True when the sequence shares more with the tree than a hit can reuse.

        Marconi then checkpoints the SSM state at ``matched_length`` during
        prefill (speculative insertion), so the next request that shares this
        prefix hits there.
        """
        return self.matched_length > self.hit_length


@dataclass(frozen=True)
class InsertPlan:
    """What :meth:`RadixTree.insert` would add, computed without mutating.

    Attributes:
        length: tokens that will be stored (up to the last checkpoint position).
        matched_length: tokens of those already in the tree.
        new_checkpoints: positions that get a new checkpoint.
        pin_nodes: nodes the insert walks through or splits; pin them while evicting.
    """

    length: int
    matched_length: int
    new_checkpoints: tuple[int, ...]
    pin_nodes: tuple[TreeNode, ...]

    @property
    def new_kv_tokens(self) -> int:
        return max(self.length - self.matched_length, 0)

    def state_nbytes(self, source: StateSource) -> int:
        """Bytes of the new checkpoints (their logits included)."""
        return sum(source.checkpoint_nbytes(p) for p in self.new_checkpoints)

    def nbytes(self, source: StateSource) -> int:
        return source.kv_nbytes(self.new_kv_tokens) + self.state_nbytes(source)


@dataclass(frozen=True)
class InsertResult:
    """Nodes an insert walked through (``path``, top-down) and what it added."""

    path: tuple[TreeNode, ...]
    new_nodes: int
    new_checkpoints: int
    added_bytes: int


@dataclass(frozen=True)
class EvictResult:
    """``kind`` is ``"leaf"`` (edge KV + checkpoint freed) or ``"checkpoint"`` (state only)."""

    kind: str
    freed_bytes: int


def _common_prefix(edge: list[int], tokens: list[int], pos: int, limit: int) -> int:
    """Length of the common prefix of ``edge`` and ``tokens[pos:]``, at most ``limit``."""
    if limit == len(edge) and tokens[pos : pos + limit] == edge:
        return limit
    i = 0
    while i < limit and edge[i] == tokens[pos + i]:
        i += 1
    return i


class RadixTree:
    """Compressed radix tree of cached prefixes; see the module docstring.

    Args:
        listener: the eviction policy's index (optional for plain use).
    """

    def __init__(self, listener: TreeListener | None = None) -> None:
        self._ids = itertools.count()
        self.root = TreeNode(next(self._ids), None, [], None, None, 0, 0)
        self.clock = 0
        self.nbytes = 0
        self.state_nbytes = 0
        self.num_nodes = 0
        self.num_checkpoints = 0
        self.listener = listener

    # ------------------------------------------------------------------ helpers

    def tick(self) -> int:
        """Advance the logical clock (once per match, insert and eviction)."""
        self.clock += 1
        return self.clock

    def _changed(self, node: TreeNode) -> None:
        node.version += 1
        if self.listener is not None and not node.is_root:
            self.listener.node_changed(node)

    def _removed(self, node: TreeNode) -> None:
        node.alive = False
        node.version += 1
        if self.listener is not None:
            self.listener.node_removed(node)

    def nodes(self) -> Iterator[TreeNode]:
        """All non-root nodes, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ------------------------------------------------------------------ reading

    def match_prefix(self, tokens: Sequence[int], max_hit: int | None = None) -> MatchResult:
        """Longest cached prefix of ``tokens``; does not touch timestamps.

        Args:
            tokens: the request's token ids.
            max_hit: ignore checkpoints deeper than this (an engine that must
                recompute the last input token for its logits passes ``len - 1``).
        """
        tokens = tokens if isinstance(tokens, list) else list(tokens)
        limit = len(tokens) if max_hit is None else min(max_hit, len(tokens))
        node, pos, n = self.root, 0, len(tokens)
        hit, hit_length = self.root, 0
        path: list[TreeNode] = []
        while pos < n:
            child = node.children.get(tokens[pos])
            if child is None:
                break
            size = len(child.edge)
            if pos + size <= n and tokens[pos : pos + size] == child.edge:
                pos += size
                node = child
                path.append(child)
                if child.checkpoint is not None and pos <= limit:
                    hit, hit_length = child, pos
                continue
            k = _common_prefix(child.edge, tokens, pos, min(size, n - pos))
            return MatchResult(hit_length, hit, pos + k, tuple(path), child)
        return MatchResult(hit_length, hit, pos, tuple(path))

    def plan_insert(self, tokens: Sequence[int], positions: Sequence[int]) -> InsertPlan:
        """What inserting ``tokens`` with checkpoints at ``positions`` would add."""
        tokens = tokens if isinstance(tokens, list) else list(tokens)
        wanted = sorted({p for p in positions if 0 < p <= len(tokens)})
        if not wanted:
            return InsertPlan(0, 0, (), ())
        end = wanted[-1]
        node, pos = self.root, 0
        have: set[int] = set()
        pins: list[TreeNode] = []
        while pos < end:
            child = node.children.get(tokens[pos])
            if child is None:
                break
            size = len(child.edge)
            k = _common_prefix(child.edge, tokens, pos, min(size, end - pos))
            pins.append(child)
            if k < size:
                pos += k
                break
            pos += size
            node = child
            if child.checkpoint is not None:
                have.add(pos)
        new = tuple(p for p in wanted if p not in have)
        return InsertPlan(end, pos, new, tuple(pins))

    # ------------------------------------------------------------------ mutating

    def touch(self, nodes: Sequence[TreeNode]) -> None:
        """Stamp ``nodes`` with the current clock."""
        for node in nodes:
            if node.alive and not node.is_root and node.last_access != self.clock:
                node.last_access = self.clock
                self._changed(node)

    def touch_state(self, nodes: Sequence[TreeNode]) -> None:
        """Stamp the checkpoints of ``nodes`` (those that hold one) with the current clock."""
        for node in nodes:
            if node.alive and node.checkpoint is not None and node.state_access != self.clock:
                node.state_access = self.clock
                self._changed(node)

    def pin(self, nodes: Sequence[TreeNode]) -> None:
        """Protect ``nodes`` from eviction and merging until :meth:`unpin`."""
        for node in nodes:
            node.pins += 1
            if node.pins == 1:
                self._changed(node)

    def unpin(self, nodes: Sequence[TreeNode]) -> None:
        """Undo :meth:`pin`; nodes left without purpose are compacted now."""
        for node in nodes:
            if node.pins <= 0:
                raise RuntimeError(f"unpin of {node!r}, which is not pinned")
            node.pins -= 1
        for node in reversed(nodes):
            if node.alive and node.pins == 0:
                self._changed(node)
                self._compact(node)

    def insert(
        self, tokens: Sequence[int], positions: Sequence[int], source: StateSource
    ) -> InsertResult:
        """Store ``tokens`` up to the last of ``positions``, checkpointing at each position.

        Edges are split wherever the sequence diverges from the tree or a
        checkpoint falls inside an edge. New nodes and nodes that get a new
        checkpoint are stamped with the current clock; other nodes keep theirs.
        """
        tokens = tokens if isinstance(tokens, list) else list(tokens)
        wanted = sorted({p for p in positions if 0 < p <= len(tokens)})
        if not wanted:
            return InsertResult((), 0, 0, 0)
        end = wanted[-1]
        before = self.nbytes
        node, pos, wi = self.root, 0, 0
        path: list[TreeNode] = []
        new_nodes = new_checkpoints = 0
        while pos < end:
            child = node.children.get(tokens[pos])
            if child is None:
                break
            size = len(child.edge)
            k = _common_prefix(child.edge, tokens, pos, min(size, end - pos))
            while wanted[wi] <= pos:
                wi += 1
            cut = min(k, wanted[wi] - pos)
            if cut < size:
                child = self._split(child, cut)
            node, pos = child, pos + cut
            path.append(node)
            if wanted[wi] == pos:
                wi += 1
                if node.checkpoint is None:
                    self._attach(node, source.checkpoint(pos))
                    new_checkpoints += 1
            if cut < k:
                continue  # split only for a checkpoint; the rest still matches
            if k < size:
                break
        while pos < end:
            while wanted[wi] <= pos:
                wi += 1
            nxt = wanted[wi]
            leaf = TreeNode(
                next(self._ids),
                node,
                tokens[pos:nxt],
                source.kv(pos, nxt),
                source.checkpoint(nxt),
                nxt,
                self.clock,
            )
            node.children[tokens[pos]] = leaf
            self.nbytes += leaf.nbytes
            self.state_nbytes += leaf.checkpoint.nbytes
            self.num_nodes += 1
            self.num_checkpoints += 1
            new_nodes += 1
            new_checkpoints += 1
            self._changed(leaf)
            if not node.is_root:
                self._changed(node)
            node, pos = leaf, nxt
            path.append(leaf)
        return InsertResult(tuple(path), new_nodes, new_checkpoints, self.nbytes - before)

    def evict(self, node: TreeNode) -> EvictResult:
        """Free ``node``'s states: a leaf goes entirely, an inner node loses its checkpoint.

        The freed bytes are the evicted node's own (the artifact credited the
        wrong node's bytes for leaves).
        """
        if node.is_root or not node.alive:
            raise ValueError(f"cannot evict {node!r}: root or already removed")
        if node.pins:
            raise ValueError(f"cannot evict {node!r}: pinned")
        if not node.children:
            freed = node.nbytes
            self._remove_leaf(node)
            return EvictResult("leaf", freed)
        if node.checkpoint is None:
            raise ValueError(f"cannot evict {node!r}: inner node without a checkpoint")
        freed = node.checkpoint.nbytes
        node.checkpoint = None
        self.nbytes -= freed
        self.state_nbytes -= freed
        self.num_checkpoints -= 1
        self._changed(node)
        self._changed_below(node)
        self._compact(node)
        return EvictResult("checkpoint", freed)

    # ------------------------------------------------------------------ internals

    def _attach(self, node: TreeNode, checkpoint: Checkpoint) -> None:
        node.checkpoint = checkpoint
        node.last_access = node.state_access = self.clock
        self.nbytes += checkpoint.nbytes
        self.state_nbytes += checkpoint.nbytes
        self.num_checkpoints += 1
        self._changed(node)
        self._changed_below(node)

    def _changed_below(self, node: TreeNode) -> None:
        """Tell the listener about the nodes whose nearest checkpoint above is ``node``'s place."""
        stack = list(node.children.values())
        while stack:
            below = stack.pop()
            self._changed(below)
            if below.checkpoint is None:
                stack.extend(below.children.values())

    def _split(self, node: TreeNode, k: int) -> TreeNode:
        """Cut ``node``'s edge after ``k`` tokens; returns the new upper node.

        The upper node takes the first ``k`` tokens and their KV and inherits
        the timestamp; ``node`` keeps the rest, its checkpoint and its children.
        """
        parent = node.parent
        assert parent is not None and 0 < k < len(node.edge)
        head_kv, tail_kv = node.kv.split(k)
        upper = TreeNode(
            next(self._ids),
            parent,
            node.edge[:k],
            head_kv,
            None,
            node.start + k,
            node.last_access,
        )
        upper.children[node.edge[k]] = node
        parent.children[node.edge[0]] = upper
        node.parent = upper
        node.edge = node.edge[k:]
        node.kv = tail_kv
        self.num_nodes += 1
        self._changed(node)
        self._changed(upper)
        return upper

    def _remove_leaf(self, node: TreeNode) -> None:
        parent = node.parent
        assert parent is not None and not node.children
        del parent.children[node.edge[0]]
        self.nbytes -= node.nbytes
        self.num_nodes -= 1
        if node.checkpoint is not None:
            self.num_checkpoints -= 1
            self.state_nbytes -= node.checkpoint.nbytes
        self._removed(node)
        if not parent.is_root:
            self._changed(parent)
            self._compact(parent)

    def _compact(self, node: TreeNode) -> None:
        """Restore the shape invariant at ``node`` (see the module docstring)."""
        if node.is_root or not node.alive or node.pins or node.checkpoint is not None:
            return
        if not node.children:
            self._remove_leaf(node)
        elif len(node.children) == 1:
            self._merge_into_child(node)

    def _merge_into_child(self, node: TreeNode) -> None:
        """Fold a checkpoint-less single-child node into its child (no bytes freed)."""
        parent = node.parent
        (child,) = node.children.values()
        assert parent is not None and node.checkpoint is None
        child.edge = node.edge + child.edge
        child.kv = node.kv.join(child.kv)
        child.parent = parent
        child.last_access = max(child.last_access, node.last_access)
        parent.children[child.edge[0]] = child
        self.num_nodes -= 1
        self._removed(node)
        self._changed(child)

    # ------------------------------------------------------------------ copies and checks

    def clone_sized(self, listener: TreeListener | None = None) -> RadixTree:
        """A size-only copy (same shape, clock and byte counts) for what-if replays."""
        twin = RadixTree(listener)
        twin.clock = self.clock
        twin._ids = itertools.count(next(self._ids))
        twin.root.id = self.root.id
        stack = [(self.root, twin.root)]
        while stack:
            old, new = stack.pop()
            for key, child in old.children.items():
                kv = SizedKV(child.kv.num_tokens, child.kv.nbytes // max(child.kv.num_tokens, 1))
                ckpt = (
                    SizedCheckpoint(child.checkpoint.nbytes, child.checkpoint.logits_nbytes)
                    if child.checkpoint is not None
                    else None
                )
                copy = TreeNode(child.id, new, child.edge, kv, ckpt, child.depth, child.last_access)
                copy.state_access = child.state_access
                new.children[key] = copy
                stack.append((child, copy))
        twin.nbytes = self.nbytes
        twin.state_nbytes = self.state_nbytes
        twin.num_nodes = self.num_nodes
        twin.num_checkpoints = self.num_checkpoints
        if listener is not None:
            for node in twin.nodes():
                twin._changed(node)
        return twin

    def check_invariants(self) -> None:
        """Raise AssertionError if the tree's bookkeeping or shape is broken (tests)."""
        total = nodes = ckpts = state = 0
        for node in self.nodes():
            parent = node.parent
            assert parent is not None and node.alive, f"{node!r}: detached or dead"
            assert node.edge, f"{node!r}: empty edge"
            assert parent.children.get(node.edge[0]) is node, f"{node!r}: wrong child key"
            assert node.depth == parent.depth + len(node.edge), f"{node!r}: wrong depth"
            assert node.kv is not None and node.kv.num_tokens == len(node.edge), (
                f"{node!r}: KV covers {node.kv.num_tokens if node.kv else None} tokens"
            )
            assert node.pins >= 0
            if node.pins == 0:
                assert node.checkpoint is not None or len(node.children) >= 2, (
                    f"{node!r}: neither a checkpoint nor a branch point"
                )
            total += node.nbytes
            nodes += 1
            ckpts += node.checkpoint is not None
            state += node.checkpoint.nbytes if node.checkpoint is not None else 0
        assert total == self.nbytes, f"byte count {self.nbytes} != sum over nodes {total}"
        assert state == self.state_nbytes, f"state bytes {self.state_nbytes} != sum {state}"
        assert nodes == self.num_nodes, f"node count {self.num_nodes} != {nodes}"
        assert ckpts == self.num_checkpoints, f"checkpoint count {self.num_checkpoints} != {ckpts}"
