"""Inference: load a checkpoint, sample tokens with a KV cache, stream text; the `abot chat` loop.

Sampling is a pure function of (logits, key, settings): temperature, then top-k, then top-p (nucleus),
then a categorical draw with an explicit `mx.random` key; temperature 0 is greedy (argmax). The key for
step i is the i-th split of `mx.random.key(seed)`, so a seed reproduces a sample exactly.

With the KV cache (the default), the prompt is run once and every new token costs one position; without
it every step re-runs the whole sequence (kept for tests and the benchmark). Generation stops at any of the
tokenizer's EOS ids or its template's end-of-turn id (abot's: EOS or `<|end|>`; none is yielded), after
`max_new_tokens`, or when the sequence reaches `model.max_seq_len`.

Raw prompts (`abot generate`) start as a pre-training document does: with BOS where the tokenizer prepends
one, else with EOS (abot's tokenizer: pre-training separates documents with EOS, so that is what the start
of a document looks like to the model; an empty prompt works too). Chat prompts are exactly
`abot.chat_template.render(..., add_generation_prompt=True)` with the tokenizer's template, as in fine-tuning.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import mlx.core as mx

from abot.build import build_model
from abot.chat_template import render, template_of
from abot.config import Config, config_from_dict
from abot.errors import AbotError
from abot.restore import checkpoint_tokenizer, open_checkpoint
from abot.token_layout import ASSISTANT_ID, END_ID, EOS_ID, SYSTEM_ID, USER_ID
from abot.tokenizer import Tokenizer, document_start

# abot's own tokenizer's stops (what `stops_of` gives for it): EOS and the end of a turn...
STOP_IDS = (EOS_ID, END_ID)
# ...and in a chat any marker ends the reply: a model that starts the next turn itself has finished this one.
CHAT_STOP_IDS = (EOS_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID)


def stops_of(tokenizer: Tokenizer, chat: bool = False) -> tuple[int, ...]:
    """Ids that end generation: the tokenizer's EOS ids and its template's end of turn (in a chat: its stops)."""
    template = template_of(tokenizer)
    extra = template.stop_ids if chat else template.end_of_turn_ids
    return tuple(dict.fromkeys([*tokenizer.eos_ids, *extra]))


# ---------------------------------------------------------------------------------------------- loading

@dataclass
class Loaded:
    """A checkpoint ready for inference."""

    model: Any  # abot.models.transformer.Model (or a registered plugin model)
    params: dict
    tokenizer: Tokenizer
    cfg: Config
    step: int
    path: Path


def load_for_inference(ckpt_path: str | Path, tokenizer_path: str | Path | None = None,
                       overrides: Sequence[str] = ()) -> Loaded:
    """Checkpoint or run folder -> model (built through the registry from its own config), params, tokenizer."""
    opened = open_checkpoint(ckpt_path)
    cfg = opened.config(lambda raw, where: config_from_dict(raw, where, overrides, stored=True))
    tokenizer = checkpoint_tokenizer(cfg, opened, tokenizer_path)
    return Loaded(build_model(cfg), opened.params(), tokenizer, cfg, opened.step, opened.path)


# ---------------------------------------------------------------------------------------------- sampling

def top_k_filter(logits: mx.array, k: int) -> mx.array:
    """Keep exactly the `k` largest logits of the last axis (ties broken by position), -inf elsewhere."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    drop = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., k:]  # everything outside the top k
    return mx.put_along_axis(logits, drop, mx.array(-mx.inf, dtype=logits.dtype), axis=-1)


def top_p_filter(logits: mx.array, p: float) -> mx.array:
    """Nucleus: keep the most probable tokens until their mass reaches `p` (at least one), -inf elsewhere.

    A token is kept when the mass of the tokens more probable than it is below `p`.
    """
    if p >= 1.0:
        return logits
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits.astype(mx.float32), axis=-1)
    before = mx.cumsum(probs, axis=-1) - probs  # mass of the strictly more probable tokens
    drop_sorted = before >= p
    drop_sorted[..., 0] = False  # the most probable token always stays
    drop = mx.put_along_axis(mx.zeros(logits.shape, dtype=mx.bool_), order, drop_sorted, axis=-1)
    return mx.where(drop, mx.array(-mx.inf, dtype=logits.dtype), logits)


