"""Hugging Face tokenizers: tokenizer.json, BOS/EOS rules, the Jinja chat template and its SFT/DPO masks.

Everything is built here, offline: a tiny byte-level BPE trained with the `tokenizers` library, and folders in
both layouts (transformers 5: chat_template.jinja; older: chat_template inside tokenizer_config.json) with
two templates written for these tests in the two common styles (ChatML, and Llama 3's header tokens with BOS).
Where transformers is installed, render is also compared with its apply_chat_template.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from abot.chat_template import render
from abot.config import config_from_dict
from abot.data.pipeline import token_windows
from abot.data.shards import write_split
from abot.errors import AbotError
from abot.finetune.batches import encode_conversation, encode_pair
from abot.generate import prompt_ids, stops_of
from abot.tokenizer import document_start, load_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TEXTS = ["Hello there, how are you today?", "The assistant answers questions briefly.", "What is two plus two?",
         "It is four. Numbers: 0123456789.", "Be brief and kind to the user.", "café, naïve, 東京, emoji 🙂"] * 4

# ChatML, as Qwen2/SmolLM2 write it: a default system message when none is given, whitespace-control tags.
CHATML = """{%- for message in messages %}
    {%- if loop.first and message['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Llama 3's header tokens with BOS, written with plain tags: trim_blocks and lstrip_blocks shape its text.
LLAMA = """{{ bos_token }}{% for message in messages %}
  {% if message['role'] not in ['system', 'user', 'assistant'] %}
{{ raise_exception('Unknown role: ' + message['role']) }}
  {% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""
# Qwen3's habit: an (empty) think block only in assistant turns after the last user message, so an earlier
# turn renders differently once later turns follow (the mask's fallback path).
THINKING = """{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}{% if message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for message in messages %}
    {%- if message['role'] == 'assistant' and loop.index0 > ns.last_user %}
        {{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "It is four."}, {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four, today."}]


def train_bpe(bos: str | None = None) -> Tokenizer:
    """A byte-level BPE of a few hundred tokens; `bos`: a post-processor that prepends it (as Llama 3's does)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(), train_bpe("<|begin_of_text|>")


def write_folder(folder: Path, tok: Tokenizer, config: dict, template: str | None = None, layout: str = "new",
                 eos_ids: list[str] | None = None) -> Path:
    """A model folder's tokenizer files; the template in chat_template.jinja ("new") or tokenizer_config ("old")."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = dict(config)
    if template is not None and layout == "new":
        (folder / "chat_template.jinja").write_text(template)
    elif template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if eos_ids:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id(t) for t in eos_ids]}))
    return folder


def chatml_folder(root: Path, tok: Tokenizer, layout: str = "new", template: str = CHATML) -> Path:
    config = {"tokenizer_class": "TokenizersBackend" if layout == "new" else "PreTrainedTokenizerFast",
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}
    return write_folder(root / f"chatml-{layout}", tok, config, template, layout, ["<|im_end|>", "<|endoftext|>"])


def llama_folder(root: Path, tok: Tokenizer, layout: str = "old", **config) -> Path:
    # Special tokens as dicts, as older folders on the Hub write them.
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True},
              "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False, "special": True},
              **config}
    return write_folder(root / f"llama-{layout}", tok, config, LLAMA, layout,
                        ["<|end_of_text|>", "<|eot_id|>"])


def masked_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m])


# --- loading, ids, BOS and EOS rules -------------------------------------------------------------------------

def test_encode_decode_round_trip_and_the_contract(bpe, tmp_path):
    tok = load_tokenizer(chatml_folder(tmp_path, bpe[0]))
    assert load_tokenizer(tok.path).sha256 == tok.sha256  # the folder or its tokenizer.json: the same tokenizer
    assert tok.kind == "huggingface" and tok.path.name == "tokenizer.json" and not tok.exact_vocab
    assert tok.vocab_size == bpe[0].get_vocab_size() > 300  # a few hundred: 256 bytes, the specials, merges
    for text in TEXTS[:6] + ["", "  leading spaces\n\ttabs", "<|im_end|> as text"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS[:3]) == [tok.encode(t) for t in TEXTS[:3]]
    assert tok.encode("<|im_end|>") == [tok.special_tokens["<|im_end|>"]]  # added tokens are single ids
    assert tok.pad_id == bpe[0].token_to_id("<|endoftext|>")


