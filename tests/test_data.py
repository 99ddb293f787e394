import abot  # noqa: F401  (first: it sets up BLAS before anything imports mlx.core)

import gc
import json
import socket
import time

import numpy as np
import pytest

from abot.config import DataConfig
from abot import hub
from abot.data import corpus
from abot.data.pipeline import BatchStream, buffer_shuffle, eval_batches, token_windows
from abot.data.sources import huggingface, stdlib_docs
from abot.errors import AbotError
from abot.tokenizer import load_tokenizer, train_tokenizer


# --- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    """The stdlib corpus built once into a private cache folder (not the user's ~/.cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg")))
        files = corpus.stdlib_docs_files()
        yield files


@pytest.fixture(scope="module")
def tok(corpus_files, tmp_path_factory):
    docs = read_texts(corpus_files["validation"])
    return load_tokenizer(train_tokenizer(docs, 500, tmp_path_factory.mktemp("tok") / "tok.model"))


class CharTokenizer:
    """A fake tokenizer: one id per character (its code point), EOS = 0, so windows can be checked by hand."""

    eos_id = 0

    def encode_batch(self, texts, num_threads=1):
        return [[ord(c) for c in t] for t in texts]


def synthetic_docs(n_docs=120, seed=0):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    docs = [" ".join(rng.choice(words, size=rng.integers(3, 30))) for _ in range(n_docs)]
    return lambda epoch: iter(docs)


def read_texts(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def c4_rows(n, start=0):
    return [{"text": f"Document number {i}. Some web text here.", "timestamp": "2019-04-25T12:57:54Z",
             "url": f"https://example.com/{i}"} for i in range(start, start + n)]


# --- corpus ------------------------------------------------------------------------------------------------

def test_corpus_splits_nonempty_disjoint_and_cached(corpus_files):
    texts = {s: read_texts(p) for s, p in corpus_files.items()}
    assert len(texts["train"]) > 300 and 5 <= len(texts["validation"]) < len(texts["train"]) // 5
    assert not set(texts["train"]) & set(texts["validation"])
    assert all(t.strip() for split in texts.values() for t in split)
    assert corpus_files["train"].parent.name.startswith("stdlib-docs-py")
    mtime = corpus_files["train"].stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(corpus_files["train"].parents[3]))
        assert corpus.stdlib_docs_files() == corpus_files
    assert corpus_files["train"].stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_modules_skip_tests_and_site_packages():
    mods = [p.as_posix() for p in corpus.stdlib_modules()]
    assert "json/decoder.py" in mods and mods == sorted(mods)
    assert not [m for m in mods if set(m.split("/")[:-1]) & {"test", "tests", "idle_test", "site-packages"}]


def test_module_document_order():
    source = '''"""Module doc."""
def f():
    """F doc."""
class C:
    """C doc."""
    def m(self):
        """M doc."""
    def undocumented(self):
        pass
async def g():
    """G doc."""
'''
    assert corpus.module_document(source) == "Module doc.\n\nF doc.\n\nC doc.\n\nM doc.\n\nG doc."
    assert corpus.module_document("x = 1") == ""


def test_validation_membership_is_deterministic():
    paths = [f"pkg/mod{i}.py" for i in range(2000)]
    held = [p for p in paths if corpus.in_validation(p)]
    assert held == [p for p in paths if corpus.in_validation(p)]
    assert 0.03 < len(held) / len(paths) < 0.07


# --- sources -----------------------------------------------------------------------------------------------

def test_stdlib_docs_source(corpus_files):
    train = stdlib_docs(DataConfig(source="stdlib_docs"), "train", seed=0)
    evaluation = stdlib_docs(DataConfig(source="stdlib_docs"), "eval", seed=0)
    epoch0, epoch1 = list(train(0)), list(train(1))
    assert epoch0 == list(train(0))  # deterministic per (seed, epoch)
    assert epoch0 != epoch1 and sorted(epoch0) == sorted(epoch1)  # reshuffled per epoch
    assert list(stdlib_docs(DataConfig(), "train", seed=1)(0)) != epoch0
    file_order = read_texts(corpus_files["validation"])
    assert list(evaluation(0)) == list(evaluation(3)) == file_order  # eval is never shuffled
    assert not set(epoch0) & set(file_order)


