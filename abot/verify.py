"""Setup verification: the checks behind `abot verify CONFIG` and the pre-flight checks of `abot train`.

Each check is a small function returning a `Check` record (name, status pass/warn/fail, what was found, the
fix). `run_checks` runs all of them for `abot verify`; `preflight` runs the cheap ones (save_dir writable,
disk space for a checkpoint, memory estimate vs this machine) before `abot train` starts, and stops it with the
same messages when one fails.

Memory estimate
---------------
Peak memory of one compiled training step (`abot.step.make_train_step`), in bytes, for the configured
precision, micro-batch B, sequence length L and model (n layers, width D, MLP hidden F, H heads, vocabulary V),
with c = bytes per element of the compute precision (4 for float32, 2 for bfloat16/float16):

    peak  = state + max(activation phase, update phase)
    state = P + S                        P: float32 master parameters, S: optimizer state; both counted
                                         exactly from the shapes (model.init and optimizer.init, lazily:
                                         nothing is allocated). adamw: S = 2P; muon_adamw: momentum for
                                         hidden matrices + m, v for embedding and norms.

Activation phase (forward + backward of one micro-batch), per-token sizes with T = B*L:

    BLD = T*D*c      BLF = T*F*c      BHLL = B*H*L*L*c (CPU only)      BLV = T*V*4 (float32)

    saved per block = 8 BLD                     block input x, its RMSNorm output, q*scale and k after RoPE,
                                                v, the merged attention output, the mid-block residual and its
                                                RMSNorm output (each needed by a matmul's or a norm's
                                                backward)
                    + 2 BHLL + L*L*c            CPU attention: exp(scores - max) and the probabilities
                                                (softmax backward needs both), and the causal mask; on GPUs
                                                MLX's fused attention keeps none of these, its backward
                                                recomputes them for the block being differentiated (so
                                                they count once; not measured here: no GPU)
                    + 8 BLF + T*F               SwiGLU: written as x*where(x>=0, 1, e)/(1+e), e = exp(-|x|),
                                                autodiff keeps gate, up, e, where(...), x*where, 1+e, silu,
                                                silu*up (8 floats per hidden unit) and the x>=0 mask (bool);
                      (gelu: 4 BLF)             GELU: up, up/sqrt(2), 1+erf(.), the GELU output
                    + 2*T*D                     dropout > 0: the two bool keep-masks
    top             = 3 BLD                     embedding output, final-norm input and output
    loss            = 3 BLV                     float32 logits' softmax exp, the scattered one-hot
                                                cotangent and the logits gradient, alive together at the
                                                start of the backward pass (+ T*V*c for the low-precision
                                                logits when c < 4)

    one micro-batch, no checkpointing:  (n + 1) * saved-per-block + top + loss
        the peak is where the backward pass starts: every block's saved set, the loss buffers, and the
        top block's first cotangents (gradients of its saved tensors), about as large as its saved set.
    one micro-batch, gradient checkpointing:  the larger of
        n * BLD + 2 * saved-per-block + top + loss
            backward's start: each block kept only its input (BLD); the top block recomputed (its saved
            set) with its cotangents (about as much again), the loss buffers;
        n * (BLD + 2 BLF + BLD) + 2 * saved-per-block + top + BLV
            backward's end: MLX computes a block's gate/up weight gradients only after the input-gradient
            chain has passed below it, so every block holds those two MLP cotangents and its normalised
            input (2 BLF + BLD) until then; of the loss buffers only the logits gradient is left (the tied
            head's weight gradient reads it last).
    grad_accum_steps = k > 1: the k micro-batches are unrolled in one compiled graph and MLX's scheduler
        runs them side by side: + (k - 1) * saved-per-micro-batch + k * P (one gradient tree per
        micro-batch before they are summed). Saved per micro-batch: n * saved-per-block + top + BLV (its
        softmax exp); checkpointed n * BLD + top + 2 BLV (its softmax exp and its logits gradient, held until
        the tied head's weight gradient at the end of its backward). Measured for k = 2 and 4.
    bfloat16/float16: + P*c/4, the compute-precision copy of the parameters (not measured here: CPU).

Update phase (clip + optimizer + the non-finite guard), above `state`:

    update = G + P + S                 the float32 gradients (G = P bytes), and the new parameters and
                                       optimizer state, written while the old ones are still held (the
                                       non-finite guard `where(finite, new, old)` reads the old state after
                                       the new one is computed).

Measured on this CPU (fp32, muon_adamw, compiled, vocab 32000), estimate vs `mx.get_peak_memory()`:
README "Verify a config" has the table; tests/test_verify.py re-measures two small shapes (slow).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from abot.config import Config, load_config
from abot.errors import AbotError, ConfigError

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"
GIB = 2**30


@dataclass
class Check:
    """The outcome of one check: `status` is pass, warn, fail or skip; `fix` says what to do about it."""

    name: str
    status: str
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def line(self) -> str:
        return f"{self.name}: {self.status}: {self.detail}" + (f" Fix: {self.fix}" if self.fix else "")


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


# ------------------------------------------------------------------------------------------------ config

def check_config(path: str | Path, overrides: list[str] = ()) -> tuple[Check, Config | None]:
    """Load and validate the config: every key/type problem and cross-field rule at once, then the registry
    names (model, optimizer and its options, schedule, data source)."""
    name = "config valid"
    try:
        cfg = load_config(path, overrides)
    except ConfigError as err:
        problems = getattr(err, "problems", None) or [str(err)]
        detail = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}: " + "; ".join(problems)
        return Check(name, FAIL, detail, f"edit {path} (or the command-line overrides) as each message says"), None
    problems = _registry_problems(cfg)
    if problems:
        return Check(name, FAIL, "; ".join(problems), f"edit {path} as each message says"), None
    t = cfg.train
    return Check(name, PASS, f"{path}: model {cfg.model.name}, optimizer {t.optimizer}, schedule {t.schedule}, "
                             f"data source {cfg.data.source}"), cfg


def _registry_problems(cfg: Config) -> list[str]:
    """Names and options the registry resolves (a typo'd optimizer fails here, before anything slow)."""
    from abot import registry
    from abot.build import build_model, build_optimizer, build_schedule

    problems = []
    for build in (build_model, build_optimizer, build_schedule):
        try:
            build(cfg)
        except (AbotError, ValueError, TypeError) as err:
            problems.append(str(err))
    try:
        registry.datasets.get(cfg.data.source, "data.source")
    except AbotError as err:
        problems.append(str(err))
    return problems


# --------------------------------------------------------------------------------------------- tokenizer

def check_tokenizer(cfg: Config) -> Check:
    """The tokenizer at train.tokenizer_path exists and its vocabulary equals model.vocab_size."""
    from abot.tokenizer import load_tokenizer

    name, path, vocab = "tokenizer", Path(cfg.train.tokenizer_path), cfg.model.vocab_size
    if not path.exists():
        return Check(name, WARN, f"{path} not found: abot train will train one ({vocab} tokens) on the "
                                 "configured data before it starts",
                     "nothing, or train it now: abot tokenizer train CONFIG")
    try:
        tok = load_tokenizer(path)
    except AbotError as err:
        return Check(name, FAIL, str(err), f"delete {path} so abot train trains a new one, or point "
                                           "train.tokenizer_path at a good tokenizer")
    if tok.vocab_size != vocab:
        return Check(name, FAIL, f"{path} has {tok.vocab_size} tokens but model.vocab_size is {vocab}",
                     f"set model.vocab_size: {tok.vocab_size}, or point train.tokenizer_path at a new path "
                     f"so abot train trains a {vocab}-token tokenizer")
    return Check(name, PASS, f"{path}: {tok.vocab_size} tokens = model.vocab_size")


# ---------------------------------------------------------------------------------------------- dataset

def check_dataset(cfg: Config) -> Check:
    """The configured data source opens and its first training document has text (just that one is fetched)."""
    from abot.build import build_documents

    name, d = "dataset", cfg.data
    where = d.dataset if d.source == "huggingface" else f"data.source {d.source}"
    try:
        docs = build_documents(cfg, "train")
        first = next(iter(docs(0)), None)
    except AbotError as err:
        message = str(err)
        if "cannot be reached" in message or "offline" in message.lower():
            fix = ("connect to the internet (or set HF_HUB_OFFLINE=1 for a dataset already in the cache), or "
                   "train on local files: data.dataset=json data.data_files=path/*.jsonl")
        else:
            fix = "fix the data section as the message says"
        return Check(name, FAIL, message, fix)
    except Exception as err:  # a source plugin's own failure: report it, do not crash the checklist
        return Check(name, FAIL, f"{where}: {type(err).__name__}: {err}", "fix the data section or the data source")
    if first is None:
        return Check(name, FAIL, f"{where}: no documents in the train split", "point data at a non-empty split")
    if not isinstance(first, str):  # a source of token windows (pre-tokenized shards)
        return Check(name, PASS, f"{where}: reachable (pre-tokenized windows)")
    field_name = f" field '{d.text_field}'" if d.source == "huggingface" else ""
    return Check(name, PASS, f"{where}: reachable; first document{field_name}: {len(first):,} characters")


# ------------------------------------------------------------------------------------- parameters, memory

@dataclass
class Shapes:
    """Sizes read from the model's and the optimizer's lazily built trees (no memory is allocated)."""

    n_params: int
    param_bytes: int  # float32 master weights
    opt_bytes: int
    groups: dict = field(default_factory=dict)  # "embedding", "blocks", "head", "norms" -> parameter count


def model_shapes(cfg: Config) -> Shapes:
    """Parameter and optimizer-state sizes, computed from shapes only.

    MLX is lazy: `model.init(key)` and `optimizer.init(params)` build graphs whose arrays have shapes and
    dtypes but no memory until evaluated, and nothing here evaluates them. Works for plugin models and
    optimizers too.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from abot.build import build_model, build_optimizer

    params = build_model(cfg).init(mx.random.key(0))
    flat = tree_flatten(params)
    opt_state = build_optimizer(cfg).init(_as_float32(params))  # init_state hands it float32 masters
    groups: dict[str, int] = {}
    for path, leaf in flat:
        top = path.split(".")[0]
        group = {"embed": "embedding", "head": "head", "blocks": "blocks"}.get(top, "norms")
        groups[group] = groups.get(group, 0) + leaf.size
    n = sum(v.size for _, v in flat)
    return Shapes(n_params=n, param_bytes=4 * n,
                  opt_bytes=sum(v.nbytes for _, v in tree_flatten(opt_state)), groups=groups)


def _as_float32(params):
    import mlx.core as mx
    from mlx.utils import tree_map

    return tree_map(lambda p: p.astype(mx.float32), params)


def transformer_param_count(m) -> int:
    """The built-in transformer's parameter count from its config (a formula; tests hold it to count_params)."""
    from abot.models.transformer import hidden_size

    d, f = m.d_model, hidden_size(m)
    mlp = (3 if m.ffn_activation == "silu" else 2) * d * f
    block = 4 * d * d + mlp + 2 * d
    head = 0 if m.tie_embeddings else d * m.vocab_size
    return m.vocab_size * d + m.n_layers * block + d + head


def check_params(cfg: Config, shapes: Shapes | None = None) -> Check:
    shapes = shapes or model_shapes(cfg)
    g = shapes.groups
    parts = [f"embedding {g.get('embedding', 0) / 1e6:.2f}M"]
    if g.get("blocks"):
        parts.append(f"{cfg.model.n_layers} blocks x {g['blocks'] / cfg.model.n_layers / 1e6:.2f}M")
    parts.append(f"head {g['head'] / 1e6:.2f}M" if g.get("head") else "head tied to the embedding")
    return Check("parameters", PASS, f"{shapes.n_params / 1e6:.2f}M ({', '.join(parts)}); "
                                     f"{_gib(shapes.param_bytes)} in float32")


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

    @property
    def state(self) -> int:
        return self.params + self.optimizer

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


def estimate_memory(cfg: Config, shapes: Shapes | None = None, gpu: bool | None = None) -> MemoryEstimate:
    """Peak bytes of one compiled train step for `cfg` (formula in the module docstring)."""
    from abot.models.transformer import hidden_size
    from abot.step import DTYPES

    shapes = shapes or model_shapes(cfg)
    gpu = on_gpu() if gpu is None else gpu
    m, t = cfg.model, cfg.train
    c = DTYPES[t.precision].size if t.precision in DTYPES else 4
    b, seq, d, f, h, v, n = t.micro_batch_size, cfg.data.seq_len, m.d_model, hidden_size(m), m.n_heads, \
        m.vocab_size, m.n_layers
    tokens = b * seq
    bld, blf, blv = tokens * d * c, tokens * f * c, tokens * v * 4
    attention = 2 * b * h * seq * seq * c + seq * seq * c  # probabilities + softmax exp, and the mask
    mlp = 8 * blf + tokens * f if m.ffn_activation == "silu" else 4 * blf
    drop = 2 * tokens * d if m.dropout > 0 else 0
    block = 8 * bld + (0 if gpu else attention) + mlp + drop
    # The block whose backward is running: its saved set again as cotangents; on GPUs the fused attention's
    # backward recomputes that block's attention matrices.
    active = block + (attention if gpu else 0)
    top = 3 * bld + (tokens * d if m.dropout > 0 else 0)
    loss = 3 * blv + (tokens * v * c if c < 4 else 0)
    no_ckpt = n * block + active + top + loss
    # Checkpointed: the larger of the backward pass's first moment (loss buffers + the top block recomputed
    # with its cotangents) and its last (every block's deferred MLP cotangents, only the logits gradient left).
    ckpt = max(n * bld + block + active + top + loss, n * (2 * bld + 2 * blf) + block + active + top + blv)
    compute_copy = shapes.param_bytes * c // 4 if c < 4 else 0
    k = t.grad_accum_steps
    # Saved across a micro-batch's forward and backward: its blocks' saved sets (or, checkpointed, their
    # inputs), the top and the float32 softmax exp of the loss.
    # Checkpointed, a micro-batch also holds its logits gradient until its tied head's weight gradient, which
    # comes last (the "backward's end" moment).
    saved_no_ckpt, saved_ckpt = n * block + top + blv, n * bld + top + 2 * blv

    def phase(acts: int, saved: int) -> int:
        # grad_accum_steps = k > 1: MLX runs the k unrolled micro-batches of the compiled step side by side,
        # so k saved sets and k gradient trees are alive together; the loss and top-block transients once.
        return acts + (k - 1) * saved + (k * shapes.param_bytes if k > 1 else 0) + compute_copy

    no_ckpt, ckpt = phase(no_ckpt, saved_no_ckpt), phase(ckpt, saved_ckpt)

    grads = shapes.param_bytes
    update = grads + shapes.param_bytes + shapes.opt_bytes
    return MemoryEstimate(params=shapes.param_bytes, optimizer=shapes.opt_bytes, grads=grads,
                          compute_copy=compute_copy, activations=ckpt if t.gradient_checkpointing else no_ckpt,
                          activations_no_ckpt=no_ckpt, activations_ckpt=ckpt, update=update,
                          gradient_checkpointing=t.gradient_checkpointing)


def measure_step_peak(cfg: Config) -> tuple[int, int]:
    """Run one compiled train step of `cfg` on random tokens; (peak bytes, bytes held before the step).

    The peak is `mx.get_peak_memory()` after `mx.reset_peak_memory()`, with the training state already
    allocated, as in `abot train`. Costs one step (plus compilation): seconds for small models.
    """
    import mlx.core as mx

    from abot.build import build_loss, build_model, build_optimizer
    from abot.step import init_state, make_train_step

    t = cfg.train
    model, optimizer = build_model(cfg), build_optimizer(cfg)
    init_key, key = mx.random.split(mx.random.key(t.seed))
    state = init_state(model.init(init_key), optimizer, key, t.precision)
    tokens = mx.random.randint(0, cfg.model.vocab_size, (t.grad_accum_steps, t.micro_batch_size, cfg.data.seq_len + 1))
    mx.eval(state, tokens)
    step = make_train_step(model, build_loss(), optimizer, grad_accum_steps=t.grad_accum_steps,
                           max_grad_norm=t.max_grad_norm, precision=t.precision, compile=t.compile)
    mx.clear_cache()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    state, metrics = step(state, tokens, mx.array(1e-4, dtype=mx.float32))  # rebinding frees the old state
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


def check_memory(cfg: Config, shapes: Shapes | None = None, *, can_fail: bool = True,
                 memory: tuple[int | None, int | None, str] | None = None) -> Check:
    """The estimated peak against this machine's memory: fail above the total (warn only when can_fail is
    False, as in `abot train`), warn above what is available now."""
    est = estimate_memory(cfg, shapes)
    total, available, where = memory or machine_memory()
    t = cfg.train
    ckpt_word = "on" if est.gradient_checkpointing else "off"
    detail = (f"estimated peak {_gib(est.peak)} ({t.precision}, micro-batch {t.micro_batch_size} x seq "
              f"{cfg.data.seq_len}, gradient checkpointing {ckpt_word}) = params {_gib(est.params)} + optimizer "
              f"{_gib(est.optimizer)} + max(activations {_gib(est.activations)}, update {_gib(est.update)}); "
              f"with checkpointing {'off' if est.gradient_checkpointing else 'on'}: {_gib(est.peak_other)}")
    if total is None:
        return Check("memory", WARN, detail + "; this machine's memory is unknown", "")
    detail += f"; this machine: {_gib(total)}" + (f", {_gib(available)} available" if available else "") + \
        f" ({where})"
    fixes = []
    if not est.gradient_checkpointing and est.peak_other < est.peak:
        fixes.append(f"train.gradient_checkpointing=true ({_gib(est.peak_other)})")
    if t.micro_batch_size > 1:
        fixes.append("a smaller train.micro_batch_size (raise grad_accum_steps to keep the batch)")
    fixes.append("a smaller data.seq_len")
    fix = "try " + ", or ".join(fixes)
    if est.peak > total:
        return Check("memory", FAIL if can_fail else WARN, detail + "; it does not fit", fix)
    if available is not None and est.peak > available:
        return Check("memory", WARN, detail + "; more than is free now", "close other programs, or " + fix)
    return Check("memory", PASS, detail)


# ------------------------------------------------------------------------------------- disk, save_dir

def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def checkpoint_bytes(shapes: Shapes) -> int:
    """A checkpoint holds the float32 parameters and the optimizer state (plus a small header and metadata)."""
    return shapes.param_bytes + shapes.opt_bytes + 64 * 1024


def check_disk(cfg: Config, shapes: Shapes | None = None, *, copies: int | None = None) -> Check:
    """Free disk under save_dir for the checkpoints the run keeps: ckpt_keep + 1 at the moment of rotation
    (a new checkpoint is written before the oldest is deleted). Checkpoints already in save_dir count as
    space that rotation gives back. `copies` overrides the count (1 in `abot train`'s pre-flight)."""
    from abot.checkpoint import list_checkpoints

    shapes = shapes or model_shapes(cfg)
    t = cfg.train
    save_dir = Path(t.save_dir)
    one = checkpoint_bytes(shapes)
    keep = t.ckpt_keep + 1 if copies is None else copies
    try:
        existing = sum(p.stat().st_size for _, p in list_checkpoints(save_dir)) if save_dir.is_dir() else 0
        free = shutil.disk_usage(_existing_ancestor(save_dir)).free
    except OSError as err:
        return Check("disk space", FAIL, f"{save_dir}: cannot read the free space ({err})",
                     "point train.save_dir at a local, readable folder")
    need = max(0, keep * one - existing)
    detail = (f"a checkpoint is ~{_gib(one)}; {keep} at once (ckpt_keep {t.ckpt_keep} + the one being written)"
              if copies is None else f"a checkpoint is ~{_gib(one)}")
    detail += f" need {_gib(need)}; {_gib(free)} free under {_existing_ancestor(save_dir)}"
    if free < one:
        return Check("disk space", FAIL, detail + "; not even one checkpoint fits",
                     "free disk space, or point train.save_dir at a disk with room")
    if free < need:
        return Check("disk space", FAIL if copies is None else WARN, detail,
                     "free disk space, lower train.ckpt_keep, or move train.save_dir")
    return Check("disk space", PASS, detail)


def _check_writable(folder: Path, key: str) -> str | None:
    """None if files can be created in `folder` (created on the way, then removed); else the problem."""
    folder = folder.absolute()
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{key} {folder}: {probe} is a file, not a folder"
    if probe == folder:
        try:
            fd, name = tempfile.mkstemp(prefix=".abot-verify-", dir=folder)
            os.close(fd)
            os.unlink(name)
        except OSError as err:
            return f"{key} {folder}: cannot create files there ({err.strerror or err})"
        return None
    # The folder does not exist yet: abot train will create it. Check that it can, leaving nothing behind.
    try:
        tmp = tempfile.mkdtemp(prefix=".abot-verify-", dir=probe)
        os.rmdir(tmp)
    except OSError as err:
        return f"{key} {folder}: cannot create it under {probe} ({err.strerror or err})"
    return None


def check_save_dir(cfg: Config) -> Check:
    t = cfg.train
    targets = [(Path(t.save_dir), "train.save_dir")]
    if t.log_path:
        targets.append((Path(t.log_path), "train.log_path"))
    problems = [p for folder, key in targets if (p := _check_writable(folder, key))]
    if problems:
        return Check("save_dir writable", FAIL, "; ".join(problems),
                     "point train.save_dir (and train.log_path) at a writable folder")
    state = "exists" if Path(t.save_dir).is_dir() else "will be created"
    return Check("save_dir writable", PASS, f"{t.save_dir} ({state})")


# -------------------------------------------------------------------------------------------- compute

def sgemm_gflops(n: int = 512, min_time: float = 0.2) -> float:
    """Measured float32 matmul speed (n^3 sgemm) on MLX's default device, GFLOP/s."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b)
    for _ in range(2):
        mx.eval(a @ b)
    reps, start = 0, time.perf_counter()
    while True:
        mx.eval(a @ b)
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and reps >= 3:
            return 2 * n**3 * reps / elapsed / 1e9


def numpy_sgemm_gflops(n: int = 512, min_time: float = 0.2) -> float:
    """The same sgemm through numpy (its bundled OpenBLAS): what this CPU gives a good BLAS right now."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    for _ in range(2):
        a @ a
    reps, start = 0, time.perf_counter()
    while True:
        a @ a
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time and reps >= 3:
            return 2 * n**3 * reps / elapsed / 1e9


def check_compute(cfg: Config | None = None) -> Check:
    """Which device and BLAS MLX uses, and its measured 512^3 sgemm speed (next to numpy's on the CPU: a
    busy machine slows both, a reference BLAS only MLX)."""
    import mlx.core as mx

    from abot import cpu

    gflops = sgemm_gflops()
    if mx.default_device() == mx.gpu:
        kind = "Metal" if mx.metal.is_available() else "CUDA"
        return Check("device", PASS, f"GPU ({kind}); 512^3 sgemm {gflops:,.0f} GFLOP/s")
    reference = numpy_sgemm_gflops()
    detail = (f"CPU, BLAS: {cpu.status}, JIT: {cpu.jit_status}; 512^3 sgemm {gflops:,.1f} GFLOP/s "
              f"(numpy: {reference:,.1f})")
    if cpu.status.startswith(("reference", "disabled")) or gflops < reference / 4:
        return Check("device", WARN, detail + "; MLX is on a slow (reference) BLAS",
                     "unset ABOT_BLAS=off and install a C compiler (abot builds a shim to numpy's OpenBLAS), "
                     "or set ABOT_BLAS=/path/to/libopenblas.so")
    if cfg is not None and cfg.train.precision != "float32":
        return Check("device", WARN, detail + f"; train.precision {cfg.train.precision} matmuls are slow on CPUs",
                     "train.precision=float32 (the fast precision on a CPU)")
    return Check("device", PASS, detail)


# ----------------------------------------------------------------------------------------------- runs

def check_measured(cfg: Config, shapes: Shapes | None = None) -> Check:
    """Run one real compiled step and compare its peak memory with the estimate (`abot verify --measure`)."""
    est = estimate_memory(cfg, shapes)
    peak, _ = measure_step_peak(cfg)
    error = (est.peak - peak) / peak
    detail = f"one compiled step: peak {_gib(peak)}; the estimate {_gib(est.peak)} is {error:+.0%} off"
    if abs(error) > 0.15:
        return Check("memory (measured)", WARN, detail, "the estimate misses this configuration: please report it")
    return Check("memory (measured)", PASS, detail)


def run_checks(path: str | Path, overrides: list[str] = (), *, data: bool = True, measure: bool = False,
               on_check: Callable[[Check], None] | None = None) -> list[Check]:
    """Every check of the validation checklist, in order; `on_check` sees each as it finishes. `measure`
    adds one real training step to compare its peak memory with the estimate."""
    results: list[Check] = []

    def add(check: Check) -> None:
        results.append(check)
        if on_check:
            on_check(check)

    config_check, cfg = check_config(path, overrides)
    add(config_check)
    if cfg is None:
        for name in ("tokenizer", "dataset", "parameters", "memory", "disk space", "save_dir writable"):
            add(Check(name, SKIP, "needs a valid config"))
        add(check_compute())
        return results
    add(check_tokenizer(cfg))
    add(check_dataset(cfg) if data else Check("dataset", SKIP, "skipped (--no-data)"))
    shapes = model_shapes(cfg)
    add(check_params(cfg, shapes))
    add(check_memory(cfg, shapes))
    if measure:
        add(check_measured(cfg, shapes))
    add(check_disk(cfg, shapes))
    add(check_save_dir(cfg))
    add(check_compute(cfg))
    return results


def preflight(cfg: Config, say: Callable[[str], None] = print) -> list[Check]:
    """`abot train`'s cheap checks: save_dir writable, disk for one checkpoint, memory (warn only).

    Warnings are printed; a failure raises AbotError with the same message `abot verify` shows.
    """
    shapes = model_shapes(cfg)
    results = [check_save_dir(cfg), check_disk(cfg, shapes, copies=1), check_memory(cfg, shapes, can_fail=False)]
    failed = [c for c in results if c.failed]
    for check in results:
        if check.status == WARN:
            say(f"warning: {check.line()}")
    if failed:
        raise AbotError("pre-flight check failed (abot verify CONFIG shows the full checklist): "
                        + " | ".join(c.line() for c in failed))
    return results


STATUS_STYLE = {PASS: "green", WARN: "yellow", FAIL: "bold red", SKIP: "dim"}


def report_table(results: list[Check]):
    """A rich Table: one row per check."""
    from rich.table import Table

    table = Table(title="abot verify", title_justify="left", show_lines=True)
    for column in ("check", "status", "details", "fix"):
        table.add_column(column, overflow="fold")
    for c in results:
        table.add_row(c.name, f"[{STATUS_STYLE[c.status]}]{c.status}[/]", c.detail, c.fix)
    return table