def test_bos_rule_from_the_post_processor_and_from_add_bos_token(bpe, tmp_path):
    bos = bpe[1].token_to_id("<|begin_of_text|>")
    llama = load_tokenizer(llama_folder(tmp_path, bpe[1]))  # no add_bos_token: the post-processor prepends BOS
    assert (llama.bos_id, llama.add_bos) == (bos, True)
    assert document_start(llama) == [bos] and prompt_ids(llama, "Hello") == [bos, *llama.encode("Hello")]
    assert bos not in llama.encode("Hello")  # encode is the text alone; callers add BOS by the rule
    windows = list(token_windows(["Hello", "It is four."], llama, window=4))
    flat = np.concatenate(windows).tolist()
    assert flat[0] == bos and flat.count(bos) == 2  # every document starts with BOS, and ends with EOS
    entry = write_split(["Hello", "It is four."], llama, tmp_path, "train", vocab_size=512)
    shard = np.fromfile(tmp_path / entry["files"][0], dtype="<u2").tolist()
    assert shard == [bos, *llama.encode("Hello"), llama.eos_id, bos, *llama.encode("It is four."), llama.eos_id]
    off = load_tokenizer(llama_folder(tmp_path / "off", bpe[1], add_bos_token=False))
    assert (off.bos_id, off.add_bos) == (bos, False) and document_start(off) == []
    chatml = load_tokenizer(chatml_folder(tmp_path, bpe[0]))  # no BOS at all: a raw prompt starts after an EOS
    assert (chatml.bos_id, chatml.add_bos) == (None, False)
    assert prompt_ids(chatml, "Hi") == [chatml.eos_id, *chatml.encode("Hi")]


def test_several_eos_ids_all_end_generation(bpe, tmp_path):
    tok = load_tokenizer(llama_folder(tmp_path, bpe[1]))
    eot, end = bpe[1].token_to_id("<|eot_id|>"), bpe[1].token_to_id("<|end_of_text|>")
    assert tok.eos_id == eot and tok.eos_ids == (eot, end)  # tokenizer_config's first, then generation_config's
    assert tok.chat_template.end_of_turn_ids == (eot,)
    assert set(stops_of(tok)) == set(stops_of(tok, chat=True)) == {eot, end}
    chatml = load_tokenizer(chatml_folder(tmp_path, bpe[0]))
    im_end, eot_text = bpe[0].token_to_id("<|im_end|>"), bpe[0].token_to_id("<|endoftext|>")
    assert chatml.eos_ids == (im_end, eot_text) and stops_of(chatml, chat=True) == (im_end, eot_text)


def test_folder_problems_are_named(bpe, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AbotError, match="a Hugging Face model folder with a tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    folder = write_folder(tmp_path / "named", bpe[0], {"eos_token": "<|im_end|>",
                                                       "chat_template": [{"name": "tool_use", "template": "x"}]})
    with pytest.raises(AbotError, match="none named 'default'"):
        load_tokenizer(folder)
    folder = write_folder(tmp_path / "noeos", bpe[0], {"eos_token": "<|not-a-token|>"})
    with pytest.raises(AbotError, match="not a token of the tokenizer's vocabulary"):
        load_tokenizer(folder)
    no_template = load_tokenizer(write_folder(tmp_path / "plain", bpe[0], {"eos_token": "<|endoftext|>"}))
    with pytest.raises(AbotError, match="has no chat template"):
        render(CHAT, tokenizer=no_template)


# --- the chat template: text, ids, masks ---------------------------------------------------------------------

CHATML_TEXT = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
               "<|im_start|>assistant\nIt is four.<|im_end|>\n<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
               "<|im_start|>assistant\nFour, today.<|im_end|>\n")
LLAMA_TEXT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHello there<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nIt is four.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhat is two plus two?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nFour, today.<|eot_id|>")


def styles(bpe, root):
    """(tokenizer, expected text of CHAT, of [user] with the generation prompt, end marker) per style and layout."""
    for layout in ("new", "old"):
        yield (load_tokenizer(chatml_folder(root, bpe[0], layout)), CHATML_TEXT,
               "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
               "<|im_end|>")
        yield (load_tokenizer(llama_folder(root, bpe[1], layout)), LLAMA_TEXT,
               "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")


