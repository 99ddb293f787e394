"""Peak-memory estimate of one training step, from shapes alone (used by `abot verify` and `abot train`).

Peak memory of one compiled training step (`abot.step.make_train_step`), in bytes, for the configured
precision, micro-batch B, sequence length L and model (n layers, width D, MLP hidden F, H heads, vocabulary V),
with c = bytes per element of the compute precision (4 for float32, 2 for bfloat16/float16):

    peak  = state + max(activation phase, update phase)
    state = P + S                        P: float32 master parameters, S: optimizer state; both counted
                                         exactly from the shapes (model.init and optimizer.init, lazily:
                                         nothing is allocated). adamw: S = 2P; muon_adamw: momentum for
                                         hidden matrices + m, v for embedding and norms.

Activation phase (forward + backward of one micro-batch), per-token sizes with T = B*L:

    BLD = T*D*c      BLF = T*F*c      BHLL = B*H*L*L*c      BLV = T*V*4 (float32)

    saved per block = 8 BLD                     block input x, its RMSNorm output, q*scale and k after RoPE,
                                                v, the merged attention output, the mid-block residual and its
                                                RMSNorm output (each needed by a matmul's or a norm's
                                                backward). Of these, q and the attention output are
                                                T*H*hd*c and k, v T*Hkv*hd*c (head width hd, Hkv kv heads:
                                                grouped-query k, v are never repeated), so 4 BLD +
                                                2 T(H + Hkv)hd c in general, 8 BLD for d_model = H*hd, Hkv = H
                    + T(H + Hkv)hd c            qk_norm: q and k before their norms
                    + 4 BLF                     SwiGLU with its hand-written gradient (abot/ops/elementwise.py):
                                                gate, up and silu(gate)*up, which the backward pass needs,
                                                and 1 BLF more (measured, CPU)
                      (gelu: 4 BLF)             GELU: up, up/sqrt(2), 1+erf(.), the GELU output
                      (relu2: 4 BLF)            ReLU²: up and its square, hand-written gradient (measured
                                                within 1% at 3x256, seq 256)
                    + 2*T*D                     dropout > 0: the two bool keep-masks
    top             = 3 BLD                     embedding output, final-norm input and output
    loss            = 2.5 BLV                   the float32 logits and their gradient at the start of the
                                                backward pass, and part of the time the forward's softmax
                                                exp (measured: 2 to 3 BLV with the evaluation order; the
                                                gradient is one fused kernel, abot/ops/losses.py) (+ T*V*c
                                                for the low-precision logits when c < 4; + BLV with
                                                model.logit_softcap: the capped logits, measured +1.0 BLV)

    attention: no seq x seq matrix is kept from the forward pass (MLX's fused kernel on GPUs, a
        FlashAttention-style backward on the CPU); the block whose backward is running rebuilds its
        probabilities and their gradients: + 4 BHLL + L*L*c (with the causal mask) once.
    one micro-batch, no checkpointing:  (n + 1) * saved-per-block + 4 BHLL + top + loss
        the peak is where the backward pass starts: every block's saved set, the loss buffers, and the
        top block's first cotangents (gradients of its saved tensors), about as large as its saved set.
    one micro-batch, gradient checkpointing:  the larger of
        n * BLD + 2 * saved-per-block + 4 BHLL + top + loss
            backward's start: each block kept only its input (BLD); the top block recomputed (its saved
            set) with its cotangents (about as much again), the loss buffers;
        n * (BLD + 2 BLF + BLD) + 2 * saved-per-block + 4 BHLL + top + BLV
            backward's end: MLX computes a block's gate/up weight gradients only after the input-gradient
            chain has passed below it, so every block holds those two MLP cotangents and its normalised
            input (2 BLF + BLD) until then; of the loss buffers only the logits gradient is left (the tied
            head's weight gradient reads it last).
    grad_accum_steps = k > 1: the k micro-batches are unrolled in one compiled graph, each made to start
        after the previous one's gradients (abot/step.py), so one micro-batch's activations are alive at a
        time, beside two gradient trees: the running sum and the micro-batch's own (+ 2P). Measured at
        k = 4 (tiny, seq 256, micro-batch 4): + 96 MiB over k = 1 with and without checkpointing, P = 50 MiB.
        (Before that ordering, MLX ran the micro-batches side by side: 2.7x / 2.4x one micro-batch's peak.)
    bfloat16/float16: + P*c/4, the compute-precision copy of the parameters (not measured here: CPU).

Update phase (clip + optimizer + the non-finite guard), above `state`:

    update = G + P + S                 the float32 gradients (G = P bytes), and the new parameters and
                                       optimizer state, written while the old ones are still held (the
                                       non-finite guard `where(finite, new, old)` reads the old state after
                                       the new one is computed).
             + P                       an elementwise optimizer's flat update (abot.update): the gradients'
                                       and the parameters' flat copies, less what is freed buffer by buffer
                                       (measured, adamw, batch 1: 7.0 P and 8.7 P peaks where the per-leaf
                                       update's are 5.6 P and 6.0 P; 6 x 256 vocab 8000, 3 x 256 vocab 32000).

Adapters (an `adapter` section: abot.adapters): P and S are the adapters' own (float32 masters, their
optimizer state), and so are the gradients (G), the update phase and the accumulation buffers; the frozen
base adds its bytes to `state`: the base in the compute precision, its block projections at bits/8 bytes per
weight plus a scale and a bias per group when quantized (QLoRA). The activation phase is counted as full
fine-tuning's (the adapters' own activations, (x A) per projection, are r/D of a BLD each: left out; the
frozen weights' gradients, which the adapters skip, are not part of the activation terms). Measured:
tests/test_adapters.py holds a LoRA step's peak to this estimate.

Measured on this CPU (fp32, muon_adamw, compiled, vocab 32000), estimate vs `mx.get_peak_memory()`:
README "Verify a config" has the table; tests/test_verify.py re-measures two small shapes (slow).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from abot.config import Config


@dataclass
class Shapes:
    """Sizes read from the model's and the optimizer's lazily built trees (no memory is allocated)."""

    n_params: int  # the model's
    param_bytes: int  # float32 master weights of what trains: the model's, or with adapters the adapters'
    opt_bytes: int
    groups: dict = field(default_factory=dict)  # role (abot.models.roles: "embedding", "hidden", ...) -> count
    frozen_bytes: int = 0  # adapters: the frozen base in the compute precision (quantized for QLoRA)
    flat_update: bool = False  # the optimizer is elementwise: the step updates flat buffers (abot.update)


def model_shapes(cfg: Config) -> Shapes:
    """Parameter and optimizer-state sizes, computed from shapes only; parameters counted by the role the
    model declares for them (`Model.param_role`).

    MLX is lazy: `model.init(key)` and `optimizer.init(params)` build graphs whose arrays have shapes and
    dtypes but no memory until evaluated, and nothing here evaluates them. Works for plugin models and
    optimizers too.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from abot.build import build_model, build_optimizer

    from abot.run import build_step, trainable
    from abot.stage import stage_for_source

    model = build_model(cfg)
    params = model.init(mx.random.key(0))
    flat = tree_flatten(params)
    groups: dict[str, int] = {}
    for path, leaf in flat:
        role = model.param_role(path, leaf)
        groups[role] = groups.get(role, 0) + leaf.size
    n, frozen_bytes = sum(v.size for _, v in flat), 0
    if cfg.adapter.kind is None:
        trained, optimizer = params, build_optimizer(cfg, model)
    else:  # the adapters train; the frozen base is built (lazily, as everything here) as the run builds it
        parts = build_step(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=False)),
                           stage_for_source(cfg))
        trained, frozen = trainable(cfg, parts, params, mx.random.key(1), evaluate=False)
        frozen_bytes = sum(v.nbytes for _, v in tree_flatten(frozen) if isinstance(v, mx.array))
        optimizer = parts.optimizer
    opt_state = optimizer.init(_as_float32(trained))  # init_state hands it float32 masters
    return Shapes(n_params=n, param_bytes=4 * sum(v.size for _, v in tree_flatten(trained)),
                  opt_bytes=sum(v.nbytes for _, v in tree_flatten(opt_state)), groups=groups, frozen_bytes=frozen_bytes,
                  flat_update=optimizer.elementwise)


