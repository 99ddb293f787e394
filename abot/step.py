"""The train step: one pure function `(state, batch, lr) -> (state, metrics)`, compiled with mx.compile.

Inside: value-and-grad over each micro-batch, gradients averaged over `grad_accum_steps`,
global-norm clipping, the optimizer update, and a guard that skips the update when the loss or a
gradient is not finite. Parameters are functions of trees, not nn.Modules, so the gradient comes from
`mx.value_and_grad` (what `nn.value_and_grad` wraps for Modules).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_reduce

from abot.optim.base import Optimizer, leaf_streams
from abot.optim.flat import Layout, flat_opt_state, flatten, layout_of, tree_opt_state, unflatten

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# float16 dynamic loss scaling (as in mixed-precision training, Micikevicius et al. 2018):
# start high, halve on overflow, double after this many clean steps.
INITIAL_LOSS_SCALE = 2.0**15
LOSS_SCALE_GROWTH_INTERVAL = 1000


def init_state(params, optimizer: Optimizer, key: mx.array, precision: str = "float32") -> dict:
    """The full training state: float32 master params, optimizer state, PRNG key, loss scale."""
    params = tree_map(lambda p: p.astype(mx.float32), params)
    scale = INITIAL_LOSS_SCALE if precision == "float16" else 1.0
    return {"params": params, "opt_state": optimizer.init(params), "key": key,
            "loss_scale": mx.array(scale, dtype=mx.float32), "good_steps": mx.array(0, dtype=mx.int32)}


def global_norm(tree) -> mx.array:
    return mx.sqrt(tree_reduce(lambda acc, g: acc + mx.sum(mx.square(g.astype(mx.float32))), tree, mx.array(0.0)))


def buffers_global_norm(buffers, row: int = 4096) -> mx.array:
    """`global_norm` of a few long flat buffers, each summed in rows of `row` and then across the rows.

    MLX's CPU sum runs one float32 total along the array: over a whole model's gradients the small terms are
    lost to a large total (a 2-layer model's norm was 5e-5 off where per-tensor sums were 3e-6 off)."""
    total = mx.array(0.0)
    for x in tree_flatten(buffers):
        x = x[1].reshape(-1)
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
    """`params -> Layout` of the flat update (abot.optim.flat), one buffer per lane and kind of leaf; None when
    the step updates leaf by leaf (`flat_update` off, or an optimizer not declared elementwise)."""
    if not (flat_update and optimizer.elementwise):
        return None
    return lambda params: layout_of(params, parts=max(1, lanes))


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
                   max_grad_norm: float, streams: list, norm_of: Callable = global_norm):
    """Clip, update and the non-finite guard over whatever trees it is given -> (params, opt_state, norm, finite).

    A non-finite loss or gradient skips the update: params and optimizer state stay as they were."""
    norm = norm_of(grads)
    finite = mx.isfinite(norm) & mx.isfinite(loss)
    grads = clip_by_global_norm(grads, norm, max_grad_norm)
    with leaf_streams(streams):  # with lanes, the update's leaves are spread over their streams too
        new_params, new_opt = optimizer.update(grads, opt_state, params, lr)
    keep = lambda new, old: mx.where(finite, new, old)  # noqa: E731
    return tree_map(keep, new_params, params), tree_map(keep, new_opt, opt_state), norm, finite


def guarded_flat_update(layout: Layout, optimizer: Optimizer, grads, params, opt_state, lr: mx.array,
                        loss: mx.array, max_grad_norm: float, streams: list):
    """`guarded_update` on the layout's buffers: gradients and parameters flattened once (a concatenate per
    buffer), the norm, clip, update and guard a few whole-buffer kernels, the new parameters views again."""
    new_params, new_opt, norm, finite = guarded_update(
        optimizer, flatten(grads, layout), flatten(params, layout), flat_opt_state(opt_state, layout), lr, loss,
        max_grad_norm, streams, buffers_global_norm)
    return unflatten(new_params, layout), new_opt, norm, finite


def new_streams(lanes: int) -> list:
    """One new MLX stream per parallel lane on the default device; none for one lane (the default stream is used)."""
    return [mx.new_stream(mx.default_device()) for _ in range(lanes)] if lanes > 1 else []


