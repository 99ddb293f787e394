"""Checkpoints as checksummed msgpack files (no pickle: loading never runs code), written atomically.

Layout (docs/checkpoint-format.md): b"ABOTCKPT" | u32 LE format version | SHA-256 of payload | msgpack payload.
A run's save_dir holds `step_{step:08d}.ckpt` files and a `latest` pointer naming the newest one.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import msgpack
import numpy as np

from abot import __version__
from abot.errors import AbotError

MAGIC = b"ABOTCKPT"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sI32s")  # magic, format version, SHA-256 of the payload
ARRAY_KEY = "__array__"
LATEST_POINTER = "latest"
CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.ckpt$")
TMP_SUFFIX = ".tmp"
_READ_CHUNK = 1 << 24

# Stored dtype name -> little-endian numpy dtype of the raw bytes. bfloat16 has no numpy dtype, so its
# bits travel as uint16 and are re-viewed as bfloat16 on load: bit-exact, no float conversion.
_NUMPY_DTYPES = {
    "bool": "|b1", "uint8": "|u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8",
    "int8": "|i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
    "float16": "<f2", "bfloat16": "<u2", "float32": "<f4", "float64": "<f8", "complex64": "<c8",
}


@dataclass
class Checkpoint:
    """What a checkpoint file holds, with mx.array leaves in `trees`."""

    step: int
    meta: dict = field(default_factory=dict)
    trees: dict = field(default_factory=dict)
    abot_version: str = ""
    format_version: int = FORMAT_VERSION


# ---------------------------------------------------------------------------------------------- file writing

def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomically(path: Path, write_body) -> int:
    """Run `write_body(file)` on a temp file next to `path`, fsync it, rename it over `path`; returns its size.

    The temp file (`<name>.<random>.tmp`) is removed on any error, so the final name only ever holds a
    complete file; a SIGKILL can leave the temp file behind, which `save_rotating` sweeps up.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as err:
        raise AbotError(f"{path}: cannot create a file in {path.parent} ({err.strerror or err}); "
                        "check that the folder is writable") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write_body(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp_name, path)
    except BaseException as err:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise AbotError(f"{path}: cannot write ({err.strerror or err}); check that the folder is writable "
                            "and the disk has free space") from None
        raise
    fsync_dir(path.parent)
    return size


def atomic_write_bytes(path: str | Path, data: bytes) -> int:
    """Write `data` to `path` so readers see the old file or the whole new one, never a partial one."""
    return _write_atomically(Path(path), lambda f: f.write(data))


# ---------------------------------------------------------------------------------------------- encoding

class _HashingWriter:
    """Writes to a file while hashing, so the payload streams to disk without a second in-memory copy."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.sha256 = hashlib.sha256()
        self.packer = msgpack.Packer(autoreset=True, use_bin_type=True)

    def write(self, data) -> None:
        self.sha256.update(data)
        self.f.write(data)

    def pack(self, *objs: Any) -> None:
        """Pack each of `objs` in turn: a map's keys and values follow its header this way."""
        for obj in objs:
            self.write(self.packer.pack(obj))

    def pack_bin(self, data: memoryview) -> None:
        # msgpack bin 8/16/32 header written by hand so the array bytes go to the file uncopied.
        n = data.nbytes
        if n < 1 << 8:
            self.write(struct.pack(">BB", 0xC4, n))
        elif n < 1 << 16:
            self.write(struct.pack(">BH", 0xC5, n))
        elif n < 1 << 32:
            self.write(struct.pack(">BI", 0xC6, n))
        else:
            raise AbotError(f"an array of {n} bytes is over msgpack's 4 GiB limit for one value; "
                            "split the parameter into smaller arrays")
        self.write(data)


def dtype_name(dtype: mx.Dtype) -> str:
    """`mx.bfloat16` -> "bfloat16"."""
    return str(dtype).rsplit(".", 1)[-1]


def array_to_little_endian(array: mx.array) -> np.ndarray:
    """The array's raw values as a C-contiguous little-endian numpy array (bfloat16 as its uint16 bits)."""
    name = dtype_name(array.dtype)
    if name not in _NUMPY_DTYPES:
        raise AbotError(f"cannot save an array of dtype {name}; supported: {', '.join(_NUMPY_DTYPES)}")
    if name == "bfloat16":
        array = mx.view(array, mx.uint16)
    return np.ascontiguousarray(np.asarray(array), dtype=np.dtype(_NUMPY_DTYPES[name]))


