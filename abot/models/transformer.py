"""The decoder-only transformer: pre-RMSNorm, RoPE, causal attention, SwiGLU (or GELU) MLP.

Parameters are a plain tree (dicts and a list of blocks) of mx.array; weights are stored
(in_features, out_features) so a layer is `x @ w`. With tied embeddings the output head *is*
`params["embed"]` (one leaf), used transposed. The options that Llama, Mistral, Qwen2 and Qwen3 need
(grouped-query attention, a free head_dim, attention biases, q/k norms, Llama 3 rope scaling) add or
reshape leaves only when set: with their defaults the tree, the initialisation and the logits are abot's
original model's.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import mlx.core as mx

from abot.config import ModelConfig
from abot.models.roles import BIAS, EMBEDDING, HEAD, HIDDEN, NORM, ParamRole, conventional_role
from abot.ops.attention import causal_attention
from abot.ops.dropout import dropout
from abot.ops.linear import linear
from abot.ops.mlp import gelu_mlp, relu2_mlp, swiglu
from abot.ops.norm import rms_norm
from abot.ops.rope import apply_rope, rope_periods

Params = dict[str, Any]
KVCache = list  # per layer: None (empty) or (keys, values), each (batch, kv_heads, seq, head_dim)


class Model(NamedTuple):
    """The model contract (built-ins and plugins).

    init(key) -> params
    apply(params, tokens, key=None, cache=None) -> logits (batch, seq, vocab)
        key: PRNG key for dropout (None: no dropout). cache: a KV cache from `new_cache`, in which
        case apply returns (logits, cache) and `tokens` continue the cached positions.
    new_cache() -> empty KV cache
    param_role(path, leaf) -> role of one parameter (abot.models.roles): which leaves are hidden matrices
        (Muon's), the embedding, the head, norms. A model that declares none gets `conventional_role`.
    """

    init: Callable[[mx.array], Params]
    apply: Callable[..., Any]
    new_cache: Callable[[], KVCache]
    config: Any
    param_role: ParamRole = conventional_role


def hidden_size(cfg: ModelConfig) -> int:
    """The MLP's hidden width: model.mlp_hidden, or mlp_multiple * d_model."""
    return cfg.mlp_hidden if cfg.mlp_hidden is not None else int(cfg.mlp_multiple * cfg.d_model)


def head_dim(cfg: ModelConfig) -> int:
    """The width of one attention head: model.head_dim, or d_model / n_heads."""
    return cfg.head_dim if cfg.head_dim is not None else cfg.d_model // cfg.n_heads


def kv_heads(cfg: ModelConfig) -> int:
    """Key/value heads: model.n_kv_heads, or n_heads (multi-head attention)."""
    return cfg.n_kv_heads if cfg.n_kv_heads is not None else cfg.n_heads


def init_params(cfg: ModelConfig, key: mx.array) -> Params:
    """Normal(0, 0.02) weights (GPT-2), residual projections scaled by 1/sqrt(2 n_layers), unit norms.

    With std 0.02 the initial logits have std ~0.02 sqrt(d_model), so the first loss on random tokens
    is ln(vocab) + var/2, within 0.2 of ln(vocab) up to d_model ~ 1024.
    """
    d, h, std = cfg.d_model, hidden_size(cfg), 0.02
    out_std = std / math.sqrt(2 * cfg.n_layers)
    keys = iter(mx.random.split(key, 2 + 7 * cfg.n_layers))

    def normal(shape, s=std):
        return mx.random.normal(shape, key=next(keys)) * s

    q_width, kv_width = cfg.n_heads * head_dim(cfg), kv_heads(cfg) * head_dim(cfg)
    blocks = []
    for _ in range(cfg.n_layers):
        block = {"attn_norm": mx.ones((d,)), "wq": normal((d, q_width)), "wk": normal((d, kv_width)),
                 "wv": normal((d, kv_width)), "wo": normal((q_width, d), out_std), "mlp_norm": mx.ones((d,)),
                 **attention_extras(cfg)}
        if cfg.ffn_activation == "silu":
            block["w_gate"] = normal((d, h))
        block["w_up"] = normal((d, h))
        block["w_down"] = normal((h, d), out_std)
        if cfg.zero_init_out:  # drawn first all the same, so every other leaf starts as without the option
            block["wo"], block["w_down"] = mx.zeros_like(block["wo"]), mx.zeros_like(block["w_down"])
        if has_value_embed(cfg, len(blocks)):  # zero: the model starts as without them, other leaves unchanged
            block["value_embed"] = mx.zeros((cfg.vocab_size, kv_width))
        blocks.append(block)
    params = {"embed": normal((cfg.vocab_size, d)), "blocks": blocks, "final_norm": mx.ones((d,))}
    if not cfg.tie_embeddings:
        params["head"] = normal((d, cfg.vocab_size))
    return params


def has_value_embed(cfg: ModelConfig, layer: int) -> bool:
    """model.value_embeds: every other block, ending with the last, has a value embedding (nanochat's placement;
    modded-nanogpt puts its three tables in the first and last blocks)."""
    return cfg.value_embeds and layer % 2 == (cfg.n_layers - 1) % 2


def attention_extras(cfg: ModelConfig) -> Params:
    """The optional attention leaves of one block: zero biases, unit q/k norm gains (none by default).

    They draw no random keys, so the other leaves' initialisation is the same with or without them.
    """
    q_width, kv_width, extras = cfg.n_heads * head_dim(cfg), kv_heads(cfg) * head_dim(cfg), {}
    if cfg.qkv_bias:
        extras.update(bq=mx.zeros((q_width,)), bk=mx.zeros((kv_width,)), bv=mx.zeros((kv_width,)))
    if cfg.attn_out_bias:
        extras["bo"] = mx.zeros((cfg.d_model,))
    if cfg.qk_norm:
        extras.update(q_norm=mx.ones((head_dim(cfg),)), k_norm=mx.ones((head_dim(cfg),)))
    return extras


# init_params' leaves by name (the last component of their path).
PARAM_ROLES = {"embed": EMBEDDING, "head": HEAD, "final_norm": NORM, "attn_norm": NORM, "mlp_norm": NORM,
               "q_norm": NORM, "k_norm": NORM, "value_embed": EMBEDDING, **{b: BIAS for b in ("bq", "bk", "bv", "bo")},
               **{w: HIDDEN for w in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}}


def param_role(path: str, leaf: mx.array) -> str:
    """The role of one of `init_params`' leaves, from its name ("blocks.0.wq" -> hidden)."""
    return PARAM_ROLES[path.split(".")[-1]]


def count_params(params: Params) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(params))


