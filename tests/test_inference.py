"""Generation, sampling, chat, eval and Hugging Face export on a small random-init checkpoint."""

import abot  # noqa: F401  (first: BLAS before mlx.core)

import itertools
import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map_with_path
from typer.testing import CliRunner

from abot.build import build_model
from abot.chat_template import render
from abot.checkpoint import save_checkpoint
from abot.cli import app
from abot.config import config_from_dict
from abot.data.corpus import stdlib_documents
from abot.errors import AbotError
from abot.generate import (
    TextStream, fit_history, generate_tokens, load_for_inference, sample, stream_text, top_k_filter, top_p_filter,
)
from abot.tokenizer import load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 512


def make_checkpoint(path, tok, data_files, scale=8.0, **model):
    """Random init with the block matrices scaled up, so greedy decoding wanders instead of repeating a token."""
    cfg = config_from_dict({
        "model": {"vocab_size": VOCAB, "n_layers": 2, "d_model": 64, "n_heads": 4, "max_seq_len": 128,
                  "dropout": 0.1, **model},
        "data": {"dataset": "json", "data_files": str(data_files), "seq_len": 32, "eval_fraction": 0.3},
        "train": {"tokenizer_path": str(tok.path), "micro_batch_size": 2, "eval_steps": 3, "compile": False}})
    params = build_model(cfg).init(mx.random.key(0))
    params = tree_map_with_path(lambda p, v: v * scale if p.startswith("blocks") and v.ndim == 2 else v, params)
    save_checkpoint(path, {"state": {"params": params}}, 7, {"config": cfg.to_dict(), "tokenizer_sha256": tok.sha256})
    return SimpleNamespace(path=path, cfg=cfg, params=params)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    docs = [text for _, text in itertools.islice(stdlib_documents(), 40)]
    tok = load_tokenizer(train_tokenizer(docs, VOCAB, root / "tok.model"))
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ckpt = make_checkpoint(root / "model.ckpt", tok, root / "docs.jsonl")
    return SimpleNamespace(root=root, tok=tok, ckpt=ckpt.path, cfg=ckpt.cfg, params=ckpt.params,
                           loaded=load_for_inference(ckpt.path))


# --- sampling ---------------------------------------------------------------------------------------------

PROBS = [0.1, 0.4, 0.05, 0.3, 0.15]  # sorted: 1 (0.4), 3 (0.3), 4 (0.15), 0 (0.1), 2 (0.05)


def kept(logits):
    return set(np.flatnonzero(np.isfinite(np.asarray(logits).reshape(-1))).tolist())


@pytest.mark.parametrize("k, expected", [(1, {1}), (2, {1, 3}), (3, {1, 3, 4}), (4, {0, 1, 3, 4}),
                                         (0, {0, 1, 2, 3, 4}), (5, {0, 1, 2, 3, 4}), (9, {0, 1, 2, 3, 4})])
def test_top_k_keeps_exactly_the_k_most_likely(k, expected):
    logits = mx.log(mx.array([PROBS]))
    out = top_k_filter(logits, k)
    assert kept(out) == expected
    assert np.allclose(np.asarray(out)[0, sorted(expected)], np.log(np.array(PROBS))[sorted(expected)])


def test_top_k_with_ties_keeps_exactly_k():
    assert len(kept(top_k_filter(mx.array([[1.0, 1.0, 1.0, 0.0]]), 2))) == 2


