"""Feed-forward blocks: SwiGLU (Shazeer, 2020) or a plain GELU MLP."""

import mlx.core as mx
import mlx.nn as nn

from abot.ops.elementwise import silu_gate


def swiglu(x: mx.array, w_gate: mx.array, w_up: mx.array, w_down: mx.array) -> mx.array:
    return silu_gate(x @ w_gate, x @ w_up) @ w_down


def gelu_mlp(x: mx.array, w_up: mx.array, w_down: mx.array) -> mx.array:
    return nn.gelu(x @ w_up) @ w_down
