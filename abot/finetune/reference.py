"""The frozen reference model of preference losses that need one (DPO, IPO): its summed log-probs of each sequence.

The reference parameters are an explicit argument of a compiled function run outside the gradient (eval
mode: no dropout); the train step receives its output as part of the batch ("ref_chosen", "ref_rejected").
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from abot.finetune.losses import sequence_logprobs
from abot.step import batch_slices, new_streams


def make_reference_fn(model, compile: bool = True, lanes: int = 1):
    """`ref(ref_params, tokens, mask) -> (B,)` summed log-probs of the frozen model, eval mode, no gradient.

    With `lanes` > 1 the rows are split over that many MLX streams, as the train step's (abot.platform.lanes).
    """
    streams = new_streams(lanes)

    def ref(ref_params, tokens, mask):
        if len(streams) < 2 or tokens.shape[0] % len(streams):
            return mx.stop_gradient(sequence_logprobs(model, ref_params, tokens, mask, key=None))
        parts = []
        for stream, (part_tokens, part_mask) in zip(streams, batch_slices((tokens, mask), len(streams))):
            with mx.stream(stream):
                parts.append(sequence_logprobs(model, ref_params, part_tokens, part_mask, key=None))
        return mx.stop_gradient(mx.concatenate(parts))

    return mx.compile(ref) if compile else ref


def add_reference_logprobs(ref_fn: Callable, ref_params, batch: dict, lanes: int = 1) -> dict:
    """Add "ref_chosen" / "ref_rejected" to a preference batch with a leading (grad_accum,) axis or none.

    `lanes` as `ref_fn`'s: the rows go in the order the policy's loss sees them inside the train and eval steps
    (lane j: its pairs' chosen, then their rejected), so that, at equal parameters, the reference's log-probs
    equal the policy's bit for bit and the first evaluation's reward margins are exactly 0, not rounding noise.
    """
    lead = batch["chosen"].shape[:-2]  # () for a micro-batch, (grad_accum,) for a step's batch
    chosen = batch["chosen"].reshape(-1, *batch["chosen"].shape[-2:])
    rejected = batch["rejected"].reshape(chosen.shape)
    cm = batch["chosen_mask"].reshape(-1, *batch["chosen_mask"].shape[-2:])
    rm = batch["rejected_mask"].reshape(cm.shape)
    n = chosen.shape[1]
    lanes = lanes if lanes > 1 and n % lanes == 0 else 1
    rc, rr = [], []
    for i in range(chosen.shape[0]):  # one micro-batch at a time: one trace, bounded memory
        parts = batch_slices((chosen[i], rejected[i], cm[i], rm[i]), lanes)
        tokens = mx.concatenate([x for c, r, _, _ in parts for x in (c, r)])
        mask = mx.concatenate([x for _, _, a, b in parts for x in (a, b)])
        lp = ref_fn(ref_params, tokens, mask).reshape(lanes, 2, n // lanes)
        rc.append(lp[:, 0].reshape(-1))
        rr.append(lp[:, 1].reshape(-1))
    out = dict(batch)
    out["ref_chosen"] = mx.stack(rc).reshape(*lead, -1)
    out["ref_rejected"] = mx.stack(rr).reshape(*lead, -1)
    return out
