"""The one pluggable attention backend interface of the model.

Every backend is an nn.Module called as
    backend(q, k, v, q_pre=..., k_pre=..., ctx=...) -> out [B, Hq, T, D]
with q [B, Hq, T, D], k/v [B, Hkv, T, D] after RoPE, and q_pre/k_pre the same before RoPE (after QK-norm),
which the RTPurbo indexer needs. `ctx` carries what is shared by all layers of one forward: document ids
for packed sequences, a dict where backends may leave losses/statistics (stage 1 KL, kept density), and
later the KV cache, and under context parallelism the CPContext (ctx.extras["cp"]; then q/k/v hold only this
rank's tokens, see torchtitan_rtpurbo/distributed/context_parallel.py). RTPurbo replaces `layer.attention.inner_attention` with its own backend
(models/rtpurbo/convert.py); the model code does not change.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class AttentionContext:
    """Per-forward state shared by every layer; each layer must see THIS object (not a copy), since the
    backends append to ctx.collect and read ctx.extras.

    Deliberately a plain class, not a dataclass: FSDP2 walks dataclasses, dicts and lists in a block's
    arguments (input casting, and post-backward hooks on every grad-requiring tensor it finds) and rebuilds
    them, so from the first grad-requiring entry in ctx.collect on (stage-1 KL, MoE aux loss) every later
    block would have received a fresh copy and its statistics would never reach the task."""

    __slots__ = ("doc_ids", "collect", "kv_cache", "extras")

    def __init__(self, doc_ids: torch.Tensor | None = None, collect: dict[str, Any] | None = None,
                 kv_cache: Any = None, extras: dict[str, Any] | None = None):
        self.doc_ids = doc_ids  # [B, T] document index of each token (packed sequences)
        self.collect = collect  # backends append statistics / auxiliary losses here
        self.kv_cache = kv_cache  # inference cache (None in training)
        self.extras = {} if extras is None else extras  # e.g. "cp": CPContext, "decode_from": int

    def __repr__(self) -> str:
        return (f"AttentionContext(doc_ids={None if self.doc_ids is None else tuple(self.doc_ids.shape)}, "
                f"collect={None if self.collect is None else sorted(self.collect)}, "
                f"kv_cache={type(self.kv_cache).__name__}, extras={sorted(self.extras)})")


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
    """Full causal attention through SDPA or FlexAttention.

    Context parallel aware by itself: with a CPContext in ctx.extras["cp"], q/k/v are this rank's tokens
    (load-balanced layout) and the exact result comes from all-gathering K/V (cp_dense_attention); without
    one it is the plain path, so one model trains under CP and evaluates without it. It is built in, not a
    subclass swapped in by apply_cp, because stage 2's teacher (models/rtpurbo/export.py dense_backends)
    installs fresh DenseAttention modules inside a CP-parallelised model."""

    supports_context_parallel = True  # parallelize.apply_cp keeps backends that declare this

    def __init__(self, backend: str = "sdpa"):
        super().__init__()
        if backend not in ("sdpa", "flex"):
            raise ValueError(f"model.attn_backend must be 'sdpa' or 'flex', got {backend!r}")
        self.backend = backend

    def forward(self, q, k, v, *, q_pre=None, k_pre=None, ctx: AttentionContext | None = None):
        cp = ctx.extras.get("cp") if ctx is not None else None
        if cp is not None:
            from torchtitan_rtpurbo.distributed.context_parallel import cp_dense_attention

            # the global doc ids travel in the CPContext (ctx.doc_ids are the local ones); "flex" and
            # "sdpa" are the same math, cp_dense_attention picks SDPA or FlexAttention per chunk itself
            return cp_dense_attention(q, k, v, cp)
        doc_ids = ctx.doc_ids if ctx is not None else None
        if self.backend == "flex":
            from kernels.masks import causal_attention

            return causal_attention(q, k, v, doc_ids=doc_ids)
        return dense_causal_attention(q, k, v, doc_ids)

    def extra_repr(self) -> str:
        return f"backend={self.backend}"


def build_attention_backend(backend: str) -> nn.Module:
    return DenseAttention(backend)
