"""Fine-tuning data: assistant-only masks, preference masks, bad input counted, oasst1 trees, sources, streams."""

import abot  # noqa: F401  (first: it sets up BLAS before anything imports mlx.core)

import json
from typing import NamedTuple

import numpy as np
import pytest

from abot import registry
from abot.chat_template import ASSISTANT_ID, END_ID, NEWLINE_ID, SYSTEM_ID, USER_ID
from abot.config import DataConfig, config_from_dict
from abot.errors import AbotError
from abot.finetune.batches import (DataStats, ExampleStream, describe, encode_conversation, encode_pair,
                                   example_eval_batches)
from abot.finetune.sources import chat, oasst1, oasst_conversations, preferences
from abot.stage import check_stage, stage_loss
from abot.finetune.synthetic import chat_rows, preference_rows, write_dataset


class CharTokenizer:
    """One id per character, 100 + its code point mod 800: ids are readable by hand and never a marker."""

    def encode(self, text):
        return [100 + ord(c) % 800 for c in text]


TOK = CharTokenizer()


def ids(text):
    return TOK.encode(text)


def msg(role, content):
    return {"role": role, "content": content}


# --- SFT: the assistant-only mask, by hand -----------------------------------------------------------------

def test_sft_mask_is_exactly_the_assistant_tokens():
    conv = [msg("system", "S"), msg("user", "hi"), msg("assistant", "yo"), msg("user", "x"), msg("assistant", "ok")]
    example, outcome = encode_conversation(conv, TOK, seq_len=24)
    assert outcome == "used"
    #            <|system|> S     <|end|> \n       <|user|> h i  <|end|> \n
    expected = [SYSTEM_ID, *ids("S"), END_ID, NEWLINE_ID, USER_ID, *ids("hi"), END_ID, NEWLINE_ID,
                ASSISTANT_ID, *ids("yo"), END_ID, NEWLINE_ID, USER_ID, *ids("x"), END_ID, NEWLINE_ID,
                ASSISTANT_ID, *ids("ok"), END_ID, NEWLINE_ID]
    learn = {10, 11, 12, 19, 20, 21}  # y, o, <|end|> and o, k, <|end|>: the assistant's text and its <|end|>
    assert len(expected) == 23 and [expected[i] for i in sorted(learn)] == [*ids("yo"), END_ID, *ids("ok"), END_ID]
    tokens, mask = example["tokens"], example["mask"]
    assert tokens.shape == (25,) and mask.shape == (24,) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, expected + [0, 0])  # right-padded with PAD (0)
    # mask[t] says whether target tokens[t + 1] is learned: the template's mask shifted by one.
    np.testing.assert_array_equal(mask, [1.0 if t + 1 in learn else 0.0 for t in range(24)])
    assert [int(tokens[t + 1]) for t in range(24) if mask[t]] == [*ids("yo"), END_ID, *ids("ok"), END_ID]


def test_sft_overlong_truncated_or_dropped():
    conv = [msg("user", "a" * 10), msg("assistant", "b" * 10)]  # 1 + 10 + 2 + 1 + 10 + 2 = 26 tokens
    example, outcome = encode_conversation(conv, TOK, seq_len=20, overlong="truncate")
    assert outcome == "truncated" and example["tokens"].shape == (21,)
    assert example["mask"].sum() == 21 - 14  # targets 14..20 are assistant text, nothing beyond the window
    assert encode_conversation(conv, TOK, seq_len=20, overlong="drop") == (None, "too_long")
    # Truncation that leaves no assistant token: nothing to learn, dropped and counted.
    assert encode_conversation(conv, TOK, seq_len=12, overlong="truncate") == (None, "too_long")
    assert encode_conversation(conv, TOK, seq_len=25)[1] == "used"  # exactly seq_len + 1 fits