def _as_float32(params):
    import mlx.core as mx
    from mlx.utils import tree_map

    return tree_map(lambda p: p.astype(mx.float32), params)


def transformer_param_count(m) -> int:
    """The built-in transformer's parameter count from its config (a formula; tests hold it to count_params)."""
    from abot.models.transformer import head_dim, hidden_size, kv_heads

    d, f = m.d_model, hidden_size(m)
    q_width, kv_width = m.n_heads * head_dim(m), kv_heads(m) * head_dim(m)
    attention = 2 * d * q_width + 2 * d * kv_width  # wq, wo; wk, wv
    attention += (q_width + 2 * kv_width if m.qkv_bias else 0) + (d if m.attn_out_bias else 0)
    attention += 2 * head_dim(m) if m.qk_norm else 0
    mlp = (3 if m.ffn_activation == "silu" else 2) * d * f
    block = attention + mlp + 2 * d
    head = 0 if m.tie_embeddings else d * m.vocab_size
    value_embeds = (m.n_layers + 1) // 2 * m.vocab_size * kv_width if m.value_embeds else 0  # every other block
    return m.vocab_size * d + m.n_layers * block + d + head + value_embeds


@dataclass
class MemoryEstimate:
    """Bytes of one training step's peak, by term (see the module docstring for the formula)."""

    params: int
    optimizer: int
    grads: int
    compute_copy: int  # low-precision copy of the parameters (0 in float32)
    activations: int  # activation phase with the configured gradient_checkpointing
    activations_no_ckpt: int
    activations_ckpt: int
    update: int  # update phase above the state
    gradient_checkpointing: bool
    frozen: int = 0  # adapters: the frozen base

    @property
    def state(self) -> int:
        return self.params + self.optimizer + self.frozen

    @property
    def peak(self) -> int:
        return self.state + max(self.activations, self.update)

    @property
    def peak_other(self) -> int:
        """The peak with gradient checkpointing switched the other way."""
        other = self.activations_no_ckpt if self.gradient_checkpointing else self.activations_ckpt
        return self.state + max(other, self.update)

    @property
    def phase(self) -> str:
        return "activations" if self.activations >= self.update else "optimizer update"


