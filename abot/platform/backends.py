"""Which MLX backend wheels are installed: asked before `mlx.core` loads, so it reads package metadata only."""

from __future__ import annotations

import importlib.metadata
import sys


def installed_backends() -> list[str]:
    """MLX's backend distributions present (Linux wheels: mlx-cpu, mlx-cuda-12, mlx-cuda-13)."""
    names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in importlib.metadata.distributions()}
    return sorted(n for n in names if n == "mlx-cpu" or n.startswith("mlx-cuda"))


def backend_conflict() -> tuple[str, str] | None:
    """(problem, fix) when two Linux backends are installed: they overwrite each other's mlx/lib/libmlx.so."""
    found = installed_backends()
    if len(found) < 2:
        return None
    keep = "abot[cuda]" if any(n.startswith("mlx-cuda") for n in found) else "abot[cpu]"
    return (f"{' and '.join(found)} are both installed and share mlx/lib/libmlx.so",
            f"pip uninstall -y {' '.join(found)} && pip install '{keep}'")


def linux_cpu_build() -> bool:
    """True for MLX's Linux CPU build (CUDA builds run matmuls through cuBLAS; macOS uses Accelerate)."""
    if not sys.platform.startswith("linux"):
        return False
    backends = installed_backends()
    return "mlx-cpu" in backends and not any(n.startswith("mlx-cuda") for n in backends)
