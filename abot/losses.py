"""Training objectives, registered by name (`losses` registry).

A loss is `loss(model, params, batch, key) -> (scalar loss, metrics dict of scalars)`, where
`batch` is what the data pipeline yields for one micro-batch. A loss that is a mean over a number of
items that varies between batches (masked tokens) also returns that count as metrics["loss_weight"]:
with it abot combines the losses of any split of a batch exactly as the whole batch's (today the parallel
lanes of abot/step.py's `on_streams`), and then drops it from the metrics.
"""

import mlx.core as mx

from abot.ops.losses import cross_entropy


def next_token(model, params, batch: mx.array, key: mx.array | None):
    """Next-token cross-entropy on a (batch, seq_len + 1) window of tokens (pre-training)."""
    logits = model.apply(params, batch[:, :-1], key=key)
    return cross_entropy(logits, batch[:, 1:]), {}