def test_huggingface_local_jsonl_c4_schema_carves_eval(tmp_path):
    write_jsonl(tmp_path / "c4-train.00000-of-00002.json", c4_rows(100))
    write_jsonl(tmp_path / "c4-train.00001-of-00002.json", c4_rows(100, start=100))
    data = DataConfig(dataset="json", data_files=str(tmp_path / "c4-train.*.json"), eval_fraction=0.1)
    train, evaluation = huggingface(data, "train", 0), huggingface(data, "eval", 0)
    train_docs, eval_docs = list(train(0)), list(evaluation(0))
    assert not set(train_docs) & set(eval_docs)
    assert len(train_docs) + len(eval_docs) == 200 and 5 <= len(eval_docs) <= 40
    assert list(train(1)) == train_docs and list(evaluation(1)) == eval_docs


def test_huggingface_doc_shuffle_keeps_the_carve(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", c4_rows(200))
    data = DataConfig(dataset="json", data_files=str(tmp_path / "a.jsonl"), eval_fraction=0.1)
    plain = list(huggingface(data, "train", 0)(0))
    shuffled = huggingface(data, "train", 0, doc_shuffle_buffer=50)
    assert shuffled(0) is not None and list(shuffled(0)) == list(shuffled(0)) != plain
    assert sorted(shuffled(0)) == sorted(plain) and list(shuffled(1)) != list(shuffled(0))


def test_huggingface_eval_split_from_data_files(tmp_path):
    files = {"train": str(write_jsonl(tmp_path / "train.jsonl", c4_rows(30))),
             "validation": str(write_jsonl(tmp_path / "valid.jsonl", c4_rows(5, start=30)))}
    data = DataConfig(dataset="json", data_files=files, eval_split="validation")
    assert len(list(huggingface(data, "train", 0)(0))) == 30
    assert list(huggingface(data, "eval", 0)(0)) == [r["text"] for r in c4_rows(5, start=30)]


def test_huggingface_local_parquet_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "my-dataset"
    (folder / "data").mkdir(parents=True)
    for split, rows in [("train", c4_rows(20)), ("validation", c4_rows(4, start=20))]:
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{split}-00000-of-00001.parquet")
    data = DataConfig(dataset=str(folder), eval_split="validation")
    assert list(huggingface(data, "train", 0)(0)) == [r["text"] for r in c4_rows(20)]
    assert len(list(huggingface(data, "eval", 0)(0))) == 4


def test_huggingface_nested_text_field(tmp_path):
    rows = [{"id": i, "meta": {"x": f"nested text {i}", "y": i}} for i in range(10)]
    data = DataConfig(dataset="json", data_files=str(write_jsonl(tmp_path / "n.jsonl", rows)),
                      text_field="meta.x", eval_fraction=0.0)
    assert list(huggingface(data, "train", 0)(0)) == [f"nested text {i}" for i in range(10)]


def test_missing_text_field_lists_fields(tmp_path):
    data = DataConfig(dataset="json", data_files=str(write_jsonl(tmp_path / "c4.jsonl", c4_rows(3))),
                      text_field="content")
    with pytest.raises(AbotError, match="content") as info:
        huggingface(data, "train", 0)
    assert "text, timestamp, url" in str(info.value)


def test_no_files_and_bad_paths(tmp_path):
    with pytest.raises(AbotError, match="data.data_files"):
        huggingface(DataConfig(dataset="json", data_files=str(tmp_path / "none-*.jsonl")), "train", 0)
    with pytest.raises(AbotError, match="not found"):
        huggingface(DataConfig(dataset="./no/such/folder"), "train", 0)
    with pytest.raises(AbotError, match="eval_fraction"):
        huggingface(DataConfig(dataset="json", data_files="x", eval_fraction=0.0), "eval", 0)


def test_hub_name_offline_fails_fast():
    start = time.perf_counter()
    with pytest.raises(AbotError) as info:
        huggingface(DataConfig(dataset="allenai/c4", config="en"), "train", 0)
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "Hub cannot be reached" in message and "data.data_files" in message and "allenai/c4" in message


def test_hub_probe_when_not_flagged_offline(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens there: refused at once
    start = time.perf_counter()
    with pytest.raises(AbotError, match="Hub cannot be reached"):
        huggingface(DataConfig(dataset="allenai/c4"), "train", 0)
    assert time.perf_counter() - start < 1.0


def test_hub_probe_does_not_hang_on_slow_name_resolution(monkeypatch):
    def stuck_resolver(*args, **kwargs):
        time.sleep(5)
        raise OSError("name resolution timed out")

    monkeypatch.setattr(socket, "create_connection", stuck_resolver)
    start = time.perf_counter()
    assert "no answer" in hub.probe("huggingface.co", 443, timeout=0.2)
    assert time.perf_counter() - start < 1.0


# --- pipeline ----------------------------------------------------------------------------------------------

def test_windows_by_hand():
    docs = ["ab", "cde", "", "f"]  # -> a b EOS c d e EOS f EOS (the empty document adds nothing)
    a, b, c, d, e, f = map(ord, "abcdef")
    expected = [[a, b, 0], [c, d, e], [0, f, 0]]
    for per_chunk in (1, 2, 64):  # windows continue across tokenization chunks
        assert [w.tolist() for w in token_windows(docs, CharTokenizer(), 3, docs_per_chunk=per_chunk)] == expected
    stream = BatchStream(lambda epoch: docs, CharTokenizer(), seq_len=2, batch_shape=(1, 1))
    got = [next(stream) for _ in range(4)]
    assert [g.tolist() for g in got] == [[[w]] for w in expected] + [[[expected[0]]]]  # then epoch 1 starts
    assert stream.state() == {"epoch": 1, "batches": 1}
    stream = BatchStream(lambda epoch: docs, CharTokenizer(), seq_len=3, batch_shape=(1, 2))  # 9 tokens: 2 windows
    assert next(stream).tolist() == [[[a, b, 0, c], [d, e, 0, f]]]


def test_batch_shapes_real_tokenizer(corpus_files, tok):
    docs = stdlib_docs(DataConfig(), "train", seed=0)
    with BatchStream(docs, tok, seq_len=32, batch_shape=(2, 3), shuffle_buffer=50, num_workers=2) as stream:
        batches = [next(stream) for _ in range(3)]
    for batch in batches:
        assert batch.shape == (2, 3, 33) and batch.dtype == np.int32
        assert 0 <= batch.min() and batch.max() < tok.vocab_size
    assert (batches[0] == tok.eos_id).any() or (np.concatenate(batches) == tok.eos_id).any()


def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_same_seed_same_batches_other_seed_different():
    def make(seed):
        return BatchStream(synthetic_docs(), CharTokenizer(), seq_len=16, batch_shape=(2, 2), shuffle_buffer=64,
                           seed=seed)

    first, again, other = take(make(0), 12), take(make(0), 12), take(make(1), 12)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))