def _split_heads(x: mx.array, n_heads: int) -> mx.array:
    b, t, _ = x.shape
    return x.reshape(b, t, n_heads, -1).transpose(0, 2, 1, 3)


def _linear(x: mx.array, p: Params, weight: str, bias: str) -> mx.array:
    """A projection (plain, quantized or adapted weight: abot.ops.linear) and its bias where the block has one."""
    return linear(x, p[weight]) + p[bias] if bias in p else linear(x, p[weight])


def _attention_inputs(cfg: ModelConfig, p: Params, h: mx.array, tokens: mx.array, offset: int, periods):
    """q (batch, n_heads, seq, head_dim) and k, v (batch, kv_heads, seq, head_dim), q/k normed and rotated.

    Qwen3 normalises each head of q and k before RoPE (Hugging Face's Qwen3Attention). A block with a value
    embedding adds its row for each token to v (value residual: modded-nanogpt, nanochat).
    """
    q = _split_heads(_linear(h, p, "wq", "bq"), cfg.n_heads)
    k, v = (_linear(h, p, w, b) for w, b in (("wk", "bk"), ("wv", "bv")))
    if "value_embed" in p:
        v = v + p["value_embed"][tokens]
    k, v = _split_heads(k, kv_heads(cfg)), _split_heads(v, kv_heads(cfg))
    if cfg.qk_norm:
        q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    return apply_rope(q, cfg.rope_theta, offset, periods), apply_rope(k, cfg.rope_theta, offset, periods), v


