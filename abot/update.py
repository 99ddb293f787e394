"""The update phase of the train step: global-norm clipping, the optimizer update and the non-finite guard,
leaf by leaf or, for an elementwise optimizer, on a few flat buffers (abot.optim.flat).

The flat update concatenates the gradients and the parameters once per buffer, then the norm, clip, update
and guard are a few whole-buffer kernels per buffer instead of a few per tensor; the new parameters come back
as views (slices) of the new buffers. The moments stay flat from step to step (`step_state`); a checkpoint
holds them per tensor (`checkpoint_state`), whichever update wrote it.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_reduce

from abot.optim.base import Optimizer, leaf_streams
from abot.optim.flat import (Layout, buffer_opt_state, flat_opt_state, flatten, group_buffer, layout_of,
                             merge_opt_states, tree_opt_state, unflatten)

# A kind of leaf is cut into buffers of at most 1/FLAT_BUFFERS of the parameters (not under MIN_BUFFER
# elements, and never inside a leaf): what the flat update holds beyond its outputs is a buffer's temporaries
# per stream. One buffer per kind held them all at once (batch 1, 6 x 256 and 3 x 256: a step's peak 12x the
# parameters' bytes; so 7.0x and 8.7x; the per-leaf update's 5.6x and 6.0x).
FLAT_BUFFERS = 8
MIN_BUFFER = 1 << 20


def global_norm(tree) -> mx.array:
    return mx.sqrt(tree_reduce(lambda acc, g: acc + mx.sum(mx.square(g.astype(mx.float32))), tree, mx.array(0.0)))


def buffers_global_norm(buffers, row: int = 4096) -> mx.array:
    """`global_norm` of a few long flat buffers, each summed in rows of `row` and then across the rows.

    MLX's CPU sum runs one float32 total along the array: over a whole model's gradients the small terms are
    lost to a large total (a 2-layer model's norm was 5e-5 off where per-tensor sums were 3e-6 off)."""
    total = mx.array(0.0)
    for _, x in tree_flatten(buffers):
        x = x.reshape(-1)
        whole = x.size - x.size % row
        total = total + mx.sum(mx.square(x[whole:]))
        if whole:
            total = total + mx.sum(mx.sum(mx.square(x[:whole]).reshape(-1, row), axis=1))
    return mx.sqrt(total)


def clip_by_global_norm(grads, norm: mx.array, max_norm: float):
    """Scale gradients so their global norm is at most `max_norm`; max_norm <= 0 leaves them untouched."""
    if max_norm <= 0:
        return grads
    factor = mx.minimum(1.0, max_norm / (norm + 1e-6))
    return tree_map(lambda g: g * factor, grads)


def update_layout(optimizer: Optimizer, lanes: int = 1, flat_update: bool = True) -> Callable | None:
    """`params -> Layout` of the flat update: for each kind of leaf at least one buffer per lane, each at most
    1/FLAT_BUFFERS of the parameters; None when the step updates leaf by leaf (`flat_update` off, or an
    optimizer not declared elementwise)."""
    if not (flat_update and optimizer.elementwise):
        return None

    def layout(params) -> Layout:
        total = sum(leaf.size for _, leaf in tree_flatten(params))
        return layout_of(params, parts=max(1, lanes), max_size=max(total // FLAT_BUFFERS, MIN_BUFFER))

    return layout


def step_state(state: dict, layout: Callable | None) -> dict:
    """`state` in the form the step built with `layout` carries from step to step: moments as flat buffers.

    The step takes a per-tensor state too, flattening it inside (and compiling once more for it)."""
    if layout is None:
        return state
    return {**state, "opt_state": flat_opt_state(state["opt_state"], layout(state["params"]))}


def checkpoint_state(state: dict, layout: Callable | None) -> dict:
    """`state` with a per-tensor optimizer state, the form a checkpoint holds whichever update wrote it."""
    if layout is None:
        return state
    return {**state, "opt_state": tree_opt_state(state["opt_state"], layout(state["params"]))}


def guarded_update(optimizer: Optimizer, grads, params, opt_state, lr: mx.array, loss: mx.array,
                   max_grad_norm: float, streams: list):
    """Clip, update and the non-finite guard, leaf by leaf -> (params, opt_state, norm, finite).

    A non-finite loss or gradient skips the update: params and optimizer state stay as they were."""
    norm = global_norm(grads)
    finite = mx.isfinite(norm) & mx.isfinite(loss)
    grads = clip_by_global_norm(grads, norm, max_grad_norm)
    with leaf_streams(streams):  # with lanes, the update's leaves are spread over their streams too
        new_params, new_opt = optimizer.update(grads, opt_state, params, lr)
    keep = lambda new, old: mx.where(finite, new, old)  # noqa: E731
    return tree_map(keep, new_params, params), tree_map(keep, new_opt, opt_state), norm, finite


def guarded_flat_update(layout: Layout, optimizer: Optimizer, grads, params, opt_state, lr: mx.array,
                        loss: mx.array, max_grad_norm: float, streams: list):
    """`guarded_update` on the layout's buffers, one buffer per stream at a time -> (params, opt_state, norm,
    finite), the opt_state flat (it may come in per tensor)."""
    done = [g for _, g in tree_flatten(grads)]
    # The copies wait for every gradient. Nothing else orders them, and MLX interleaved them with the backward
    # pass, keeping its activations longer (tiny, batch 8: a peak of 16.7x the parameters' bytes, 11.1x so).
    flat_grads = flatten(tree_map(lambda g: mx.depends(g, done), grads), layout)
    norm = buffers_global_norm(flat_grads)
    finite = mx.isfinite(norm) & mx.isfinite(loss)
    flat_grads = clip_by_global_norm(flat_grads, norm, max_grad_norm)
    opt_state, leaves, lanes = flat_opt_state(opt_state, layout), dict(tree_flatten(params)), max(1, len(streams))
    new_params, new_states, outputs = {}, [], []
    keep = lambda new, old: mx.where(finite, new, old)  # noqa: E731
    for i, group in enumerate(layout.groups):
        # A buffer starts when the one `lanes` before it is done: one buffer's temporaries per stream.
        g = mx.depends(flat_grads[group.name], [finite, *(outputs[i - lanes] if i >= lanes else [])])
        p = group_buffer(mx.depends([leaves[s.path] for s in group.slots], [g]), group)
        old = buffer_opt_state(opt_state, layout, group.name)
        with leaf_streams(streams[i % lanes:i % lanes + 1]):  # placed as the per-leaf update would place a leaf
            new_p, new = optimizer.update({group.name: g}, old, {group.name: p}, lr)
        new_params[group.name], new = keep(new_p[group.name], p), tree_map(keep, new, old)
        new_states.append(new)
        outputs.append([new_params[group.name], *(x for _, x in tree_flatten(new))])
    return unflatten(new_params, layout), merge_opt_states(opt_state, new_states), norm, finite
