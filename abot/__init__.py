"""abot: train small language models from scratch on MLX, as pure functions over parameter trees."""

from abot.cpu import ensure_fast_blas, ensure_jit_flags, ensure_malloc_reuse

ensure_fast_blas()  # both must run before anything imports mlx.core
ensure_jit_flags()
ensure_malloc_reuse()

__version__ = "0.1.0"
