"""abot: train small language models from scratch on MLX, as pure functions over parameter trees."""

from abot.cpu import ensure_eval_order, ensure_fast_blas, ensure_jit_flags, ensure_malloc_reuse

ensure_fast_blas()  # these must run before anything imports mlx.core
ensure_jit_flags()
ensure_malloc_reuse()
ensure_eval_order()

try:
    import mlx.core  # noqa: F401,E402
except ImportError as err:  # Linux: the `mlx` bindings without a backend wheel
    raise ImportError(f"MLX cannot load its backend ({err}). On Linux install one with abot's extras: "
                      "pip install -e '.[cpu]' (CPU) or pip install -e '.[cuda]' (NVIDIA GPU)") from err

__version__ = "0.1.0"