@pytest.mark.parametrize("conv, reason", [
    ([msg("user", "hi")], "no_assistant_turn"),
    ([msg("system", "s"), msg("user", "hi")], "no_assistant_turn"),
    ([], "no_assistant_turn"),
    ([msg("user", "hi"), msg("assistant", "")], "empty_message"),
    ([msg("user", "  \n"), msg("assistant", "ok")], "empty_message"),
    ([msg("robot", "hi"), msg("assistant", "ok")], "malformed"),
    ([msg("user", None), msg("assistant", "ok")], "malformed"),
    ("not a list", "malformed"),
])
def test_bad_conversations_are_dropped_with_a_reason(conv, reason):
    assert encode_conversation(conv, TOK, seq_len=32) == (None, reason)


# --- DPO pairs -----------------------------------------------------------------------------------------------

def test_pair_masks_cover_the_final_response_only():
    prompt = [msg("user", "q"), msg("assistant", "a"), msg("user", "r")]  # an earlier reply is prompt, not response
    pair = {"chosen": prompt + [msg("assistant", "good")], "rejected": prompt + [msg("assistant", "no")]}
    example, outcome = encode_pair(pair, TOK, seq_len=24)
    assert outcome == "used"
    p = 12  # the prompt's tokens: 3 x (marker, 1 char, <|end|>, \n)
    for side, text in (("chosen", "good"), ("rejected", "no")):
        tokens, mask = example[side], example[side + "_mask"]
        assert tokens[p] == ASSISTANT_ID
        assert [int(tokens[t + 1]) for t in range(24) if mask[t]] == [*ids(text), END_ID]


@pytest.mark.parametrize("pair, reason", [
    ({"chosen": [msg("user", "a"), msg("assistant", "x")], "rejected": [msg("user", "b"), msg("assistant", "y")]},
     "prompt_mismatch"),
    ({"chosen": [msg("user", "a"), msg("assistant", "x")], "rejected": [msg("user", "a"), msg("assistant", "x")]},
     "identical_responses"),
    ({"chosen": [msg("user", "a"), msg("assistant", "x")], "rejected": [msg("user", "a")]}, "no_assistant_turn"),
    ({"chosen": [msg("user", "a"), msg("assistant", "x"), msg("user", "b")],
      "rejected": [msg("user", "a"), msg("assistant", "y")]}, "no_assistant_turn"),
    ({"chosen": [msg("user", "a"), msg("assistant", "")], "rejected": [msg("user", "a"), msg("assistant", "y")]},
     "empty_message"),
    ({"chosen": [msg("user", "a"), msg("assistant", "x")]}, "malformed"),
    ({"chosen": [msg("user", "a"), msg("assistant", "x" * 30)], "rejected": [msg("user", "a"), msg("assistant", "y")]},
     "too_long"),
])
def test_bad_pairs_are_dropped_with_a_reason(pair, reason):
    assert encode_pair(pair, TOK, seq_len=16, overlong="drop") == (None, reason)


# --- oasst1 trees ----------------------------------------------------------------------------------------------

def oasst_row(mid, parent, role, text, rank=None, lang="en", deleted=False, tree="t1"):
    """A row with OpenAssistant/oasst1's fields (the ones abot reads, and some it does not)."""
    return {"message_id": mid, "parent_id": parent, "user_id": "u", "created_date": "2023-02-05T00:00:00",
            "text": text, "role": role, "lang": lang, "review_count": 3, "review_result": True,
            "deleted": deleted, "rank": rank, "synthetic": False, "model_name": None, "detoxify": None,
            "message_tree_id": tree, "tree_state": "ready_for_export", "emojis": None, "labels": None}


