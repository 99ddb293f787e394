"""Generation speed (tokens/s, batch 1, greedy) of the tiny and small shapes, with and without the KV cache.

    python benchmarks/generate_speed.py [--shapes tiny,small] [--prompt 64] [--new 128] [--blas-threads 1]

Random-initialised weights (speed does not depend on what the model learned), vocabulary 8000, the
prompt run once, then `--new` tokens through `abot.generate.generate_tokens` (no stop token). Decode
tokens/s excludes the prompt step (the time to the first token, reported separately); the uncached
run re-reads the whole sequence at every step, so its cost grows with the length. `--blas-threads 0`
leaves OpenBLAS at its default thread count instead of generation's single thread (abot.generate.blas_threads).
"""

from __future__ import annotations

import argparse
import time

import abot  # noqa: F401  (loads the fast BLAS before mlx)
import mlx.core as mx

from abot.config import ModelConfig
from abot.generate import generate_tokens
from abot.models.transformer import count_params, transformer
from abot.platform import prepare

SHAPES = {"tiny": (256, 6, 8), "small": (512, 8, 8)}  # d_model, n_layers, n_heads
VOCAB = 8000


def run(model, params, prompt, new: int, use_cache: bool, threads: int | None = 1) -> dict:
    tokens = generate_tokens(model, params, prompt, max_new_tokens=new, temperature=0.0, stop_ids=(),
                             use_cache=use_cache, threads=threads)
    t0 = time.perf_counter()
    next(tokens)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    n = sum(1 for _ in tokens)
    decode = time.perf_counter() - t1
    return {"first_token_s": first, "decode_tokens_per_s": n / decode, "total_s": first + decode}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,small")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=128, help="generated tokens")
    parser.add_argument("--blas-threads", type=int, default=1, help="OpenBLAS threads (0: its default)")
    args = parser.parse_args()
    threads = args.blas_threads or None
    device = "gpu" if mx.default_device() == mx.gpu else f"cpu (BLAS: {prepare().blas})"
    print(f"device: {device}; batch 1, prompt {args.prompt} tokens, {args.new} new tokens, greedy, float32, "
          f"BLAS threads: {threads or 'default'}")
    print(f"{'shape':<16}{'params':>9}{'cache':>7}{'first token':>13}{'decode tok/s':>14}{'total':>9}")
    for name in args.shapes.split(","):
        d, n_layers, n_heads = SHAPES[name]
        cfg = ModelConfig(vocab_size=VOCAB, n_layers=n_layers, d_model=d, n_heads=n_heads, dropout=0.0,
                          max_seq_len=max(512, args.prompt + args.new + 1))
        model = transformer(cfg)
        params = model.init(mx.random.key(0))
        mx.eval(params)
        prompt = mx.random.randint(0, VOCAB, (args.prompt,), key=mx.random.key(1)).tolist()
        run(model, params, prompt, 8, True, threads)  # warm-up (first-call overheads, allocator)
        for use_cache in (True, False):
            r = run(model, params, prompt, args.new, use_cache, threads)
            print(f"{name + f' d{d}x{n_layers}':<16}{count_params(params) / 1e6:>8.1f}M{'yes' if use_cache else 'no':>7}"
                  f"{r['first_token_s'] * 1000:>11.0f}ms{r['decode_tokens_per_s']:>14.1f}{r['total_s']:>8.2f}s")


if __name__ == "__main__":
    main()