@pytest.mark.parametrize("p, expected", [(0.01, {1}), (0.35, {1}), (0.6, {1, 3}), (0.8, {1, 3, 4}),
                                         (0.9, {0, 1, 3, 4}), (0.99, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    logits = mx.log(mx.array([PROBS]))
    out = top_p_filter(logits, p)
    assert kept(out) == expected
    assert np.allclose(np.asarray(out)[0, sorted(expected)], np.log(np.array(PROBS))[sorted(expected)])


def test_samples_come_only_from_the_allowed_tokens():
    logits = mx.broadcast_to(mx.log(mx.array([PROBS])), (400, 5))
    draws = set(np.asarray(sample(logits, mx.random.key(0), temperature=1.0, top_k=3)).tolist())
    assert draws == {1, 3, 4}
    draws = set(np.asarray(sample(logits, mx.random.key(1), temperature=1.0, top_p=0.6)).tolist())
    assert draws == {1, 3}
    # top-p applies to the tempered distribution: at T=2 the probabilities are ~ sqrt(p), .30 .26 .18 .15 .11
    draws = set(np.asarray(sample(logits, mx.random.key(2), temperature=2.0, top_p=0.6)).tolist())
    assert draws == {1, 3, 4}
    assert np.asarray(sample(logits, None, temperature=0.0)).tolist() == [1] * 400  # greedy


# --- generation ---------------------------------------------------------------------------------------------

def test_cached_and_uncached_greedy_generation_agree(run):
    model, params = run.loaded.model, run.loaded.params
    prompt = [3] + run.tok.encode("The quick brown fox")
    cached = list(generate_tokens(model, params, prompt, max_new_tokens=40, stop_ids=()))
    uncached = list(generate_tokens(model, params, prompt, max_new_tokens=40, stop_ids=(), use_cache=False))
    assert cached == uncached
    assert len(cached) == 40 and len(set(cached)) > 10  # a real sequence, not one token repeated


def test_the_cache_feeds_one_position_per_new_token(run):
    lengths = []
    model = run.loaded.model

    def apply(params, tokens, key=None, cache=None):
        lengths.append(tokens.shape[1])
        return model.apply(params, tokens, key=key, cache=cache)

    spy = model._replace(apply=apply)
    list(generate_tokens(spy, run.loaded.params, [3, 10, 11, 12], max_new_tokens=6, stop_ids=()))
    assert lengths == [4, 1, 1, 1, 1, 1]


def test_a_seed_reproduces_a_sample(run):
    model, params = run.loaded.model, run.loaded.params

    def draw(seed):
        return list(generate_tokens(model, params, [3, 50], max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9,
                                    seed=seed, stop_ids=()))

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_generation_stops_at_a_stop_token_and_at_max_seq_len(run):
    model, params = run.loaded.model, run.loaded.params
    greedy = list(generate_tokens(model, params, [3, 50], max_new_tokens=20, stop_ids=()))
    stopped = list(generate_tokens(model, params, [3, 50], max_new_tokens=20, stop_ids=(greedy[5],)))
    assert stopped == greedy[:greedy.index(greedy[5])]
    long_prompt = list(range(20, 20 + 120))  # max_seq_len is 128
    assert len(list(generate_tokens(model, params, long_prompt, max_new_tokens=50, stop_ids=()))) == 8


def test_streamed_text_is_the_decoded_text(run):
    ids = run.tok.encode("café 日本語 🎉 and\nmore")
    pieces = list(stream_text(run.tok, ids))
    assert "".join(pieces) == run.tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # multi-byte characters are held back until complete
    stream = TextStream(run.tok)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == run.tok.decode(ids)


def test_chat_template_decodes_to_the_documented_text(run):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi <|end|> there"},
                {"role": "assistant", "content": "Hello."}]
    ids, mask = render(messages, add_generation_prompt=True, tokenizer=run.tok)
    assert run.tok.decode(ids) == ("<|system|>Be terse.<|end|>\n<|user|>Hi <|end|> there<|end|>\n"
                                   "<|assistant|>Hello.<|end|>\n<|assistant|>")
    assert run.tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello.<|end|>"
    assert ids.count(7) == 3  # the <|end|> typed by the user is text, not the marker


def test_history_drops_the_oldest_turns_but_keeps_the_system_message(run):
    messages = [{"role": "system", "content": "S"}]
    for i in range(10):
        messages += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "answer"}]
    messages.append({"role": "user", "content": "last"})
    ids = fit_history(messages, run.tok, 60)
    text = run.tok.decode(ids)
    assert len(ids) <= 60 and text.startswith("<|system|>S<|end|>\n<|user|>") and text.endswith("last<|end|>\n<|assistant|>")


