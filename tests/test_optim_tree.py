"""abot.optim.tree: the tree utilities optimizers share, on small trees against hand computation."""

import abot  # noqa: F401  (loads the BLAS shim before mlx.core)
import mlx.core as mx
import pytest

from abot.optim.placement import leaf_streams
from abot.optim.tree import map_leaves, unzip, zeros_like_f32


def tree():
    return {"w": mx.array([[1.0, 2.0], [3.0, 4.0]]), "blocks": [{"g": mx.array([5.0, 6.0], dtype=mx.bfloat16)}]}


def values(t):
    return {"w": t["w"].tolist(), "g": t["blocks"][0]["g"].tolist()}


def test_zeros_like_f32_is_float32_zeros_of_each_shape():
    zeros = zeros_like_f32(tree())
    assert values(zeros) == {"w": [[0.0, 0.0], [0.0, 0.0]], "g": [0.0, 0.0]}
    assert zeros["w"].dtype == mx.float32 and zeros["blocks"][0]["g"].dtype == mx.float32
    assert zeros_like_f32(mx.ones((3,), dtype=mx.float16)).dtype == mx.float32  # a lone leaf is a tree too


def test_unzip_splits_tuple_leaves_into_trees():
    pairs = {"a": (mx.array(1.0), mx.array(2.0)), "b": [(mx.array(3.0), mx.array(4.0))]}
    first, second = unzip(pairs, 2)
    assert first["a"].item() == 1.0 and first["b"][0].item() == 3.0
    assert second["a"].item() == 2.0 and second["b"][0].item() == 4.0


def test_map_leaves_returns_one_tree_per_result():
    t = tree()
    sums, products = map_leaves(lambda a, b: (a + b, a * b), t, t)
    assert values(sums) == {"w": [[2.0, 4.0], [6.0, 8.0]], "g": [10.0, 12.0]}
    assert values(products) == {"w": [[1.0, 4.0], [9.0, 16.0]], "g": [25.0, 36.0]}
    (only,) = map_leaves(lambda a: (a - 1,), t)
    assert values(only) == {"w": [[0.0, 1.0], [2.0, 3.0]], "g": [4.0, 5.0]}


def test_map_leaves_with_path_passes_tree_flatten_paths():
    seen = []

    def leaf(path, a):
        seen.append(path)
        return a, path

    _, paths = map_leaves(leaf, tree(), with_path=True)
    assert seen == ["w", "blocks.0.g"] and paths == {"w": "w", "blocks": [{"g": "blocks.0.g"}]}


def test_map_leaves_spreads_leaves_over_the_streams_without_changing_them():
    streams = [mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)]
    placed = []

    def leaf(a):
        placed.append(mx.default_stream(mx.cpu))
        return (a * 3,)

    (plain,) = map_leaves(leaf, tree())
    with leaf_streams(streams):
        (spread_out,) = map_leaves(leaf, tree())
    assert placed[2:] == streams  # w (4 parameters) on the first stream, then g on the less loaded one
    assert values(spread_out) == values(plain) == {"w": [[3.0, 6.0], [9.0, 12.0]], "g": [15.0, 18.0]}


def test_map_leaves_refuses_a_tree_without_leaves():
    with pytest.raises(ValueError, match="no leaves"):
        map_leaves(lambda a: (a,), {})