TREE = [
    # English tree t1:   q1 -> a1 (rank 1), a2 (rank 0) ; a2 -> q2 (rank 0, deleted), q3 (rank 1) ; q3 -> a3
    #                    a1 -> q4 (unranked) -> a4 (Spanish, filtered) ; a1 -> q5 (unranked) -> a5
    oasst_row("a2", "q1", "assistant", "A2", rank=0),  # rows in any order
    oasst_row("q1", None, "prompter", "Q1"),
    oasst_row("a1", "q1", "assistant", "A1", rank=1),
    oasst_row("q2", "a2", "prompter", "Q2", rank=0, deleted=True),
    oasst_row("a2x", "q2", "assistant", "under a deleted message"),
    oasst_row("q3", "a2", "prompter", "Q3", rank=1),
    oasst_row("a3", "q3", "assistant", "A3"),
    oasst_row("q4", "a1", "prompter", "Q4"),
    oasst_row("a4", "q4", "assistant", "A4 en espanol", lang="es"),
    oasst_row("q5", "a1", "prompter", "Q5"),
    oasst_row("a5", "q5", "assistant", "A5"),
    # German tree t2, and an English root nobody answered (t3).
    oasst_row("g1", None, "prompter", "Hallo", lang="de", tree="t2"),
    oasst_row("g2", "g1", "assistant", "Guten Tag", lang="de", tree="t2", rank=0),
    oasst_row("lonely", None, "prompter", "anyone?", tree="t3"),
]


def turns(conversations):
    return [[m["content"] for m in conv] for conv in conversations]


def test_oasst_best_ranked_path_skips_deleted_and_other_languages():
    convs = oasst_conversations(TREE, lang="en")
    # q1 -> a2 (rank 0) -> q3 (q2 is deleted) -> a3; the unanswered root stays (dropped later, counted).
    assert turns(convs) == [["Q1", "A2", "Q3", "A3"], ["anyone?"]]
    assert [m["role"] for m in convs[0]] == ["user", "assistant", "user", "assistant"]


def test_oasst_all_paths_and_languages():
    convs = oasst_conversations(TREE, lang=None, paths="all")
    assert turns(convs) == [
        ["Q1", "A2", "Q3", "A3"],
        ["Q1", "A1", "Q4", "A4 en espanol"],  # every language
        ["Q1", "A1", "Q5", "A5"],
        ["Hallo", "Guten Tag"],
        ["anyone?"],
    ]
    english = oasst_conversations(TREE, lang=["en"], paths="all")
    # Spanish a4 filtered: q4 becomes a leaf and is cut back to ... a1, which is kept once.
    assert turns(english) == [["Q1", "A2", "Q3", "A3"], ["Q1", "A1"], ["Q1", "A1", "Q5", "A5"], ["anyone?"]]
    assert turns(oasst_conversations(TREE, lang="de")) == [["Hallo", "Guten Tag"]]


def test_oasst_source_reads_local_rows_and_counts_the_unanswered_root(tmp_path):
    write_dataset(tmp_path / "oasst", {"train": TREE, "validation": TREE[:3]})
    data = DataConfig(source="oasst1", dataset=str(tmp_path / "oasst"), split="train", eval_split="validation",
                      seq_len=64)
    train = oasst1(data, "train", seed=0)
    assert turns(train(0)) == [["Q1", "A2", "Q3", "A3"], ["anyone?"]]
    assert turns(oasst1(data, "eval", seed=0, lang=None)(0)) == [["Q1", "A2"]]
    stats = DataStats()
    stream = ExampleStream(train, lambda c: encode_conversation(c, TOK, 64), (1, 1), stats=stats)
    batch = next(stream)
    assert batch["tokens"].shape == (1, 1, 65) and batch["mask"].shape == (1, 1, 64)
    stream.close()
    report = stats.report()
    assert report["used"] == 1 and report["dropped"] == {"no_assistant_turn": 1}


def test_oasst_carve_keeps_trees_whole(tmp_path):
    rows = [oasst_row(f"{t}-{i}", None if i == 0 else f"{t}-{i - 1}", "prompter" if i % 2 == 0 else "assistant",
                      f"{t}:{i}", tree=f"tree{t}") for t in range(40) for i in range(4)]
    write_dataset(tmp_path / "oasst", {"train": rows})
    data = DataConfig(dataset=str(tmp_path / "oasst"), eval_fraction=0.3)
    train, held = list(oasst1(data, "train", seed=0)(0)), list(oasst1(data, "eval", seed=0)(0))
    trees = lambda convs: {c[0]["content"].split(":")[0] for c in convs}  # noqa: E731
    assert len(train) + len(held) == 40 and not trees(train) & trees(held) and held
    assert all(len(c) == 4 for c in train + held)  # never half a conversation


