"""Setup verification: the checks behind `abot verify CONFIG` and the pre-flight checks of `abot train`.

Each check is a small function returning a `Check` record (name, status pass/warn/fail, what was found, the
fix). `run_checks` runs all of them for `abot verify`; `preflight` runs the cheap ones (keys nothing reads,
save_dir writable, disk space for a checkpoint, memory estimate vs this machine, precision) before `abot train`
starts, and stops it with the same messages when one fails.

The memory estimate and its formula are in abot/memory.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from abot.config import Config, load_config
from abot.errors import AbotError
from abot.restore import with_model_folder
from abot.memory import Shapes, estimate_memory, machine_memory, measure_step_peak, model_shapes
from abot.run import decide_lanes
from abot.unread import unread_keys
from abot.platform import PlatformStatus, prepare

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
        cfg = with_model_folder(load_config(path, overrides))  # train.init_from a Hugging Face model
    except AbotError as err:
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


def check_unread(cfg: Config) -> list[Check]:
    """One warning per key the user gave that the chosen source, optimizer or schedule never reads."""
    return [Check("unread key", WARN, u.detail, u.fix) for u in unread_keys(cfg)]


# --------------------------------------------------------------------------------------------- tokenizer

def check_tokenizer(cfg: Config) -> Check:
    """The tokenizer at train.tokenizer_path exists and fits model.vocab_size (abot.tokenizer.vocab_rule)."""
    from abot.tokenizer import is_hf_path, load_tokenizer, vocab_fits, vocab_rule

    name, path, vocab = "tokenizer", Path(cfg.train.tokenizer_path), cfg.model.vocab_size
    if not path.exists() and not is_hf_path(path):
        return Check(name, WARN, f"{path} not found: abot train will train one ({vocab} tokens) on the "
                                 "configured data before it starts",
                     "nothing, or train it now: abot tokenizer train CONFIG")
    try:
        tok = load_tokenizer(path)
    except AbotError as err:
        return Check(name, FAIL, str(err), f"delete {path} so abot train trains a new one, or point "
                                           "train.tokenizer_path at a good tokenizer")
    if not vocab_fits(tok, vocab):
        return Check(name, FAIL, f"{path} has {tok.vocab_size} tokens but model.vocab_size is {vocab}",
                     f"set model.vocab_size: {tok.vocab_size}, or point train.tokenizer_path at a new path "
                     f"so abot train trains a {vocab}-token tokenizer" if tok.exact_vocab else
                     f"set model.vocab_size: {tok.vocab_size} or more ({vocab_rule(tok)})")
    relation = "=" if tok.vocab_size == vocab else "<="
    return Check(name, PASS, f"{path}: {tok.vocab_size} tokens {relation} model.vocab_size")


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

def check_params(cfg: Config, shapes: Shapes | None = None) -> Check:
    shapes = shapes or model_shapes(cfg)
    g = shapes.groups
    parts = [f"embedding {g.get('embedding', 0) / 1e6:.2f}M"]
    if g.get("hidden"):  # roles the model declares (abot.models.roles)
        n = cfg.model.n_layers
        parts.append(f"hidden matrices {g['hidden'] / 1e6:.2f}M ({n} layers x {g['hidden'] / n / 1e6:.2f}M)")
    parts.append(f"head {g['head'] / 1e6:.2f}M" if g.get("head") else "head tied to the embedding")
    return Check("parameters", PASS, f"{shapes.n_params / 1e6:.2f}M ({', '.join(parts)}); "
                                     f"{_gib(shapes.param_bytes)} in float32")


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
    if where.startswith("GPU memory"):  # CUDA: the estimate is calibrated on MLX's CPU backend
        detail += "; MLX's CUDA backend measured up to 2x this estimate at seq 1024 (README, NVIDIA GPUs)"
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

def check_compute(status: PlatformStatus | None = None) -> Check:
    """Which device and BLAS MLX uses, and its measured 512^3 sgemm speed (next to numpy's on the CPU: a
    busy machine slows both, a reference BLAS only MLX). `status`: abot.platform.prepare()'s, by default."""
    import mlx.core as mx

    from abot.platform import backends, device

    status = status or prepare()
    gflops = device.sgemm_gflops()
    if conflict := backends.backend_conflict():
        return Check("device", WARN, f"{device.describe(status)}; {conflict[0]}", conflict[1])
    if mx.default_device() == mx.gpu:
        return Check("device", PASS, f"{device.describe(status)}; 512^3 sgemm {gflops:,.0f} GFLOP/s")
    reference = device.numpy_sgemm_gflops()
    detail = f"{device.describe(status)}; 512^3 sgemm {gflops:,.1f} GFLOP/s (numpy: {reference:,.1f})"
    if status.blas.startswith(("reference", "disabled")) or gflops < reference / 4:
        return Check("device", WARN, detail + "; MLX is on a slow (reference) BLAS",
                     "unset ABOT_BLAS=off and install a C compiler (abot builds a shim to numpy's OpenBLAS), "
                     "or set ABOT_BLAS=/path/to/libopenblas.so")
    return Check("device", PASS, detail)