def test_render_equals_the_text_written_by_hand(bpe, tmp_path):
    for tok, text, prompt_text, _ in styles(bpe, tmp_path):
        ids, mask = render(CHAT, tokenizer=tok)
        assert tok.decode(ids) == text and len(mask) == len(ids)
        assert ids == tok.encode(text)  # encoded without adding specials: BOS only where the template writes it
        gen = render([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenizer=tok)
        assert tok.decode(gen.ids) == prompt_text and not any(gen.mask)
        if tok.add_bos:
            assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


def test_sft_mask_is_exactly_the_assistant_contents_and_end_markers(bpe, tmp_path):
    for tok, _, _, end in styles(bpe, tmp_path):
        ids, mask = render(CHAT, tokenizer=tok)
        assert masked_text(tok, ids, mask) == f"It is four.{end}Four, today.{end}"
        runs = "".join(map(str, mask)).split("0")
        assert len([r for r in runs if r]) == 2  # one contiguous run per assistant message
        example, outcome = encode_conversation(CHAT, tok, seq_len=len(ids) + 3)
        assert outcome == "used"
        tokens, target_mask = example["tokens"], example["mask"]
        assert tok.decode([int(t) for t, m in zip(tokens[1:], target_mask) if m]) == f"It is four.{end}Four, today.{end}"
        assert (tokens[len(ids):] == tok.pad_id).all()


def test_mask_when_earlier_turns_render_differently(bpe, tmp_path):
    tok = load_tokenizer(chatml_folder(tmp_path, bpe[0], template=THINKING))
    ids, mask = render(CHAT[1:], tokenizer=tok)
    assert "<|im_start|>assistant\nIt is four.<|im_end|>" in tok.decode(ids)  # no think block: not the last turn
    assert masked_text(tok, ids, mask) == "It is four.<|im_end|><think>\n\n</think>\n\nFour, today.<|im_end|>"


def test_pair_masks_cover_the_final_reply_only(bpe, tmp_path):
    for tok, _, _, end in styles(bpe, tmp_path):
        chosen = CHAT
        rejected = CHAT[:-1] + [{"role": "assistant", "content": "Five."}]
        example, outcome = encode_pair({"chosen": chosen, "rejected": rejected}, tok, seq_len=96)
        assert outcome == "used"
        for side, reply in (("chosen", "Four, today."), ("rejected", "Five.")):
            tokens, mask = example[side], example[side + "_mask"]
            assert tok.decode([int(t) for t, m in zip(tokens[1:], mask) if m]) == reply + end
            first = int(np.argmax(mask)) + 1  # the first response token: everything before it is the prompt
            assert tok.decode(tokens[:first].tolist()) == tok.decode(render(CHAT[:-1], True, tokenizer=tok).ids)
        prompt_len = int(np.argmax(example["chosen_mask"])) + 1
        assert (example["chosen"][:prompt_len] == example["rejected"][:prompt_len]).all()


def test_raise_exception_names_the_template(bpe, tmp_path):
    folder = llama_folder(tmp_path, bpe[1], layout="new")
    tok = load_tokenizer(folder)
    with pytest.raises(AbotError, match=r"chat template .*chat_template\.jinja refused the conversation: "
                                        r"Unknown role: tool"):
        render([{"role": "tool", "content": "x"}], tokenizer=tok)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(AbotError, match="chat_template.jinja: not valid Jinja"):
        load_tokenizer(folder)


def test_tojson_keeps_non_ascii_and_strftime_now_works(bpe, tmp_path):
    template = ("{% for m in messages %}{{ m | tojson }}{% endfor %}{{ strftime_now('%Y') | length }}"
                "{% if add_generation_prompt %}<|im_start|>{% endif %}")
    tok = load_tokenizer(chatml_folder(tmp_path, bpe[0], template=template))
    ids, _ = render([{"role": "user", "content": "café <b>"}], tokenizer=tok)
    assert tok.decode(ids) == '{"role": "user", "content": "café <b>"}4'


def test_render_matches_transformers(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    cases = [(CHAT, False), (CHAT[1:3], False), (CHAT[:2], True), (CHAT[1:2], True), (CHAT[1:], False)]
    for tok, _, _, _ in styles(bpe, tmp_path):
        theirs = transformers.AutoTokenizer.from_pretrained(str(tok.folder))
        for messages, gen in cases:
            ids = render(messages, gen, tokenizer=tok).ids
            assert theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == tok.decode(ids)
            got = theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            assert list(got["input_ids"] if hasattr(got, "keys") else got) == ids


# --- the vocabulary rule --------------------------------------------------------------------------------------

def cfg_with(tokenizer_path, vocab_size):
    return config_from_dict({"model": {"vocab_size": vocab_size, "n_layers": 1, "d_model": 32, "n_heads": 2},
                             "train": {"tokenizer_path": str(tokenizer_path)}}, "test")


def test_a_tokenizer_larger_than_the_model_is_refused(bpe, tmp_path):
    from abot.build import ensure_tokenizer
    from abot.verify import FAIL, PASS, check_tokenizer

    folder, n = chatml_folder(tmp_path, bpe[0]), bpe[0].get_vocab_size()
    with pytest.raises(AbotError, match=rf"the tokenizer has {n} tokens but model.vocab_size is 300; set "
                                        rf"model.vocab_size: {n}, \(model.vocab_size must be at least"):
        ensure_tokenizer(cfg_with(folder, 300), say=lambda _: None)
    assert ensure_tokenizer(cfg_with(folder, 512), say=lambda _: None).vocab_size == n  # padded: fine
    assert ensure_tokenizer(cfg_with(folder / "tokenizer.json", n), say=lambda _: None).vocab_size == n
    assert check_tokenizer(cfg_with(folder, 300)).status == FAIL
    assert check_tokenizer(cfg_with(folder, 512)).status == PASS
    with pytest.raises(AbotError, match="not found"):
        ensure_tokenizer(cfg_with(tmp_path / "missing.json", 512), say=lambda _: None)


def test_a_checkpoint_refuses_a_tokenizer_larger_than_its_model(bpe, tmp_path):
    from abot.build import build_model
    from abot.checkpoint import save_checkpoint
    from abot.restore import checkpoint_tokenizer, open_checkpoint

    folder = chatml_folder(tmp_path, bpe[0])
    tok = load_tokenizer(folder)
    cfg = cfg_with(folder, 256)
    params = build_model(cfg).init(mx.random.key(0))
    save_checkpoint(tmp_path / "m.ckpt", {"params": params}, 0, {"config": cfg.to_dict(), "tokenizer_sha256": tok.sha256})
    opened = open_checkpoint(tmp_path / "m.ckpt")
    with pytest.raises(AbotError, match=r"tokens, but the model of .* has 256 \(model.vocab_size must be at least"):
        checkpoint_tokenizer(cfg, opened)


# --- end to end: SFT with a Hugging Face tokenizer, then chat and export --------------------------------------

@pytest.mark.slow
def test_sft_with_a_hf_tokenizer_trains_chats_and_exports(bpe, tmp_path):
    import subprocess
    import sys

    from abot.checkpoint import latest_checkpoint
    from abot.export import export_checkpoint
    from abot.generate import chat_loop, load_for_inference

    root = Path(__file__).resolve().parent.parent
    folder = chatml_folder(tmp_path, bpe[0])
    args = ["model.vocab_size=512", "model.n_layers=2", "model.d_model=64", "model.n_heads=4",
            "model.max_seq_len=128", f"train.tokenizer_path={folder}", "train.init_from=null",
            f"train.save_dir={tmp_path}/sft", "data.seq_len=96", "train.micro_batch_size=8", "train.total_steps=30",
            "train.lr=3e-3", "train.warmup_steps=3", "train.log_interval=10", "train.eval_interval=30",
            "train.eval_steps=2", "train.ckpt_interval=30", "data.shuffle_buffer=64"]
    out = subprocess.run([sys.executable, "-m", "abot", "sft", str(root / "configs" / "sft.yaml"), *args],
                         capture_output=True, text=True, cwd=root, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((tmp_path / "sft" / "logs" / "final_training_summary.json").read_text())
    assert summary["final_eval"]["loss"] < summary["initial_eval"]["loss"] - 0.5

    loaded = load_for_inference(tmp_path / "sft")
    assert loaded.tokenizer.kind == "huggingface" and loaded.tokenizer.sha256 == load_tokenizer(folder).sha256
    lines, written = iter(["Hello there", "/quit"]), []
    assert chat_loop(loaded, read=lambda _: next(lines), write=lambda *a, **k: written.append(a[0] if a else ""),
                     max_new_tokens=12) == 0
    assert len("".join(written)) > 1  # a reply was streamed (and a newline after it)

    exported = export_checkpoint(latest_checkpoint(tmp_path / "sft"), tmp_path / "hf", say=lambda _: None)
    assert (exported / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert not (exported / "tokenizer.model").exists()
    tok_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHATML and tok_config["eos_token"] == "<|im_end|>"
    im_end, eot = bpe[0].token_to_id("<|im_end|>"), bpe[0].token_to_id("<|endoftext|>")
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == [im_end, eot]
    config = json.loads((exported / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (im_end, eot, None)
    again = load_tokenizer(exported)  # the export is itself a folder abot (and transformers) can read
    assert render(CHAT, tokenizer=again) == render(CHAT, tokenizer=loaded.tokenizer)
    try:
        import transformers
    except ImportError:
        return
    theirs = transformers.AutoTokenizer.from_pretrained(str(exported))
    assert theirs.apply_chat_template(CHAT, tokenize=False) == again.decode(render(CHAT, tokenizer=again).ids)
