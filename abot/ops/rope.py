"""Rotary position embeddings (Su et al., 2021), with Llama 3's frequency scaling."""

import math

import mlx.core as mx


def apply_rope(x: mx.array, theta: float, offset: int = 0, periods: mx.array | None = None) -> mx.array:
    """Rotate (batch, heads, seq, head_dim) by position; `offset` is the first position (KV-cached decoding).

    Layout: "rotate half" (traditional=False): dimension i pairs with i + head_dim/2, the layout of
    Hugging Face's Llama, so exported q/k weights need no permutation. `periods` (from `rope_periods`)
    replaces the frequencies theta^(-2i/head_dim) when the model scales them.
    """
    if periods is None:
        return mx.fast.rope(x, x.shape[-1], traditional=False, base=theta, scale=1.0, offset=offset)
    return mx.fast.rope(x, x.shape[-1], traditional=False, base=None, scale=1.0, offset=offset, freqs=periods)


def inverse_frequencies(head_dim: int, theta: float) -> list[float]:
    """RoPE's angle per position for each rotated pair: theta^(-2i/head_dim), i < head_dim/2."""
    return [theta ** (-2 * i / head_dim) for i in range(head_dim // 2)]


def llama3_inverse_frequencies(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                               high_freq_factor: float, original_max_position_embeddings: int) -> list[float]:
    """Llama 3's scaled inverse frequencies (Hugging Face's `_compute_llama3_parameters`).

    With L the original context and wavelength w = 2 pi / f: w < L / high keeps f; w > L / low gives
    f / factor; in between, s = (L / w - low) / (high - low) blends them: (1 - s) f / factor + s f.
    """
    length, low, high = original_max_position_embeddings, low_freq_factor, high_freq_factor
    out = []
    for f in inverse_frequencies(head_dim, theta):
        wavelength = 2 * math.pi / f
        if wavelength < length / high:
            out.append(f)
        elif wavelength > length / low:
            out.append(f / factor)
        else:
            s = (length / wavelength - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return out


def rope_periods(head_dim: int, theta: float, scaling: dict | None) -> mx.array | None:
    """The `periods` argument of `apply_rope` for model.rope_scaling: None without scaling (RoPE's own
    frequencies from theta), else 1 / f per pair, which is what mx.fast.rope's `freqs` takes."""
    if scaling is None:
        return None
    options = {k: v for k, v in scaling.items() if k != "rope_type"}
    if scaling.get("rope_type") != "llama3":  # config_rules.rope_scaling_problems refuses these earlier
        raise ValueError(f"model.rope_scaling: rope_type {scaling.get('rope_type')!r} is not supported (llama3)")
    return mx.array([1.0 / f for f in llama3_inverse_frequencies(head_dim, theta, **options)], dtype=mx.float32)
