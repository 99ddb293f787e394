"""Keys the user gives that the chosen components never read are named in a warning (abot.unread)."""

import abot  # noqa: F401  (first: it sets up BLAS before anything imports mlx.core)

import dataclasses
import json
from pathlib import Path

import pytest

from abot import registry, verify
from abot.config import DataConfig, config_from_dict, load_config
from abot.data.shards import shards
from abot.data.sources import huggingface, stdlib_docs
from abot.errors import AbotError
from abot.evaluate import eval_config
from abot.finetune.sources import chat, oasst1, preferences
from abot.restore import Opened
from abot.registry import Entry
from abot.unread import PIPELINE_READS, unread_keys

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TINY = CONFIGS / "tiny.yaml"


def keys(cfg) -> list[str]:
    return [u.key for u in unread_keys(cfg)]


# ------------------------------------------------------------------------------------------ Config.given

def test_given_holds_the_keys_written_in_the_file_and_the_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  source: stdlib_docs\ntrain:\n  lr: 1e-3\n")
    cfg = load_config(path, ["data.dataset=allenai/c4", "train.optimizer_args.b1=0.8"])
    assert cfg.given == {"data.source", "train.lr", "data.dataset", "train.optimizer_args"}
    assert "given" not in cfg.to_dict() and set(cfg.to_dict()) == {"model", "data", "train"}
    same = load_config(path, ["data.dataset=allenai/c4"])  # the default value, given
    assert same == load_config(path) and same.given != load_config(path).given  # only settings compare


def test_a_checkpoints_stored_config_gives_only_its_overrides():
    stored = load_config(TINY, ["data.dataset=allenai/c4", "train.momentum=0.9"]).to_dict()  # every key
    opened = Opened(Path("run/step_00000001.ckpt"), type("Checkpoint", (), {"meta": {"config": stored}})())
    cfg = opened.config()  # as generate, chat, export and resume read it
    assert cfg.given == frozenset() and unread_keys(cfg) == []
    assert eval_config(stored, "ckpt").given == frozenset()
    again = opened.config(lambda raw, where: config_from_dict(raw, where, ["data.text_field=content"], stored=True))
    assert keys(again) == ["data.text_field"]  # what the user gives now is still judged


# ------------------------------------------------------------------------------------------ data sources

def test_the_issue_example_names_the_key_its_source_and_the_fix():
    [found] = unread_keys(load_config(TINY, ["data.dataset=allenai/c4"]))  # allenai/c4 is the default value
    assert found.key == "data.dataset"
    assert found.detail.startswith("data.dataset: set to 'allenai/c4', but data.source 'stdlib_docs' does not "
                                   "read it (it reads docstrings of Python's standard library")
    assert "data.source" in found.fix and "huggingface" in found.fix and "data.dataset" in found.fix
    assert str(found) == f"{found.detail}; {found.fix}"


def test_a_key_the_source_reads_is_quiet():
    assert unread_keys(load_config(TINY, ["data.source=huggingface", "data.dataset=allenai/c4"])) == []
    assert unread_keys(load_config(TINY)) == []  # the pipeline's keys (seq_len, shuffle_buffer, ...) are read


def test_text_field_is_unread_by_conversation_and_token_sources():
    assert keys(load_config(CONFIGS / "sft.yaml", ["data.text_field=content"])) == ["data.text_field"]
    assert keys(load_config(TINY, ["data.source=shards", "data.dataset=out", "data.split=en"])) == ["data.split"]


def test_overlong_is_unread_by_pretraining_only():
    [found] = unread_keys(load_config(TINY, ["data.overlong=drop"]))
    assert found.key == "data.overlong" and "abot train" in found.detail and "sft" in found.fix
    assert unread_keys(load_config(CONFIGS / "sft.yaml", ["data.overlong=drop"])) == []


def test_a_source_that_declares_nothing_is_not_judged(monkeypatch):
    def mine(data, split, seed):
        """A plugin source that does not say what it reads."""
    monkeypatch.setitem(registry.datasets._extra, "mine", Entry("mine", mine, "test", ""))
    assert unread_keys(load_config(TINY, ["data.source=mine", "data.text_field=body"])) == []


