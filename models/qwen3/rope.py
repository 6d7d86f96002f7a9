"""Rotary position embedding (rotate-half, as Hugging Face Qwen3) with optional YaRN scaling.

There is no per-layer table and no max_seq_len table at all: cos/sin are computed once per forward from
the actual positions (a [B, T, head_dim] pair), so 1M-token contexts cost O(T * head_dim), and packed
documents get per-document positions for free.
"""

from __future__ import annotations

import math

import torch

from models.qwen3.args import Qwen3ModelArgs


def rope_inv_freq(args: Qwen3ModelArgs) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (float32) and the attention (m)scale, matching HF's rope init."""
    dim = args.head_dim
    base = args.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = args.rope_scaling
    if sc is None or sc.rope_type in ("default", "none"):
        return inv_freq, 1.0
    if sc.rope_type != "yarn":
        raise ValueError(f"rope_scaling.rope_type {sc.rope_type!r} not supported (only 'yarn')")
    factor = sc.factor
    orig = sc.original_max_position_embeddings
    attention_factor = sc.attention_factor if sc.attention_factor is not None else (
        0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    )

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(sc.beta_fast)), 0)
    high = min(math.ceil(correction_dim(sc.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero, as HF does
    ramp = (torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)
    extrapolation_factor = 1 - ramp.clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    inv_interp = 1.0 / (factor * pos_freqs)
    inv_extrap = 1.0 / pos_freqs
    inv_freq = inv_interp * (1 - extrapolation_factor) + inv_extrap * extrapolation_factor
    return inv_freq, attention_factor


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, T, head_dim] (angles in float32, cast at the end)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * mscale).to(dtype), (emb.sin() * mscale).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D]."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin
