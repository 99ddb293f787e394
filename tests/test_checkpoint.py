"""Checkpoint files: bit-exact round trips, clear errors for bad files, rotation and crash safety."""

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

import abot
from abot.checkpoint import (
    FORMAT_VERSION, HEADER, MAGIC, checkpoint_name, latest_checkpoint, list_checkpoints, load_checkpoint,
    save_checkpoint, save_rotating, verify_checkpoint,
)
from abot.errors import AbotError

import mlx.core as mx


def sample_trees():
    bf16_bits = np.array([0x3FC0, 0xC010, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x8000], dtype=np.uint16)
    return {
        "params": {
            "embed": mx.arange(12, dtype=mx.float32).reshape(3, 4) / 7,
            "layers": [
                {"w": mx.view(mx.array(bf16_bits), mx.bfloat16), "scale": mx.array(0.5, dtype=mx.float16)},
                {"w": mx.array([[1.5, -2.0]], dtype=mx.float16), "count": mx.array(-3, dtype=mx.int32)},
            ],
            "empty": mx.zeros((0, 3), dtype=mx.float32),
        },
        "opt_state": {"step": mx.array(7, dtype=mx.uint32), "ids": mx.array([0, 2**32 - 1], dtype=mx.uint32),
                      "pair": (mx.array([1, -2], dtype=mx.int32), None), "lr": 3e-4, "name": "adamw",
                      "flag": True},
    }


