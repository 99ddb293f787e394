"""Pre-tokenized shards (`abot data prepare`, data.source: shards), WindowStream, and data-parallel ranks."""

import abot  # noqa: F401  (first: it sets up BLAS before anything imports mlx.core)

import json

import numpy as np
import pytest

from abot.config import config_from_dict
from abot.data.loader import data_rank, eval_data, train_stream
from abot.data.pipeline import BatchStream, rank_documents
from abot.data.windows import WindowStream, rank_windows
from abot.data.shards import ShardSet, prepare, read_meta, token_dtype, write_split
from abot.errors import AbotError
from abot.tokenizer import train_tokenizer

WORDS = ["the", "model", "reads", "tokens", "from", "shards", "quickly", "while", "streaming", "text", "is",
         "slow", "data", "pipeline", "window", "epoch", "seed", "rank", "batch", "of"]


def make_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, 60))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return train_tokenizer(make_docs(400, seed=9), 320, tmp_path_factory.mktemp("tok") / "tok.model")


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """A local folder laid out like a Hub dataset: data/{train,validation}-00000-of-00001.parquet (c4 schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("hub") / "my-corpus"
    (folder / "data").mkdir(parents=True)
    for split, docs in [("train", make_docs(300, 1)), ("validation", make_docs(40, 2))]:
        rows = [{"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"} for i, t in enumerate(docs)]
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


def make_cfg(tokenizer_path, folder, *overrides):
    raw = {"model": {"vocab_size": 320, "n_layers": 1, "d_model": 16, "n_heads": 2, "max_seq_len": 128},
           "data": {"dataset": str(folder), "eval_split": "validation", "seq_len": 31, "shuffle_buffer": 0,
                    "num_workers": 1},
           "train": {"tokenizer_path": str(tokenizer_path), "micro_batch_size": 2, "grad_accum_steps": 3,
                     "eval_steps": 4, "seed": 5}}
    return config_from_dict(raw, "test", list(overrides))


@pytest.fixture(scope="module")
def shards_dir(tokenizer_path, hub_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "corpus"
    # 1000 tokens per file: many files, and windows of 32 tokens that span two of them.
    prepare(make_cfg(tokenizer_path, hub_folder), out, tokens_per_shard=1000, say=lambda s: None)
    return out


def take(stream, n):
    return [next(stream) for _ in range(n)]


def same(xs, ys):
    return len(xs) == len(ys) and all(np.array_equal(x, y) for x, y in zip(xs, ys))


class ArangeSource:
    """A WindowSource whose token i is i: every window is identified by its first token."""

    tokenizer_sha256 = None

    def __init__(self, n_tokens):
        self.n_tokens = n_tokens

    def read(self, start, length):
        return np.arange(start, start + length, dtype=np.int32)


# --- prepare -------------------------------------------------------------------------------------------------

def test_prepare_writes_raw_shards_and_meta(shards_dir, tokenizer_path):
    meta = read_meta(shards_dir)
    from abot.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["dtype"] == "uint16" and meta["vocab_size"] == 320
    assert meta["source"]["dataset"].endswith("my-corpus") and meta["source"]["eval_split"] == "validation"
    train = meta["splits"]["train"]
    assert len(train["files"]) > 3 and sum(train["tokens"]) == train["total_tokens"] and train["documents"] == 300
    raw = np.concatenate([np.fromfile(shards_dir / f, dtype="<u2") for f in train["files"]])  # no header
    assert len(raw) == train["total_tokens"] and (shards_dir / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    docs = [t for t in make_docs(300, 1)]
    expected = [t for ids in tok.encode_batch(docs) for t in (*ids, tok.eos_id)]  # each document + EOS
    assert raw.tolist() == expected
    with pytest.raises(AbotError, match="not empty"):
        prepare(make_cfg(tokenizer_path, shards_dir), shards_dir, say=lambda s: None)


def test_cli_prepare_max_tokens(tokenizer_path, hub_folder, tmp_path):
    from typer.testing import CliRunner

    from abot.cli import app

    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"model": {"vocab_size": 320, "n_layers": 1, "d_model": 16, "n_heads": 2},
                                  "data": {"dataset": str(hub_folder)},
                                  "train": {"tokenizer_path": str(tokenizer_path)}}))
    out = tmp_path / "shards"
    result = CliRunner().invoke(app, ["data", "prepare", str(config), "data.eval_split=validation",
                                      "--out", str(out), "--max-tokens", "777", "--max-eval-tokens", "100"])
    assert result.exit_code == 0, result.output
    meta = read_meta(out)
    assert meta["splits"]["train"]["total_tokens"] == 777 and meta["splits"]["train"]["truncated"]
    assert meta["splits"]["eval"]["total_tokens"] == 100 and meta["source"]["eval_split"] == "validation"
    assert (out / "train-00000.bin").stat().st_size == 777 * 2


def test_uint32_when_the_vocabulary_needs_it(tmp_path):
    class BigIds:
        eos_id = 3

        def encode_batch(self, texts, num_threads=1):
            return [[70_000 + len(t), 65_535, 65_536] for t in texts]

    assert token_dtype(65_535) == np.dtype("<u2") and token_dtype(65_536) == np.dtype("<u4")
    entry = write_split(["a", "bb", "", "ccc"], BigIds(), tmp_path, "train", vocab_size=80_000, tokens_per_shard=5)
    assert entry["files"] == ["train-00000.bin", "train-00001.bin", "train-00002.bin"] and entry["tokens"] == [5, 5, 2]
    meta = {"dtype": "uint32", "tokenizer_sha256": None, "splits": {"train": entry}}
    source = ShardSet(tmp_path, "train", meta)
    expected = [70_001, 65_535, 65_536, 3, 70_002, 65_535, 65_536, 3, 70_003, 65_535, 65_536, 3]
    assert source.read(0, 12).tolist() == expected and source.read(4, 6).tolist() == expected[4:10]


# --- shards read back: the same batches as streaming ---------------------------------------------------------

def test_shard_batches_equal_streaming_batches(shards_dir, tokenizer_path, hub_folder):
    """shuffle_buffer 0: the first k batches (all of epoch 0 and into epoch 1) and the eval batches are identical."""
    from abot.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    text_cfg = make_cfg(tokenizer_path, hub_folder)
    shard_cfg = make_cfg(tokenizer_path, shards_dir, "data.source=shards")
    streamed, sharded = train_stream(text_cfg, tok, rank=0, world_size=1), train_stream(shard_cfg, tok, rank=0,
                                                                                        world_size=1)
    assert isinstance(streamed, BatchStream) and isinstance(sharded, WindowStream)
    k = sharded.batches_per_epoch + 3
    assert same(take(streamed, k), take(sharded, k))
    assert streamed.state() == sharded.state() == {"epoch": 1, "batches": 3}
    assert same(eval_data(text_cfg, tok), eval_data(shard_cfg, tok))
    streamed.close()


def test_shuffled_epochs_are_seeded_permutations_of_the_windows(shards_dir):
    source = ShardSet(shards_dir, "train")
    stream = WindowStream(source, seq_len=31, batch_shape=(3, 2), shuffle=True, seed=5)
    n = stream.batches_per_epoch
    epoch0 = np.concatenate([b.reshape(-1, 32) for b in take(stream, n)])
    epoch1 = np.concatenate([b.reshape(-1, 32) for b in take(stream, n)])
    in_order = np.stack([source.read(i * 32, 32) for i in range(source.n_tokens // 32)])
    key = lambda rows: sorted(map(bytes, rows.astype(np.int32)))  # noqa: E731
    assert not np.array_equal(epoch0, in_order[: len(epoch0)]) and not np.array_equal(epoch0, epoch1)
    order = np.random.default_rng([5, 0]).permutation(len(in_order))[: len(epoch0)]
    assert np.array_equal(epoch0, in_order[order])  # epoch e reads permutation(seed, e)
    assert key(epoch1) == key(in_order[np.random.default_rng([5, 1]).permutation(len(in_order))[: len(epoch1)]])


@pytest.mark.parametrize("consumed", [0, 5, 13])
def test_restored_shard_state_gives_identical_next_10_batches(shards_dir, consumed):
    def make(state=None):
        return WindowStream(ShardSet(shards_dir, "train"), seq_len=31, batch_shape=(8, 16), shuffle=True, seed=5,
                            state=state)

    stream = make()
    assert stream.batches_per_epoch < 10  # the 10 batches after the restore point cross an epoch boundary
    take(stream, consumed)
    state = json.loads(json.dumps(stream.state()))
    assert set(state) == {"epoch", "batches"}
    assert same(take(stream, 10), take(make(state), 10))


def test_restore_is_o1_and_checks_the_position():
    big = ArangeSource(10**8)  # 3 M windows; a replay would read 10^8 tokens per epoch skipped
    stream = WindowStream(big, seq_len=31, batch_shape=(1, 4), shuffle=True, seed=0,
                          state={"epoch": 10**6, "batches": 700_000})
    batch = next(stream)
    assert batch.shape == (1, 4, 32) and stream.state() == {"epoch": 10**6, "batches": 700_001}
    with pytest.raises(AbotError, match="changed since the checkpoint"):
        WindowStream(ArangeSource(1000), 31, (1, 2), state={"epoch": 0, "batches": 15})
    with pytest.raises(AbotError, match="cannot fill a single batch"):
        WindowStream(ArangeSource(100), 31, (2, 2))


def test_other_tokenizer_is_refused(shards_dir, tokenizer_path, tmp_path):
    from abot.tokenizer import load_tokenizer

    other = load_tokenizer(train_tokenizer(make_docs(300, seed=3) + ["zzz qqq"], 320, tmp_path / "other.model"))
    cfg = make_cfg(other.path, shards_dir, "data.source=shards")
    with pytest.raises(AbotError, match="another tokenizer"):
        train_stream(cfg, other, rank=0, world_size=1)
    with pytest.raises(AbotError, match="another tokenizer"):
        eval_data(cfg, other)


def test_shards_source_errors(shards_dir, tmp_path):
    from abot.build import build_documents

    with pytest.raises(AbotError, match="no such folder"):
        ShardSet(tmp_path / "nope", "train")
    with pytest.raises(AbotError, match="meta.json"):
        ShardSet(tmp_path, "train")
    cfg = config_from_dict({"data": {"source": "shards", "dataset": str(shards_dir)}})
    with pytest.raises(AbotError, match="holds tokens, not text"):
        build_documents(cfg, "train")(0)  # e.g. tokenizer training on a shards config
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in shards_dir.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    (damaged / "train-00001.bin").write_bytes(b"\0\0")
    with pytest.raises(AbotError, match="damaged"):
        ShardSet(damaged, "train")


# --- data-parallel ranks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shuffle", [False, True])
def test_two_ranks_read_disjoint_windows_that_cover_one_rank(shuffle):
    source = ArangeSource(32 * 48)  # 48 windows of 32 tokens; window i starts with token 32 i
    one = WindowStream(source, 31, (2, 3), shuffle=shuffle, seed=1)
    ranks = [WindowStream(source, 31, (2, 3), shuffle=shuffle, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert one.batches_per_epoch == 8 and all(r.batches_per_epoch == 4 for r in ranks)
    first = lambda batches: [int(w[0]) // 32 for b in batches for w in b.reshape(-1, 32)]  # noqa: E731
    single = first(take(one, 8))
    r0, r1 = first(take(ranks[0], 4)), first(take(ranks[1], 4))
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(single) == list(range(48))
    assert [w for pair in zip(r0, r1) for w in pair] == single  # rank r reads positions r, r + 2, r + 4, ...
    assert rank_windows(49, 1, 2) == (24, slice(1, 48, 2))  # an odd window out is dropped: equal batch counts


def test_streaming_ranks_take_disjoint_documents():
    docs = [f"document {i}" for i in range(11)]
    parts = [list(rank_documents(lambda e: iter(docs), r, 3)(0)) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(docs) and all(not set(a) & set(b) for a in parts for b in parts if a is not b)
    with pytest.raises(AbotError, match="rank"):
        rank_documents(lambda e: docs, 3, 3)
    assert data_rank() == (0, 1)  # not launched by mlx.launch: a world of one



# --- end to end ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_prepare_then_train_and_resume_from_shards(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from abot.checkpoint import load_checkpoint

    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    common = [f"train.tokenizer_path={tmp_path}/tok.model", "model.vocab_size=1000"]
    run = lambda *a: subprocess.run([sys.executable, "-m", "abot", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=tmp_path, timeout=600)
    out = run("data", "prepare", str(tiny), *common, "--out", str(tmp_path / "shards"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "training a 1000-token BPE tokenizer" in out.stdout and "data.source=shards" in out.stdout
    train = [*common, "data.source=shards", f"data.dataset={tmp_path}/shards", f"train.save_dir={tmp_path}/run",
             "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "data.seq_len=32", "train.micro_batch_size=4",
             "train.log_interval=2", "train.eval_interval=2", "train.eval_steps=2", "train.ckpt_interval=2"]
    out = run("train", str(tiny), *train, "train.total_steps=2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert load_checkpoint(tmp_path / "run" / "step_00000002.ckpt").meta["data_state"] == {"epoch": 0, "batches": 2}
    out = run("train", str(tiny), *train, "train.total_steps=4", "--resume")
    assert out.returncode == 0, out.stdout + out.stderr
    assert load_checkpoint(tmp_path / "run" / "step_00000004.ckpt").meta["data_state"] == {"epoch": 0, "batches": 4}
    from abot.data import corpus

    validation = [json.loads(line)["text"] for line in corpus.stdlib_docs_files()["validation"].read_text().splitlines()]
    train_tokenizer(validation, 1000, tmp_path / "other.model")  # other text: another tokenizer, same vocab size
    refused = run("train", str(tiny), *train, "train.total_steps=2", f"train.tokenizer_path={tmp_path}/other.model",
                  f"train.save_dir={tmp_path}/run2")
    assert refused.returncode == 2 and "another tokenizer" in refused.stdout