def batch_slices(micro, n: int) -> list:
    """`micro` (an array or a tree of arrays with a common batch axis) cut into n equal parts along it."""
    size = tree_flatten(micro)[0][1].shape[0] // n
    return [tree_map(lambda b: b[j * size:(j + 1) * size], micro) for j in range(n)]


def on_streams(fn: Callable, streams: list, micro, key: mx.array | None = None):
    """`fn(part, key) -> ((loss, aux), rest)` over equal parts of a micro-batch, one per stream, combined.

    The result is the whole micro-batch's: each part's loss is a mean over its own items, so a loss that
    reports the count of items it averages over as aux["loss_weight"] has its parts weighted by those counts
    (exact for masked tokens); otherwise the parts weigh the same. loss_weight is removed from aux either way.
    With no streams, or a batch they do not divide, `fn` runs once on the whole micro-batch.
    """
    n = len(streams)
    if n < 2 or tree_flatten(micro)[0][1].shape[0] % n:
        (loss, aux), rest = fn(micro, key)
        aux.pop("loss_weight", None)
        return (loss, aux), rest
    keys = mx.random.split(key, n) if key is not None else [None] * n
    parts = []
    for stream, part, part_key in zip(streams, batch_slices(micro, n), keys):
        with mx.stream(stream):
            parts.append(fn(part, part_key))
    weights = [aux.pop("loss_weight", None) for (_, aux), _ in parts]
    if any(w is None for w in weights):
        factors = [1.0 / n] * n
    else:
        total = mx.maximum(sum(weights[1:], weights[0]), 1.0)  # counts: all zero means every loss is 0
        factors = [w / total for w in weights]

    def combine(*xs):
        return sum((f * x for f, x in zip(factors[1:], xs[1:])), factors[0] * xs[0])

    return tree_map(combine, *parts)


def check_micro_batches(batch: Any, grad_accum_steps: int) -> None:
    """A step's batch must hold exactly grad_accum_steps micro-batches: reading past its end inside the
    compiled graph would not raise, it would read out of bounds."""
    given = tree_flatten(batch)[0][1].shape[0]
    if given != grad_accum_steps:
        raise ValueError(f"the batch holds {given} micro-batches on its leading axis, but the step was built "
                         f"for grad_accum_steps={grad_accum_steps}")


def next_loss_scale(finite: mx.array, scale: mx.array, good_steps: mx.array) -> tuple[mx.array, mx.array]:
    """float16's dynamic loss scale after a step, and the clean-step count: halve on overflow, double after
    LOSS_SCALE_GROWTH_INTERVAL clean steps."""
    grow = good_steps >= LOSS_SCALE_GROWTH_INTERVAL
    scale = mx.where(finite, mx.where(grow, scale * 2.0, scale), scale * 0.5)
    return scale, mx.where(grow, 0, good_steps)


