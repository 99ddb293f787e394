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
from mlx.utils import tree_flatten, tree_map

from abot.optim.base import Optimizer
from abot.update import guarded_flat_update, guarded_update, update_layout

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
    With `flat_update` and an elementwise optimizer the update runs on a few flat buffers (abot.update), and
    the state carries the moments flat between steps (`abot.update.step_state`, `checkpoint_state`).
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