# -------------------------------------------------------------------------------- optimizer and schedule

def test_momentum_warns_for_an_optimizer_without_it():
    [found] = unread_keys(load_config(TINY, ["train.optimizer=adamw", "train.momentum=0.9"]))
    assert found.key == "train.momentum" and "'adamw'" in found.detail and "muon_adamw" in found.fix
    assert unread_keys(load_config(TINY, ["train.optimizer=muon_adamw", "train.momentum=0.9"])) == []
    assert unread_keys(load_config(TINY, ["train.optimizer=adamw", "train.momentum=null"])) == []  # the default


def test_schedule_keys_warn_for_a_schedule_without_them(monkeypatch):
    def flat(lr, total_steps):
        """A constant learning rate that takes no warmup and no floor."""
        return lambda step: lr
    monkeypatch.setitem(registry.schedules._extra, "flat", Entry("flat", flat, "test", ""))
    found = keys(load_config(TINY, ["train.schedule=flat"]))  # tiny.yaml writes both
    assert found == ["train.warmup_steps", "train.min_lr"]
    assert keys(load_config(TINY, ["train.schedule=constant"])) == []


# -------------------------------------------------------------------------------------- where they show

def test_verify_and_preflight_show_them_as_warnings(tmp_path):
    checks = verify.run_checks(TINY, ["data.dataset=allenai/c4"], data=False)
    [unread] = [c for c in checks if c.name == "unread key"]
    assert unread.status == verify.WARN and "data.dataset" in unread.detail and unread.fix
    said = []
    verify.preflight(load_config(TINY, ["data.dataset=allenai/c4", f"train.save_dir={tmp_path}"]), said.append)
    assert any(line.startswith("warning: unread key: warn: data.dataset") for line in said)


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_shipped_config_warns(path):
    assert unread_keys(load_config(path)) == []


# ------------------------------------------------------------------ each source's `reads` is what it reads

def reads_while_running(source, data: DataConfig, split: str = "train", **options) -> set[str]:
    """The DataConfig fields `source` reads while built and while giving its first example (or failing)."""
    seen: set[str] = set()
    names = {f.name for f in dataclasses.fields(DataConfig)}

    class Spy(DataConfig):
        def __getattribute__(self, name):
            if name in names:
                seen.add(name)
            return object.__getattribute__(self, name)

    spy = Spy(**{n: getattr(data, n) for n in names})
    try:
        next(iter(source(spy, split, 0, **options)(0)), None)
    except AbotError:
        pass
    return seen


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


OASST = [{"message_id": "q", "parent_id": None, "role": "prompter", "text": "Q", "lang": "en", "rank": None},
         {"message_id": "a", "parent_id": "q", "role": "assistant", "text": "A", "lang": "en", "rank": 0}]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_each_source_reads_only_what_it_declares(tmp_path, split):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"document {i}"} for i in range(50)])
    local = dict(dataset="json", data_files=text, eval_fraction=0.5)
    cases = [
        (stdlib_docs, DataConfig(source="stdlib_docs"), {}),
        (huggingface, DataConfig(**local), {}),
        (chat, DataConfig(dataset=str(CONFIGS / "data/ultrachat_mini"), split="train_sft", eval_split="test_sft"), {}),
        (preferences, DataConfig(dataset=str(CONFIGS / "data/ultrafeedback_mini"), split="train_prefs",
                                 eval_fraction=0.5), {}),
        (oasst1, DataConfig(dataset="json", data_files=write_jsonl(tmp_path / "oasst.jsonl", OASST * 20),
                            eval_fraction=0.5), {}),
        (shards, DataConfig(source="shards", dataset=str(tmp_path / "no-shards")), {}),
    ]
    for source, data, options in cases:
        read = reads_while_running(source, data, split, **options)
        assert read <= set(source.reads) | PIPELINE_READS, (source.__name__, read - set(source.reads))
    assert reads_while_running(huggingface, DataConfig(**local), split) == set(huggingface.reads)
