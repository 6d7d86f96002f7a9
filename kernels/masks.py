"""FlexAttention BlockMasks built directly from block index arithmetic.

Conventions (shared by every kernel in this package):
  q [B, Hq, T, D], k/v [B, Hkv, T, D]; query head h uses kv head h // (Hq // Hkv).
  A key n is visible from query m iff n <= m, both lie in the same document and, for a
  window+sink ("local") mask, (m - n < window) or (n - doc_start(m) < sinks).
  A document is a maximal run of equal values in doc_ids[b] (packed sequences); without
  doc_ids the whole row is one document starting at 0.

Why not `create_block_mask`: it evaluates mask_mod over a T x T grid (128 GiB at T = 128K
without compile) and its kv_indices are [.., T/128, T/128] per (batch, head) (256 MiB at 1M).
Here the visible key blocks of a query block are at most two index ranges (the sink blocks
and the window blocks), so the BlockMask is computed in O(T/block * blocks-per-row) memory,
with head/batch dimension 1 (H=None / B=None) whenever the mask does not depend on them.
kv_indices are compact (width = the largest row count), which the CUDA kernels accept (they
index through strides). The partial and full lists are padded to one common width because
torch 2.11's Triton template reads full_kv_indices with kv_indices' strides (found on the
GPU: unequal widths gave wrong outputs and illegal addresses). The CPU inductor kernel
asserts full width, so on CPU the lists are padded to T/block columns (tests only, small T).

Full blocks (every (m, n) pair of the tile visible and in bounds) go to full_kv_* so the
kernel skips mask_mod on them; a tile touching the padded tail (T not a multiple of the
block) is always classified partial, as create_block_mask does.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

__all__ = [
    "document_segments",
    "causal_block_mask",
    "window_sink_block_mask",
    "block_lists_to_block_mask",
    "transpose_block_lists",
    "block_mask_to_dense",
    "local_mask_dense",
    "local_attention",
    "local_prefill_impl",
    "local_attention_reference",
    "causal_attention",
    "flex_attention_call",
]


# ----------------------------------------------------------------------------- helpers


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _device_key(device) -> str:
    """Normalise a device so 'cuda' and 'cuda:0' share one cache entry."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return str(dev)


