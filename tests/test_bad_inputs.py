"""A catalogue of malformed inputs: each is one clear `error:` line naming the file or key and the fix, exit code 2,
and no traceback.

Every case runs the real CLI (`python -m abot ...`) in a subprocess; the cases run a few at a time and all fail
before any training step, so the whole catalogue takes seconds. The workspace (a 1000-token tokenizer, a
checkpoint of the tiny model written the way `abot train` writes them, small data files) is built once.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import abot  # noqa: F401  (before mlx.core)

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
MODEL = ["model.vocab_size=1000", "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "data.seq_len=64",
         "train.micro_batch_size=4", "train.total_steps=3", "train.eval_steps=1", "train.compile=false"]


@dataclass
class Case:
    id: str
    args: list  # after `python -m abot`; "{ws}" is replaced by the workspace folder
    expect: list  # substrings of the error, whitespace-normalised: what is wrong, where, and the fix
    slow: bool = False  # opens a dataset (imports `datasets`, 3-8 s a case): marked slow


def train(*extra, tok="{ws}/tok.model", save="{ws}/runs/{id}"):
    return ["train", TINY, *MODEL, f"train.tokenizer_path={tok}", f"train.save_dir={save}", *extra]


JSON = ["data.source=huggingface", "data.dataset=json", "data.eval_fraction=0.2"]

CASES = [
    # --- config files and overrides (fail while loading the config)
    Case("config_missing", ["train", "{ws}/nope.yaml"], ["nope.yaml: config file not found"]),
    Case("config_is_a_folder", ["train", "{ws}"], ["is a folder; give the path of a YAML config file"]),
    Case("config_is_a_list", ["train", "{ws}/list.yaml"],
         ["list.yaml: the top level must be a mapping with sections model, data, train"]),
    Case("config_invalid_yaml", ["train", "{ws}/broken.yaml"], ["broken.yaml: invalid YAML (line 3"]),
    Case("config_binary", ["train", "{ws}/binary.yaml"], ["binary.yaml: not a text file; give a YAML config"]),
    Case("config_unknown_section", ["train", "{ws}/section.yaml"],
         ["section.yaml: unknown section 'optimiser'", "valid keys: model, data, train"]),
    Case("config_section_not_a_mapping", ["train", "{ws}/scalar_section.yaml"],
         ["scalar_section.yaml: model: expected a mapping of keys, got 5"]),
    Case("config_unknown_key", train("train.totl_steps=5"),
         ["train.totl_steps: unknown key; did you mean 'total_steps'?"]),
    Case("config_wrong_type", train("train.total_steps=many"), ["train.total_steps: expected an integer, got 'many'"]),
    Case("override_without_equals", train("train.total_steps"),
         ["override 'train.total_steps': expected section.key=value, e.g. train.total_steps=20"]),
    Case("override_misspelt_section", train("trian.lr=1"), ["override 'trian.lr'", "did you mean 'train'?"]),
    Case("override_without_section", train("lr=1"), ["override 'lr' must look like section.key=value"]),
    Case("heads_do_not_divide_d_model", train("model.d_model=66"),
         ["model.d_model (66) must be divisible by model.n_heads (4)"]),
    Case("seq_len_over_max_seq_len", train("data.seq_len=1024"),
         ["data.seq_len (1024) must be <= model.max_seq_len (512)"]),
    Case("unknown_precision", train("train.precision=fp8"),
         ["train.precision 'fp8' is not one of float32, bfloat16, float16"]),
    Case("several_problems_at_once", train("train.lr=-1", "model.dropout=1.5"),
         ["problems:", "model.dropout must be in [0, 1), got 1.5", "train.lr must be >= 0, got -1"]),
    Case("unknown_optimizer", train("train.optimizer=adamww"),
         ["unknown optimizer 'adamww' (train.optimizer); did you mean 'adamw'?", "Available:"]),
    Case("unknown_schedule", train("train.schedule=cosin"),
         ["unknown schedule 'cosin' (train.schedule); did you mean 'cosine'?"]),
    Case("unknown_dataset_source", train("data.source=stdlib"),
         ["unknown dataset 'stdlib' (data.source); did you mean 'stdlib_docs'?"]),
    Case("unknown_model", train("model.name=gpt2"), ["unknown model 'gpt2' (model.name)", "Available: "]),
    Case("unknown_optimizer_option", train("train.optimizer_args={betas: [0.9, 0.95]}"),
         ["train.optimizer_args: unknown option 'betas' for muon_adamw", "It accepts:"]),
    Case("optimizer_switched_from_the_configs", train("train.optimizer=adamw"),  # tiny.yaml sets Muon's options
         ["train.optimizer_args: unknown option 'adamw_lr_scale' for adamw", "train.optimizer_args={} on the command"]),
    Case("bad_optimizer_option_value", train("train.momentum=1.5"),
         ["momentum must be in (0, 1) (usually 0.95), got 1.5"]),
    Case("unknown_schedule_option", train("train.schedule_args={decay: 3}"),
         ["train.schedule_args: unknown option 'decay' for wsd",
          "It accepts: lr, min_lr, warmup_steps, total_steps, decay_fraction"]),
    Case("optimizer_args_not_a_mapping", train("train.optimizer_args=5"),
         ["train.optimizer_args: expected a mapping, got 5"]),
    # --- tokenizer files
    Case("tokenizer_vocab_differs", train("model.vocab_size=1200"),
         ["tok.model: the tokenizer has 1000 tokens but model.vocab_size is 1200; set model.vocab_size: 1000"]),
    Case("tokenizer_empty", train(tok="{ws}/empty.model"), ["empty.model: the file is empty", "abot tokenizer train"]),
    Case("tokenizer_not_sentencepiece", train(tok="{ws}/list.yaml"),
         ["list.yaml: not a SentencePiece model file", "abot tokenizer train"]),
    Case("tokenizer_is_a_folder", train(tok="{ws}/runs"),
         ["runs: is a folder, not a SentencePiece model file; point train.tokenizer_path at a .model file"]),
    Case("tokenizer_folder_is_a_file", ["tokenizer", "train", TINY, "train.tokenizer_path={ws}/afile/tok.model"],
         ["train.tokenizer_path", "afile/tok.model", "afile is a file"], slow=True),
    Case("tokenizer_exists_without_force", ["tokenizer", "train", TINY, "train.tokenizer_path={ws}/tok.model"],
         ["tok.model already exists; pass --force to replace it"]),
    # --- data
    Case("data_files_match_nothing", train(*JSON, "data.data_files={ws}/nowhere/*.jsonl"),
         ["data.data_files: '{ws}/nowhere/*.jsonl' matches no files", "fix the path or glob"], slow=True),
    Case("data_loader_without_files", train(*JSON), ["data.dataset: 'json' reads local files; set data.data_files"],
         slow=True),
    Case("data_text_field_missing", train(*JSON, "data.data_files={ws}/good.jsonl", "data.text_field=body"),
         ["data.text_field: 'body' is not a field of 'json'; its fields are: text"], slow=True),
    Case("data_text_field_not_text", train(*JSON, "data.data_files={ws}/numbers.jsonl"),
         ["data.text_field: 'text' of 'json' holds int values, not text"], slow=True),
    Case("data_local_path_missing", train("data.source=huggingface", "data.dataset=./corpus/missing"),
         ["data.dataset: './corpus/missing' not found (a local path)"], slow=True),
    Case("data_file_empty", train(*JSON, "data.data_files={ws}/empty.jsonl"),
         ["data.dataset 'json': the files of data.data_files", "empty.jsonl) are empty"], slow=True),
    Case("data_file_not_json", train(*JSON, "data.data_files={ws}/list.yaml"),
         ["data.dataset 'json': cannot read the data", "JSON parse error",
          "check that the files of data.data_files", "list.yaml) are well-formed"], slow=True),
    Case("data_too_small_for_a_batch", train(*JSON, "data.data_files={ws}/short.jsonl", "data.eval_fraction=0.5"),
         ["cannot fill", "lower data.seq_len"], slow=True),
    Case("data_no_held_out_documents", train(*JSON, "data.data_files={ws}/good.jsonl", "data.eval_fraction=0"),
         ["data.eval_fraction is 0 and data.eval_split is null", "set data.eval_fraction"], slow=True),
    Case("data_hub_offline", train("data.source=huggingface", "data.dataset=allenai/c4"),
         ["data.dataset 'allenai/c4'", "data.data_files"], slow=True),
    # --- checkpoints and run folders
    Case("checkpoint_missing", train("train.checkpoint_path={ws}/nope.ckpt"),
         ["nope.ckpt: checkpoint file not found; check the path"]),
    Case("checkpoint_folder_without_checkpoints", train("train.checkpoint_path={ws}/runs"),
         ["train.checkpoint_path: {ws}/runs is a folder with no loadable checkpoint"]),
    Case("checkpoint_empty", train("train.checkpoint_path={ws}/empty.ckpt"),
         ["empty.ckpt: checkpoint file is empty", "use an earlier checkpoint"]),
    Case("checkpoint_truncated", train("train.checkpoint_path={ws}/truncated.ckpt"),
         ["truncated.ckpt: checkpoint is corrupted or truncated", "use an earlier checkpoint"]),
    Case("checkpoint_wrong_magic", train("train.checkpoint_path={ws}/tok.model"),
         ["tok.model: not an abot checkpoint", "give a .ckpt file written by abot"]),
    Case("checkpoint_future_version", train("train.checkpoint_path={ws}/future.ckpt"),
         ["future.ckpt: checkpoint format version 2 is newer than this abot supports (1); upgrade abot"]),
    Case("checkpoint_of_another_model", train("model.d_model=32", "train.checkpoint_path={ws}/ckpt/step_00000005.ckpt"),
         ["step_00000005.ckpt: cannot resume", "model.d_model: checkpoint 64, config 32", "start a new run in another save_dir"]),
    Case("checkpoint_of_another_optimizer",
         train("train.optimizer=adamw", "train.optimizer_args={}",
               "train.checkpoint_path={ws}/ckpt/step_00000005.ckpt"),
         ["step_00000005.ckpt: cannot resume", "train.optimizer: muon_adamw -> adamw",
          "start a new run in another save_dir"]),
    Case("checkpoint_of_another_tokenizer", train("train.checkpoint_path={ws}/other_tok.ckpt"),
         ["other_tok.ckpt: the checkpoint was trained with a different tokenizer", "train.tokenizer_path"]),
    Case("checkpoint_without_training_state", train("train.checkpoint_path={ws}/weights.ckpt"),
         ["weights.ckpt: not a training checkpoint", "train.checkpoint_path"]),
    Case("resume_with_only_a_damaged_checkpoint", [*train(save="{ws}/damaged_run"), "--resume"],
         ["damaged_run", "no checkpoint there can be loaded", "step_00000007.ckpt: checkpoint is corrupted",
          "train.checkpoint_path"]),
    Case("save_dir_inside_a_file", train(save="{ws}/afile/run"),
         ["train.save_dir", "afile/run", "writable folder"]),
    Case("log_path_inside_a_file", train("train.log_path={ws}/afile/logs"),
         ["train.log_path", "afile/logs", "writable folder"]),
]


def normalised(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("bad")
    out = subprocess.run([sys.executable, "-m", "abot", "tokenizer", "train", TINY, "model.vocab_size=1000",
                          f"train.tokenizer_path={ws}/tok.model"], capture_output=True, text=True, cwd=ws)
    assert out.returncode == 0, out.stdout + out.stderr
    (ws / "runs").mkdir()
    (ws / "afile").write_text("a file, not a folder\n")
    (ws / "list.yaml").write_text("- model\n- data\n")
    (ws / "broken.yaml").write_text("model:\n  d_model: [64\n")
    (ws / "binary.yaml").write_bytes(bytes(range(128, 256)))
    (ws / "section.yaml").write_text("optimiser:\n  lr: 1\n")
    (ws / "scalar_section.yaml").write_text("model: 5\n")
    (ws / "empty.model").write_bytes(b"")
    (ws / "empty.jsonl").write_text("")
    (ws / "empty.ckpt").write_bytes(b"")
    (ws / "numbers.jsonl").write_text("".join(json.dumps({"text": i}) + "\n" for i in range(20)))
    (ws / "short.jsonl").write_text("".join(json.dumps({"text": f"line {i}."}) + "\n" for i in range(4)))
    from abot.data.corpus import stdlib_docs_files
    with open(stdlib_docs_files()["train"]) as f:
        (ws / "good.jsonl").write_text("".join(next(f) for _ in range(40)))
    write_checkpoints(ws)
    return ws


def write_checkpoints(ws: Path) -> None:
    """A checkpoint of the tiny model as `abot train` writes one, and damaged or foreign variants of it."""
    from abot.build import build_model, build_optimizer
    from abot.checkpoint import MAGIC, save_checkpoint, save_rotating
    from abot.config import load_config
    from abot.step import init_state
    from abot.tokenizer import load_tokenizer

    import mlx.core as mx

    cfg = load_config(TINY, [*MODEL, f"train.tokenizer_path={ws}/tok.model"])
    state = init_state(build_model(cfg).init(mx.random.key(0)), build_optimizer(cfg), mx.random.key(1))
    meta = {"config": cfg.to_dict(), "tokenizer_sha256": load_tokenizer(ws / "tok.model").sha256,
            "data_state": {"epoch": 0, "batches": 5}, "n_params": 0}
    good = save_rotating(ws / "ckpt", {"state": state}, 5, meta, keep=1)
    blob = good.read_bytes()
    (ws / "truncated.ckpt").write_bytes(blob[: len(blob) // 2])
    (ws / "future.ckpt").write_bytes(MAGIC + struct.pack("<I", 2) + blob[12:])
    save_checkpoint(ws / "other_tok.ckpt", {"state": state}, 5, {**meta, "tokenizer_sha256": "0" * 64})
    save_checkpoint(ws / "weights.ckpt", {"params": state["params"]}, 5, {"config": cfg.to_dict()})
    damaged = save_rotating(ws / "damaged_run", {"state": state}, 7, meta, keep=1)
    damaged.write_bytes(blob[:-100])


def run_case(case: Case, ws: Path) -> tuple[int, str]:
    args = [a.replace("{ws}", str(ws)).replace("{id}", case.id) for a in case.args]
    env = {**os.environ, "COLUMNS": "400", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "abot", *args], capture_output=True, text=True, cwd=ws, env=env,
                         timeout=300)
    return out.returncode, out.stdout + out.stderr


@pytest.fixture(scope="module")
def results(workspace):
    """case -> (exit code, output); the first case asked for runs its whole group (fast or slow), 4 at a time."""
    done: dict = {}

    def result(case: Case) -> tuple[int, str]:
        if case.id not in done:
            group = [c for c in CASES if c.slow == case.slow]
            with ThreadPoolExecutor(max_workers=4) as pool:
                done.update(zip([c.id for c in group], pool.map(lambda c: run_case(c, workspace), group)))
        return done[case.id]

    return result


def test_the_catalogue_is_large_and_distinct():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else [])
                                  for c in CASES])
def test_bad_input_is_one_clear_error(case, results, workspace):
    code, output = results(case)
    assert "Traceback" not in output, output
    assert code == 2, f"exit code {code}:\n{output}"
    text = normalised(output)
    assert "error:" in text, output
    for want in case.expect:
        want = normalised(want.replace("{ws}", str(workspace)))
        assert want in text, f"missing {want!r} in:\n{output}"
    assert not list((workspace / "runs").glob(f"{case.id}/step_*.ckpt")), "a failed run wrote a checkpoint"
