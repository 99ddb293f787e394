"""Softmax, log-sum-exp and the SwiGLU gate written for MLX's CPU backend, with the built-ins on GPUs.

On MLX's CPU backend the built-in softmax/logsumexp/sigmoid kernels are precompiled for baseline
x86-64, where their exp polynomial runs through a software fma(); the same math written as
elementwise ops is fused by `mx.compile` into one JIT kernel built with the host's FMA and vectorised
(see abot/platform/jit.py). Measured on tiny's shapes: softmax 2.4x, logsumexp 1.8x faster; the SwiGLU gate
with its hand-written gradient 3.4x faster forward + backward than autodiff through `silu(a) * b`.
On GPUs the built-in softmax and logsumexp are the fast path, so `fused_kernels()` picks them there;
the gate's hand-written gradient is used everywhere, since it also keeps half the activations.
"""

import mlx.core as mx


def fused_kernels() -> bool:
    """True where MLX's own fused kernels are the fast path (Metal, CUDA)."""
    return mx.default_device() == mx.gpu


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    if fused_kernels():
        return mx.softmax(x, axis=axis, precise=True)
    e = mx.exp(x - mx.stop_gradient(x.max(axis, keepdims=True)))
    return e / row_sum(e, axis)


def logsumexp(x: mx.array, axis: int = -1) -> mx.array:
    if fused_kernels():
        return mx.logsumexp(x, axis=axis)
    # Shift by the (gradient-free) max for stability; the gradient of lse does not depend on the shift.
    m = mx.stop_gradient(x.max(axis, keepdims=True))
    return mx.log(row_sum(mx.exp(x - m), axis).squeeze(axis)) + m.squeeze(axis)


def row_sum(x: mx.array, axis: int = -1) -> mx.array:
    """x.sum(axis, keepdims=True), as a matrix-vector product when `axis` is the last one.

    MLX's CPU reduction reads a row one element at a time; the BLAS product with a vector of ones runs at
    memory speed: measured 2.8 -> 1.3 ms on (8, 8, 256, 256), 13.6 -> 4.1 ms on (2048, 8000).
    """
    if axis not in (-1, x.ndim - 1):
        return x.sum(axis, keepdims=True)
    return x @ mx.ones((x.shape[-1], 1), dtype=x.dtype)


def _sigmoid(x: mx.array) -> mx.array:
    # Through exp(-|x|), which never overflows (1 / (1 + exp(-x)) is inf/inf-prone below -88).
    e = mx.exp(-mx.abs(x))
    return mx.where(x >= 0, 1.0, e) / (1.0 + e)


@mx.custom_function
def silu_gate(a: mx.array, b: mx.array) -> mx.array:
    """silu(a) * b, the gate of a SwiGLU feed-forward block."""
    return a * _sigmoid(a) * b


@silu_gate.vjp
def _silu_gate_vjp(primals, cotangent, output):
    # d silu(a)/da = s (1 + a (1 - s)) with s = sigmoid(a), recomputed here (one fused kernel) rather
    # than kept from the forward pass: cheaper to recompute than to store and reload. Only a and b are
    # kept for backward; autodiff of silu(a) * b also keeps sigmoid(a) and silu(a), two more tensors
    # of the MLP's hidden size per block. s is written unlike the forward's `_sigmoid` on purpose: under
    # mx.compile identical expressions are merged (common subexpression elimination), which would keep
    # the forward's exp(-|a|) alive until backward. 1 / (1 + exp(-a)) is exact at both ends: exp(-a) = inf
    # gives 0, never NaN.
    a, b = primals
    s = 1.0 / (1.0 + mx.exp(-a))
    gs = cotangent * s
    return gs * b * (1.0 + a * (1.0 - s)), gs * a


@mx.custom_function
def relu_squared(a: mx.array) -> mx.array:
    """max(a, 0)^2, the ReLU² activation."""
    r = mx.maximum(a, 0.0)
    return r * r


@relu_squared.vjp
def _relu_squared_vjp(primals, cotangent, output):
    # d/da = 2 max(a, 0), recomputed from a: only `a` is kept for backward, not max(a, 0) as well (autodiff
    # of maximum-then-square keeps both, one more tensor of the MLP's hidden size per block).
    a = primals  # a one-argument custom function gets its primal and returns its cotangent bare
    return 2.0 * cotangent * mx.maximum(a, 0.0)
