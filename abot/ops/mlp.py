"""Feed-forward blocks: SwiGLU (Shazeer, 2020), a plain GELU MLP, or ReLU² (So et al. 2021, "Primer")."""

import mlx.core as mx
import mlx.nn as nn

from abot.ops.elementwise import relu_squared, silu_gate


def swiglu(x: mx.array, w_gate: mx.array, w_up: mx.array, w_down: mx.array) -> mx.array:
    return silu_gate(x @ w_gate, x @ w_up) @ w_down


def gelu_mlp(x: mx.array, w_up: mx.array, w_down: mx.array) -> mx.array:
    return nn.gelu(x @ w_up) @ w_down


def relu2_mlp(x: mx.array, w_up: mx.array, w_down: mx.array) -> mx.array:
    """relu(x W_up)^2 W_down: modded-nanogpt's MLP, measured ahead of SwiGLU there and in nanochat."""
    return relu_squared(x @ w_up) @ w_down
