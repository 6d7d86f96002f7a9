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
"""

from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

from kernels.block_select import _check_indexer, _pooled_queries, _row_ranges

__all__ = ["indexer_block_mass_triton", "triton_supports", "topp_select_rows_triton"]



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
