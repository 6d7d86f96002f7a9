"""Triton kernel for the indexer block mass (kernels/block_select.py has the semantics and
the pure-torch versions; indexer_block_mass_triton has the signature of
indexer_block_mass_torch).

One program owns BLOCK_M softmax rows of one (batch, head): the queries of one query block
(mode="mean") or BLOCK_M pooled query blocks (mode="pooled"). Each row m has a key range
[lo(m), hi(m)] (causal, same document). Two loops over the key tiles of the union of the
rows' ranges, each tile = one key block of BLOCK_N = block_size tokens:
  1. online row max / sum of exp  ->  row log-sum-exp (kept in registers, never stored);
  2. p = exp(s - lse) per row, summed over the tile's keys; "mean" also sums over the
     rows and divides by the number of valid rows, "pooled" stores one value per row.
Scores never leave registers: no T x T (nor rows x T) tensor exists.
Scores use exp2 with log2(e) folded in. Both operands are fp32 in registers and the dot
runs in Triton's default tf32 on GPU: exact products for bf16/fp16 inputs (tf32 keeps 10
mantissa bits), ~1e-3 relative score error for fp32 inputs. (Casting to bf16 in-kernel
would double the dot rate, but the dot is not the bottleneck: the exponentials are.)

Selection pipeline "triton_hist" (select_blocks(threshold="triton_hist")), two kernels:
  _pooled_logmass_kernel  (mode="pooled" only) one pass, split over key chunks: program
      (key chunk, BLOCK_M pooled rows, batch*head) writes L[row, j] = log2 sum_{n in block j,
      visible} 2^(qbar . k_n * log2 e) for its CHUNK key blocks. No row normaliser is needed
      (it is the log-sum-exp of the row's L, taken by the selection kernel), so each score is
      exponentiated once and the grid covers (key chunks x row groups x heads) instead of
      (row groups x heads): the two-pass kernel above runs only cdiv(rows, 64) x heads
      programs, each walking the whole causal key range twice.
  _topp_select_hist_kernel  one program per (batch*head, query block) row, streaming the row
      in TILE-block tiles (only its causal range [causal_lo, win_hi]; no power-of-two row in
      registers): stats pass (normaliser, forced mass, free mass, max), then rounds that
      evaluate the free mass F(t) and count C(t) above NT thresholds spread over the current
      bit-pattern bracket [lo, hi) (a cumulative histogram; the first bracket is
      [(F_free - target) / (2 n_free), max]: no kept block can be lighter, exactly), until the
      bracket holds <= CAND blocks; those are gathered into registers and the exact threshold
      is found there; then one pass writes the selection. Same rule as the bisection kernel
      (topp_keep_reference: descending mass, ties by lower index, forced mass counts).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

import triton
import triton.language as tl

from kernels.block_select import _check_indexer, _pooled_queries, _row_ranges

__all__ = [
    "indexer_block_mass_triton",
    "indexer_block_logmass_triton",
    "triton_supports",
    "topp_select_rows_triton",
    "topp_select_rows_hist_triton",
    "HistConfig",
]



def _pow2(x: int) -> bool:
    return x >= 16 and (x & (x - 1)) == 0


def triton_supports(qi: Tensor, block_size: int, q_block_size: int, mode: str) -> bool:
    """Whether the Triton kernel handles these sizes (else use the torch version)."""
    return _pow2(block_size) and block_size <= 128 and (mode == "pooled" or (_pow2(q_block_size) and q_block_size <= 256))


@triton.jit
def _indexer_block_mass_kernel(
    Q, K, ROW_LO, ROW_HI, OUT,
    stride_q_bh, stride_q_row,
    stride_k_bh, stride_k_t,
    stride_lo_b,
    stride_o_bh, stride_o_row,
    H, R, RANK,
    RANK_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    REDUCE_ROWS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # 64-bit bases: [BH, rows, nKB] passes 2^31 at 1M tokens
    b = bh // H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    dims = tl.arange(0, RANK_PAD)
    lo = tl.load(ROW_LO + b * stride_lo_b + rows, mask=row_ok, other=2147483647)
    hi = tl.load(ROW_HI + b * stride_lo_b + rows, mask=row_ok, other=-1)
    q = tl.load(
        Q + bh * stride_q_bh + rows[:, None] * stride_q_row + dims[None, :],
        mask=row_ok[:, None] & (dims[None, :] < RANK), other=0.0,
    )
    start = (tl.min(lo, axis=0) // BLOCK_N) * BLOCK_N
    end = tl.max(hi, axis=0) + 1
    k_base = K + bh * stride_k_bh

    # pass 1: row log-sum-exp (base 2)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + cols[:, None] * stride_k_t + dims[None, :],
                    mask=(cols[:, None] < end) & (dims[None, :] < RANK), other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * 1.4426950408889634  # log2 units for exp2
        ok = (cols[None, :] >= lo[:, None]) & (cols[None, :] <= hi[:, None])
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))  # empty row: p = 0

    # pass 2: mass per key block
    n_valid = tl.sum(row_ok.to(tl.float32), axis=0)
    out_base = OUT + bh * stride_o_bh
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + cols[:, None] * stride_k_t + dims[None, :],
                    mask=(cols[:, None] < end) & (dims[None, :] < RANK), other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * 1.4426950408889634
        ok = (cols[None, :] >= lo[:, None]) & (cols[None, :] <= hi[:, None])
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        blk = n0 // BLOCK_N
        if REDUCE_ROWS:
            total = tl.sum(tl.sum(p, axis=1), axis=0) / n_valid
            tl.store(out_base + pid_m * stride_o_row + blk, total)
        else:
            tl.store(out_base + rows * stride_o_row + blk, tl.sum(p, axis=1), mask=row_ok)


def indexer_block_mass_triton(
    qi: Tensor,
    ki: Tensor,
    *,
    block_size: int = 64,
    q_block_size: int = 128,
    mode: str = "mean",
    doc_ids: Tensor | None = None,
    q_block_start: int = 0,
    q_block_end: int | None = None,
    num_warps: int | None = None,
    pooled_rows: int = 64,
) -> Tensor:
    """Block mass [B, Hr, nQB', nKB] float32 for query blocks [q_block_start, q_block_end)."""
    B, H, T, r = _check_indexer(qi, ki, block_size, q_block_size, doc_ids)
    if mode not in ("mean", "pooled"):
        raise ValueError(f"mode must be 'mean' or 'pooled', got {mode!r}")
    if not triton_supports(qi, block_size, q_block_size, mode):
        raise ValueError(
            f"Triton block mass needs block_size a power of two in [16, 128] and (mean) q_block_size a power "
            f"of two in [16, 256]; got block_size={block_size}, q_block_size={q_block_size}"
        )
    n_qb = (T + q_block_size - 1) // q_block_size
    n_kb = (T + block_size - 1) // block_size
    qb0, qb1 = q_block_start, (n_qb if q_block_end is None else q_block_end)
    lo, hi = _row_ranges(T, q_block_size, mode, doc_ids, qi.device, qb0, qb1)
    lo = lo.to(torch.int32).contiguous()
    hi = hi.to(torch.int32).contiguous()
    k = ki.reshape(B * H, T, r)
    if k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        k = k.float()
    k = k.contiguous()  # read in its own dtype, upcast in-kernel
    q_end = min(qb1 * q_block_size, T)
    if mode == "mean":
        rows_t = qi[:, :, qb0 * q_block_size : q_end]
        block_m, reduce_rows = q_block_size, True
    else:
        rows_t = _pooled_queries(qi[:, :, qb0 * q_block_size : q_end], q_block_size)
        block_m, reduce_rows = pooled_rows, False
    R = rows_t.shape[2]
    q = rows_t.reshape(B * H, R, r).float().contiguous()  # cast to ki's dtype in-kernel
    out_rows = qb1 - qb0
    out = torch.zeros(B * H, out_rows, n_kb, dtype=torch.float32, device=qi.device)
    rank_pad = max(16, triton.next_power_of_2(r))
    if num_warps is None:
        num_warps = 8 if block_m * block_size >= 8192 else 4
    grid = (triton.cdiv(R, block_m), B * H)
    _indexer_block_mass_kernel[grid](
        q, k, lo, hi, out,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1),
        lo.stride(0) if lo.shape[0] > 1 else 0,
        out.stride(0), out.stride(1),
        H, R, r,
        RANK_PAD=rank_pad, BLOCK_M=block_m, BLOCK_N=block_size, REDUCE_ROWS=reduce_rows,
        num_warps=num_warps,
    )
    return out.view(B, H, out_rows, n_kb)


