"""Muon: momentum whose 2-D updates are orthogonalised by a Newton-Schulz iteration.

Sources: Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024,
kellerjordan.github.io/posts/muon) for the iteration, its coefficients and momentum 0.95 with Nesterov;
Liu et al., "Muon is Scalable for LLM Training" (Moonshot AI, 2025, arXiv:2502.16982) for the
0.2 * sqrt(max(rows, cols)) update scale and decoupled weight decay.
"""

from __future__ import annotations

import math

import mlx.core as mx

from abot.optim.base import Optimizer, Tree
from abot.optim.placement import MATMUL_FLOPS_PER_PARAM
from abot.optim.tree import map_leaves, zeros_like_f32
from abot.optim.weight_decay import decoupled_weight_decay

# Quintic Newton-Schulz coefficients (a, b, c) from Keller Jordan's Muon post: tuned so that 5 steps
# push every singular value of a Frobenius-normalised matrix into roughly [0.7, 1.2] (not exactly 1:
# speed over precision, which does not hurt training).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7  # added to the Frobenius norm so a zero update stays zero (Keller Jordan's reference)

SCALES = ("moonshot", "keller")


def newton_schulz(g: mx.array, steps: int = 5) -> mx.array:
    """Approximately orthogonalise g (U S V^T -> ~U V^T) with the quintic Newton-Schulz iteration, in float32.

    g (2-D) is divided by its Frobenius norm first, putting every singular value in [0, 1], where the
    iteration converges. Tall matrices are transposed so the Gram matrix X X^T is the smaller one.
    """
    a, b, c = NS_COEFFICIENTS
    if g.ndim != 2:
        raise ValueError(f"newton_schulz: expected a matrix, got shape {g.shape}")
    x = g.astype(mx.float32)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (mx.sqrt(mx.sum(x * x)) + NS_EPS)  # Frobenius norm >= spectral norm, so ||x||_2 <= 1
    m, n = x.shape
    if n >= 2 * m:
        x = _newton_schulz_gram(x, steps)
    else:
        for _ in range(steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.T if tall else x


def _newton_schulz_gram(x: mx.array, steps: int) -> mx.array:
    """The same iteration run on m x m matrices, for a wide x (m x n, n >= 2m).

    Each step is x <- q(G) x with G = x x^T and q(G) = aI + bG + cG^2, so x_k = P_k x_0 with P_k a
    polynomial in G_0: every P, q and G commute, and G_{k+1} = q G_k q = q (q G_k). Iterating P and G
    (m x m) and applying P to x_0 once costs 4 m^2 n + 34 m^3 FLOPs for 5 steps, against
    5 (4 m^2 n + 2 m^3): 45% fewer for a 512 x 2048 MLP weight. Break-even is n ~ 1.9 m, hence n >= 2m.
    In float32 it is less exact than the direct iteration (small singular values get large factors in P):
    within 5e-4 of the largest entry on a spectrum spanning 6 decades, against 1e-5 (tests/test_optimizers.py),
    far inside the quintic's own tolerance (singular values left anywhere in ~[0.7, 1.2]).
    """
    a, b, c = NS_COEFFICIENTS
    gram = x @ x.T
    eye = mx.eye(gram.shape[0], dtype=gram.dtype)
    p = None
    for i in range(steps):
        q = a * eye + b * gram + c * (gram @ gram)
        p = q if p is None else q @ p
        if i < steps - 1:
            gram = q @ (q @ gram)
    return p @ x


def newton_schulz_flops(shape: tuple[int, ...], steps: int) -> int:
    """The matmul FLOPs of `newton_schulz` on a matrix of `shape`, in the form it takes (direct or Gram)."""
    m, n = sorted(shape)
    if n >= 2 * m:  # _newton_schulz_gram: G and P x_0 (m x n), and per step q, P and G (m x m)
        return 4 * m * m * n + m ** 3 * (2 * steps + 6 * (steps - 1))
    return steps * (4 * m * m * n + 2 * m ** 3)


def muon_cost(param: mx.array, ns_steps: int) -> float:
    """A Muon leaf's update work in parameter-equivalents (abot.optim.placement): its elementwise steps plus,
    for a matrix, Newton-Schulz. Spread by size alone, tiny's update put 10.6 of its 14.1 GFLOP on one of its
    two cores (README "Every core on Linux CPU")."""
    if param.ndim != 2:
        return param.size
    return param.size + newton_schulz_flops(param.shape, ns_steps) / MATMUL_FLOPS_PER_PARAM


def update_scale(shape: tuple[int, ...], scale: str) -> float:
    """The factor multiplying an orthogonalised update of a (fan_in, fan_out) matrix (abot stores `x @ w`).

    "moonshot": 0.2 * sqrt(max(rows, cols)) (Muon is Scalable, Moonshot 2025): an orthogonal update has
        RMS 1/sqrt(max dim), so this gives it RMS 0.2, about AdamW's, and one AdamW-sized lr (3e-4) fits both.
    "keller": sqrt(max(1, fan_out / fan_in)) (Keller Jordan's Muon, torch.optim.Muon "original"), with lr ~0.02.
        They write it as rows/cols of a torch (out, in) weight; abot's weights are (in, out), so it is cols/rows.
    """
    rows, cols = shape[-2], shape[-1]
    if scale == "moonshot":
        return 0.2 * math.sqrt(max(rows, cols))
    if scale == "keller":
        return math.sqrt(max(1.0, cols / rows))
    raise ValueError(f"muon: unknown scale {scale!r}; valid scales: {', '.join(repr(s) for s in SCALES)}")


def check_muon_options(momentum: float, ns_steps: int, scale: str, weight_decay: float) -> None:
    """Reject invalid Muon options with a message naming the option and its valid values."""
    if not 0.0 < momentum < 1.0:
        raise ValueError(f"muon: momentum must be in (0, 1) (usually 0.95), got {momentum}")
    if int(ns_steps) != ns_steps or ns_steps < 1:
        raise ValueError(f"muon: ns_steps must be a positive integer (usually 5), got {ns_steps}")
    if scale not in SCALES:
        raise ValueError(f"muon: unknown scale {scale!r}; valid scales: {', '.join(repr(s) for s in SCALES)}")
    if weight_decay < 0.0:
        raise ValueError(f"muon: weight_decay must be >= 0, got {weight_decay}")


def muon_leaf(param: mx.array, grad: mx.array, buf: mx.array, lr: mx.array, *, momentum: float,
              nesterov: bool, ns_steps: int, scale: str, weight_decay: float) -> tuple[mx.array, mx.array]:
    """One Muon step of one leaf -> (param, momentum buffer); 2-D leaves are orthogonalised and scaled.

    Other leaves get the plain (Nesterov) momentum step. Weight decay is decoupled and uses the unscaled lr,
    as in torch.optim.Muon.
    """
    g = grad.astype(mx.float32)
    # Sum-form momentum (Keller Jordan's reference): buf = mu*buf + g, Nesterov update g + mu*buf.
    # torch.optim.Muon keeps the EMA form buf.lerp_(g, 1-mu), which is (1-mu) times this; the difference
    # vanishes after the Frobenius normalisation in newton_schulz, so 2-D updates are the same.
    buf = momentum * buf + g
    step = g + momentum * buf if nesterov else buf
    if param.ndim == 2:
        step = newton_schulz(step, ns_steps) * update_scale(param.shape, scale)
    p = decoupled_weight_decay(param.astype(mx.float32), lr, weight_decay)
    return (p - lr * step).astype(param.dtype), buf


def muon(weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
         scale: str = "moonshot") -> Optimizer:
    """Muon alone: orthogonalised momentum on 2-D leaves, plain momentum on the rest (muon_adamw is the default).

    scale="moonshot" (default) suits AdamW-sized learning rates (~3e-4); scale="keller" wants lr ~0.02.
    State: {"buf": tree} of float32 momentum buffers.
    """
    check_muon_options(momentum, ns_steps, scale, weight_decay)

    def init(params: Tree) -> Tree:
        return {"buf": zeros_like_f32(params)}

    def update(grads: Tree, state: Tree, params: Tree, lr: mx.array) -> tuple[Tree, Tree]:
        def step(p, g, buf):
            return muon_leaf(p, g, buf, lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                             scale=scale, weight_decay=weight_decay)

        def cost(p, g, buf):
            return muon_cost(p, ns_steps)

        new_params, bufs = map_leaves(step, params, grads, state["buf"], cost=cost)
        return new_params, {"buf": bufs}

    return Optimizer(init, update)
