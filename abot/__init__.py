"""abot: train small language models from scratch on MLX, as pure functions over parameter trees."""

from abot.blas import ensure_fast_blas

ensure_fast_blas()  # must run before anything imports mlx.core

__version__ = "0.1.0"
