"""abot: train small language models from scratch on MLX, as pure functions over parameter trees."""

__version__ = "0.1.0"

from abot.platform import prepare  # noqa: E402

# Before mlx.core loads: on Linux CPU it loads the fast BLAS that MLX binds at load time and sets the JIT's
# compiler, malloc and evaluation order that MLX reads (abot/platform). Every `import abot.x` runs this file
# first, so a library module needs no import for it, and a user's script needs only `import abot` first.
prepare()

try:
    import mlx.core  # noqa: F401,E402
except ImportError as err:  # Linux: the `mlx` bindings without a backend wheel
    raise ImportError(f"MLX cannot load its backend ({err}). On Linux install one with abot's extras: "
                      "pip install -e '.[cpu]' (CPU) or pip install -e '.[cuda]' (NVIDIA GPU)") from err