def make_train_step(model, loss_fn: Callable, optimizer: Optimizer, *, grad_accum_steps: int,
                    max_grad_norm: float, precision: str = "float32", compile: bool = True,
                    group: mx.distributed.Group | None = None, lanes: int = 1, combine: Callable | None = None,
                    flat_update: bool = True):
    """Build `step(state, batch, lr) -> (state, metrics)`.

    `batch` has a leading axis of `grad_accum_steps` micro-batches (an array or a dict of arrays);
    `lr` is a scalar array. Metrics: loss (mean over micro-batches), grad_norm (before clipping),
    finite (1.0 when the update was applied), loss_scale, plus the loss function's own metrics.
    With a distributed `group` of several ranks, gradients and metrics are averaged across ranks
    before clipping, so every rank applies the same update to the same parameters.
    With `lanes` > 1 each micro-batch is split along its batch axis into that many equal parts, each
    differentiated on its own MLX stream, and their gradients combined as one batch's (see
    `abot.platform.lanes.parallel_lanes`: MLX runs a stream's elementwise kernels on one core).
    With `combine(frozen, params, key) -> model params` (adapters: abot.adapters.tree.attach) it is `step(state,
    batch, lr, frozen)`: `frozen` (the base) gets no gradient, no optimizer state and is never returned.
    With `flat_update` and an elementwise optimizer the update runs on a few flat buffers (`update_layout`), and
    the state carries the moments flat between steps (`step_state`, `checkpoint_state`).
    """
    compute_dtype = DTYPES[precision]
    dynamic_scaling = precision == "float16"
    world = group.size() if group is not None else 1
    streams = new_streams(lanes)
    layout = update_layout(optimizer, lanes, flat_update)

    def across_ranks(tree):
        return tree if world == 1 else tree_map(lambda x: mx.distributed.all_sum(x, group=group) / world, tree)

    def scaled_loss(params, micro, key, scale, frozen):
        if compute_dtype != mx.float32:  # master weights stay float32; compute in low precision
            params = tree_map(lambda p: p.astype(compute_dtype), params)
        if combine is not None:  # the trained tree attached to the frozen one (differentiated: params only)
            key, combine_key = mx.random.split(key) if key is not None else (None, None)
            params = combine(frozen, params, combine_key)
        loss, aux = loss_fn(model, params, micro, key)
        return loss.astype(mx.float32) * scale, aux

    grad_fn = mx.value_and_grad(scaled_loss)

    def step(state: dict, batch: Any, lr: mx.array, frozen: Any = None):
        check_micro_batches(batch, grad_accum_steps)
        params, scale = state["params"], state["loss_scale"]
        key, *micro_keys = mx.random.split(state["key"], grad_accum_steps + 1)
        grads, loss, aux_sum = None, mx.array(0.0), {}
        for i in range(grad_accum_steps):  # unrolled: the compiled graph holds every micro-batch
            micro = tree_map(lambda b: b[i], batch)
            if grads is not None:
                # Micro-batch i starts after micro-batch i-1's gradients. Nothing else orders them, and MLX ran
                # the micro-batches side by side, holding all their activations at once (tiny at seq 256, four
                # micro-batches of 4: 1.8 GiB where one holds 0.7; small in parallel lanes: 4.2 GB vs 1.5).
                done = [g for _, g in tree_flatten(grads)]
                micro = tree_map(lambda b: mx.depends(b, done), micro)
            # ((loss, aux), grads) of the micro-batch, from its parallel lanes when there are several
            (l, aux), g = on_streams(lambda part, part_key: grad_fn(params, part, part_key, scale, frozen), streams,
                                     micro, micro_keys[i])
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss = loss + l
            aux_sum = {k: aux_sum.get(k, 0.0) + v for k, v in aux.items()}
        if grad_accum_steps > 1 or dynamic_scaling:  # else the factor is 1: no pass over every gradient
            inv = 1.0 / (grad_accum_steps * scale)
            grads = tree_map(lambda g: g.astype(mx.float32) * inv, grads)
            loss = loss / (grad_accum_steps * scale)
        if world > 1:  # data parallel: all-reduce in 32 MiB buckets, then the metrics
            grads = nn.average_gradients(grads, group=group)
            loss, aux_sum = across_ranks((loss, aux_sum))
        update = guarded_update if layout is None else partial(guarded_flat_update, layout(params))
        new_params, new_opt, norm, finite = update(optimizer, grads, params, state["opt_state"], lr, loss,
                                                   max_grad_norm, streams)
        good = mx.where(finite, state["good_steps"] + 1, 0)
        if dynamic_scaling:
            scale, good = next_loss_scale(finite, scale, good)
        new_state = {"params": new_params, "opt_state": new_opt, "key": key, "loss_scale": scale,
                     "good_steps": good}
        metrics = {"loss": loss, "grad_norm": norm, "finite": finite.astype(mx.float32), "loss_scale": scale,
                   **{k: v / grad_accum_steps for k, v in aux_sum.items()}}
        return new_state, metrics

    return mx.compile(step) if compile else step


def make_eval_step(model, loss_fn: Callable, compile: bool = True, lanes: int = 1, combine: Callable | None = None):
    """`eval_step(params, micro) -> (loss, metrics)` without dropout or gradients, in `lanes` parallel parts;
    with `combine` (as the train step's) `eval_step(params, micro, frozen)`."""
    streams = new_streams(lanes)

    def eval_step(params, micro, frozen=None):
        if combine is not None:
            params = combine(frozen, params, None)
        return on_streams(lambda part, _: (loss_fn(model, params, part, None), {}), streams, micro)[0]

    return mx.compile(eval_step) if compile else eval_step