def assert_same_tree(got, want):
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for key in want:
            assert_same_tree(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_same_tree(g, w)
    elif isinstance(want, mx.array):
        assert isinstance(got, mx.array)
        assert got.dtype == want.dtype and got.shape == want.shape
        if want.dtype == mx.bfloat16:  # compare bits: NaN payloads and signed zeros must survive
            got, want = mx.view(got, mx.uint16), mx.view(want, mx.uint16)
        assert np.array(got).tobytes() == np.array(want).tobytes()
    else:
        assert got == want and type(got) is type(want)


def write_sample(path, step=3):
    meta = {"config": {"train": {"lr": 3e-4, "total_steps": 20}}, "tokenizer_sha256": "ab" * 32,
            "data_state": {"shard": 2, "offset": 12345, "rng": [1, 2, 3]}, "note": None}
    save_checkpoint(path, sample_trees(), step=step, meta=meta)
    return meta


def test_round_trip_is_bit_exact(tmp_path):
    path = tmp_path / "a.ckpt"
    meta = write_sample(path, step=42)
    ckpt = load_checkpoint(path)
    assert ckpt.step == 42 and ckpt.meta == meta
    assert ckpt.abot_version == abot.__version__ and ckpt.format_version == FORMAT_VERSION
    assert_same_tree(ckpt.trees, sample_trees())


def test_file_layout_matches_the_documented_format(tmp_path):
    import hashlib
    path = tmp_path / "a.ckpt"
    n = save_checkpoint(path, {"p": {"w": mx.array([1.0, 2.0])}}, step=5, meta={"k": "v"})
    blob = path.read_bytes()
    assert n == len(blob)
    magic, version, digest = struct.unpack("<8sI32s", blob[:44])
    assert (magic, version) == (b"ABOTCKPT", 1) and digest == hashlib.sha256(blob[44:]).digest()
    payload = msgpack.unpackb(blob[44:])  # a reader without abot sees plain msgpack
    assert payload["step"] == 5 and payload["meta"] == {"k": "v"}
    w = payload["trees"]["p"]["w"]
    assert w["__array__"] == 1 and w["dtype"] == "float32" and w["shape"] == [2]
    assert np.frombuffer(w["data"], "<f4").tolist() == [1.0, 2.0]


def test_unsupported_values_are_refused_naming_the_place(tmp_path):
    with pytest.raises(AbotError, match=r"trees\.p\.w: cannot store a value of type object"):
        save_checkpoint(tmp_path / "a.ckpt", {"p": {"w": object()}}, step=1, meta={})
    with pytest.raises(AbotError, match=r"meta\.x: meta holds plain values only"):
        save_checkpoint(tmp_path / "a.ckpt", {}, step=1, meta={"x": mx.array(1)})
    with pytest.raises(AbotError, match=r"meta\.a: the key '__array__' is reserved"):
        save_checkpoint(tmp_path / "a.ckpt", {}, step=1, meta={"a": {"__array__": 1}})
    assert list(tmp_path.iterdir()) == []  # the failed writes left no temp file


def test_unwritable_target(tmp_path):
    (tmp_path / "taken.ckpt").mkdir()
    with pytest.raises(AbotError, match=r"taken\.ckpt: cannot write .*check that the folder is writable"):
        save_checkpoint(tmp_path / "taken.ckpt", {}, step=1, meta={})
    (tmp_path / "a_file").write_text("")
    with pytest.raises(AbotError, match=r"cannot create a file in .*a_file"):
        save_rotating(tmp_path / "a_file" / "run", {}, 1, {}, keep=1)
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------- bad files

@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.ckpt"
    write_sample(path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(AbotError, match=r"nope\.ckpt: checkpoint file not found; check the path"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_folder(tmp_path):
    with pytest.raises(AbotError, match=r"is a folder; give a checkpoint file"):
        load_checkpoint(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    with pytest.raises(AbotError, match=r"empty\.ckpt: checkpoint file is empty.*use an earlier checkpoint"):
        load_checkpoint(path)


def test_wrong_magic(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + bytes(64))
    with pytest.raises(AbotError, match=r"model\.safetensors: not an abot checkpoint"):
        load_checkpoint(path)


def test_future_format_version(tmp_path, good_file):
    blob = bytearray(good_file.read_bytes())
    blob[8:12] = struct.pack("<I", FORMAT_VERSION + 1)
    good_file.write_bytes(bytes(blob))
    with pytest.raises(AbotError, match=r"format version 2 is newer than this abot supports \(1\); upgrade abot"):
        load_checkpoint(good_file)


@pytest.mark.parametrize("keep_bytes", [5, HEADER.size - 1, HEADER.size, HEADER.size + 10, -1])
def test_truncated_file(good_file, keep_bytes):
    blob = good_file.read_bytes()
    good_file.write_bytes(blob[:keep_bytes])
    with pytest.raises(AbotError, match=r"good\.ckpt: checkpoint is corrupted or truncated.*use an earlier checkpoint"):
        load_checkpoint(good_file)


def test_flipped_byte(good_file):
    blob = bytearray(good_file.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    good_file.write_bytes(bytes(blob))
    with pytest.raises(AbotError, match=r"corrupted or truncated \(SHA-256 checksum mismatch\)"):
        load_checkpoint(good_file)
    with pytest.raises(AbotError, match=r"checksum mismatch"):
        verify_checkpoint(good_file)


def forge(path, payload: bytes):
    """A file with a valid header and checksum around an arbitrary payload."""
    import hashlib
    path.write_bytes(MAGIC + struct.pack("<I", 1) + hashlib.sha256(payload).digest() + payload)


def test_undecodable_payload(tmp_path):
    path = tmp_path / "odd.ckpt"
    forge(path, b"\xc1\xc1\xc1")  # 0xc1 is never used in msgpack
    with pytest.raises(AbotError, match=r"odd\.ckpt: checkpoint payload cannot be decoded.*use an earlier"):
        load_checkpoint(path)
    forge(path, msgpack.packb({"trees": {"w": {"__array__": 1, "dtype": "float99", "shape": [1], "data": b""}},
                               "step": 1, "meta": {}}))
    with pytest.raises(AbotError, match=r"cannot be decoded \(malformed array entry"):
        load_checkpoint(path)
    forge(path, msgpack.packb([1, 2, 3]))
    with pytest.raises(AbotError, match=r"lacks step/meta/trees"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------------------------- run folders

def tiny_tree(step):
    return {"params": {"w": mx.full((4,), float(step))}}


def test_rotation_keeps_the_newest_and_points_latest_at_it(tmp_path):
    for step in [10, 20, 30, 40, 50]:
        path = save_rotating(tmp_path, tiny_tree(step), step, {"s": step}, keep=3)
        assert path == tmp_path / checkpoint_name(step)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40, 50]
    assert (tmp_path / "latest").read_text().strip() == "step_00000050.ckpt"
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000050.ckpt"
    assert load_checkpoint(latest_checkpoint(tmp_path)).meta == {"s": 50}
    with pytest.raises(AbotError, match=r"keep must be at least 1 checkpoint \(train\.ckpt_keep\)"):
        save_rotating(tmp_path, tiny_tree(60), 60, {}, keep=0)


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in [100, 200]:
        save_rotating(tmp_path, tiny_tree(step), step, {}, keep=2)
    save_rotating(tmp_path, tiny_tree(50), 50, {}, keep=2)  # resumed from an earlier step
    assert [s for s, _ in list_checkpoints(tmp_path)] == [50, 200]
    assert latest_checkpoint(tmp_path).name == "step_00000050.ckpt"


def test_stray_temp_files_are_removed_on_the_next_save(tmp_path):
    save_rotating(tmp_path, tiny_tree(1), 1, {}, keep=2)
    stray = tmp_path / "step_00000002.ckpt.k3j4.tmp"
    stray.write_bytes(MAGIC + b"partial")
    assert latest_checkpoint(tmp_path).name == "step_00000001.ckpt"
    save_rotating(tmp_path, tiny_tree(3), 3, {}, keep=2)
    assert not stray.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001.ckpt", "step_00000003.ckpt"]


def test_latest_falls_back_when_the_pointer_is_missing_or_bad(tmp_path):
    assert latest_checkpoint(tmp_path / "never-made") is None
    assert latest_checkpoint(tmp_path) is None
    for step in [1, 2, 3]:
        save_rotating(tmp_path, tiny_tree(step), step, {}, keep=5)
    newest, middle = tmp_path / checkpoint_name(3), tmp_path / checkpoint_name(2)
    pointer = tmp_path / "latest"

    pointer.unlink()
    assert latest_checkpoint(tmp_path) == newest
    pointer.write_text("")  # torn pointer
    assert latest_checkpoint(tmp_path) == newest
    pointer.write_text("../../etc/passwd\n")  # a pointer may only name a file in save_dir
    assert latest_checkpoint(tmp_path) == newest

    pointer.write_text(newest.name)
    newest.write_bytes(newest.read_bytes()[:-7])  # the newest is corrupt: fall back to the one before
    assert latest_checkpoint(tmp_path) == middle
    newest.unlink()  # the pointer names a deleted file
    assert latest_checkpoint(tmp_path) == middle
    (tmp_path / checkpoint_name(1)).write_bytes(b"")
    middle.write_bytes(b"junk")
    assert latest_checkpoint(tmp_path) is None


def test_a_checkpoint_written_after_the_pointer_wins(tmp_path):
    """Killed after writing step 3 but before moving `latest` to it: resume from step 3, not step 2. A stale
    higher-numbered file from before the pointer (an abandoned branch of the run) does not win."""
    save_rotating(tmp_path, tiny_tree(9), 9, {}, keep=5)
    time.sleep(0.01)
    for step in [1, 2]:
        save_rotating(tmp_path, tiny_tree(step), step, {}, keep=5)
    assert latest_checkpoint(tmp_path).name == checkpoint_name(2)  # the pointer, not the older step 9
    time.sleep(0.01)
    save_checkpoint(tmp_path / checkpoint_name(3), tiny_tree(3), 3, {})  # no pointer update: the kill
    assert latest_checkpoint(tmp_path).name == checkpoint_name(3)


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    save_rotating(tmp_path, tiny_tree(1), 1, {"step": 1}, keep=3)
    # The child writes a ~128 MB tree, lazily computed so the write itself takes a while; it is killed
    # as soon as its temp file appears.
    child = textwrap.dedent(f"""
        import abot
        import mlx.core as mx
        from abot.checkpoint import save_rotating
        tree = {{"params": [mx.zeros((1 << 20,)) + i for i in range(32)]}}
        save_rotating({str(tmp_path)!r}, tree, 2, {{}}, keep=3)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    try:
        while not any(p.suffix == ".tmp" and p.stat().st_size > 0 for p in tmp_path.glob("*.tmp")):
            assert proc.poll() is None, f"child exited before it was killed: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "child never started writing"
            time.sleep(0.001)
    except FileNotFoundError:  # the temp file vanished between glob and stat: the child finished
        pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()

    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / checkpoint_name(2)).exists()
    assert list(tmp_path.glob("*.tmp")), "the killed writer should have left its temp file"
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(1)
    assert load_checkpoint(latest_checkpoint(tmp_path)).meta == {"step": 1}
    save_rotating(tmp_path, tiny_tree(3), 3, {}, keep=3)  # the next save sweeps up the debris
    assert not list(tmp_path.glob("*.tmp"))
    assert latest_checkpoint(tmp_path).name == "step_00000003.ckpt"
