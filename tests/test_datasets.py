"""The guide's datasets through the Hub code path, on small local copies laid out like the real repositories.

`datasets.load_dataset` is redirected from the Hub name to a local folder that mirrors the real repository:
the same file formats (json.gz, parquet, jsonl.zst), file layout, columns, and the dataset card's `configs`
(README.md YAML), so the config name, split names and fields abot passes are checked by `datasets` itself.
Nothing touches the network.
"""

import abot  # noqa: F401  (first: it sets up BLAS before anything imports mlx.core)

import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from abot.config import DataConfig, load_config
from abot.data.known import KNOWN_DATASETS, known_dataset, with_known_defaults
from abot.data.sources import huggingface, huggingface_rows
from abot.errors import AbotError

GUIDE = Path(__file__).resolve().parents[1] / "configs" / "guide"


@pytest.fixture
def hub(monkeypatch):
    """Hub name -> local copy, for datasets.load_dataset; records every call's (name, args, kwargs)."""
    import datasets

    real = datasets.load_dataset
    state = SimpleNamespace(copies={}, calls=[])

    def load_dataset(name, *args, **kwargs):
        state.calls.append((name, args, kwargs))
        return real(str(state.copies.get(name, name)), *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return state


def card(folder: Path, configs: str) -> None:
    (folder / "README.md").write_text(f"---\nconfigs:\n{configs}---\n# local copy\n")


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# --- local copies --------------------------------------------------------------------------------------------

def c4_copy(root: Path) -> Path:
    """allenai/c4: en/c4-{split}.NNNNN-of-MMMMM.json.gz, fields text/timestamp/url, config `en`."""
    folder = root / "c4"
    (folder / "en").mkdir(parents=True)
    for split, n_files in [("train", 2), ("validation", 1)]:
        for k in range(n_files):
            rows = [{"text": f"c4 {split} file {k} doc {i}.", "timestamp": "2019-04-25T12:57:54Z",
                     "url": f"https://example.com/{split}/{k}/{i}"} for i in range(40)]
            with gzip.open(folder / "en" / f"c4-{split}.{k:05d}-of-{n_files:05d}.json.gz", "wb") as f:
                f.write(jsonl(rows))
    card(folder, "- config_name: en\n  data_files:\n  - split: train\n    path: en/c4-train.*.json.gz\n"
                 "  - split: validation\n    path: en/c4-validation.*.json.gz\n")
    return folder


def fineweb_rows(n, dump="CC-MAIN-2024-10"):
    return [{"text": f"fineweb {dump} doc {i}.", "id": f"<urn:uuid:{i:08d}>", "dump": dump,
             "url": f"https://example.org/{i}", "date": "2024-02-21T12:00:00Z",
             "file_path": f"s3://commoncrawl/crawl-data/{dump}/{i}.warc.gz", "language": "en",
             "language_score": round(0.5 + (i % 10) / 20, 3), "token_count": 10 + i} for i in range(n)]


def fineweb_copy(root: Path) -> Path:
    """HuggingFaceFW/fineweb: data/<dump>/000_00000.parquet; configs default (all dumps) and one per dump."""
    folder = root / "fineweb"
    for dump in ("CC-MAIN-2024-10", "CC-MAIN-2013-20"):
        write_parquet(folder / "data" / dump / "000_00000.parquet", fineweb_rows(30, dump))
    card(folder, "- config_name: default\n  data_files:\n  - split: train\n    path: data/*/*\n"
                 "- config_name: CC-MAIN-2024-10\n  data_files:\n  - split: train\n    path: data/CC-MAIN-2024-10/*\n")
    return folder


def ultra_fineweb_copy(root: Path) -> Path:
    """openbmb/Ultra-FineWeb: text in `content`; splits en and zh (no `train`)."""
    folder = root / "ultra-fineweb"
    for lang in ("en", "zh"):
        write_parquet(folder / "data" / f"ultrafineweb_{lang}" / f"ultrafineweb-{lang}-part-0000.parquet",
                      [{"content": f"ultra {lang} doc {i}."} for i in range(20)])
    card(folder, "- config_name: default\n  data_files:\n  - split: en\n    path: data/ultrafineweb_en/*\n"
                 "  - split: zh\n    path: data/ultrafineweb_zh/*\n")
    return folder


def pile_copy(root: Path) -> Path:
    """NeelNanda/pile-uncopyrighted: train/NN.jsonl.zst, fields text and meta.pile_set_name."""
    import zstandard

    folder = root / "pile"
    (folder / "train").mkdir(parents=True)
    sets = ["Pile-CC", "PubMed Central", "ArXiv", "Github"]
    for k in range(2):
        rows = [{"text": f"pile file {k} doc {i}.", "meta": {"pile_set_name": sets[i % 4]}} for i in range(20)]
        (folder / "train" / f"{k:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl(rows)))
    return folder


def chat(i, reply="Sure."):
    return [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"{reply} {i}"}]


def ultrachat_copy(root: Path) -> Path:
    """HuggingFaceH4/ultrachat_200k: data/{split}-00000-of-00001.parquet, splits train_sft/test_sft/..."""
    folder = root / "ultrachat"
    for split, n in [("train_sft", 12), ("test_sft", 4), ("train_gen", 4), ("test_gen", 2)]:
        write_parquet(folder / "data" / f"{split}-00000-of-00001.parquet",
                      [{"prompt": f"question {i}?", "prompt_id": f"{split}{i:04x}", "messages": chat(i)}
                       for i in range(n)])
    card(folder, "- config_name: default\n  data_files:\n"
         + "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in ("train_sft", "test_sft", "train_gen", "test_gen")))
    return folder


def ultrafeedback_copy(root: Path) -> Path:
    """HuggingFaceH4/ultrafeedback_binarized: splits train_prefs/test_prefs/...; chosen and rejected chats."""
    folder = root / "ultrafeedback"
    for split, n in [("train_prefs", 10), ("test_prefs", 3)]:
        write_parquet(folder / "data" / f"{split}-00000-of-00001.parquet",
                      [{"prompt": f"question {i}?", "prompt_id": f"{i:04x}", "chosen": chat(i, "Good"),
                        "rejected": chat(i, "Bad"), "messages": chat(i, "Good"), "score_chosen": 8.0,
                        "score_rejected": 3.5} for i in range(n)])
    card(folder, "- config_name: default\n  data_files:\n"
         + "".join(f"  - split: {s}\n    path: data/{s}-*\n" for s in ("train_prefs", "test_prefs")))
    return folder


# --- the table -----------------------------------------------------------------------------------------------

def test_known_defaults_fill_only_keys_left_at_abot_defaults():
    c4 = with_known_defaults(DataConfig(dataset="allenai/c4"))
    assert c4.config == "en" and c4.split == "train" and c4.text_field == "text"
    assert with_known_defaults(DataConfig(dataset="allenai/c4", config="realnewslike")).config == "realnewslike"
    ufw = with_known_defaults(DataConfig(dataset="openbmb/ultra-fineweb"))  # Hub ids are case-insensitive
    assert (ufw.split, ufw.text_field) == ("en", "content")
    explicit = with_known_defaults(DataConfig(dataset="openbmb/Ultra-FineWeb", split="zh", text_field="x"))
    assert (explicit.split, explicit.text_field) == ("zh", "x")
    plain = DataConfig(dataset="json", data_files="x.jsonl")
    assert with_known_defaults(plain) is plain
    assert known_dataset("EliMC/Ultra-FineWeb").text_field == "content"
    assert {"allenai/c4", "EliMC/Ultra-FineWeb", "openbmb/Ultra-FineWeb", "NeelNanda/pile-uncopyrighted",
            "HuggingFaceFW/fineweb", "HuggingFaceH4/ultrachat_200k", "HuggingFaceH4/ultrafeedback_binarized",
            "OpenAssistant/oasst1"} <= set(KNOWN_DATASETS)


# --- pre-training datasets -----------------------------------------------------------------------------------

def test_c4_gets_config_en_and_its_validation_split(hub, tmp_path):
    hub.copies["allenai/c4"] = c4_copy(tmp_path)
    train = huggingface(DataConfig(dataset="allenai/c4", eval_split="validation"), "train", 0)
    docs = list(train(0))
    assert len(docs) == 80 and docs[0] == "c4 train file 0 doc 0." and docs[-1] == "c4 train file 1 doc 39."
    assert hub.calls[-1][1] == ("en",) and hub.calls[-1][2]["split"] == "train"
    evaluation = huggingface(DataConfig(dataset="allenai/c4", eval_split="validation"), "eval", 0)
    assert list(evaluation(0))[:2] == ["c4 validation file 0 doc 0.", "c4 validation file 0 doc 1."]
    carved = huggingface(DataConfig(dataset="allenai/c4", eval_fraction=0.1), "eval", 0)  # no eval_split: carve
    assert 0 < len(list(carved(0))) < 30 and not set(carved(0)) & set(huggingface(
        DataConfig(dataset="allenai/c4", eval_fraction=0.1), "train", 0)(0))


def test_guide_yamls_work_unchanged(hub, tmp_path):
    hub.copies["allenai/c4"] = c4_copy(tmp_path)
    elimc = tmp_path / "elimc"  # EliMC/Ultra-FineWeb: the guide gives only its text field, `content`
    write_parquet(elimc / "data" / "train-00000-of-00001.parquet", [{"content": f"elimc doc {i}."} for i in range(9)])
    hub.copies["EliMC/Ultra-FineWeb"] = elimc
    cfg = load_config(GUIDE / "minimal_test_run.yaml")  # dataset allenai/c4, config en
    assert next(iter(huggingface(cfg.data, "train", 0)(0))).startswith("c4 train")
    cfg = load_config(GUIDE / "full_pretraining.yaml")  # EliMC/Ultra-FineWeb, text_field content
    assert next(iter(huggingface(cfg.data, "train", 0)(0))) == "elimc doc 0."
    cfg = load_config(GUIDE / "full_pretraining.yaml", ["data.text_field=text"])  # the default: content is filled
    assert next(iter(huggingface(cfg.data, "train", 0)(0))) == "elimc doc 0."


def test_ultra_fineweb_content_field_and_en_zh_splits(hub, tmp_path):
    hub.copies["openbmb/Ultra-FineWeb"] = ultra_fineweb_copy(tmp_path)
    en = list(huggingface(DataConfig(dataset="openbmb/Ultra-FineWeb", eval_fraction=0.0), "train", 0)(0))
    assert en == [f"ultra en doc {i}." for i in range(20)]
    zh = huggingface(DataConfig(dataset="openbmb/Ultra-FineWeb", split="en", eval_split="zh"), "eval", 0)
    assert next(iter(zh(0))) == "ultra zh doc 0."
    with pytest.raises(AbotError, match="data.split"):  # an explicit value wins, even a wrong one
        huggingface(DataConfig(dataset="openbmb/Ultra-FineWeb", split="validation"), "train", 0)


def test_fineweb_parquet_columns_config_and_min_score(hub, tmp_path):
    hub.copies["HuggingFaceFW/fineweb"] = fineweb_copy(tmp_path)
    everything = list(huggingface(DataConfig(dataset="HuggingFaceFW/fineweb", eval_fraction=0.0), "train", 0)(0))
    assert len(everything) == 60
    dump = DataConfig(dataset="HuggingFaceFW/fineweb", config="CC-MAIN-2024-10", eval_fraction=0.0)
    assert list(huggingface(dump, "train", 0)(0)) == [r["text"] for r in fineweb_rows(30)]
    good = huggingface(dump, "train", 0, min_score={"field": "language_score", "value": 0.8})
    expected = [r["text"] for r in fineweb_rows(30) if r["language_score"] >= 0.8]
    assert list(good(0)) == expected and 0 < len(expected) < 30
    with pytest.raises(AbotError, match="language_scor.*token_count"):  # names the fields there are
        huggingface(dump, "train", 0, min_score={"field": "language_scor", "value": 0.8})
    with pytest.raises(AbotError, match="not numbers"):
        huggingface(dump, "train", 0, min_score={"field": "url", "value": 0.8})
    with pytest.raises(AbotError, match="field: NAME"):
        huggingface(dump, "train", 0, min_score={"field": "language_score"})
    with pytest.raises(AbotError, match="no row has"):
        huggingface(dump, "train", 0, min_score={"field": "language_score", "value": 2})


def test_pile_jsonl_zst_and_nested_field(hub, tmp_path):
    hub.copies["NeelNanda/pile-uncopyrighted"] = pile_copy(tmp_path)
    data = DataConfig(dataset="NeelNanda/pile-uncopyrighted", eval_fraction=0.0)
    docs = list(huggingface(data, "train", 0)(0))
    assert len(docs) == 40 and docs[0] == "pile file 0 doc 0."
    nested = DataConfig(dataset="NeelNanda/pile-uncopyrighted", eval_fraction=0.0, text_field="meta.pile_set_name")
    assert list(huggingface(nested, "train", 0)(0))[:4] == ["Pile-CC", "PubMed Central", "ArXiv", "Github"]


# --- fine-tuning and preference rows load through the same path ----------------------------------------------

def test_ultrachat_messages_rows(hub, tmp_path):
    hub.copies["HuggingFaceH4/ultrachat_200k"] = ultrachat_copy(tmp_path)
    data = DataConfig(dataset="HuggingFaceH4/ultrachat_200k", eval_split="test_sft")
    rows = list(huggingface_rows(data, "train", 0)(0))  # split train_sft: the known default
    assert len(rows) == 12 and rows[0]["messages"] == chat(0)
    assert [r["prompt_id"] for r in huggingface_rows(data, "eval", 0)(0)][0] == "test_sft0000"
    assert next(iter(huggingface(DataConfig(dataset="HuggingFaceH4/ultrachat_200k", text_field="prompt",
                                            eval_fraction=0.0), "train", 0)(0))) == "question 0?"
    with pytest.raises(AbotError, match="list values, not text"):
        huggingface(DataConfig(dataset="HuggingFaceH4/ultrachat_200k", text_field="messages"), "train", 0)


def test_ultrafeedback_chosen_rejected_rows(hub, tmp_path):
    hub.copies["HuggingFaceH4/ultrafeedback_binarized"] = ultrafeedback_copy(tmp_path)
    data = DataConfig(dataset="HuggingFaceH4/ultrafeedback_binarized", eval_split="test_prefs")
    rows = list(huggingface_rows(data, "train", 0)(0))
    assert len(rows) == 10 and rows[3]["chosen"] == chat(3, "Good") and rows[3]["rejected"] == chat(3, "Bad")
    assert len(list(huggingface_rows(data, "eval", 0)(0))) == 3
    with pytest.raises(AbotError, match="no row has score_chosen >= 9"):
        huggingface_rows(data, "train", 0, min_score={"field": "score_chosen", "value": 9})