def check_precision(cfg: Config) -> Check:
    """Warn about float16/bfloat16 on a CPU: MLX has no BLAS for them there, so every matmul is slow."""
    import mlx.core as mx

    t = cfg.train
    if t.precision == "float32" or mx.default_device() == mx.gpu:
        return Check("precision", PASS, t.precision)
    return Check("precision", WARN, f"train.precision {t.precision} on a CPU: MLX runs half-precision matmuls "
                 "without BLAS there, about 15x slower than float32 (configs/tiny.yaml: 113 tok/s in float16, "
                 "~1,800 in float32)", "train.precision=float32 (the fast precision on a CPU)")


# ----------------------------------------------------------------------------------------------- runs

def check_measured(cfg: Config, shapes: Shapes | None = None, lanes: int = 1) -> Check:
    """Run one step of the compiled train step `abot train` runs (`lanes` as `abot.run.decide_lanes` chose) and
    compare its peak memory with the estimate (`abot verify --measure`)."""
    from abot.platform.blas import set_blas_threads
    from abot.platform.lanes import usable_cores

    est = estimate_memory(cfg, shapes)
    peak, _ = measure_step_peak(cfg, lanes=lanes)
    if lanes > 1:  # the lanes gave each stream's matmuls a share of the cores: the device check wants them all
        set_blas_threads(usable_cores())
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
    lanes = decide_lanes(cfg.train) if measure and cfg is not None else 1  # before MLX's first evaluation
    if cfg is None:
        for name in ("tokenizer", "dataset", "parameters", "memory", "disk space", "save_dir writable"):
            add(Check(name, SKIP, "needs a valid config"))
        add(check_compute())
        add(Check("precision", SKIP, "needs a valid config"))
        return results
    for check in check_unread(cfg):  # only when a given key is unread: a clean config has no such line
        add(check)
    add(check_tokenizer(cfg))
    add(check_dataset(cfg) if data else Check("dataset", SKIP, "skipped (--no-data)"))
    shapes = model_shapes(cfg)
    add(check_params(cfg, shapes))
    add(check_memory(cfg, shapes))
    if measure:
        add(check_measured(cfg, shapes, lanes))
    add(check_disk(cfg, shapes))
    add(check_save_dir(cfg))
    add(check_compute())
    add(check_precision(cfg))
    return results


def preflight(cfg: Config, say: Callable[[str], None] = print) -> list[Check]:
    """`abot train`'s cheap checks: keys nothing reads (warn), save_dir writable, disk for one checkpoint, memory
    and precision (warn only).

    Warnings are printed; a failure raises AbotError with the same message `abot verify` shows.
    """
    shapes = model_shapes(cfg)
    results = [*check_unread(cfg), check_save_dir(cfg), check_disk(cfg, shapes, copies=1),
               check_memory(cfg, shapes, can_fail=False), check_precision(cfg)]
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