def document_segments(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Return (segment id, document start) per token, both [B, T] int64.

    A segment is a maximal run of equal doc_ids, so documents packed back to back are
    separated even if two of them happen to carry the same id.
    """
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be [B, T], got shape {tuple(doc_ids.shape)}")
    B, T = doc_ids.shape
    change = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.ones(B, 1, dtype=torch.bool, device=doc_ids.device)
    starts = torch.cat([first, change], dim=1)
    seg = starts.to(torch.int64).cumsum(dim=1) - 1
    pos = torch.arange(T, device=doc_ids.device).expand(B, T)
    doc_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    return seg, doc_start


def _check_doc_ids(doc_ids: Tensor | None, seq_len: int, batch: int | None = None) -> None:
    if doc_ids is None:
        return
    if doc_ids.dim() != 2 or doc_ids.shape[1] != seq_len:
        raise ValueError(f"doc_ids must be [B, T={seq_len}], got shape {tuple(doc_ids.shape)}")
    if batch is not None and doc_ids.shape[0] != batch:
        raise ValueError(f"doc_ids batch {doc_ids.shape[0]} != q batch {batch}")


def _compact_rows(candidates: Tensor, keep: Tensor, pad_width: int | None) -> tuple[Tensor, Tensor]:
    """Move kept candidates to the front of each row, preserving their order.

    candidates/keep: [..., C]. Returns (num [...] int32, indices [..., W] int32) with
    W = max kept count (at least 1) or pad_width; entries past num are 0.
    """
    num = keep.sum(dim=-1)
    C = candidates.shape[-1]
    pos = keep.to(torch.int64).cumsum(dim=-1) - 1
    dump = torch.full_like(pos, C)  # dropped entries land in an extra column
    out = torch.zeros(*candidates.shape[:-1], C + 1, dtype=torch.int64, device=candidates.device)
    out.scatter_(-1, torch.where(keep, pos, dump), torch.where(keep, candidates, torch.zeros_like(candidates)))
    width = max(int(num.max().item()) if num.numel() else 1, 1)
    if pad_width is not None:
        width = max(width, pad_width)
    if width > C:
        out = torch.nn.functional.pad(out[..., :C], (0, width - C))
    else:
        out = out[..., :width]
    return num.to(torch.int32).contiguous(), out.to(torch.int32).contiguous()


def transpose_block_lists(num: Tensor, idx: Tensor, n_cols: int, pad_width: int | None = None) -> tuple[Tensor, Tensor]:
    """Transpose row-major block lists ([.., R] counts, [.., R, W] column ids) into
    column-major ones ([.., n_cols] counts, [.., n_cols, W'] row ids, ascending).

    This is FlexAttention's q_num_blocks / q_indices, needed only for the backward pass.
    Memory is O(number of listed blocks + n_cols * W'), never R x n_cols unless W' is.
    """
    *batch, R, W = idx.shape
    G = int(math.prod(batch)) if batch else 1
    num_f = num.reshape(G, R).to(torch.int64)
    idx_f = idx.reshape(G, R, W).to(torch.int64)
    valid = torch.arange(W, device=idx.device) < num_f[..., None]
    g = torch.arange(G, device=idx.device)[:, None, None].expand(G, R, W)
    r = torch.arange(R, device=idx.device)[None, :, None].expand(G, R, W)
    g, r, c = g[valid], r[valid], idx_f[valid]
    key = (g * n_cols + c) * R + r
    key, _ = torch.sort(key)
    r = key % R
    gc = key // R  # group * n_cols + col
    counts = torch.bincount(gc, minlength=G * n_cols)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(key.numel(), device=idx.device) - starts[gc]
    width = max(int(counts.max().item()) if counts.numel() else 1, 1)
    if pad_width is not None:
        width = max(width, pad_width)
    out = torch.zeros(G * n_cols, width, dtype=torch.int32, device=idx.device)
    out[gc, pos] = r.to(torch.int32)
    return (
        counts.reshape(*batch, n_cols).to(torch.int32).contiguous(),
        out.reshape(*batch, n_cols, width).contiguous(),
    )


# The CPU inductor flex kernel asserts kv_indices of full width (T / block); tests switch
# this off to see the compact lists that CUDA gets.
CPU_FULL_WIDTH_LISTS = True


def block_lists_to_block_mask(
    partial_num: Tensor,
    partial_idx: Tensor,
    full_num: Tensor,
    full_idx: Tensor,
    *,
    seq_len: int,
    q_block_size: int,
    kv_block_size: int,
    mask_mod: Callable,
    compute_q_blocks: bool,
) -> BlockMask:
    """Wrap block lists (already split into partial and full) in a BlockMask.

    The q-side lists (for the backward kernel) are built here only when asked: at 1M tokens
    the sink column alone makes them [.., T/kv_block, T/q_block].
    """
    n_kb = _cdiv(seq_len, kv_block_size)
    # The partial and full lists must have the same shape: torch 2.11's Triton template
    # reads FULL_KV_IDX (and FULL_Q_IDX) with the strides of KV_IDX (Q_IDX).
    width = max(partial_idx.shape[-1], full_idx.shape[-1])
    pad_cpu = partial_idx.device.type == "cpu" and CPU_FULL_WIDTH_LISTS
    if pad_cpu:  # CPU inductor asserts full-width lists
        width = max(width, n_kb)
    partial_idx, full_idx = _pad_last(partial_idx, width), _pad_last(full_idx, width)
    if compute_q_blocks:
        n_qb = _cdiv(seq_len, q_block_size)
        pad = n_qb if pad_cpu else None
        q_num, q_idx = transpose_block_lists(partial_num, partial_idx, n_kb, pad)
        fq_num, fq_idx = transpose_block_lists(full_num, full_idx, n_kb, pad)
        q_width = max(q_idx.shape[-1], fq_idx.shape[-1])
        q_idx, fq_idx = _pad_last(q_idx, q_width), _pad_last(fq_idx, q_width)
    else:
        q_num = q_idx = fq_num = fq_idx = None
    return BlockMask(
        seq_lengths=(seq_len, seq_len),
        kv_num_blocks=partial_num,
        kv_indices=partial_idx,
        full_kv_num_blocks=full_num,
        full_kv_indices=full_idx,
        q_num_blocks=q_num,
        q_indices=q_idx,
        full_q_num_blocks=fq_num,
        full_q_indices=fq_idx,
        BLOCK_SIZE=(q_block_size, kv_block_size),
        mask_mod=mask_mod,
    )


def _pad_last(x: Tensor, width: int) -> Tensor:
    if x.shape[-1] >= width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()


# ------------------------------------------------------------------ window/sink structure


def window_sink_block_ranges(
    seq_len: int,
    window: int,
    sinks: int,
    *,
    q_block_size: int,
    kv_block_size: int,
    device,
    doc_start: Tensor | None = None,
    q_block_start: int = 0,
    q_block_end: int | None = None,
) -> dict[str, Tensor]:
    """Per query block, the kv-block ranges a window+sink mask can touch.

    Returns int64 tensors of shape [Bd, nQB'] (Bd = doc_start's batch or 1):
      win_lo, win_hi: kv blocks overlapping the union of the block's windows
                      [max(qs - window + 1, doc_start(qs)), qe]  (a contiguous range);
      sink_lo, sink_hi: kv blocks overlapping [doc_start(qs), min(doc_start(qs)+sinks-1, qe)]
                      (empty, lo > hi, when sinks == 0);
      causal_lo: first kv block any query of the block can see (doc_start(qs) // kv_block);
      doc0: doc_start(qs); qs, qe: first/last (valid) query of the block.
    Only the first document of a query block can add sink blocks: later documents start
    inside the block, so their sinks lie inside the window range already.
    """
    n_qb = _cdiv(seq_len, q_block_size)
    q_block_end = n_qb if q_block_end is None else q_block_end
    qb = torch.arange(q_block_start, q_block_end, device=device, dtype=torch.int64)
    qs = qb * q_block_size
    qe = torch.clamp(qs + q_block_size, max=seq_len) - 1
    if doc_start is None:
        d0 = torch.zeros_like(qs)[None, :]
    else:
        d0 = doc_start[:, qs]
    qs, qe = qs[None, :], qe[None, :]
    lo_w = torch.maximum(qs - window + 1, d0)
    sink_end = torch.minimum(d0 + sinks - 1, qe)
    return {
        "qs": qs.expand_as(d0),
        "qe": qe.expand_as(d0),
        "doc0": d0,
        "win_lo": lo_w // kv_block_size,
        "win_hi": (qe // kv_block_size).expand_as(d0),
        "sink_lo": d0 // kv_block_size,
        # sinks == 0: sink_end = d0 - 1 < d0; use -1 so the range is empty
        "sink_hi": torch.where(sink_end >= d0, sink_end // kv_block_size, torch.full_like(d0, -1)),
        "causal_lo": d0 // kv_block_size,
    }


def _window_sink_block_lists(
    seq_len: int,
    window: int,
    sinks: int,
    block_size: int,
    device,
    seg: Tensor | None,
    doc_start: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(partial_num, partial_idx, full_num, full_idx), shapes [Bd, 1, nQB(, W)]."""
    B_q = B_k = block_size
    T = seq_len
    rng = window_sink_block_ranges(
        T, window, sinks, q_block_size=B_q, kv_block_size=B_k, device=device, doc_start=doc_start
    )
    n_kb = _cdiv(T, B_k)
    n_win = min(n_kb, (window - 1 + B_q - 1) // B_k + 2)
    n_sink = min(n_kb, (sinks - 1) // B_k + 2) if sinks > 0 else 0
    ar_w = torch.arange(n_win, device=device)
    cand_w = rng["win_lo"][..., None] + ar_w
    valid_w = cand_w <= rng["win_hi"][..., None]
    if n_sink:
        cand_s = rng["sink_lo"][..., None] + torch.arange(n_sink, device=device)
        # sink blocks at or after win_lo are already in the window range
        valid_s = (cand_s <= rng["sink_hi"][..., None]) & (cand_s < rng["win_lo"][..., None])
        cand = torch.cat([cand_s, cand_w], dim=-1)  # ascending wherever valid
        valid = torch.cat([valid_s, valid_w], dim=-1)
    else:
        cand, valid = cand_w, valid_w
    cand = torch.where(valid, cand, torch.zeros_like(cand))

    qs, qe, d0 = rng["qs"][..., None], rng["qe"][..., None], rng["doc0"][..., None]
    ks = cand * B_k
    ke = torch.clamp(ks + B_k, max=T) - 1
    in_bounds = (ks + B_k <= T) & (qs + B_q <= T)
    if seg is not None:
        same_doc = torch.gather(seg, 1, ks.flatten(1)).view_as(ks) == torch.gather(seg, 1, qe.flatten(1)).view_as(qe)
    else:
        same_doc = torch.ones_like(valid)
    gap_lo = d0 + sinks  # keys in [gap_lo, qe - window] are hidden from the last query
    gap_hi = qe - window
    gap_clear = (ke < gap_lo) | (ks > gap_hi) | (gap_lo > gap_hi)
    full = valid & in_bounds & (ke <= qs) & same_doc & gap_clear
    partial = valid & ~full
    p_num, p_idx = _compact_rows(cand, partial, None)
    f_num, f_idx = _compact_rows(cand, full, None)
    return p_num[:, None], p_idx[:, None], f_num[:, None], f_idx[:, None]


def _make_window_sink_mask_mod(window: int, sinks: int, seg: Tensor | None, doc_start: Tensor | None) -> Callable:
    if seg is None:

        def window_sink_mask(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (((q_idx - kv_idx) < window) | (kv_idx < sinks))

        return window_sink_mask

    def window_sink_doc_mask(b, h, q_idx, kv_idx):
        same = seg[b, q_idx] == seg[b, kv_idx]
        sink = (kv_idx - doc_start[b, q_idx]) < sinks
        return same & (kv_idx <= q_idx) & (((q_idx - kv_idx) < window) | sink)

    return window_sink_doc_mask


def _make_causal_mask_mod(seg: Tensor | None) -> Callable:
    if seg is None:

        def causal_mask(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx

        return causal_mask

    def causal_doc_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (seg[b, q_idx] == seg[b, kv_idx])

    return causal_doc_mask


def _check_mask_args(seq_len: int, window: int, sinks: int, block_size: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if window < 1:
        raise ValueError(f"window must be >= 1 (a query always sees itself), got {window}")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


@functools.lru_cache(maxsize=32)
def _cached_window_sink_mask(
    seq_len: int, window: int, sinks: int, block_size: int, device_key: str, compute_q_blocks: bool
) -> BlockMask:
    # Cached on the parameters, never on a mask_mod closure (closures defeat the cache).
    window = min(window, seq_len)  # a window >= T is plain causal; keeps the key canonical
    lists = _window_sink_block_lists(seq_len, window, sinks, block_size, torch.device(device_key), None, None)
    return block_lists_to_block_mask(
        *lists,
        seq_len=seq_len,
        q_block_size=block_size,
        kv_block_size=block_size,
        mask_mod=_make_window_sink_mask_mod(window, sinks, None, None),
        compute_q_blocks=compute_q_blocks,
    )


@functools.lru_cache(maxsize=32)
def _cached_causal_mask(seq_len: int, block_size: int, device_key: str, compute_q_blocks: bool) -> BlockMask:
    lists = _window_sink_block_lists(seq_len, seq_len, 0, block_size, torch.device(device_key), None, None)
    return block_lists_to_block_mask(
        *lists,
        seq_len=seq_len,
        q_block_size=block_size,
        kv_block_size=block_size,
        mask_mod=_make_causal_mask_mod(None),
        compute_q_blocks=compute_q_blocks,
    )


def window_sink_block_mask(
    seq_len: int,
    window: int,
    sinks: int,
    *,
    block_size: int = 128,
    device=None,
    doc_ids: Tensor | None = None,
    compute_q_blocks: bool = True,
) -> BlockMask:
    """BlockMask for local heads: key n visible from query m iff n <= m, same document and
    (m - n < window or n - doc_start(m) < sinks).

    Batch/head dimensions are 1 (broadcast) without doc_ids, [B, 1] with them.
    compute_q_blocks=False skips the q-side lists (forward-only use, e.g. 1M-token prefill).
    Cached (lru_cache on the parameters) when doc_ids is None.
    """
    _check_mask_args(seq_len, window, sinks, block_size)
    if doc_ids is None:
        return _cached_window_sink_mask(seq_len, window, sinks, block_size, _device_key(device), compute_q_blocks)
    _check_doc_ids(doc_ids, seq_len)
    device = doc_ids.device if device is None else torch.device(device)
    seg, doc_start = document_segments(doc_ids.to(device))
    window = min(window, seq_len)
    lists = _window_sink_block_lists(seq_len, window, sinks, block_size, device, seg, doc_start)
    return block_lists_to_block_mask(
        *lists,
        seq_len=seq_len,
        q_block_size=block_size,
        kv_block_size=block_size,
        mask_mod=_make_window_sink_mask_mod(window, sinks, seg, doc_start),
        compute_q_blocks=compute_q_blocks,
    )


def causal_block_mask(
    seq_len: int,
    *,
    block_size: int = 128,
    device=None,
    doc_ids: Tensor | None = None,
    compute_q_blocks: bool = True,
) -> BlockMask:
    """Causal (and document) BlockMask, built from block indices; cached without doc_ids."""
    _check_mask_args(seq_len, 1, 0, block_size)
    if doc_ids is None:
        return _cached_causal_mask(seq_len, block_size, _device_key(device), compute_q_blocks)
    _check_doc_ids(doc_ids, seq_len)
    device = doc_ids.device if device is None else torch.device(device)
    seg, doc_start = document_segments(doc_ids.to(device))
    lists = _window_sink_block_lists(seq_len, seq_len, 0, block_size, device, seg, doc_start)
    return block_lists_to_block_mask(
        *lists,
        seq_len=seq_len,
        q_block_size=block_size,
        kv_block_size=block_size,
        mask_mod=_make_causal_mask_mod(seg),
        compute_q_blocks=compute_q_blocks,
    )


# ------------------------------------------------------------------------- dense views


def local_mask_dense(
    seq_len: int, window: int, sinks: int, *, device=None, doc_ids: Tensor | None = None
) -> Tensor:
    """The token-level visibility mask as a dense bool [Bd, T, T] (references/tests only)."""
    m = torch.arange(seq_len, device=device)[:, None]
    n = torch.arange(seq_len, device=device)[None, :]
    if doc_ids is None:
        vis = (n <= m) & (((m - n) < window) | (n < sinks))
        return vis[None]
    seg, doc_start = document_segments(doc_ids.to(device) if device is not None else doc_ids)
    same = seg[:, :, None] == seg[:, None, :]
    sink = (n[None] - doc_start[:, :, None]) < sinks
    return same & (n <= m)[None] & (((m - n) < window)[None] | sink)


def block_mask_to_dense(block_mask: BlockMask) -> Tensor:
    """Expand a BlockMask the way the fused kernel reads it: full blocks fully visible,
    partial blocks through mask_mod, unlisted blocks hidden. Returns bool [B, H, Tq, Tk].
    Test helper (materialises T x T)."""
    Tq, Tk = block_mask.seq_lengths
    Bq_sz, Bk_sz = block_mask.BLOCK_SIZE
    B, H, n_qb = block_mask.kv_num_blocks.shape
    n_kb = _cdiv(Tk, Bk_sz)
    dev = block_mask.kv_num_blocks.device

    def dense_blocks(num: Tensor | None, idx: Tensor | None) -> Tensor:
        out = torch.zeros(B, H, n_qb, n_kb + 1, dtype=torch.bool, device=dev)
        if num is None:
            return out[..., :n_kb]
        valid = torch.arange(idx.shape[-1], device=dev) < num[..., None]
        col = torch.where(valid, idx.long(), torch.full_like(idx.long(), n_kb))
        out.scatter_(-1, col, torch.ones_like(valid))
        return out[..., :n_kb]

    partial = dense_blocks(block_mask.kv_num_blocks, block_mask.kv_indices)
    full = dense_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    if (partial & full).any():
        raise AssertionError("a block is listed both as partial and as full")
    tq = torch.arange(Tq, device=dev)
    tk = torch.arange(Tk, device=dev)
    part_tok = partial[:, :, tq // Bq_sz][:, :, :, tk // Bk_sz]
    full_tok = full[:, :, tq // Bq_sz][:, :, :, tk // Bk_sz]
    b = torch.arange(B, device=dev)[:, None, None, None]
    h = torch.arange(H, device=dev)[None, :, None, None]
    mm = block_mask.mask_mod(b, h, tq[None, None, :, None], tk[None, None, None, :])
    mm = torch.as_tensor(mm, device=dev).expand(B, H, Tq, Tk)
    return full_tok | (part_tok & mm)


# ------------------------------------------------------------------------ attention ops


_COMPILED_FLEX = None


# Dynamo compiles flex_attention once per guard set (dtype, head counts, grad mode, mask_mod
# code, block sizes, ...) and after `recompile_limit` (default 8) entries silently runs it
# eagerly: that materialises T x T scores (out of memory at long T) and ignores the block
# lists. A model mixes local / causal / sparse masks, forward and backward, so 8 is too few.
MIN_RECOMPILE_LIMIT = 64


def _compiled_flex():
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        if getattr(cfg, name, MIN_RECOMPILE_LIMIT) < MIN_RECOMPILE_LIMIT:
            setattr(cfg, name, MIN_RECOMPILE_LIMIT)
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def flex_attention_call(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, *, scale=None, compiled: bool | None = None, kernel_options=None) -> Tensor:
    """flex_attention with GQA; compiled on CUDA (eager flex materialises T x T scores).

    FlexAttention has no CPU backward: on CPU with autograd this runs SDPA with the dense
    mask the BlockMask stands for (block_mask_to_dense; T x T, small T only)."""
    if q.device.type == "cpu" and _needs_grad(q, k, v):
        dense = block_mask_to_dense(block_mask)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=dense, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    if q.device.type == "cpu":  # flex refuses CPU tensors that require grad, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    if compiled is None:
        compiled = q.is_cuda
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1], kernel_options=kernel_options)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k/v must be [B={B}, Hkv, T={T}, D={D}]; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    return B, Hq, Hkv, T, D


def _needs_grad(*xs: Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


# FlexAttention kernel_options used by local_attention when none are passed (None = torch's
# own choice; on the H100 with torch 2.11 that is BLOCK_M 128, BLOCK_N 64, 8 warps, 3 stages
# for bf16 head_dim 128). scripts/bench_attention.py sweeps candidates (LOCAL_KERNEL_OPTION_
# CANDIDATES there); set this to the measured best. Keys: FlexKernelOptions in
# torch.nn.attention.flex_attention (BLOCK_M / BLOCK_N must divide the mask's 128-token blocks;
# fwd_* / bwd_* prefixes apply to one direction, e.g. bwd_BLOCK_M1).
# Measured 2026-11-25 on the H100 (docs/kernels.md, forward, 24 local heads): 441 / 425 / 437 TF/s at
# 32K / 128K / 1M vs 384 / 388 / 321 with torch's choice (70.2 / 70.6 / 88.8% of cuDNN's dense TF/s).
# Used for forward-only flex calls (prefill, evaluation, when local_attention does not take the chunked
# SDPA path of LOCAL_PREFILL_IMPL); calls that need gradients keep torch's choice, since backward was not swept.
LOCAL_KERNEL_OPTIONS: dict | None = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3,
                                     "IS_DIVISIBLE": True}
# Query heads per flex_attention call in local_attention (rounded down to whole KV groups; None =
# all heads in one call). Inductor indexes a call in int64 once q/k/v/out exceed 2^31 elements
# (24 heads x 1M tokens x 128), in int32 below; the benchmark measures whether splitting pays.
LOCAL_HEADS_PER_CALL: int | None = None


def default_local_kernel_options(on_cuda: bool, needs_grad: bool, block_size: int) -> dict | None:
    """LOCAL_KERNEL_OPTIONS where they were measured (CUDA, forward only, 128-token mask blocks that the
    128 x 128 tiles divide); None (torch's own choice) elsewhere."""
    if LOCAL_KERNEL_OPTIONS is None or not on_cuda or needs_grad:
        return None
    tile = max(LOCAL_KERNEL_OPTIONS.get("BLOCK_M", 0), LOCAL_KERNEL_OPTIONS.get("BLOCK_N", 0))
    return dict(LOCAL_KERNEL_OPTIONS) if tile and block_size % tile == 0 else None


# Forward-only window attention on CUDA (prefill, evaluation): "cudnn_chunked" runs the window band
# as two batched square causal cuDNN SDPA calls + a sink term, merged by log-sum-exp
# (kernels/window_sdpa.py); "flash_chunked" the same through the flash SDPA op; "flex" always runs
# FlexAttention. The chunked paths need CUDA, bf16/fp16, no gradient, no doc_ids, and a backend
# that passes its first-use probe; otherwise local_attention runs FlexAttention and logs why once.
LOCAL_PREFILL_IMPL = "cudnn_chunked"
LOCAL_PREFILL_IMPLS = ("flex", "cudnn_chunked", "flash_chunked")
_CHUNKED_BACKENDS = {"cudnn_chunked": "cudnn", "flash_chunked": "flash"}
_log = logging.getLogger(__name__)
_LOCAL_FALLBACK_LOGGED: set[str] = set()


def local_prefill_impl(q: Tensor, k: Tensor, v: Tensor, *, doc_ids: Tensor | None = None,
                       impl: str | None = None) -> tuple[str, str | None]:
    """(implementation local_attention runs, reason the requested chunked path is not taken or None).

    impl None means LOCAL_PREFILL_IMPL. A chunked impl is taken only on CUDA tensors, without
    gradients, without doc_ids, in bf16/fp16, when its SDPA backend passes the first-use probe
    (kernels/window_sdpa.window_sdpa_unavailable_reason)."""
    impl = LOCAL_PREFILL_IMPL if impl is None else impl
    if impl not in LOCAL_PREFILL_IMPLS:
        raise ValueError(f"impl must be one of {LOCAL_PREFILL_IMPLS}; got {impl!r}")
    if impl == "flex":
        return "flex", None
    if not q.is_cuda:
        return "flex", f"{impl}: tensors are on {q.device.type}, the chunked SDPA path is CUDA only"
    if _needs_grad(q, k, v):
        return "flex", f"{impl}: q/k/v require grad and the chunked SDPA path is forward-only"
    if doc_ids is not None:
        return "flex", f"{impl}: doc_ids given and the chunked SDPA path has no document masking"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return "flex", f"{impl}: dtype {q.dtype} (the chunked SDPA path runs bf16/fp16 only)"
    from kernels import window_sdpa

    reason = window_sdpa.window_sdpa_unavailable_reason(q, k, v, backend=_CHUNKED_BACKENDS[impl])
    return (impl, None) if reason is None else ("flex", f"{impl}: {reason}")


def _log_local_fallback(reason: str, on_cuda: bool) -> None:
    """Once per reason. CPU is not a fallback (the chunked path is CUDA only): debug level there.
    Nothing is logged while Dynamo traces (a log call would break the graph)."""
    if reason in _LOCAL_FALLBACK_LOGGED or torch.compiler.is_compiling():
        return
    _LOCAL_FALLBACK_LOGGED.add(reason)
    _log.log(logging.WARNING if on_cuda else logging.DEBUG, "local_attention runs FlexAttention: %s", reason)


@torch.compiler.disable
def _chunked_local_attention(q, k, v, *, window, sinks, scale, backend, heads_per_call):
    """kernels/window_sdpa.window_attention_sdpa, run eagerly (a graph break under torch.compile)."""
    from kernels.window_sdpa import window_attention_sdpa

    return window_attention_sdpa(q, k, v, window=window, sinks=sinks, scale=scale, backend=backend,
                                 heads_per_call=heads_per_call)


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    sinks: int,
    doc_ids: Tensor | None = None,
    scale: float | None = None,
    block_size: int = 128,
    compiled: bool | None = None,
    kernel_options: dict | None = None,
    heads_per_call: int | None = None,
    impl: str | None = None,
) -> Tensor:
    """Window + sink attention for local heads (GQA).

    impl (default LOCAL_PREFILL_IMPL): "cudnn_chunked" / "flash_chunked" run
    kernels/window_sdpa.window_attention_sdpa when they can (CUDA, no gradient, no doc_ids,
    bf16/fp16, backend probe passed); otherwise FlexAttention runs and the reason is logged once
    (an explicit impl= that cannot run raises instead). heads_per_call is passed on (None: the
    chunked path sizes its calls itself); block_size, compiled and kernel_options are flex-only.
    FlexAttention (compiled on CUDA):
    kernel_options: FlexAttention kernel options (default LOCAL_KERNEL_OPTIONS when no gradient is
    needed, torch's choice otherwise); each distinct
    dict is one more Dynamo compile of flex_attention. "IS_DIVISIBLE": True is dropped when
    T is not a multiple of 128 (it would skip bounds checks). heads_per_call: query heads per
    flex call, whole KV groups (default LOCAL_HEADS_PER_CALL; None = one call)."""
    B, Hq, Hkv, T, _ = _check_qkv(q, k, v)
    _check_doc_ids(doc_ids, T, B)
    chosen, reason = local_prefill_impl(q, k, v, doc_ids=doc_ids, impl=impl)
    if reason is not None:
        if impl is not None:
            raise RuntimeError(f"local_attention(impl={impl!r}) cannot run: {reason}")
        _log_local_fallback(reason, q.is_cuda)
    if chosen != "flex":
        return _chunked_local_attention(q, k, v, window=window, sinks=sinks, scale=scale,
                                        backend=_CHUNKED_BACKENDS[chosen], heads_per_call=heads_per_call)
    bm = window_sink_block_mask(
        T, window, sinks, block_size=block_size, device=q.device, doc_ids=doc_ids,
        compute_q_blocks=_needs_grad(q, k, v),
    )
    if kernel_options is None:
        kernel_options = default_local_kernel_options(q.is_cuda, _needs_grad(q, k, v), block_size)
    if kernel_options is not None and kernel_options.get("IS_DIVISIBLE") and T % 128:
        kernel_options = {k_: v_ for k_, v_ in kernel_options.items() if k_ != "IS_DIVISIBLE"}
    heads_per_call = LOCAL_HEADS_PER_CALL if heads_per_call is None else heads_per_call
    G = Hq // Hkv
    groups = max(1, (heads_per_call or Hq) // G)
    if groups >= Hkv:
        return flex_attention_call(q, k, v, bm, scale=scale, compiled=compiled, kernel_options=kernel_options)
    outs = [
        flex_attention_call(q[:, g0 * G : (g0 + groups) * G], k[:, g0 : g0 + groups], v[:, g0 : g0 + groups], bm,
                            scale=scale, compiled=compiled, kernel_options=kernel_options)
        for g0 in range(0, Hkv, groups)
    ]
    return torch.cat(outs, dim=1)


def causal_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    doc_ids: Tensor | None = None,
    scale: float | None = None,
    block_size: int = 128,
    compiled: bool | None = None,
    kernel_options: dict | None = None,
) -> Tensor:
    """Dense causal (+document) attention through FlexAttention, for the model's 'flex' backend."""
    B, _, _, T, _ = _check_qkv(q, k, v)
    _check_doc_ids(doc_ids, T, B)
    bm = causal_block_mask(T, block_size=block_size, device=q.device, doc_ids=doc_ids, compute_q_blocks=_needs_grad(q, k, v))
    return flex_attention_call(q, k, v, bm, scale=scale, compiled=compiled, kernel_options=kernel_options)


def masked_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, scale: float | None = None) -> Tensor:
    """Dense attention in fp32 with a bool mask broadcastable to [B, Hq, T, T]; GQA by repeat.
    Rows with no visible key return 0. Output in q's dtype."""
    _, Hq, Hkv, _, D = _check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    g = Hq // Hkv
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = torch.einsum("bhmd,bhnd->bhmn", q.float(), kf) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhmn,bhnd->bhmd", p, vf).to(q.dtype)


def local_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    sinks: int,
    doc_ids: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Dense masked attention in fp32 (T x T; small T only)."""
    B, _, _, T, _ = _check_qkv(q, k, v)
    _check_doc_ids(doc_ids, T, B)
    mask = local_mask_dense(T, window, sinks, device=q.device, doc_ids=doc_ids)[:, None]
    return masked_attention_reference(q, k, v, mask, scale=scale)