# --------------------------------------------------------------------- fused top-p select


@triton.jit
def _topp_select_rows_kernel(
    MASS, RANGES, OUT_IDX, OUT_NUM, OUT_KEPT, OUT_FREE,
    n_rows, H, NKB, stride_ranges_b, top_p,
    BLOCK_K: tl.constexpr,
    DENSE: tl.constexpr,
):
    """One program per (batch*head, query block) row of MASS [BH * n_rows, NKB]:
    forced = window/sink block ranges, candidates = causal range, extra = smallest prefix of
    the free blocks (descending mass, ties by index) with forced + extra mass >= top_p, found
    by 31 halvings of the float bit pattern (same rule as topp_keep_threshold); writes the
    selected block ids ascending to OUT_IDX[row, :num], and the counts."""
    row = tl.program_id(0).to(tl.int64)
    bh = row // n_rows
    i = row % n_rows
    b = bh // H
    rp = RANGES + b * stride_ranges_b + i * 5
    win_lo = tl.load(rp)
    win_hi = tl.load(rp + 1)
    sink_lo = tl.load(rp + 2)
    sink_hi = tl.load(rp + 3)
    causal_lo = tl.load(rp + 4)
    k = tl.arange(0, BLOCK_K)
    inb = k < NKB
    forced = (((k >= win_lo) & (k <= win_hi)) | ((k >= sink_lo) & (k <= sink_hi))) & inb
    free = (k >= causal_lo) & (k <= win_hi) & inb & (forced == 0)
    if DENSE:
        extra = free
    else:
        m = tl.load(MASS + row * NKB + k, mask=inb, other=0.0)
        target = top_p - tl.sum(tl.where(forced, m, 0.0), axis=0)
        x = tl.where(free, m, 0.0)
        bits = x.to(tl.int32, bitcast=True)
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], 0x7F800001, tl.int32)
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            s = tl.sum(tl.where(bits >= mid, x, 0.0), axis=0)
            ok = s >= target
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        above = bits > lo
        sum_above = tl.sum(tl.where(above, x, 0.0), axis=0)
        tie = bits == lo
        tie_mass = tl.where(tie, x, 0.0)
        tie_excl = tl.cumsum(tie_mass, axis=0) - tie_mass
        extra = (above | (tie & ((sum_above + tie_excl) < target))) & (x > 0.0) & free
    sel = forced | extra
    sel_i = sel.to(tl.int32)
    pos = tl.cumsum(sel_i, axis=0) - 1
    tl.store(OUT_IDX + row * NKB + pos, k.to(tl.int32), mask=sel)
    tl.store(OUT_NUM + row, tl.sum(sel_i, axis=0))
    tl.store(OUT_KEPT + row, tl.sum(extra.to(tl.int32), axis=0))
    tl.store(OUT_FREE + row, tl.sum(free.to(tl.int32), axis=0))