def on_gpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def estimate_memory(cfg: Config, shapes: Shapes | None = None) -> MemoryEstimate:
    """Peak bytes of one compiled train step for `cfg` (formula in the module docstring)."""
    from abot.models.transformer import head_dim, hidden_size, kv_heads
    from abot.step import DTYPES

    shapes = shapes or model_shapes(cfg)
    m, t = cfg.model, cfg.train
    c = DTYPES[t.precision].size if t.precision in DTYPES else 4
    b, seq, d, f, h, v, n = t.micro_batch_size, cfg.data.seq_len, m.d_model, hidden_size(m), m.n_heads, \
        m.vocab_size, m.n_layers
    tokens = b * seq
    bld, blf, blv = tokens * d * c, tokens * f * c, tokens * v * 4
    # q and the attention output, then k and v (kv heads), then q and k again before their norms.
    per_head = tokens * head_dim(m) * c
    attn_saved = 2 * per_head * (h + kv_heads(m)) + (per_head * (h + kv_heads(m)) if m.qk_norm else 0)
    attention = 4 * b * h * seq * seq * c + seq * seq * c  # the active block's rebuilt probabilities
    adapters = shapes.frozen_bytes > 0
    # Adapters: a frozen projection's backward needs no input of its own (dx = dy W.T), so of the MLP's saved set
    # only what the gate's gradient and the adapters' (x A) read stays: 2.5 BLF measured (CPU, fp32).
    mlp = 5 * blf // 2 if adapters else 4 * blf
    drop = 2 * tokens * d if m.dropout > 0 else 0
    # Attention keeps no seq x seq matrix between forward and backward (fused on GPUs, FlashAttention-style
    # backward on the CPU): the block whose backward is running rebuilds its own, on top of its saved set
    # again as cotangents.
    block = 4 * bld + attn_saved + mlp + drop
    active = block + attention
    top = 3 * bld + (tokens * d if m.dropout > 0 else 0)
    loss = 5 * blv // 2 + (tokens * v * c if c < 4 else 0) + (blv if m.logit_softcap is not None else 0)
    no_ckpt = n * block + active + top + loss
    # Checkpointed: the larger of the backward pass's first moment (loss buffers + the top block recomputed
    # with its cotangents) and its last (every block's deferred MLP cotangents, only the logits gradient left).
    # With adapters no block defers frozen weight gradients to the end of the backward pass: its start is the peak.
    start = n * bld + block + active + top + loss
    ckpt = start if adapters else max(start, n * (2 * bld + 2 * blf) + block + active + top + blv)
    compute_copy = shapes.param_bytes * c // 4 if c < 4 else 0
    # grad_accum_steps > 1: the running gradient sum and the current micro-batch's gradients (see docstring).
    accumulation = 2 * shapes.param_bytes if t.grad_accum_steps > 1 else 0
    no_ckpt, ckpt = (acts + accumulation + compute_copy for acts in (no_ckpt, ckpt))

    grads = shapes.param_bytes
    update = grads + shapes.param_bytes + shapes.opt_bytes + (shapes.param_bytes if shapes.flat_update else 0)
    return MemoryEstimate(params=shapes.param_bytes, optimizer=shapes.opt_bytes, grads=grads,
                          compute_copy=compute_copy, activations=ckpt if t.gradient_checkpointing else no_ckpt,
                          activations_no_ckpt=no_ckpt, activations_ckpt=ckpt, update=update,
                          gradient_checkpointing=t.gradient_checkpointing, frozen=shapes.frozen_bytes)