def _block(cfg: ModelConfig, p: Params, x: mx.array, tokens: mx.array, keys, kv=None, periods=None):
    """One pre-norm residual block; returns (x, (k, v)) with k, v including any cached positions."""
    offset = 0 if kv is None else kv[0].shape[2]  # kv is None: no cache, or an empty one
    h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q, k, v = _attention_inputs(cfg, p, h, tokens, offset, periods)
    if kv is not None:
        k, v = mx.concatenate([kv[0], k], axis=2), mx.concatenate([kv[1], v], axis=2)
    b, t, _ = x.shape
    a = causal_attention(q, k, v).transpose(0, 2, 1, 3).reshape(b, t, -1)
    x = x + dropout(_linear(a, p, "wo", "bo"), cfg.dropout, keys[0])
    h = rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    if cfg.ffn_activation == "silu":
        m = swiglu(h, p["w_gate"], p["w_up"], p["w_down"])
    elif cfg.ffn_activation == "relu2":
        m = relu2_mlp(h, p["w_up"], p["w_down"])
    else:
        m = gelu_mlp(h, p["w_up"], p["w_down"])
    return x + dropout(m, cfg.dropout, keys[1]), (k, v)


def apply(cfg: ModelConfig, params: Params, tokens: mx.array, key: mx.array | None = None,
          cache: KVCache | None = None, checkpoint_blocks: bool = False):
    """Logits for int tokens (batch, seq). See `Model` for `key` and `cache`."""
    n = cfg.n_layers
    use_dropout = key is not None and cfg.dropout > 0
    keys = list(mx.random.split(key, 2 * n + 1)) if use_dropout else [None] * (2 * n + 1)
    x = dropout(params["embed"][tokens], cfg.dropout, keys[-1])
    periods = rope_periods(head_dim(cfg), cfg.rope_theta, cfg.rope_scaling)

    def block(p, x, *block_keys):
        return _block(cfg, p, x, tokens, block_keys or (None, None), periods=periods)[0]

    # Gradient checkpointing: keep only each block's input, recompute its inside during backward.
    run_block = mx.checkpoint(block) if checkpoint_blocks else block
    new_cache = []
    for i, p in enumerate(params["blocks"]):
        if cache is None:
            x = run_block(p, x, *(keys[2 * i:2 * i + 2] if use_dropout else ()))
        else:
            x, kv = _block(cfg, p, x, tokens, (None, None), cache[i], periods)
            new_cache.append(kv)
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    logits = x @ (params["embed"].T if cfg.tie_embeddings else params["head"])
    if cfg.logit_softcap is not None:  # Gemma 2 / modded-nanogpt: cap * tanh(logits / cap), a smooth bound
        # written as cap * (2 sigmoid(2 logits / cap) - 1), the same function: MLX's CPU sigmoid and its
        # backward cost about 40% less than tanh's over a (tokens, vocab) tensor (measured, 16M elements)
        logits = cfg.logit_softcap * (2 * mx.sigmoid(logits * (2 / cfg.logit_softcap)) - 1)
    return logits if cache is None else (logits, new_cache)


def transformer(cfg: ModelConfig, gradient_checkpointing: bool = False) -> Model:
    """Decoder-only transformer: pre-RMSNorm, RoPE, causal (grouped-query) attention, SwiGLU/GELU MLP."""
    def new_cache() -> KVCache:
        return [None] * cfg.n_layers

    return Model(
        init=lambda key: init_params(cfg, key),
        apply=lambda params, tokens, key=None, cache=None: apply(
            cfg, params, tokens, key, cache, gradient_checkpointing and cache is None),
        new_cache=new_cache,
        config=cfg,
        param_role=param_role,
    )