def test_loading_checks_the_tokenizer(run, tmp_path):
    meta = {"config": run.cfg.to_dict(), "tokenizer_sha256": "0" * 64}
    save_checkpoint(tmp_path / "other.ckpt", {"state": {"params": run.params}}, 1, meta)
    with pytest.raises(AbotError, match="not the tokenizer .* was trained with"):
        load_for_inference(tmp_path / "other.ckpt")
    raw = run.cfg.to_dict()
    raw["train"]["tokenizer_path"] = str(tmp_path / "gone.model")
    save_checkpoint(tmp_path / "moved.ckpt", {"state": {"params": run.params}}, 1, {"config": raw})
    with pytest.raises(AbotError, match="pass --tokenizer PATH"):
        load_for_inference(tmp_path / "moved.ckpt")
    assert load_for_inference(tmp_path / "moved.ckpt", tokenizer_path=run.tok.path).step == 1


def test_a_run_folder_means_its_newest_checkpoint(run, tmp_path):
    """`abot chat checkpoints/tiny-dpo`, as a new user types it after `abot dpo configs/dpo.yaml`."""
    from abot.checkpoint import save_rotating
    from abot.evaluate import evaluate_checkpoint
    from abot.export import export_checkpoint

    meta = {"config": run.cfg.to_dict(), "tokenizer_sha256": run.tok.sha256}
    for step in (50, 100):
        save_rotating(tmp_path / "tiny-dpo", {"state": {"params": run.params}}, step, meta, keep=3)
    loaded = load_for_inference(tmp_path / "tiny-dpo")
    assert loaded.step == 100 and loaded.path == tmp_path / "tiny-dpo" / "step_00000100.ckpt"
    assert evaluate_checkpoint(tmp_path / "tiny-dpo", steps=1)["step"] == 100
    export_checkpoint(tmp_path / "tiny-dpo", tmp_path / "hf", say=lambda line: None)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(AbotError, match="empty is a folder with no loadable checkpoint"):
        load_for_inference(tmp_path / "empty")


# --- command line --------------------------------------------------------------------------------------------

def test_generate_command_streams_text(run):
    out = CliRunner().invoke(app, ["generate", str(run.ckpt), "--prompt", "Hello", "--max-new-tokens", "8",
                                   "--seed", "1"])
    assert out.exit_code == 0, out.output
    assert out.output.strip()


def test_chat_reads_stdin_and_exits_cleanly_at_eof(run):
    out = subprocess.run([sys.executable, "-m", "abot", "chat", str(run.ckpt), "--system", "Be brief.",
                          "--max-new-tokens", "6", "--temperature", "0"], input="Hello there\n/reset\nAgain\n",
                         capture_output=True, text=True, timeout=120, cwd=run.root)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stdout.startswith("> ") and out.stdout.count("> ") >= 4 and "(history cleared)" in out.stdout


