"""Feed-forward blocks: SwiGLU (Shazeer, 2020), a plain GELU MLP, or ReLU² (So et al. 2021, "Primer")."""

import mlx.core as mx
import mlx.nn as nn

from abot.ops.elementwise import relu_squared, silu_gate
from abot.ops.linear import linear

# Each weight is a projection leaf of abot.ops.linear: a plain (in, out) array, a quantized or an adapted one.


def swiglu(x: mx.array, w_gate, w_up, w_down) -> mx.array:
    return linear(silu_gate(linear(x, w_gate), linear(x, w_up)), w_down)


def gelu_mlp(x: mx.array, w_up, w_down) -> mx.array:
    return linear(nn.gelu(linear(x, w_up)), w_down)


def relu2_mlp(x: mx.array, w_up, w_down) -> mx.array:
    """relu(x W_up)^2 W_down: modded-nanogpt's MLP, measured ahead of SwiGLU there and in nanochat."""
    return linear(relu_squared(linear(x, w_up)), w_down)