def sample(logits: mx.array, key: mx.array | None, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> mx.array:
    """Next-token ids (...,) from logits (..., vocab): greedy at temperature 0, else a filtered draw."""
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / temperature
    logits = top_k_filter(logits, top_k)
    logits = top_p_filter(logits, top_p)
    return mx.random.categorical(logits, axis=-1, key=key)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """AbotError for settings that make no sense (the CLI's flags)."""
    problems = []
    if max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        problems.append(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        problems.append(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        problems.append(f"--top-p must be in (0, 1] (1 = off), got {top_p}")
    if problems:
        raise AbotError("; ".join(problems))


# ---------------------------------------------------------------------------------------------- generation

@contextlib.contextmanager
def blas_threads(n: int | None):
    """Run the block with `n` OpenBLAS threads (numpy's OpenBLAS, which abot loads into MLX on Linux CPUs).

    Batch-1 decoding is matrix-vector work: splitting each small product over threads only adds
    synchronisation, and on a busy machine a waiting thread costs a scheduler time slice per matmul.
    Measured here (2 cores, loaded): (1, 512) @ (512, 2048) 0.47 ms on one thread, 14-24 ms on two.
    A no-op where that OpenBLAS is not loaded (macOS, CUDA, ABOT_BLAS=off) or `n` is None.
    """
    lib = ctypes.CDLL(None) if n is not None and sys.platform.startswith("linux") else None
    get = getattr(lib, "scipy_openblas_get_num_threads64_", None)
    set_ = getattr(lib, "scipy_openblas_set_num_threads64_", None)
    if get is None or set_ is None:
        yield
        return
    before = get()
    set_(int(n))
    try:
        yield
    finally:
        set_(before)


def generate_tokens(model, params, prompt: Sequence[int], *, max_new_tokens: int = 256, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_ids: Iterable[int] = STOP_IDS,
                    use_cache: bool = True, max_seq_len: int | None = None,
                    threads: int | None = 1) -> Iterator[int]:
    """Yield new token ids one by one (a stop id ends the stream and is not yielded).

    The prompt is left-truncated to `max_seq_len - 1` tokens (default: the model's `max_seq_len`), and
    generation ends when the sequence fills it. `threads`: BLAS threads meanwhile (see `blas_threads`).
    """
    with blas_threads(threads):
        yield from _generate_tokens(model, params, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                    stop_ids, use_cache, max_seq_len)


def _generate_tokens(model, params, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, use_cache,
                     max_seq_len) -> Iterator[int]:
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("generate_tokens needs a prompt of at least one token")
    limit = max_seq_len or model.config.max_seq_len
    prompt = prompt[-(limit - 1):] if limit > 1 else prompt[-1:]
    budget = min(max_new_tokens, max(0, limit - len(prompt)))
    stops = set(int(s) for s in stop_ids)
    key = mx.random.key(seed)
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)

    if budget <= 0:
        return
    cache = model.new_cache() if use_cache else None

    def step(tokens: mx.array, key: mx.array) -> mx.array:
        """Next token after `tokens` (1, n): the fresh positions with a cache, the whole sequence without."""
        nonlocal cache
        if cache is None:
            logits = model.apply(params, tokens)
        else:
            logits, cache = model.apply(params, tokens, cache=cache)
        return sample(logits[:, -1, :], key, **settings).astype(mx.int32)

    # Pipelined: step i+1's graph is built on step i's (still lazy) token and queued with async_eval
    # before step i's value is read, so graph building overlaps the computation.
    seq = mx.array([prompt], dtype=mx.int32)
    key, sub = mx.random.split(key)
    token = step(seq, sub)
    mx.async_eval(token)
    for i in range(budget):
        if i + 1 < budget:
            seq = seq if cache is not None else mx.concatenate([seq, token.reshape(1, 1)], axis=1)
            key, sub = mx.random.split(key)
            following = step(token.reshape(1, 1) if cache is not None else seq, sub)
            mx.async_eval(following)
        tid = int(token.item())
        if tid in stops:
            return
        yield tid
        if i + 1 < budget:
            token = following


class TextStream:
    """Incremental detokenization: feed ids, get the text they add (held back while a UTF-8 char is split)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character whose bytes have not all arrived
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def stream_text(tokenizer, token_ids: Iterable[int]) -> Iterator[str]:
    """Token ids -> text pieces as they become printable."""
    stream = TextStream(tokenizer)
    for tid in token_ids:
        piece = stream.push(tid)
        if piece:
            yield piece
    tail = stream.flush()
    if tail:
        yield tail


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A raw (non-chat) prompt: the start-of-document context of pre-training (BOS, or else EOS), then the text."""
    return (document_start(tokenizer) or [tokenizer.eos_id]) + tokenizer.encode(text)


def generate(loaded: Loaded, prompt: str, **options) -> Iterator[str]:
    """Text pieces continuing a raw `prompt`; options as in `generate_tokens` (stops: the tokenizer's)."""
    ids = prompt_ids(loaded.tokenizer, prompt)
    options.setdefault("stop_ids", stops_of(loaded.tokenizer))
    yield from stream_text(loaded.tokenizer, generate_tokens(loaded.model, loaded.params, ids, **options))


# ---------------------------------------------------------------------------------------------- chat

def fit_history(messages: list[dict], tokenizer, room: int) -> list[int]:
    """Rendered ids of the conversation with a generation prompt, dropping the oldest turns (never the
    system message) until it fits in `room` tokens; a single turn still too long is left-truncated."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        ids = render(system + turns, add_generation_prompt=True, tokenizer=tokenizer).ids
        if len(ids) <= room or len(turns) <= 1:
            return ids[-room:] if room > 0 else ids
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":
            turns = turns[1:]


def chat_loop(loaded: Loaded, *, system: str | None = None, read: Callable[[str], str] = input,
              write: Callable[..., None] = print, max_new_tokens: int = 256, seed: int = 0, **sampling) -> int:
    """Read user lines, stream replies, keep the history; Ctrl-D or Ctrl-C at the prompt ends it (returns 0).

    A reply ends at an EOS id or the template's stops (abot's: any chat marker). Ctrl-C during a reply stops that reply and returns to the prompt. `/reset` clears the history, `/quit`
    ends. Turn i samples with seed `seed + i`; `sampling`: temperature, top_k, top_p.
    """
    def out(text: str):
        write(text, end="", flush=True)

    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    max_len = loaded.cfg.model.max_seq_len
    room = max(1, max_len - min(max_new_tokens, max_len // 2))
    turn = 0
    while True:
        try:
            line = read("> ")
        except (EOFError, KeyboardInterrupt):
            out("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            messages = messages[:1] if system else []
            out("(history cleared)\n")
            continue
        messages.append({"role": "user", "content": line})
        ids = fit_history(messages, loaded.tokenizer, room)
        tokens = generate_tokens(loaded.model, loaded.params, ids, max_new_tokens=max_new_tokens, seed=seed + turn,
                                 stop_ids=stops_of(loaded.tokenizer, chat=True), **sampling)
        stream = TextStream(loaded.tokenizer)
        try:
            for tid in tokens:
                out(stream.push(tid))
        except KeyboardInterrupt:
            out(" [interrupted]")
        out(stream.flush() + "\n")
        messages.append({"role": "assistant", "content": loaded.tokenizer.decode(stream.ids)})
        turn += 1


def run_generate(loaded: Loaded, prompt: str, write: Callable[..., None] = print, **options) -> dict:
    """Stream the continuation of a raw `prompt` through `write`; returns {"tokens", "seconds", "tokens_per_s"}."""
    ids = prompt_ids(loaded.tokenizer, prompt)
    options.setdefault("stop_ids", stops_of(loaded.tokenizer))
    count = [0]

    def counted(tokens):
        for tid in tokens:
            count[0] += 1
            yield tid

    t0 = time.perf_counter()
    for piece in stream_text(loaded.tokenizer, counted(generate_tokens(loaded.model, loaded.params, ids, **options))):
        write(piece, end="", flush=True)
    write("", flush=True)
    seconds = time.perf_counter() - t0
    return {"prompt_tokens": len(ids), "tokens": count[0], "seconds": seconds,
            "tokens_per_s": count[0] / seconds if seconds > 0 else 0.0}