def test_chat_exits_cleanly_on_ctrl_c(run):
    proc = subprocess.Popen([sys.executable, "-m", "abot", "chat", str(run.ckpt)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=run.root)
    try:
        assert proc.stdout.read(2) == "> "  # waiting at the prompt
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout + stderr
    assert "Traceback" not in stdout + stderr


def test_eval_prints_loss_and_perplexity(run):
    out = CliRunner().invoke(app, ["eval", str(run.ckpt), "--steps", "2"])
    assert out.exit_code == 0, out.output
    assert "loss" in out.output and "ppl" in out.output and "128" in out.output  # 2 x 2 x 32 tokens
    data_yaml = run.root / "held_out.yaml"  # a config file: its data section replaces the checkpoint's
    data_yaml.write_text(f"data:\n  dataset: json\n  data_files: {run.root / 'docs.jsonl'}\n  seq_len: 8\n")
    out = CliRunner().invoke(app, ["eval", str(run.ckpt), "--json", "--split", "train", "--data", str(data_yaml),
                                   "--data", "data.seq_len=16", "train.micro_batch_size=1"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.output)
    assert result["tokens"] == 3 * 1 * 16 and result["split"] == "train" and result["seq_len"] == 16
    assert abs(result["loss"] - np.log(VOCAB)) < 3.0 and np.isclose(result["ppl"], np.exp(result["loss"]))


def test_eval_refuses_model_overrides(run):
    out = CliRunner().invoke(app, ["eval", str(run.ckpt), "model.d_model=32"])
    assert out.exit_code != 0 and "data.* and train.* overrides only" in str(out.exception)


# --- export ------------------------------------------------------------------------------------------------

def exported(run, tmp_path, ckpt=None):
    from abot.export import export_checkpoint

    messages = []
    out = export_checkpoint(ckpt or run.ckpt, tmp_path / "hf", say=messages.append)
    return out, messages


@pytest.mark.parametrize("tied", [True, False])
def test_export_round_trips_every_tensor(run, tmp_path, tied):
    from safetensors.numpy import load_file

    ckpt = run.ckpt if tied else make_checkpoint(tmp_path / "untied.ckpt", run.tok, run.root / "docs.jsonl",
                                                 tie_embeddings=False).path
    params = load_for_inference(ckpt).params
    out, messages = exported(run, tmp_path, ckpt)
    assert any("dropout 0.1 is dropped" in m for m in messages)
    tensors = load_file(str(out / "model.safetensors"))
    expected = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    if not tied:
        expected["lm_head.weight"] = params["head"].T
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    for i, block in enumerate(params["blocks"]):
        expected.update({f"model.layers.{i}.{hf}.weight": block[ours].T for ours, hf in names.items()})
        expected[f"model.layers.{i}.input_layernorm.weight"] = block["attn_norm"]
        expected[f"model.layers.{i}.post_attention_layernorm.weight"] = block["mlp_norm"]
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        assert tensors[name].dtype == np.float32 and tensors[name].shape == tuple(value.shape), name
        assert np.array_equal(tensors[name], np.asarray(value)), name
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is tied
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
            config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (64, 256, 2, 4, 4, VOCAB)
    assert (config["hidden_act"], config["torch_dtype"], config["max_position_embeddings"]) == ("silu", "float32", 128)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 3, 0)
    assert (out / "tokenizer.model").read_bytes() == Path(run.tok.path).read_bytes()
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["add_bos_token"] is False and tok_config["tokenizer_class"] == "LlamaTokenizer"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [3, 7]
    assert "<|end|>" in [t["content"] for t in json.loads((out / "special_tokens_map.json").read_text())
                         ["additional_special_tokens"]]


def test_export_refuses_what_no_architecture_has_and_non_empty_folders(run, tmp_path):
    from abot.export import export_checkpoint

    capped = make_checkpoint(tmp_path / "capped.ckpt", run.tok, run.root / "docs.jsonl", logit_softcap=30.0)
    with pytest.raises(AbotError, match="model.logit_softcap is 30.0: Llama, Qwen2 and Qwen3 do not cap logits"):
        export_checkpoint(capped.path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(AbotError, match="not empty"):
        export_checkpoint(run.ckpt, tmp_path / "busy")


def test_transformers_loads_the_export_with_the_same_logits_and_tokens(run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out, _ = exported(run, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    text = "Return the value.\n  Indented <|user|> text, café"
    ids = [3] + run.tok.encode(text)
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(run.loaded.model.apply(run.loaded.params, mx.array([ids])))
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(ids):].tolist()
    assert greedy == list(generate_tokens(run.loaded.model, run.loaded.params, ids, max_new_tokens=12, stop_ids=()))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.encode(text) == run.tok.encode(text)
    chat = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        run.tok.decode(render(chat, add_generation_prompt=True, tokenizer=run.tok).ids)


def test_mlx_lm_loads_the_export_with_the_same_logits(run, tmp_path):
    pytest.importorskip("mlx_lm")
    from mlx_lm import load

    out, _ = exported(run, tmp_path)
    model, tokenizer = load(str(out))
    ids = [3] + run.tok.encode("Return the value.")
    theirs = np.asarray(model(mx.array([ids])))
    ours = np.asarray(run.loaded.model.apply(run.loaded.params, mx.array([ids])))
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