# --- sources with the real Hub schemas ------------------------------------------------------------------------

def test_chat_and_preference_sources_read_hub_like_folders(tmp_path):
    write_dataset(tmp_path / "uc", {"train_sft": chat_rows(10, seed=1), "test_sft": chat_rows(3, seed=2)})
    data = DataConfig(source="chat", dataset=str(tmp_path / "uc"), split="train_sft", eval_split="test_sft")
    convs = list(chat(data, "train", seed=0)(0))
    assert len(convs) == 10 and convs == [r["messages"] for r in chat_rows(10, seed=1)]
    assert len(list(chat(data, "eval", seed=0)(0))) == 3
    with pytest.raises(AbotError, match="no field 'conversation'.*prompt, prompt_id, messages"):
        chat(data, "train", seed=0, messages_field="conversation")

    write_dataset(tmp_path / "uf", {"train_prefs": preference_rows(6, seed=3)})
    data = DataConfig(source="preferences", dataset=str(tmp_path / "uf"), split="train_prefs", eval_fraction=0.5)
    train, held = list(preferences(data, "train", seed=0)(0)), list(preferences(data, "eval", seed=0)(0))
    assert len(train) + len(held) == 6 and train and held
    assert train[0]["chosen"][0] == train[0]["rejected"][0] and train[0]["chosen"][1]["role"] == "assistant"


def test_preferences_from_plain_strings_with_a_prompt_field(tmp_path):
    rows = [{"question": "q?", "good": "yes", "bad": "no"}]
    (tmp_path / "p.jsonl").write_text(json.dumps(rows[0]) + "\n")
    data = DataConfig(dataset="json", data_files=str(tmp_path / "p.jsonl"), eval_fraction=0.0)
    pair = next(iter(preferences(data, "train", seed=0, chosen_field="good", rejected_field="bad",
                                 prompt_field="question")(0)))
    assert pair == {"chosen": [msg("user", "q?"), msg("assistant", "yes")],
                    "rejected": [msg("user", "q?"), msg("assistant", "no")]}


# --- streams and reports -----------------------------------------------------------------------------------

def test_stream_batches_resume_and_report():
    convs = [[msg("user", f"q{i}"), msg("assistant", f"a{i}")] for i in range(10)] + [[msg("user", "lonely")]]
    examples = lambda epoch: list(convs)  # noqa: E731
    encode = lambda c: encode_conversation(c, TOK, 16)  # noqa: E731
    stream = ExampleStream(examples, encode, (2, 2), shuffle_buffer=4, seed=1)
    first = [next(stream) for _ in range(3)]
    assert first[0]["tokens"].shape == (2, 2, 17) and first[0]["mask"].shape == (2, 2, 16)
    state = stream.state()
    after = next(stream)
    stream.close()
    resumed = ExampleStream(examples, encode, (2, 2), shuffle_buffer=4, seed=1, state=state)
    np.testing.assert_array_equal(next(resumed)["tokens"], after["tokens"])
    resumed.close()
    report = stream.stats.report()
    assert report["complete"]  # the last complete pass (the producer may have run on into the next)
    assert report["examples"] == 11 and report["used"] == 10 and report["dropped"] == {"no_assistant_turn": 1}
    assert report["left_over"] == 2  # 10 usable examples fill two batches of 4; two are left over
    assert "11 examples: 10 used (0 truncated), 1 dropped (no_assistant_turn 1)" == describe(report)


def test_data_that_cannot_fill_a_batch_says_why():
    examples = lambda epoch: [[msg("user", "q")], [msg("user", "q"), msg("assistant", "")]]  # noqa: E731
    stream = ExampleStream(examples, lambda c: encode_conversation(c, TOK, 16), (1, 1))
    with pytest.raises(AbotError, match="2 dropped \\(empty_message 1, no_assistant_turn 1\\)"):
        next(stream)
    with pytest.raises(AbotError, match="eval data cannot fill one micro-batch"):
        example_eval_batches(examples, lambda c: encode_conversation(c, TOK, 16), 1, 4)