def measure_step_peak(cfg: Config, stage=None, lanes: int = 1) -> tuple[int, int]:
    """Run one step of `cfg`'s compiled train step on random tokens; (peak bytes, bytes held before the step).

    The step is `abot.run.build_step`'s, the one `abot train` runs: the stage's loss (default: the stage whose
    batches data.source produces) and `lanes` (`abot.run.decide_lanes`, decided before MLX's first evaluation).
    The peak is `mx.get_peak_memory()` after `mx.reset_peak_memory()`, with the training state already
    allocated. Costs one step (plus compilation): seconds for small models.
    """
    import mlx.core as mx

    from abot.run import build_step, trainable
    from abot.stage import random_batch, stage_for_source

    t = cfg.train
    stage = stage or stage_for_source(cfg)
    parts = build_step(cfg, stage, lanes)
    init_key, key = mx.random.split(mx.random.key(t.seed))
    params, frozen = trainable(cfg, parts, parts.model.init(init_key), init_key)  # adapters: on a random base
    state, parts = parts.fresh_state(params, key, t.precision), parts.with_frozen(frozen)
    batch = random_batch(stage, cfg, init_key)
    mx.eval(state, batch)
    mx.clear_cache()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    state, metrics = parts.step(state, batch, mx.array(1e-4, dtype=mx.float32))  # rebinding frees the old state
    mx.eval(state, metrics)
    return mx.get_peak_memory(), held


def _read_meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


def _cgroup_limit() -> int | None:
    """A container's memory limit (cgroup v2 memory.max, or v1), if one is set."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:
            return int(text)
    return None


def machine_memory() -> tuple[int | None, int | None, str]:
    """(total, available now, where the numbers come from) for the memory that holds the training state.

    Linux: /proc/meminfo (MemTotal, MemAvailable), capped by a cgroup limit; macOS: `sysctl hw.memsize`
    (unified memory, shared with the GPU); a CUDA GPU: its own memory from mx.device_info() when reported.
    """
    import mlx.core as mx

    if on_gpu() and not sys.platform == "darwin":
        try:
            info = mx.device_info()
        except Exception:  # noqa: BLE001 - older MLX
            info = {}
        for key in ("memory_size", "total_memory", "memory"):
            if isinstance(info.get(key), int):
                return info[key], None, "GPU memory (mx.device_info)"
    if sys.platform == "darwin":
        import subprocess

        try:
            total = int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True,
                                       timeout=5).stdout.strip())
            return total, None, "sysctl hw.memsize (unified memory)"
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    info = _read_meminfo()
    total, available, where = info.get("MemTotal"), info.get("MemAvailable"), "/proc/meminfo"
    if total is None:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total = page * os.sysconf("SC_PHYS_PAGES")
            available = page * os.sysconf("SC_AVPHYS_PAGES")
            where = "os.sysconf"
        except (ValueError, OSError, AttributeError):
            return None, None, "unknown"
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        total, where = limit, "cgroup memory limit"
        available = min(available, limit) if available is not None else None
    return total, available, where
