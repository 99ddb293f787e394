"""Run by tests/test_distributed.py under `mlx.launch -n 2`: a few data-parallel steps, rank 0 saves params."""

import sys

import abot  # noqa: F401
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from abot.config import ModelConfig
from abot.losses import next_token
from abot.models.transformer import transformer
from abot.registry import optimizers
from abot.step import init_state, make_train_step

STEPS, BATCH = 3, 4


def run(out: str, distributed: bool) -> None:
    group = mx.distributed.init() if distributed else None
    rank, world = (group.rank(), group.size()) if group else (0, 1)
    model = transformer(ModelConfig(vocab_size=128, n_layers=2, d_model=32, n_heads=4, dropout=0.0, max_seq_len=64))
    opt = optimizers.get("muon_adamw")(weight_decay=0.01)
    state = init_state(model.init(mx.random.key(0)), opt, mx.random.key(1))
    step = make_train_step(model, next_token, opt, grad_accum_steps=1, max_grad_norm=1.0, group=group)
    share = BATCH // world
    for i in range(STEPS):
        batch = mx.random.randint(0, 128, (1, BATCH, 33), key=mx.random.key(100 + i))
        state, _ = step(state, batch[:, rank * share:(rank + 1) * share], mx.array(1e-2))
        mx.eval(state)
    if rank == 0:
        np.savez(out, **{k: np.array(v) for k, v in tree_flatten(state["params"])})


if __name__ == "__main__":
    run(sys.argv[1], distributed=sys.argv[2] == "dist")