def test_shuffle_is_a_permutation_within_an_epoch():
    items = list(range(100))
    shuffled = list(buffer_shuffle(items, 10, np.random.default_rng(0)))
    assert sorted(shuffled) == items and shuffled != items
    assert list(buffer_shuffle(items, 0, np.random.default_rng(0))) == items


@pytest.mark.parametrize("consumed", [0, 7, 23])
def test_restore_state_gives_identical_next_batches(consumed):
    def make(state=None):
        # ~9 batches per epoch, so 10 batches after the restore point cross epoch boundaries.
        return BatchStream(synthetic_docs(20), CharTokenizer(), seq_len=32, batch_shape=(2, 3), shuffle_buffer=20,
                           seed=3, state=state)

    stream = make()
    take(stream, consumed)
    state = json.loads(json.dumps(stream.state()))  # it must survive serialisation
    expected = take(stream, 10)
    assert stream.state()["epoch"] >= 1  # crossed at least one epoch boundary
    restored = take(make(state), 10)
    assert all(np.array_equal(x, y) for x, y in zip(expected, restored))


def test_too_small_data_raises_instead_of_hanging():
    stream = BatchStream(lambda e: ["just a few characters"], CharTokenizer(), seq_len=16, batch_shape=(2, 2))
    with pytest.raises(AbotError, match="cannot fill a single batch"):
        next(stream)
    with pytest.raises(AbotError):  # and again, not a hang
        next(stream)
    empty = BatchStream(lambda e: ["", ""], CharTokenizer(), seq_len=4, batch_shape=(1, 1))
    with pytest.raises(AbotError, match="0 windows"):
        next(empty)


