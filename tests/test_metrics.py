"""RunLogger: JSON lines that parse, TensorBoard event files, an atomic summary."""

import json
import math
import struct

import numpy as np
import pytest

import abot  # noqa: F401
from abot.metrics import RunLogger

import mlx.core as mx


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_events_and_summary(tmp_path):
    log_dir = tmp_path / "logs"
    with RunLogger(log_dir) as logger:
        logger.log(1, {"loss": mx.array(2.5), "lr": np.float32(1e-4), "tokens": 4096})
        # Flushed at once: a reader (or a kill) sees the line before close.
        assert read_jsonl(log_dir / "metrics.jsonl")[0]["loss"] == 2.5
        logger.log(2, {"loss": float("nan"), "grad_norm": math.inf}, prefix="train")
        logger.log(2, {"loss": 3.0, "ppl": 20.1}, prefix="eval")
        logger.event("checkpoint_saved", step=2, path=tmp_path / "step_00000002.ckpt", bytes=1234)
        logger.event("skipped_step", step=2, reason="non-finite loss")
        path = logger.write_summary({"final_loss": mx.array(3.0), "steps": 2, "best": {"eval_loss": 3.0}})

    lines = read_jsonl(log_dir / "metrics.jsonl")
    assert [(r["step"], r["split"]) for r in lines] == [(1, "train"), (2, "train"), (2, "eval")]
    assert lines[0]["loss"] == 2.5 and type(lines[0]["lr"]) is float and lines[0]["tokens"] == 4096
    assert lines[1]["loss"] is None and lines[1]["grad_norm"] is None  # strict JSON: no NaN
    assert all(isinstance(r["time"], float) for r in lines)

    events = read_jsonl(log_dir / "events.jsonl")
    assert [e["event"] for e in events] == ["checkpoint_saved", "skipped_step"]
    assert events[0]["bytes"] == 1234 and events[0]["path"].endswith("step_00000002.ckpt")

    assert path == log_dir / "final_training_summary.json"
    assert json.loads(path.read_text()) == {"final_loss": 3.0, "steps": 2, "best": {"eval_loss": 3.0}}
    assert list((log_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(log_dir.glob("*.tmp"))


def read_scalars(folder):
    """(tag, step, value) from TensorBoard event files: TFRecords of u64 length, u32 crc, Event, u32 crc."""
    from tensorboardX.proto.event_pb2 import Event
    found = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        blob, pos = path.read_bytes(), 0
        while pos < len(blob):
            (length,) = struct.unpack_from("<Q", blob, pos)
            event = Event.FromString(blob[pos + 12: pos + 12 + length])
            pos += 12 + length + 4
            found += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return found


def test_tensorboard_scalars_are_tagged_by_split(tmp_path):
    with RunLogger(tmp_path) as logger:
        logger.log(5, {"loss": 1.25, "note": "text stays out of TensorBoard"}, prefix="eval")
        logger.log(6, {"loss": 0.5, "tokens": 64})
    assert read_scalars(tmp_path / "tensorboard") == [("eval/loss", 5, 1.25), ("train/loss", 6, 0.5),
                                                      ("train/tokens", 6, 64.0)]


def test_appends_across_runs_and_refuses_reserved_names(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": 1.0})
    with RunLogger(tmp_path, tensorboard=False) as logger:  # a resumed run continues the same file
        logger.event("resume", step=1)
        logger.log(2, {"loss": 0.5})
        with pytest.raises(ValueError, match=r"reserved"):
            logger.log(3, {"step": 3})
        with pytest.raises(ValueError, match=r"one-element arrays"):
            logger.log(3, {"loss": mx.zeros((2,))})
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "tensorboard").exists()
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(4, {"loss": 0.1})
    logger.close()  # twice is fine