def _plain_scalar(value: Any, where: str) -> Any:
    """Python scalars pass through; numpy scalars become Python ones; anything else is refused."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    raise AbotError(f"{where}: cannot store a value of type {type(value).__name__} in a checkpoint; "
                    "use dicts, lists, mx.array, numbers, strings, bools or None")


def _write_tree(out: _HashingWriter, tree: Any, where: str, arrays_allowed: bool = True) -> None:
    """Stream `tree` as msgpack: dict -> map, list/tuple -> array, mx.array -> an `__array__` map."""
    if isinstance(tree, dict):
        if ARRAY_KEY in tree:
            raise AbotError(f"{where}: the key {ARRAY_KEY!r} is reserved for arrays in checkpoints; rename it")
        out.write(out.packer.pack_map_header(len(tree)))
        for key, value in tree.items():
            if not isinstance(key, (str, int)):
                raise AbotError(f"{where}: key {key!r} is a {type(key).__name__}; checkpoint keys must be str or int")
            out.pack(key)
            _write_tree(out, value, f"{where}.{key}", arrays_allowed)
    elif isinstance(tree, (list, tuple)):
        out.write(out.packer.pack_array_header(len(tree)))
        for i, value in enumerate(tree):
            _write_tree(out, value, f"{where}[{i}]", arrays_allowed)
    elif isinstance(tree, mx.array):
        if not arrays_allowed:
            raise AbotError(f"{where}: meta holds plain values only; put arrays in a tree")
        raw = array_to_little_endian(tree)
        out.write(out.packer.pack_map_header(4))
        out.pack(ARRAY_KEY, 1, "dtype", dtype_name(tree.dtype), "shape", list(tree.shape), "data")
        out.pack_bin(memoryview(raw.reshape(-1).view(np.uint8)))  # flat bytes; also for 0-d and empty arrays
    else:
        out.pack(_plain_scalar(tree, where))


def _write_payload(out: _HashingWriter, trees: dict, step: int, meta: dict) -> None:
    out.write(out.packer.pack_map_header(5))
    out.pack("format_version", FORMAT_VERSION, "abot_version", __version__, "step", int(step), "meta")
    _write_tree(out, meta, "meta", arrays_allowed=False)
    out.pack("trees")
    _write_tree(out, trees, "trees")


def save_checkpoint(path: str | Path, trees: dict[str, Any], step: int, meta: dict | None = None) -> int:
    """Write `trees` (name -> pytree of mx.array), `step` and `meta` to `path` atomically; returns bytes written."""
    if not isinstance(trees, dict):
        raise AbotError(f"{path}: trees must be a dict of name -> tree, got {type(trees).__name__}")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise AbotError(f"{path}: meta must be a dict, got {type(meta).__name__}")

    def write_body(f: BinaryIO) -> None:
        # Header first with a zero checksum, payload streamed while hashing, then the checksum patched in.
        f.write(HEADER.pack(MAGIC, FORMAT_VERSION, bytes(32)))
        out = _HashingWriter(f)
        _write_payload(out, trees, step, meta)
        f.seek(HEADER.size - 32)
        f.write(out.sha256.digest())
        f.seek(0, os.SEEK_END)

    return _write_atomically(Path(path), write_body)


# ---------------------------------------------------------------------------------------------- reading

def _decode_map(obj: dict) -> Any:
    """msgpack object_hook: `__array__` maps become mx.array as they are read, freeing their bytes early."""
    if obj.get(ARRAY_KEY) != 1:
        return obj
    name, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if name not in _NUMPY_DTYPES or not isinstance(shape, list) or not isinstance(data, bytes):
        raise ValueError(f"malformed array entry (dtype {name!r}, shape {shape!r})")
    flat = np.frombuffer(data, dtype=np.dtype(_NUMPY_DTYPES[name]))
    values = mx.array(flat.reshape(shape))
    return mx.view(values, mx.bfloat16) if name == "bfloat16" else values


def _read_header(path: Path, head: bytes) -> int:
    """Check the magic and version of the first HEADER.size bytes; returns the format version."""
    if len(head) == 0:
        raise AbotError(f"{path}: checkpoint file is empty (its write was interrupted); use an earlier checkpoint")
    if not head.startswith(MAGIC[: len(head)]):  # a short file that starts like MAGIC is merely truncated
        raise AbotError(f"{path}: not an abot checkpoint (it does not start with {MAGIC!r}); "
                        "give a .ckpt file written by abot")
    if len(head) < HEADER.size:
        raise AbotError(f"{path}: checkpoint is corrupted or truncated ({len(head)} bytes, shorter than "
                        f"its header); use an earlier checkpoint")
    _, version, _ = HEADER.unpack(head)
    if version > FORMAT_VERSION:
        raise AbotError(f"{path}: checkpoint format version {version} is newer than this abot supports "
                        f"({FORMAT_VERSION}); upgrade abot to load it")
    if version < 1:
        raise AbotError(f"{path}: checkpoint format version {version} is not valid; the file is corrupted, "
                        "use an earlier checkpoint")
    return version


def _open_checkpoint_file(path: Path) -> BinaryIO:
    if path.is_dir():
        newest = latest_checkpoint(path)
        hint = f"its newest is {newest}" if newest else "it holds no loadable step_*.ckpt"
        raise AbotError(f"{path}: is a folder; give a checkpoint file ({hint})")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise AbotError(f"{path}: checkpoint file not found; check the path "
                        "(train.checkpoint_path, or a file in train.save_dir)") from None
    except OSError as err:
        raise AbotError(f"{path}: cannot read the checkpoint ({err.strerror}); check its permissions") from None


def _checksum_error(path: Path) -> AbotError:
    return AbotError(f"{path}: checkpoint is corrupted or truncated (SHA-256 checksum mismatch); "
                     "use an earlier checkpoint")


def verify_checkpoint(path: str | Path) -> None:
    """Check magic, version and checksum without decoding, streaming the file; raises AbotError if bad."""
    path = Path(path)
    with _open_checkpoint_file(path) as f:
        head = f.read(HEADER.size)
        _read_header(path, head)
        sha256 = hashlib.sha256()
        while chunk := f.read(_READ_CHUNK):
            sha256.update(chunk)
    if sha256.digest() != head[-32:]:
        raise _checksum_error(path)


def is_valid_checkpoint(path: str | Path) -> bool:
    """True when `path` is a complete, uncorrupted checkpoint file."""
    try:
        verify_checkpoint(path)
    except AbotError:
        return False
    return True


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint; every problem is an AbotError naming the file and what to do."""
    path = Path(path)
    with _open_checkpoint_file(path) as f:
        blob = f.read()
    version = _read_header(path, blob[: HEADER.size])
    payload = memoryview(blob)[HEADER.size:]
    if hashlib.sha256(payload).digest() != blob[HEADER.size - 32: HEADER.size]:
        raise _checksum_error(path)
    try:
        decoded = msgpack.unpackb(payload, raw=False, strict_map_key=False, object_hook=_decode_map)
    except Exception as err:  # msgpack raises several types; any of them means the same thing here
        raise AbotError(f"{path}: checkpoint payload cannot be decoded ({err}); the file is damaged or was "
                        "not written by abot, use an earlier checkpoint") from None
    if not isinstance(decoded, dict) or not {"step", "meta", "trees"} <= decoded.keys():
        raise AbotError(f"{path}: checkpoint payload lacks step/meta/trees; the file was not written by abot, "
                        "use an earlier checkpoint")
    return Checkpoint(step=decoded["step"], meta=decoded["meta"], trees=decoded["trees"],
                      abot_version=decoded.get("abot_version", ""),
                      format_version=decoded.get("format_version", version))


