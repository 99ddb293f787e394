"""The decoder-only transformer: pre-RMSNorm, RoPE, causal attention, SwiGLU (or GELU) MLP.

Parameters are a plain tree (dicts and a list of blocks) of mx.array; weights are stored
(in_features, out_features) so a layer is `x @ w`. With tied embeddings the output head *is*
`params["embed"]` (one leaf), used transposed.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import mlx.core as mx

from abot.config import ModelConfig
from abot.models.roles import EMBEDDING, HEAD, HIDDEN, NORM, ParamRole, conventional_role
from abot.ops.attention import causal_attention
from abot.ops.dropout import dropout
from abot.ops.mlp import gelu_mlp, swiglu
from abot.ops.norm import rms_norm
from abot.ops.rope import apply_rope

Params = dict[str, Any]
KVCache = list  # per layer: None (empty) or (keys, values), each (batch, heads, seq, head_dim)


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
    return int(cfg.mlp_multiple * cfg.d_model)


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

    blocks = []
    for _ in range(cfg.n_layers):
        block = {"attn_norm": mx.ones((d,)), "wq": normal((d, d)), "wk": normal((d, d)), "wv": normal((d, d)),
                 "wo": normal((d, d), out_std), "mlp_norm": mx.ones((d,))}
        if cfg.ffn_activation == "silu":
            block["w_gate"] = normal((d, h))
        block["w_up"] = normal((d, h))
        block["w_down"] = normal((h, d), out_std)
        blocks.append(block)
    params = {"embed": normal((cfg.vocab_size, d)), "blocks": blocks, "final_norm": mx.ones((d,))}
    if not cfg.tie_embeddings:
        params["head"] = normal((d, cfg.vocab_size))
    return params


# init_params' leaves by name (the last component of their path).
PARAM_ROLES = {"embed": EMBEDDING, "head": HEAD, "final_norm": NORM, "attn_norm": NORM, "mlp_norm": NORM,
               **{w: HIDDEN for w in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}}


def param_role(path: str, leaf: mx.array) -> str:
    """The role of one of `init_params`' leaves, from its name ("blocks.0.wq" -> hidden)."""
    return PARAM_ROLES[path.split(".")[-1]]


def count_params(params: Params) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(params))


def _split_heads(x: mx.array, n_heads: int) -> mx.array:
    b, t, d = x.shape
    return x.reshape(b, t, n_heads, d // n_heads).transpose(0, 2, 1, 3)


def _block(cfg: ModelConfig, p: Params, x: mx.array, keys, kv=None):
    """One pre-norm residual block; returns (x, (k, v)) with k, v including any cached positions."""
    offset = 0 if kv is None else kv[0].shape[2]  # kv is None: no cache, or an empty one
    h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q, k, v = (_split_heads(h @ p[w], cfg.n_heads) for w in ("wq", "wk", "wv"))
    q, k = apply_rope(q, cfg.rope_theta, offset), apply_rope(k, cfg.rope_theta, offset)
    if kv is not None:
        k, v = mx.concatenate([kv[0], k], axis=2), mx.concatenate([kv[1], v], axis=2)
    a = causal_attention(q, k, v).transpose(0, 2, 1, 3).reshape(x.shape)
    x = x + dropout(a @ p["wo"], cfg.dropout, keys[0])
    h = rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    if cfg.ffn_activation == "silu":
        m = swiglu(h, p["w_gate"], p["w_up"], p["w_down"])
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

    def block(p, x, *block_keys):
        return _block(cfg, p, x, block_keys or (None, None))[0]

    # Gradient checkpointing: keep only each block's input, recompute its inside during backward.
    run_block = mx.checkpoint(block) if checkpoint_blocks else block
    new_cache = []
    for i, p in enumerate(params["blocks"]):
        if cache is None:
            x = run_block(p, x, *(keys[2 * i:2 * i + 2] if use_dropout else ()))
        else:
            x, kv = _block(cfg, p, x, (None, None), cache[i])
            new_cache.append(kv)
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    logits = x @ (params["embed"].T if cfg.tie_embeddings else params["head"])
    return logits if cache is None else (logits, new_cache)


def transformer(cfg: ModelConfig, gradient_checkpointing: bool = False) -> Model:
    """Decoder-only transformer: pre-RMSNorm, RoPE, causal attention, SwiGLU/GELU MLP, tied embeddings."""
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
