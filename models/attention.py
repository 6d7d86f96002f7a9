"""The one pluggable attention backend interface of the model.

Every backend is an nn.Module called as
    backend(q, k, v, q_pre=..., k_pre=..., ctx=...) -> out [B, Hq, T, D]
with q [B, Hq, T, D], k/v [B, Hkv, T, D] after RoPE, and q_pre/k_pre the same before RoPE (after QK-norm),
which the RTPurbo indexer needs. `ctx` carries what is shared by all layers of one forward: document ids
for packed sequences, a dict where backends may leave losses/statistics (stage 1 KL, kept density), and
later the KV cache. RTPurbo replaces `layer.attention.inner_attention` with its own backend
(models/rtpurbo/convert.py); the model code does not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class AttentionContext:
    doc_ids: torch.Tensor | None = None  # [B, T] document index of each token (packed sequences)
    collect: dict[str, Any] | None = None  # backends append statistics / auxiliary losses here
    kv_cache: Any = None  # inference cache (None in training)
    extras: dict[str, Any] = field(default_factory=dict)


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] doc ids -> [B, 1, T, T] bool (same document and causal). Only for short sequences."""
    T = doc_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


def needs_document_mask(doc_ids: torch.Tensor | None) -> bool:
    return doc_ids is not None and bool((doc_ids != doc_ids[:, :1]).any())


def sdpa_attention(q, k, v, doc_ids: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal (optionally document-masked) SDPA with GQA."""
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.is_cuda and q.dtype == torch.float32:
        # CUDA float32 + enable_gqa has no fused kernel (flash/cuDNN need 16-bit, mem-efficient has no GQA):
        # SDPA would fall back to the math path and build the T x T score matrix (96 GiB at 16K, batch 6).
        # Expanding K/V to the query heads keeps the memory-efficient kernel.
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    if needs_document_mask(doc_ids):
        mask = document_causal_mask(doc_ids)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)


def dense_causal_attention(q, k, v, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Full causal attention with GQA: SDPA (cuDNN / flash on GPU); packed documents go to FlexAttention on
    CUDA (a BlockMask from block indices, never a T x T mask) and to a dense mask on CPU (short T)."""
    if q.is_cuda and needs_document_mask(doc_ids):
        from kernels.masks import causal_attention

        return causal_attention(q, k, v, doc_ids=doc_ids)
    return sdpa_attention(q, k, v, doc_ids)


class DenseAttention(nn.Module):
    """Full causal attention through SDPA or FlexAttention."""

    def __init__(self, backend: str = "sdpa"):
        super().__init__()
        if backend not in ("sdpa", "flex"):
            raise ValueError(f"model.attn_backend must be 'sdpa' or 'flex', got {backend!r}")
        self.backend = backend

    def forward(self, q, k, v, *, q_pre=None, k_pre=None, ctx: AttentionContext | None = None):
        doc_ids = ctx.doc_ids if ctx is not None else None
        if self.backend == "flex":
            from kernels.masks import causal_attention

            return causal_attention(q, k, v, doc_ids=doc_ids)
        return dense_causal_attention(q, k, v, doc_ids)

    def extra_repr(self) -> str:
        return f"backend={self.backend}"


def build_attention_backend(backend: str) -> nn.Module:
    return DenseAttention(backend)