# ---------------------------------------------------------------------------------------------- run folders

def checkpoint_name(step: int) -> str:
    """File name of the checkpoint for `step` inside a save_dir."""
    return f"step_{step:08d}.ckpt"


def list_checkpoints(save_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step_*.ckpt` in `save_dir`, oldest step first; unverified."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = []
    for path in save_dir.iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_stray_temp_files(save_dir: str | Path) -> list[Path]:
    """Delete `*.tmp` files a killed writer left in `save_dir`; assumes one writer per save_dir."""
    removed = []
    for path in Path(save_dir).glob("*" + TMP_SUFFIX):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def save_rotating(save_dir: str | Path, trees: dict[str, Any], step: int, meta: dict | None, keep: int) -> Path:
    """Save `step_{step}.ckpt`, point `latest` at it, then delete the oldest checkpoints beyond `keep`."""
    if keep < 1:
        raise AbotError(f"keep must be at least 1 checkpoint (train.ckpt_keep), got {keep}")
    save_dir = Path(save_dir)
    remove_stray_temp_files(save_dir)
    path = save_dir / checkpoint_name(step)
    save_checkpoint(path, trees, step, meta)
    atomic_write_bytes(save_dir / LATEST_POINTER, (path.name + "\n").encode())
    # Rotation runs only once the new file and pointer are durable; the new file is never a victim, even
    # when a resume from an earlier step left higher-numbered files behind.
    others = [p for _, p in list_checkpoints(save_dir) if p != path]
    for old in others[: max(0, len(others) - (keep - 1))]:
        old.unlink(missing_ok=True)
    return path


def _pointer_target(save_dir: Path) -> Path | None:
    """The file the `latest` pointer names, if the pointer is readable and names a plain file in save_dir."""
    try:
        name = (save_dir / LATEST_POINTER).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not name or Path(name).name != name:  # a torn or hand-edited pointer must not escape save_dir
        return None
    return save_dir / name


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The newest loadable checkpoint in `save_dir`: the `latest` pointer's file if it verifies, else the
    highest-step `step_*.ckpt` that verifies (so a torn pointer or a damaged file never loses a run).

    A checkpoint written after the pointer (a run killed between writing a checkpoint and moving the pointer
    to it) wins over the pointer's file, so that kill loses no checkpoint already written.
    """
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return None
    target = _pointer_target(save_dir)
    if target is not None and target.is_file() and is_valid_checkpoint(target):
        moved = (save_dir / LATEST_POINTER).stat().st_mtime_ns
        newer = [p for _, p in list_checkpoints(save_dir) if p.stat().st_mtime_ns > moved and is_valid_checkpoint(p)]
        return max(newer, key=lambda p: p.stat().st_mtime_ns) if newer else target
    for _, path in reversed(list_checkpoints(save_dir)):
        if path != target and is_valid_checkpoint(path):
            return path
    return None
