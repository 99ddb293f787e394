"""The one projection op of the model: `linear(x, leaf)` for a plain, a quantized or an adapted weight.

A projection leaf of the tree `model.apply` sees is one of
- an (in, out) array: `x @ W` (abot's layout);
- a quantized base (QLoRA), `quantize`'s dict: `mx.quantized_matmul` on a GPU; on the CPU, where MLX's
  quantized matmul is slow, a matmul with a transient dequantized weight (`dequantized_matmul`);
- a frozen base under adapters, built by `abot.adapters.tree.attach` inside the step: `{"base": leaf}`, or
  `{"base": leaf, "adapter": tree, "apply": fn}` computing `fn(x, base, adapter)`; the base is a plain or a
  quantized leaf. No gradient reaches a frozen or quantized base: `mx.stop_gradient` here, inside the model,
  because `mx.checkpoint` (gradient checkpointing) otherwise differentiates its block with respect to every
  input, the frozen weights too (measured: one more matmul per projection; QuantizedMatmul has no such vjp).
"""

from __future__ import annotations

import functools
from typing import Any

import mlx.core as mx


def quantize(w: mx.array, bits: int, group_size: int) -> dict:
    """An (in, out) weight as `mx.quantize` packs it, grouped along the input dimension.

    `mx.quantize` groups along the last axis, and the groups of a matmul's weight should run along the
    dimension it sums over, so it quantizes W.T (out, in), the layout `quantized_matmul(..., transpose=True)`
    multiplies as x @ (W.T).T = x @ W (NOTES.md; mlx-lm's QuantizedLinear keeps the same (out, in) layout).
    The two ints are Python constants: mx.compile and mx.checkpoint pass them through as such.
    """
    packed, scales, biases = mx.quantize(mx.contiguous(w.T), group_size=group_size, bits=bits)
    return {"packed": packed, "scales": scales, "biases": biases, "bits": bits, "group_size": group_size}


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, dict) and "packed" in leaf


def weight_shape(leaf: Any) -> tuple[int, int]:
    """(in, out) of a plain or quantized projection leaf."""
    if is_quantized(leaf):
        return leaf["scales"].shape[1] * leaf["group_size"], leaf["packed"].shape[0]
    return tuple(leaf.shape)


def dequantize(leaf: dict) -> mx.array:
    """The (in, out) float weight a quantized leaf multiplies by."""
    return mx.dequantize(leaf["packed"], leaf["scales"], leaf["biases"], group_size=leaf["group_size"],
                         bits=leaf["bits"]).T


@functools.lru_cache(maxsize=None)
def dequantized_matmul(bits: int, group_size: int):
    """`f(x, packed, scales, biases) -> x @ W` through the dequantized weight, for the CPU.

    MLX's CPU `quantized_matmul` is ~20x slower than dequantizing and calling sgemm (measured, MLX 0.32 on
    2 cores, 1024 x 512 @ 512 x 1408: 754 ms against 39 ms). The float weight is a transient: the backward
    pass (a custom vjp, the gradient reaches x only) dequantizes again rather than keeping it from the forward,
    so no float copy of the base lives between the two passes and QLoRA keeps its memory saving.
    """
    def weight(packed, scales, biases):  # (out, in), W.T
        return mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)

    @mx.custom_function
    def matmul(x, packed, scales, biases):
        return x @ weight(packed, scales, biases).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, packed, scales, biases = primals
        # After the cotangent, and not the forward's node: mx.compile would otherwise merge the two identical
        # dequantizations into one and keep every float weight alive from the forward to the backward pass.
        later = mx.depends([packed, scales, biases], [cotangent])
        return cotangent @ weight(*later), *(mx.zeros_like(a) for a in (packed, scales, biases))

    return matmul


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def base_matmul(x: mx.array, leaf: Any) -> mx.array:
    """x @ W for a plain (in, out) weight or a quantized one (never differentiated): `mx.quantized_matmul` on
    a GPU, `dequantized_matmul` on the CPU."""
    if is_quantized(leaf):
        packed, scales, biases = (mx.stop_gradient(leaf[k]) for k in ("packed", "scales", "biases"))
        if on_cpu():
            return dequantized_matmul(leaf["bits"], leaf["group_size"])(x, packed, scales, biases)
        return mx.quantized_matmul(x, packed, scales, biases, transpose=True, group_size=leaf["group_size"],
                                   bits=leaf["bits"])
    return x @ leaf


def frozen(leaf: Any) -> Any:
    """A base leaf with no gradient path (a quantized one stops its gradient in `base_matmul`)."""
    return leaf if is_quantized(leaf) else mx.stop_gradient(leaf)


def linear(x: mx.array, leaf: Any) -> mx.array:
    """x @ W for any projection leaf (see the module docstring)."""
    if isinstance(leaf, dict) and "base" in leaf:
        base = frozen(leaf["base"])
        return leaf["apply"](x, base, leaf["adapter"]) if "adapter" in leaf else base_matmul(x, base)
    return base_matmul(x, leaf)