# --- stage checks ---------------------------------------------------------------------------------------------

def cfg(**sections):
    raw = {"model": {"vocab_size": 300, "n_layers": 1, "d_model": 16, "n_heads": 2, "max_seq_len": 64},
           "data": {"source": "chat", "seq_len": 32}, "train": {}}
    for name, values in sections.items():
        raw[name].update(values)
    return config_from_dict(raw)


def test_stage_checks_fail_early_with_the_fix(tmp_path):
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"x")
    with pytest.raises(AbotError, match="gives text, but `abot sft` trains on conversations.*chat"):
        check_stage("sft", cfg(data={"source": "huggingface"}, train={"tokenizer_path": str(tok)}))
    with pytest.raises(AbotError, match="gives conversations, but `abot dpo` trains on preferences"):
        check_stage("dpo", cfg(train={"tokenizer_path": str(tok), "init_from": "x"}))
    with pytest.raises(AbotError, match="gives conversations, but `abot train` trains on text.*`abot sft`"):
        check_stage("pretrain", cfg())
    check_stage("pretrain", cfg(data={"source": "stdlib_docs"}))
    with pytest.raises(AbotError, match="abot dpo needs train.init_from"):
        check_stage("dpo", cfg(data={"source": "preferences"}, train={"tokenizer_path": str(tok)}))
    with pytest.raises(AbotError, match=r"reference model of train.loss 'ipo'.*losses \(orpo, simpo\) need none"):
        check_stage("dpo", cfg(data={"source": "preferences"}, train={"tokenizer_path": str(tok), "loss": "ipo"}))
    for free in ("orpo", "simpo"):  # reference-free: no init_from needed, and allowed as the starting weights
        check_stage("dpo", cfg(data={"source": "preferences"}, train={"tokenizer_path": str(tok), "loss": free}))
        check_stage("dpo", cfg(data={"source": "preferences"},
                               train={"tokenizer_path": str(tok), "loss": free, "init_from": "x"}))
    with pytest.raises(AbotError, match="data.overlong: 'cut'"):
        check_stage("sft", cfg(data={"overlong": "cut"}, train={"tokenizer_path": str(tok)}))
    with pytest.raises(AbotError, match="tokenizer_path.*not found"):
        check_stage("sft", cfg(train={"tokenizer_path": str(tmp_path / "missing.model")}))
    check_stage("sft", cfg(train={"tokenizer_path": str(tok)}))


def test_stage_loss_lookup_and_options():
    assert stage_loss(cfg(), "sft") is registry.losses.get("sft")
    assert stage_loss(cfg(), "pretrain") is registry.losses.get("next_token")
    dpo = stage_loss(cfg(train={"loss_args": {"beta": 0.5}}), "dpo")
    assert dpo.func is registry.losses.get("dpo") and dpo.keywords == {"beta": 0.5}
    assert stage_loss(cfg(train={"loss": "ipo"}), "dpo").__name__ == "ipo"
    with pytest.raises(AbotError, match="'sft' trains on conversations, but `abot dpo`.*one of: dpo, ipo"):
        stage_loss(cfg(train={"loss": "sft"}), "dpo")
    with pytest.raises(AbotError, match="has no option 'beat'; it accepts: beta"):
        stage_loss(cfg(train={"loss_args": {"beat": 0.1}}), "dpo")
    with pytest.raises(AbotError, match="beta must be a positive number"):
        stage_loss(cfg(train={"loss_args": {"beta": 0}}), "dpo")
    with pytest.raises(AbotError, match="unknown loss 'dpoo' \\(train.loss\\); did you mean 'dpo'"):
        stage_loss(cfg(train={"loss": "dpoo"}), "dpo")



