"""Data-pipeline throughput: tokens/s into training batches, streaming text vs pre-tokenized shards.

    python benchmarks/data_speed.py [--tokens 2000000] [--seq-len 2048] [--batch 4x1] [--threads 2]

Side by side, with the small config's batch shape (seq_len 2048, grad_accum 4 x micro-batch 1):
- stdlib_docs: the built-in corpus streamed and tokenized (BatchStream, background thread);
- jsonl: a local JSONL file (the corpus repeated to ~20 MB) through the huggingface source;
- prepare: `abot data prepare`'s tokenize-and-write speed for that JSONL;
- shards: those shards read back by WindowStream (memmap, shuffled windows).
Each figure counts the tokens of the batches handed out over wall time, start-up included. The training
loop needs >= 20x the small config's training speed (~400 tokens/s on a 2-core CPU), i.e. >= 8k tokens/s.
"""

from __future__ import annotations

import abot  # noqa: F401  (first: it sets up BLAS before anything imports mlx.core)

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from abot.config import DataConfig, config_from_dict  # noqa: E402
from abot.data import corpus  # noqa: E402
from abot.data.pipeline import BatchStream  # noqa: E402
from abot.data.windows import WindowStream  # noqa: E402
from abot.data.shards import ShardSet, prepare  # noqa: E402
from abot.data.sources import huggingface, stdlib_docs  # noqa: E402
from abot.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMALL_TRAIN_TOKENS_PER_S = 400  # the small config's training speed on this kind of 2-core CPU (NOTES.md)


def get_tokenizer(tmp: Path):
    path = ROOT / "data" / "tokenizer-8k.model"
    if not path.exists():
        texts = [json.loads(line)["text"] for line in corpus.stdlib_docs_files()["train"].read_text().splitlines()]
        path = train_tokenizer(texts, 8000, tmp / "tokenizer-8k.model")
    return load_tokenizer(path)


def timed(stream, tokens: int, per_batch: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    got = 0
    while got < tokens:
        next(stream)
        got += per_batch
    return got, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2_000_000, help="tokens to read per pipeline")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", default="4x1", help="grad_accum x micro_batch")
    ap.add_argument("--threads", type=int, default=2, help="tokenizer threads (data.num_workers)")
    ap.add_argument("--jsonl-mb", type=float, default=20.0, help="size of the local JSONL file")
    args = ap.parse_args()
    grad_accum, micro = map(int, args.batch.lower().split("x"))
    shape, per_batch = (grad_accum, micro), grad_accum * micro * args.seq_len
    rows = []

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tok = get_tokenizer(tmp)
        files = corpus.stdlib_docs_files()
        print(f"tokenizer {tok.path} ({tok.vocab_size} tokens); batch {grad_accum} x {micro} x {args.seq_len} "
              f"= {per_batch} tokens; {args.threads} tokenizer threads; {os.cpu_count()} CPUs", flush=True)

        docs = stdlib_docs(DataConfig(source="stdlib_docs"), "train", seed=0)
        with BatchStream(docs, tok, args.seq_len, shape, shuffle_buffer=1000, num_workers=args.threads) as s:
            rows.append(("stream: stdlib_docs (built-in corpus)", *timed(s, args.tokens, per_batch)))

        lines = files["train"].read_text()
        jsonl = tmp / "corpus.jsonl"
        with open(jsonl, "w") as f:
            for _ in range(max(1, int(args.jsonl_mb * 2**20 / len(lines)))):
                f.write(lines)
        data = DataConfig(dataset="json", data_files=str(jsonl), seq_len=args.seq_len, num_workers=args.threads)
        with BatchStream(huggingface(data, "train", 0), tok, args.seq_len, shape, shuffle_buffer=1000,
                         num_workers=args.threads) as s:
            rows.append((f"stream: local jsonl ({jsonl.stat().st_size / 2**20:.0f} MB)", *timed(s, args.tokens, per_batch)))

        cfg = config_from_dict({"model": {"vocab_size": tok.vocab_size},
                                "data": {"dataset": "json", "data_files": str(jsonl), "seq_len": args.seq_len,
                                         "num_workers": args.threads},
                                "train": {"tokenizer_path": str(tok.path)}})
        t0 = time.perf_counter()
        meta = prepare(cfg, tmp / "shards", max_tokens=args.tokens * 2, max_eval_tokens=100_000, say=lambda s: None)
        written = meta["splits"]["train"]["total_tokens"] + meta["splits"]["eval"]["total_tokens"]
        rows.append(("abot data prepare (tokenize + write)", written, time.perf_counter() - t0))

        stream = WindowStream(ShardSet(tmp / "shards", "train"), args.seq_len, shape, shuffle=True, seed=0)
        rows.append(("shards: WindowStream (memmap, shuffled)", *timed(stream, args.tokens, per_batch)))

    print(f"\n{'pipeline':44s} {'tokens':>11s} {'seconds':>8s} {'tokens/s':>12s} {'x small train':>14s}")
    for name, tokens, seconds in rows:
        rate = tokens / seconds
        print(f"{name:44s} {tokens:>11,d} {seconds:>8.2f} {rate:>12,.0f} {rate / SMALL_TRAIN_TOKENS_PER_S:>13,.0f}x")
    slowest = min(tokens / seconds for name, tokens, seconds in rows if not name.startswith("abot data"))
    target = 20 * SMALL_TRAIN_TOKENS_PER_S
    print(f"\nslowest training pipeline: {slowest:,.0f} tokens/s; target >= {target:,} "
          f"(20x the small config's ~{SMALL_TRAIN_TOKENS_PER_S} tokens/s): {'met' if slowest >= target else 'NOT met'}")
    return 0 if slowest >= target else 1


if __name__ == "__main__":
    sys.exit(main())
