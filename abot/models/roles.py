"""What each parameter is for, as a model declares it: the optimizer and the memory estimate read it.

A model's `param_role(path, leaf) -> role` names the role of one leaf; `path` is its `mlx.utils.tree_flatten`
path ("blocks.0.wq"). muon_adamw gives Muon the 2-D leaves whose role is HIDDEN (Muon is meant for hidden
linear maps, not lookup tables or the map to the vocabulary: Keller Jordan, 2024) and AdamW the rest;
`abot verify` counts parameters by role. The function must depend on the path and the shape only.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

ParamRole = Callable[[str, mx.array], str]  # (tree_flatten path, leaf) -> one of ROLES

EMBEDDING = "embedding"  # a lookup table of token vectors
HEAD = "head"  # the map from the last hidden state to the vocabulary's logits
HIDDEN = "hidden"  # a 2-D linear map between hidden states (Muon's domain)
NORM = "norm"  # a normalisation gain
BIAS = "bias"
OTHER = "other"  # anything else (the convention's 1-D leaves: it cannot tell a gain from a bias)
ROLES = (EMBEDDING, HEAD, HIDDEN, NORM, BIAS, OTHER)

# The convention for a model that declares nothing: the names abot's transformer has always used.
CONVENTIONAL_NAMES = {"embed": EMBEDDING, "head": HEAD}


def conventional_role(path: str, leaf: mx.array) -> str:
    """The role of a leaf of a model that declares none: a path component named "embed" or "head" gives
    EMBEDDING or HEAD, any other 2-D leaf is HIDDEN, the rest OTHER.

    Every 2-D leaf is a linear map, and Muon suits all of them but the embedding and the head, which
    only names can tell apart (their shapes are those of any matrix). These are the names abot's
    optimizers recognised before models declared roles, so a plugin model's numbers do not change.
    """
    for part in (path or "").split("."):
        if part in CONVENTIONAL_NAMES:
            return CONVENTIONAL_NAMES[part]
    return HIDDEN if leaf.ndim == 2 else OTHER