def test_reference_free_losses_options_and_errors():
    simpo = stage_loss(cfg(train={"loss": "simpo", "loss_args": {"beta": 2.5, "gamma": 1.25}}), "dpo")
    assert simpo.func is registry.losses.get("simpo") and simpo.keywords == {"beta": 2.5, "gamma": 1.25}
    assert stage_loss(cfg(train={"loss": "orpo"}), "dpo") is registry.losses.get("orpo")
    with pytest.raises(AbotError, match="loss 'orpo' has no option 'gamma'; it accepts: beta"):
        stage_loss(cfg(train={"loss": "orpo", "loss_args": {"gamma": 1.0}}), "dpo")
    with pytest.raises(AbotError, match="loss 'simpo' has no option 'lam'; it accepts: beta, gamma"):
        stage_loss(cfg(train={"loss": "simpo", "loss_args": {"lam": 1.0}}), "dpo")
    with pytest.raises(AbotError, match=r"train.loss_args.gamma must be a number >= 0, got -0.5"):
        stage_loss(cfg(train={"loss": "simpo", "loss_args": {"gamma": -0.5}}), "dpo")
    with pytest.raises(AbotError, match=r"train.loss_args.beta must be a positive number, got 'big'"):
        stage_loss(cfg(train={"loss": "orpo", "loss_args": {"beta": "big"}}), "dpo")
    with pytest.raises(AbotError, match=r"train.loss_args.beta must be a positive number, got True"):
        stage_loss(cfg(train={"loss": "simpo", "loss_args": {"beta": True}}), "dpo")
    with pytest.raises(AbotError, match="'simpo' trains on preferences, but `abot sft`"):
        stage_loss(cfg(train={"loss": "simpo"}), "sft")


class FakeTokenizer(NamedTuple):
    path: str
    sha256: str


def test_init_from_checks_the_model_section_the_tokenizer_and_the_shapes(tmp_path):
    import mlx.core as mx

    from abot.build import build_model
    from abot.checkpoint import save_checkpoint
    from abot.restore import load_init_params

    pre = cfg()
    params = build_model(pre).init(mx.random.key(0))
    meta = {"config": pre.to_dict(), "tokenizer_sha256": "abc"}
    save_checkpoint(tmp_path / "run" / "step_00000010.ckpt", {"state": {"params": params}}, 10, meta)
    (tmp_path / "run" / "latest").write_text("step_00000010.ckpt\n")
    tok = FakeTokenizer("tok.model", "abc")

    ok = cfg(model={"dropout": 0.3}, train={"init_from": str(tmp_path / "run")})  # a folder: its newest checkpoint
    loaded, path = load_init_params(ok, tok, build_model(ok))
    assert path.name == "step_00000010.ckpt"
    assert all(mx.array_equal(a, b) for a, b in zip(loaded["blocks"][0].values(), params["blocks"][0].values()))

    wider = cfg(model={"d_model": 32}, train={"init_from": str(path)})
    with pytest.raises(AbotError, match=r"model section does not match the checkpoint's \(model.d_model: "
                                        r"checkpoint 16, config 32\)"):
        load_init_params(wider, tok, build_model(wider))
    with pytest.raises(AbotError, match="different tokenizer"):
        load_init_params(ok, FakeTokenizer("other.model", "def"), build_model(ok))
    # A checkpoint without a config in its meta still gets its parameter shapes checked.
    save_checkpoint(tmp_path / "bare.ckpt", {"state": {"params": params}}, 1, {})
    bare = cfg(model={"n_layers": 2}, train={"init_from": str(tmp_path / "bare.ckpt")})
    with pytest.raises(AbotError, match="parameters do not fit the configured model.*blocks.1"):
        load_init_params(bare, tok, build_model(bare))
    (tmp_path / "empty").mkdir()
    empty = cfg(train={"init_from": str(tmp_path / "empty")})
    with pytest.raises(AbotError, match="no loadable checkpoint"):
        load_init_params(empty, tok, build_model(empty))