def test_producer_errors_surface_and_thread_is_daemon():
    def docs(epoch):
        if epoch == 1:
            raise ValueError("source broke in epoch 1")
        return ["x" * 40]

    stream = BatchStream(docs, CharTokenizer(), seq_len=9, batch_shape=(1, 1))
    assert len(take(stream, 4)) == 4  # epoch 0: 41 tokens -> 4 windows of 10
    assert stream._thread.daemon
    with pytest.raises(ValueError, match="epoch 1"):
        next(stream)


def test_resume_past_the_end_of_an_epoch_is_an_error():
    stream = BatchStream(synthetic_docs(10), CharTokenizer(), seq_len=8, batch_shape=(1, 1),
                         state={"epoch": 0, "batches": 10**6})
    with pytest.raises(AbotError, match="changed since the checkpoint"):
        next(stream)
    with pytest.raises(AbotError, match="epoch"):
        BatchStream(synthetic_docs(), CharTokenizer(), 8, (1, 1), state={"step": 3})


class SlowTokenizer(CharTokenizer):
    """Each encode takes 0.2 s: the producer thread is inside it whenever the consumer looks."""

    def encode_batch(self, texts, num_threads=1):
        time.sleep(0.2)
        return super().encode_batch(texts, num_threads)


def test_close_stops_and_joins_the_producer():
    """close() returns once the thread is gone, even from inside an encode: a daemon thread left in native code
    (SentencePiece) when the interpreter exits aborts the process."""
    stream = BatchStream(synthetic_docs(), SlowTokenizer(), seq_len=8, batch_shape=(1, 1), prefetch=1)
    next(stream)
    stream.close()
    assert not stream._thread.is_alive()


def test_abandoned_stream_ends_its_thread():
    stream = BatchStream(synthetic_docs(), CharTokenizer(), seq_len=8, batch_shape=(1, 1), prefetch=1)
    next(stream)
    thread = stream._thread
    del stream  # the thread holds no reference to the stream, so it is collected and stops its producer
    gc.collect()
    thread.join(timeout=2)
    assert not thread.is_alive()


def test_eval_batches_unshuffled_prefix():
    docs = synthetic_docs(40)
    windows = list(token_windows(docs(0), CharTokenizer(), 17))
    batches = eval_batches(docs, CharTokenizer(), seq_len=16, micro_batch=4, n_batches=3)
    assert len(batches) == 3 and all(b.shape == (4, 17) and b.dtype == np.int32 for b in batches)
    assert np.array_equal(np.concatenate(batches), np.stack(windows[:12]))
    assert len(eval_batches(docs, CharTokenizer(), 16, 4, 10**6)) == len(windows) // 4  # as many as there are
    assert eval_batches(docs, CharTokenizer(), 16, 4, 0) == []
    with pytest.raises(AbotError, match="eval data"):
        eval_batches(lambda e: ["tiny"], CharTokenizer(), 16, 4, 2)
