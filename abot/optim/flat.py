"""A parameter tree as a few contiguous buffers and back: the layout of abot's flat optimizer update.

The leaves are grouped by what an elementwise update treats differently, their dtype and whether weight
decay applies (`is_decayed`), and each group is one contiguous buffer: the update, the clip and the
non-finite guard then run as a few whole-buffer kernels instead of a few per tensor. A decayed group is
stored as a (1, n) row and the others as (n,) vectors, so `is_decayed` still tells them apart. A group may
be cut into `parts` buffers at leaf boundaries, one per MLX stream (abot.optim.placement): on the CPU a
stream runs on one core. Going back, each leaf is a slice of its buffer, reshaped: a view, not a copy.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from abot.optim.base import Tree
from abot.optim.weight_decay import is_decayed


class Slot(NamedTuple):
    """Where one leaf lives in its group's buffer."""

    path: str  # the leaf's `tree_flatten` path
    shape: tuple[int, ...]
    start: int
    size: int


class Group(NamedTuple):
    """Leaves of one dtype and one decay rule, back to back in one buffer."""

    name: str
    decayed: bool
    slots: tuple[Slot, ...]
    size: int


class Layout(NamedTuple):
    """The groups, and the tree's structure with each leaf replaced by its path (to rebuild it as it was)."""

    groups: tuple[Group, ...]
    skeleton: Any


def _even_cuts(sizes: list[int], parts: int) -> list[int]:
    """Indices that cut `sizes` into at most `parts` runs of about equal total, at leaf boundaries."""
    total, cuts, acc = sum(sizes), [], 0
    for i, n in enumerate(sizes[:-1]):
        acc += n
        if len(cuts) < parts - 1 and acc >= total * (len(cuts) + 1) / parts:
            cuts.append(i + 1)
    return cuts


def _group(name: str, decayed: bool, members: list[tuple[str, mx.array]]) -> Group:
    slots, start = [], 0
    for path, leaf in members:
        slots.append(Slot(path, tuple(leaf.shape), start, leaf.size))
        start += leaf.size
    return Group(name, decayed, tuple(slots), start)


def layout_of(tree: Tree, parts: int = 1, max_size: int | None = None) -> Layout:
    """The layout of `tree` (from its shapes, dtypes and paths only: nothing is computed), each kind of leaf
    in `parts` buffers or more, so that a buffer holds about `max_size` elements at most (a leaf is never cut)."""
    kinds: dict[tuple[str, bool], list[tuple[str, mx.array]]] = {}
    for path, leaf in tree_flatten(tree):
        kinds.setdefault((str(leaf.dtype).rsplit(".", 1)[-1], is_decayed(leaf)), []).append((path, leaf))
    groups = []
    for (dtype, decayed), members in kinds.items():
        sizes = [leaf.size for _, leaf in members]
        count = max(parts, 1, -(-sum(sizes) // max_size) if max_size else 1)
        bounds = [0, *_even_cuts(sizes, count), len(members)]
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            groups.append(_group(f"{dtype}_{'decayed' if decayed else 'kept'}_{i}", decayed, members[a:b]))
    return Layout(tuple(groups), tree_map_with_path(lambda path, _: path, tree))


def group_buffer(leaves: list[mx.array], group: Group) -> mx.array:
    """One group's buffer from its leaves, in the group's order: one `concatenate`."""
    flat = mx.concatenate([leaf.reshape(-1) for leaf in leaves])
    return flat.reshape(1, group.size) if group.decayed else flat


def flatten(tree: Tree, layout: Layout) -> dict[str, mx.array]:
    """{group name: buffer}: each group's leaves concatenated."""
    leaves = dict(tree_flatten(tree))
    return {g.name: group_buffer([leaves[s.path] for s in g.slots], g) for g in layout.groups}


def unflatten(buffers: dict[str, mx.array], layout: Layout) -> Tree:
    """The tree again, each leaf a reshaped slice (a view) of its group's buffer."""
    views = {}
    for g in layout.groups:
        flat = buffers[g.name].reshape(-1)
        views.update({s.path: flat[s.start:s.start + s.size].reshape(s.shape) for s in g.slots})
    return tree_map(lambda path: views[path], layout.skeleton)


def _signature(node: Any) -> list | None:
    """[(path, shape)] of a subtree's leaves; None for a lone array or a non-array leaf."""
    if not isinstance(node, (dict, list, tuple)):
        return None
    pairs = tree_flatten(node)
    return [(p, tuple(v.shape)) for p, v in pairs] if all(isinstance(v, mx.array) for _, v in pairs) else None


def _convert_shaped(node: Any, signature: list, convert: Callable) -> Any:
    """`node` with `convert` applied to each subtree whose leaves have `signature`; the rest as it is."""
    if _signature(node) == signature:
        return convert(node)
    if isinstance(node, dict):
        return {k: _convert_shaped(v, signature, convert) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_convert_shaped(v, signature, convert) for v in node)
    return node


def flat_opt_state(opt_state: Tree, layout: Layout) -> Tree:
    """An optimizer state with each subtree shaped like the parameters (a moment tree) as the layout's
    buffers; counts and other leaves as they are. A state already flat comes back unchanged."""
    shapes = {s.path: s.shape for g in layout.groups for s in g.slots}
    signature = [(path, shapes[path]) for _, path in tree_flatten(layout.skeleton)]
    return _convert_shaped(opt_state, signature, lambda tree: flatten(tree, layout))


def _flat_signature(layout: Layout) -> list:
    return [(g.name, (1, g.size) if g.decayed else (g.size,)) for g in layout.groups]


def tree_opt_state(opt_state: Tree, layout: Layout) -> Tree:
    """The per-tensor optimizer state (the one a checkpoint holds) of a flat one; a per-tensor state comes
    back unchanged."""
    return _convert_shaped(opt_state, _flat_signature(layout), lambda buffers: unflatten(buffers, layout))


def buffer_opt_state(opt_state: Tree, layout: Layout, name: str) -> Tree:
    """A flat optimizer state cut down to one buffer's: each flat subtree as {name: its buffer}, the rest as
    it is."""
    return _convert_shaped(opt_state, _flat_signature(layout), lambda buffers: {name: buffers[name]})


def merge_opt_states(opt_state: Tree, parts: list[Tree]) -> Tree:
    """The states of single buffers (`buffer_opt_state` after an update) as one state shaped like `opt_state`;
    a leaf that is no buffer's (a step count, the same in every part) is the last part's."""
    found = {}
    for part in parts:
        found.update(tree_flatten(part))
    return tree_map_with_path(lambda path, _: found[path], opt_state)