def topp_select_rows_triton(
    mass: Tensor | None, ranges: Tensor, *, batch: int, heads: int, n_kb: int, top_p: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused selection for a chunk of query blocks.

    mass [B, H, n, nKB] float32 (ignored when top_p >= 1, may be None); ranges [Bd, n, 5] int32
    (win_lo, win_hi, sink_lo, sink_hi, causal_lo per query block; Bd = 1 or B).
    Returns (indices [B, H, n, nKB] int32 with the selected ids first, ascending; num, kept
    extra, free [B, H, n] int32).
    """
    n = ranges.shape[1]
    dev = ranges.device
    dense = top_p >= 1.0
    if mass is None:
        mass_arg = torch.empty(1, dtype=torch.float32, device=dev)
    else:
        if tuple(mass.shape) != (batch, heads, n, n_kb):
            raise ValueError(f"mass must be [B={batch}, H={heads}, n={n}, nKB={n_kb}], got {tuple(mass.shape)}")
        mass_arg = mass.float().contiguous()
    ranges = ranges.to(torch.int32).contiguous()
    out_idx = torch.zeros(batch, heads, n, n_kb, dtype=torch.int32, device=dev)  # padding stays 0
    num = torch.empty(batch, heads, n, dtype=torch.int32, device=dev)
    kept = torch.empty_like(num)
    free = torch.empty_like(num)
    block_k = max(16, triton.next_power_of_2(n_kb))
    num_warps = min(32, max(4, block_k // 512))
    _topp_select_rows_kernel[(batch * heads * n,)](
        mass_arg, ranges, out_idx, num, kept, free,
        n, heads, n_kb, ranges.stride(0) if ranges.shape[0] > 1 else 0, float(top_p),
        BLOCK_K=block_k, DENSE=dense, num_warps=num_warps,
    )
    return out_idx, num, kept, free


# ------------------------------------------------------- one-pass block log-mass (pooled)

LOG2E = 1.4426950408889634
LOGMASS_DOT_PRECISION = ["tf32x3"]  # mutable: falls back to "tf32" if tf32x3 fails to compile


def pooled_queries_log2(qi: Tensor, q_block_size: int) -> Tensor:
    """Mean-pooled indexer queries of every query block, times log2(e): [B, Hr, nQB, r] fp32."""
    return (_pooled_queries(qi, q_block_size) * LOG2E).contiguous()


def doc_start_per_q_block(doc_ids: Tensor | None, seq_len: int, q_block_size: int, device) -> Tensor | None:
    """doc_start(first query of each query block): [Bd, nQB] int32 (None without documents)."""
    if doc_ids is None:
        return None
    from kernels.masks import document_segments

    _, doc_start = document_segments(doc_ids.to(device))
    qs = torch.arange(0, seq_len, q_block_size, device=device)
    return doc_start[:, qs].to(torch.int32).contiguous()


@triton.jit
def _pooled_logmass_kernel(
    Q, K, DOC0, OUT,
    stride_q_bh, stride_q_row,
    stride_k_bh, stride_k_t,
    stride_doc_b,
    stride_o_bh, stride_o_row,
    H, R, q_block0, T, RANK,
    QB: tl.constexpr,
    BK: tl.constexpr,
    RANK_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_DOC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Program (key chunk c, row group m, batch*head): L for key blocks [c*CHUNK, (c+1)*CHUNK)
    of BLOCK_M pooled rows. Row r (query block g = q_block0 + r) sees keys [doc0(g), qe(g)];
    only blocks overlapping that range are written."""
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    b = bh // H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    g = q_block0 + rows
    qe = tl.minimum(g * QB + QB, T) - 1
    if HAS_DOC:
        d0 = tl.load(DOC0 + b * stride_doc_b + g, mask=row_ok, other=0)
    else:
        d0 = g * 0
    lo = tl.where(row_ok, d0, 2147483647)
    hi = tl.where(row_ok, qe, -1)
    lo_min = tl.min(lo, axis=0)
    hi_max = tl.max(hi, axis=0)
    lo_max = tl.max(tl.where(row_ok, lo, -1), axis=0)
    hi_min = tl.min(tl.where(row_ok, hi, 2147483647), axis=0)
    kb_first = tl.maximum(pid_c * CHUNK, lo_min // BK)
    kb_end = tl.minimum(pid_c * CHUNK + CHUNK, hi_max // BK + 1)
    blk_lo = lo // BK
    blk_hi = tl.where(row_ok, hi // BK, -1)

    dims = tl.arange(0, RANK_PAD)
    q = tl.load(
        Q + bh * stride_q_bh + rows[:, None] * stride_q_row + dims[None, :],
        mask=row_ok[:, None] & (dims[None, :] < RANK), other=0.0,
    )
    k_base = K + bh * stride_k_bh
    out_base = OUT + bh * stride_o_bh + rows * stride_o_row
    for kb in range(kb_first, kb_end):
        n0 = kb * BK
        cols = n0 + tl.arange(0, BK)
        k = tl.load(k_base + cols[:, None] * stride_k_t + dims[None, :],
                    mask=(cols[:, None] < T) & (dims[None, :] < RANK), other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # log2 units (q carries log2 e)
        if (n0 >= lo_max) & (n0 + BK - 1 <= hi_min):  # every key visible from every row
            sm = s
        else:
            sm = tl.where((cols[None, :] >= lo[:, None]) & (cols[None, :] <= hi[:, None]), s, float("-inf"))
        m = tl.max(sm, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l = tl.sum(tl.exp2(sm - m_safe[:, None]), axis=1)
        lm = m_safe + tl.log2(l)  # l == 0 (nothing visible): -inf, and not stored
        tl.store(out_base + kb, lm, mask=row_ok & (kb >= blk_lo) & (kb <= blk_hi))


def indexer_block_logmass_triton(
    qi: Tensor,
    ki: Tensor,
    *,
    block_size: int = 64,
    q_block_size: int = 128,
    doc_ids: Tensor | None = None,
    q_block_start: int = 0,
    q_block_end: int | None = None,
    qbar_log2: Tensor | None = None,
    doc0: Tensor | None = None,
    fill: bool = False,
    block_m: int = 64,
    chunk_blocks: int = 32,
    num_warps: int = 4,
    dot_precision: str | None = None,
) -> Tensor:
    """Pooled-mode block log-mass L [B, Hr, nQB', nKB] float32 for query blocks
    [q_block_start, q_block_end): L[.., i, j] = log2 sum_{n in key block j, visible from query
    block i} 2^(qbar_i . ki_n log2 e), so the pooled block mass is 2^(L - log2 sum_j 2^L).
    Only blocks [causal_lo(i), win_hi(i)] (doc_start(qs) // block .. qe // block) are written:
    the rest is uninitialised unless fill=True (then -inf). qbar_log2 / doc0 may be passed
    precomputed (pooled_queries_log2, doc_start_per_q_block) to skip recomputing them per chunk.
    dot_precision: Triton input_precision of the fp32 score dot (default LOGMASS_DOT_PRECISION,
    "tf32x3": three tf32 products, ~fp32 scores; "tf32" is what the two-pass kernel uses)."""
    B, H, T, r = _check_indexer(qi, ki, block_size, q_block_size, doc_ids)
    if not (_pow2(block_size) and block_size <= 128):
        raise ValueError(f"Triton log-mass needs block_size a power of two in [16, 128], got {block_size}")
    n_qb = (T + q_block_size - 1) // q_block_size
    n_kb = (T + block_size - 1) // block_size
    qb0, qb1 = q_block_start, (n_qb if q_block_end is None else q_block_end)
    if qbar_log2 is None:
        qbar_log2 = pooled_queries_log2(qi[:, :, qb0 * q_block_size : min(qb1 * q_block_size, T)], q_block_size)
        q_rows = qbar_log2
    else:
        q_rows = qbar_log2[:, :, qb0:qb1]
    if doc0 is None and doc_ids is not None:
        doc0 = doc_start_per_q_block(doc_ids, T, q_block_size, qi.device)
    R = qb1 - qb0
    q = q_rows.reshape(B * H, R, r)
    if q.stride(-1) != 1:
        q = q.contiguous()
    k = ki.reshape(B * H, T, r)
    if k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        k = k.float()
    k = k.contiguous()
    alloc = torch.full if fill else torch.empty
    args = ((B * H, R, n_kb), float("-inf")) if fill else ((B * H, R, n_kb),)
    out = alloc(*args, dtype=torch.float32, device=qi.device)
    doc_arg = doc0 if doc0 is not None else torch.zeros(1, 1, dtype=torch.int32, device=qi.device)
    rank_pad = max(16, triton.next_power_of_2(r))
    n_kb_rows = (min(qb1 * q_block_size, T) - 1) // block_size + 1  # key blocks any row can see
    grid = (triton.cdiv(n_kb_rows, chunk_blocks), triton.cdiv(R, block_m), B * H)
    if R > 0:
        def launch(prec):
            _pooled_logmass_kernel[grid](
                q, k, doc_arg, out,
                q.stride(0), q.stride(1),
                k.stride(0), k.stride(1),
                doc_arg.stride(0) if doc_arg.shape[0] > 1 else 0,
                out.stride(0), out.stride(1),
                H, R, qb0, T, r,
                QB=q_block_size, BK=block_size, RANK_PAD=rank_pad, BLOCK_M=block_m, CHUNK=chunk_blocks,
                HAS_DOC=doc0 is not None, DOT_PRECISION=prec, num_warps=num_warps,
            )

        prec = dot_precision or LOGMASS_DOT_PRECISION[0]
        try:
            launch(prec)
        except Exception as exc:  # e.g. a Triton without tf32x3 for this target: fall back, once
            if dot_precision is not None or prec == "tf32":
                raise
            warnings.warn(f"log-mass kernel with input_precision={prec!r} failed ({exc!r:.200}); using 'tf32'")
            LOGMASS_DOT_PRECISION[0] = "tf32"
            launch("tf32")
    return out.view(B, H, R, n_kb)


def mass_from_log2(L: Tensor, valid: Tensor) -> Tensor:
    """Normalise a block log-mass: 2^(L - log2 sum 2^L) over `valid` blocks, 0 elsewhere (torch)."""
    Lm = torch.where(valid, L, torch.full_like(L, float("-inf")))
    return torch.where(valid, torch.exp2(Lm - torch.logsumexp(Lm * math.log(2.0), -1, keepdim=True) / math.log(2.0)), 0.0)


# ------------------------------------------------- streaming top-p selection ("hist")

@dataclass(frozen=True)
class HistConfig:
    """Launch knobs of _topp_select_hist_kernel (GPU defaults; tests shrink them)."""

    tile: int = 1024  # blocks per streamed tile
    cand: int = 2048  # largest bracket gathered into registers for the exact finish
    thresholds: int = 8  # thresholds per streaming round (a cumulative mass histogram)
    search_arity: int = 4  # thresholds per round of the in-register search
    num_warps: int = 4
    bound_scale: float = 0.5  # first bracket starts at bound_scale * (F_free - target) / n_free
    # (exact for any value: a bracket whose lower end misses target restarts from 0; <= 1 never
    # does in exact arithmetic, tests use a large value to exercise the restart)


@triton.jit
def _query_block_geometry(g, b, DOC0, stride_doc_b, T, window, sinks,
                          QB: tl.constexpr, BK: tl.constexpr, HAS_DOC: tl.constexpr):
    """Key-block ranges of query block g (kernels/masks.py window_sink_block_ranges)."""
    qs = g * QB
    qe = tl.minimum(qs + QB, T) - 1
    if HAS_DOC:
        d0 = tl.load(DOC0 + b * stride_doc_b + g)
    else:
        d0 = qs * 0
    win_lo = tl.maximum(qs - window + 1, d0) // BK
    win_hi = qe // BK
    sink_end = tl.minimum(d0 + sinks - 1, qe)
    sink_lo = d0 // BK
    sink_hi = tl.where(sink_end >= d0, sink_end // BK, -1)
    causal_lo = d0 // BK
    return win_lo, win_hi, sink_lo, sink_hi, causal_lo


@triton.jit
def _block_roles(k, win_lo, win_hi, sink_lo, sink_hi):
    ok = k <= win_hi  # tiles start at causal_lo
    forced = ok & (((k >= win_lo) & (k <= win_hi)) | ((k >= sink_lo) & (k <= sink_hi)))
    free = ok & (forced == 0)
    return ok, forced, free


@triton.jit
def _load_mass(x_row, k, ok, lse, LOG_INPUT: tl.constexpr):
    """Block masses of a tile (0 outside ok): 2^(L - lse) for log input, else as stored."""
    if LOG_INPUT:
        lv = tl.load(x_row + k, mask=ok, other=float("-inf"))
        x = tl.where(ok, tl.exp2(lv - lse), 0.0)
    else:
        x = tl.load(x_row + k, mask=ok, other=0.0)
    return x


@triton.jit
def _search_registers(bits, x, valid, lo, hi, target, NT2: tl.constexpr):
    """Exact threshold over register-resident values: returns [lo, hi) holding one value, with
    F(lo) >= target > F(hi), F(t) = sum of x over valid bits >= t (invariant on entry).
    Each round shrinks [lo, hi) to the data inside it, then evaluates F at NT2 thresholds."""
    jj = tl.arange(0, NT2)
    while hi - lo > 1:
        inside = valid & (bits >= lo) & (bits < hi)
        mn = tl.min(tl.where(inside, bits, 2147483647), axis=0)
        mx = tl.max(tl.where(inside, bits, -1), axis=0)
        empty = mx < 0
        lo = tl.where(empty, lo, mn)
        hi = tl.where(empty, lo + 1, mx + 1)
        if hi - lo > 1:
            step = (hi - lo + NT2) // (NT2 + 1)
            t = lo + (jj + 1) * step
            live = t < hi
            ge = (bits[:, None] >= t[None, :]) & valid[:, None]
            F = tl.sum(tl.where(ge, x[:, None], 0.0), axis=0)
            ok = live & (F >= target)
            bad = live & (ok == 0)  # NaN counts as not reached: the search always moves
            lo = tl.maximum(lo, tl.max(tl.where(ok, t, lo), axis=0))
            hi = tl.minimum(hi, tl.min(tl.where(bad, t, hi), axis=0))
    return lo, hi


@triton.jit
def _topp_select_hist_kernel(
    X, OUT_IDX, OUT_NUM, OUT_KEPT, OUT_FREE, DOC0,
    n_rows, H, NKB, q_block0, T, window, sinks, stride_doc_b, top_p,
    QB: tl.constexpr,
    BK: tl.constexpr,
    HAS_DOC: tl.constexpr,
    LOG_INPUT: tl.constexpr,
    DENSE: tl.constexpr,
    TILE: tl.constexpr,
    CAND: tl.constexpr,
    NT: tl.constexpr,
    NT2: tl.constexpr,
    BOUND_SCALE: tl.constexpr,
):
    """One program per row of X [B*H*n_rows, NKB] (masses, or log2 block sums if LOG_INPUT).
    Writes the selected block ids ascending to OUT_IDX[row, :num] (entries past num are left
    as they were: the caller trims), and num / kept extra / free counts."""
    row = tl.program_id(0).to(tl.int64)
    bh = row // n_rows
    i = (row % n_rows).to(tl.int32)
    b = bh // H
    g = q_block0 + i
    win_lo, win_hi, sink_lo, sink_hi, causal_lo = _query_block_geometry(
        g, b, DOC0, stride_doc_b, T, window, sinks, QB, BK, HAS_DOC)
    x_row = X + row * NKB
    idx_row = OUT_IDX + row * NKB
    offs = tl.arange(0, TILE)

    if not DENSE:
        # ---- stats: normaliser, forced mass, free mass / count / max
        lse = tl.zeros([], tl.float32)
        l_max_free = tl.full([], float("-inf"), tl.float32)
        if LOG_INPUT:
            m_all = tl.full([], float("-inf"), tl.float32)
            for k0 in range(causal_lo, win_hi + 1, TILE):
                k = k0 + offs
                ok, forced, free = _block_roles(k, win_lo, win_hi, sink_lo, sink_hi)
                lv = tl.load(x_row + k, mask=ok, other=float("-inf"))
                m_all = tl.maximum(m_all, tl.max(lv, axis=0))
                l_max_free = tl.maximum(l_max_free, tl.max(tl.where(free, lv, float("-inf")), axis=0))
            lse = m_all  # every row sees >= 1 key, so this is finite
        z = tl.zeros([], tl.float32)
        f_forced = tl.zeros([], tl.float32)
        f_free = tl.zeros([], tl.float32)
        n_free = tl.zeros([], tl.int32)
        x_max = tl.zeros([], tl.float32)
        for k0 in range(causal_lo, win_hi + 1, TILE):
            k = k0 + offs
            ok, forced, free = _block_roles(k, win_lo, win_hi, sink_lo, sink_hi)
            x = _load_mass(x_row, k, ok, lse, LOG_INPUT)  # relative to the row max if LOG_INPUT
            z += tl.sum(x, axis=0)
            f_forced += tl.sum(tl.where(forced, x, 0.0), axis=0)
            f_free += tl.sum(tl.where(free, x, 0.0), axis=0)
            n_free += tl.sum(free.to(tl.int32), axis=0)
            x_max = tl.maximum(x_max, tl.max(tl.where(free, x, 0.0), axis=0))
        if LOG_INPUT:
            lse = lse + tl.log2(z)
            f_forced = f_forced / z
            f_free = f_free / z
            # the same expression as _load_mass: the bit pattern of the heaviest free block
            x_max = tl.where(l_max_free == float("-inf"), 0.0, tl.exp2(l_max_free - lse))
        target = top_p - f_forced

        # ---- search state: tau (the smallest kept value) in [lo, hi), F(lo) >= target > F(hi)
        bound = BOUND_SCALE * tl.maximum(f_free - target, 0.0) / tl.maximum(n_free, 1).to(tl.float32)
        nothing = target <= 0.0
        everything = f_free < target
        lo = tl.where(nothing, 0x7F7FFFFF, tl.where(everything, 0, bound.to(tl.int32, bitcast=True)))
        hi = tl.where(nothing, 0x7F800000, tl.where(everything, 1, x_max.to(tl.int32, bitcast=True) + 1))
        # a bound at or above the heaviest block cannot be the lower end: start from 0; rows with
        # <= CAND free blocks go straight to the in-register finish with all of them ([0, hi))
        small = n_free <= CAND
        lo = tl.where(nothing | everything | ((lo < hi - 1) & (small == 0)), lo, 0)
        f_hi = tl.zeros([], tl.float32)  # free mass at bits >= hi
        c_hi = tl.zeros([], tl.int32)  # free blocks at bits >= hi
        cnt_in = tl.where(small, n_free, 2147483647)  # free blocks inside [lo, hi) (unknown yet)
        jj = tl.arange(0, NT)

        # ---- streaming rounds: cumulative mass / count above NT thresholds of the bracket
        while (hi - lo > 1) & (cnt_in > CAND):
            step = (hi - lo + NT - 1) // NT
            t = lo + jj * step  # t[0] = lo
            live = t < hi
            f_t = tl.zeros([NT], tl.float32)
            c_t = tl.zeros([NT], tl.int32)
            for k0 in range(causal_lo, win_hi + 1, TILE):
                k = k0 + offs
                ok, forced, free = _block_roles(k, win_lo, win_hi, sink_lo, sink_hi)
                x = tl.where(free, _load_mass(x_row, k, ok, lse, LOG_INPUT), 0.0)
                bits = x.to(tl.int32, bitcast=True)
                ge = (bits[:, None] >= t[None, :]) & free[:, None]
                f_t += tl.sum(tl.where(ge, x[:, None], 0.0), axis=0)
                c_t += tl.sum(ge.to(tl.int32), axis=0)
            ok_t = live & (f_t >= target)
            bad_t = live & (ok_t == 0)
            any_ok = tl.max(ok_t.to(tl.int32), axis=0) > 0
            any_bad = tl.max(bad_t.to(tl.int32), axis=0) > 0
            # lo: the largest threshold that still reaches target; if even t[0] = lo does not
            # (only possible when lo came from the bound and rounding bit), restart from 0
            new_lo = tl.where(any_ok, tl.max(tl.where(ok_t, t, -1), axis=0), 0)
            c_lo = tl.where(any_ok, tl.sum(tl.where(t == new_lo, c_t, 0), axis=0), n_free)
            new_hi = tl.where(any_bad, tl.min(tl.where(bad_t, t, 2147483647), axis=0), hi)
            f_hi = tl.where(any_bad, tl.sum(tl.where(t == new_hi, f_t, 0.0), axis=0), f_hi)
            c_hi = tl.where(any_bad, tl.sum(tl.where(t == new_hi, c_t, 0), axis=0), c_hi)
            lo = new_lo
            hi = new_hi
            cnt_in = c_lo - c_hi

        # ---- exact finish on the <= CAND blocks of the bracket, gathered into registers
        if hi - lo > 1:
            n_c = tl.zeros([], tl.int32)
            for k0 in range(causal_lo, win_hi + 1, TILE):
                k = k0 + offs
                ok, forced, free = _block_roles(k, win_lo, win_hi, sink_lo, sink_hi)
                x = tl.where(free, _load_mass(x_row, k, ok, lse, LOG_INPUT), 0.0)
                bits = x.to(tl.int32, bitcast=True)
                inb = free & (bits >= lo) & (bits < hi)
                inb_i = inb.to(tl.int32)
                tl.store(idx_row + n_c + tl.cumsum(inb_i, axis=0) - 1, bits, mask=inb)  # scratch
                n_c += tl.sum(inb_i, axis=0)
            tl.debug_barrier()  # the gathered values were stored by other threads
            co = tl.arange(0, CAND)
            cm = co < n_c
            cb = tl.load(idx_row + co, mask=cm, other=-1, cache_modifier=".cg")
            cx = tl.where(cm, cb.to(tl.float32, bitcast=True), 0.0)
            lo, hi = _search_registers(cb, cx, cm, lo, hi, target - f_hi, NT2)
            f_hi = f_hi + tl.sum(tl.where(cm & (cb >= hi), cx, 0.0), axis=0)
            tl.debug_barrier()  # read before the selection overwrites the scratch
        need = target - f_hi

    # ---- selection: blocks above tau, ties at tau in index order, forced blocks; ascending ids
    cnt = tl.zeros([], tl.int32)
    n_kept = tl.zeros([], tl.int32)
    n_free_out = tl.zeros([], tl.int32)
    tie_before = tl.zeros([], tl.float32)
    for k0 in range(causal_lo, win_hi + 1, TILE):
        k = k0 + offs
        ok, forced, free = _block_roles(k, win_lo, win_hi, sink_lo, sink_hi)
        if DENSE:
            extra = free
        else:
            x = tl.where(free, _load_mass(x_row, k, ok, lse, LOG_INPUT), 0.0)
            bits = x.to(tl.int32, bitcast=True)
            tie = free & (bits >= lo) & (bits < hi)
            tie_x = tl.where(tie, x, 0.0)
            before = tie_before + tl.cumsum(tie_x, axis=0) - tie_x
            extra = free & (x > 0.0) & ((bits >= hi) | (tie & (before < need)))
            tie_before += tl.sum(tie_x, axis=0)
        sel = forced | extra
        sel_i = sel.to(tl.int32)
        tl.store(idx_row + cnt + tl.cumsum(sel_i, axis=0) - 1, k, mask=sel)
        cnt += tl.sum(sel_i, axis=0)
        n_kept += tl.sum(extra.to(tl.int32), axis=0)
        n_free_out += tl.sum(free.to(tl.int32), axis=0)
    tl.store(OUT_NUM + row, cnt)
    tl.store(OUT_KEPT + row, n_kept)
    tl.store(OUT_FREE + row, n_free_out)


def topp_select_rows_hist_triton(
    x: Tensor | None,
    *,
    log_input: bool,
    batch: int,
    heads: int,
    n_rows: int,
    seq_len: int,
    window: int,
    sinks: int,
    block_size: int,
    q_block_size: int,
    q_block_start: int,
    top_p: float,
    doc0: Tensor | None = None,
    config: HistConfig | None = None,
    device=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused top-p selection ("hist") for query blocks [q_block_start, q_block_start + n_rows).

    x [B, H, n_rows, nKB] float32: block masses (log_input=False) or log2 block sums
    (log_input=True, indexer_block_logmass_triton); only each row's blocks
    [causal_lo, win_hi] are read; ignored (may be None) when top_p >= 1. doc0 [Bd, nQB]
    int32: doc_start of each query block's first query (doc_start_per_q_block), or None.
    Returns (indices [B, H, n_rows, nKB] int32, selected ids ascending in [:num] and
    unspecified past num; num, kept extra, free [B, H, n_rows] int32).
    """
    cfg = config or HistConfig()
    for name in ("tile", "cand", "thresholds", "search_arity"):
        v = getattr(cfg, name)
        if v < 2 or v & (v - 1):
            raise ValueError(f"HistConfig.{name} must be a power of two >= 2, got {v}")
    n_kb = (seq_len + block_size - 1) // block_size
    dev = x.device if x is not None else (doc0.device if doc0 is not None else torch.device(device or "cuda"))
    dense = top_p >= 1.0
    if dense:
        x_arg = torch.empty(1, dtype=torch.float32, device=dev)
    else:
        if x is None or tuple(x.shape) != (batch, heads, n_rows, n_kb):
            raise ValueError(f"x must be [B={batch}, H={heads}, n={n_rows}, nKB={n_kb}], got {None if x is None else tuple(x.shape)}")
        x_arg = x if (x.dtype == torch.float32 and x.is_contiguous()) else x.float().contiguous()
    out_idx = torch.empty(batch, heads, n_rows, n_kb, dtype=torch.int32, device=dev)
    num = torch.empty(batch, heads, n_rows, dtype=torch.int32, device=dev)
    kept = torch.empty_like(num)
    free = torch.empty_like(num)
    doc_arg = doc0 if doc0 is not None else torch.zeros(1, 1, dtype=torch.int32, device=dev)
    if batch * heads * n_rows > 0:
        _topp_select_hist_kernel[(batch * heads * n_rows,)](
            x_arg, out_idx, num, kept, free, doc_arg,
            n_rows, heads, n_kb, q_block_start, seq_len, window, sinks,
            doc_arg.stride(0) if doc_arg.shape[0] > 1 else 0, float(top_p),
            QB=q_block_size, BK=block_size, HAS_DOC=doc0 is not None, LOG_INPUT=bool(log_input), DENSE=dense,
            TILE=cfg.tile, CAND=cfg.cand, NT=cfg.thresholds, NT2=cfg.search_arity, BOUND_SCALE=float(cfg.bound_scale),
            num_warps=cfg.num_warps,
        )
    return out_idx, num, kept, free


def trim_selection_lists(idx: Tensor, num: Tensor) -> Tensor:
    """idx [..., nKB] with the selection in [:num] -> [..., max(num)] with zeros past num (one
    device sync for the width)."""
    width = max(int(num.max().item()) if num.numel() else 1, 1)
    col = torch.arange(width, device=idx.device, dtype=torch.int32)
    return torch.where(col < num[..., None], idx[..., :width], 0).contiguous()
