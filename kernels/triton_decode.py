"""Triton decode kernels for RTPurbo (one query token per sequence).

Called through kernels/sparse_decode.py, which validates arguments and owns the references; the
contracts (shapes, kept sets, top-p rule) are documented there. Measurements: docs/kernels.md.

Kernels (launches of one layer step with the defaults: score, select, retrieval, its merge on the
main stream; local and its merge on a side stream)
  _indexer_select_kernel  grid (chunks, B*Hr). Each program scores BPC key blocks with the 16-d
      indexer and writes one log-sum-exp per block and one per chunk. With fused_select the last
      program of a head to finish (atomic counter) runs the top-p search for the head; by default
      _select_kernel (or the split select below) does it in a second, wider launch (faster: measured).
  selection (_select_head), the prefill rule of kernels/block_select.py for one query: the forced
      blocks (sink blocks, window blocks) are always kept and their mass counts toward top_p; the
      free blocks must bring tgt = top_p - mass(forced). Block mass w_b = exp(lse_b - Z) >= 0, so
      the float32 bit pattern of w_b orders blocks exactly like w_b. We search the largest bit
      pattern t with F(t) = sum_{free b, w_b >= t} w_b >= tgt: each round shrinks the interval to
      the data inside it and evaluates F at `search_arity` thresholds (arity 1 = bisection). Free
      blocks above t are kept, blocks equal to t (ties) in index order until the mass reaches tgt.
      Before searching, free blocks that cannot be kept (mass under (1-p)/(2(nb+1))) are pruned,
      exactly (see _select_head). The last pass writes the block mask (forced + chosen) and the
      compacted list of the mask's blocks, which the attention visits. No sort; O(1) extra memory.
  Split select (TritonDecodeConfig.select_split; default SELECT_SPLIT_DEFAULT) for views of more than
      select_cand_tile blocks: _candidates_kernel (grid <= 16 tiles x B*Hr: Z, the pruning
      candidates of its tile, tile partials, the tile's mask / bits zeroed), then
      _select_split_kernel twice: a 16-warp program per head searches the candidates in registers
      when they fit; a wide one runs _select_head for the heads whose candidates do not (streamed,
      or with every block in registers for flat heads: > select_flat_min_cand candidates).
      "Same output" as the one-program select (tested); measured faster at 1M (docs/kernels.md).
  _retrieval_attn_kernel  grid (splits, B*Hr): flash-decoding over the kept-block list, split
      evenly over `splits` programs so that one long sequence fills the GPU; the partial
      (max, sum, acc) are merged by _combine_kernel (or, fused_reduction, by the last program).
  _local_attn_kernel  grid (splits, B*Hkv_local): all query heads of one KV head at once (tl.dot,
      the KV tile is read once per group), sinks + ring buffer split over programs, same merge;
      launched with 1 software-pipelining stage (local_num_stages: faster than Triton's 3 on the
      H100, where ~4 programs per SM already hide the load latency). Also the dense decode kernel.
  GQA-union retrieval (TritonDecodeConfig.retrieval_union; default RETRIEVAL_UNION_DEFAULT),
  instead of _retrieval_attn_kernel:
  _union_kernel  grid (B*NG,), NG = retrieval KV heads: the group's visit list = valid blocks that
      a head of the group selected (mask rows) or that hold a sink / window token, ascending,
      padded to nB entries + a count (static shapes, no host sync).
  _retrieval_union_kernel  grid (splits, B*NG): the visit list split evenly; each block's K/V is
      loaded once, one tl.dot (heads padded to 16) x (D x block) gives every head's scores, a head
      that did not select the block keeps only its sink / window tokens (-inf elsewhere), fp32
      online softmax per head; partials merged by _combine_kernel (or the last program).
  Visit lists, TritonDecodeConfig.union_lists (default UNION_LISTS_DEFAULT):
    "kernel": _union_kernel above, one extra launch (one program per group scans the mask rows).
    "fused": no extra launch. The select kernel also writes each head's mask row packed as bits
      ([B*Hr, ceil(nB/32)] int32, every word rewritten each step: no zeroing; the split select zeroes
      them in its candidate pass and ORs the kept blocks in); each program of
      _retrieval_union_kernel ORs its group's bit rows (GP x nB/32 words: 16 KB at 1M tokens),
      adds the sink / window blocks, counts the union (popcount), takes the same balanced slice
      of the union list as the "kernel" path and writes only that slice (prefix sums in registers),
      then runs the unchanged attention loop. Same blocks, same order, same splits: same output.
  The indexer keys (ki_cache) may be float8_e4m3fn: the scoring kernel upcasts them to fp32.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

_F32_INF_BITS = 0x7F800000  # bit pattern of +inf: above every finite non-negative float32

# Retrieval attention kernel used by default: False = one query head per program
# (_retrieval_attn_kernel), True = one program per (split, retrieval KV head) over the union of the
# group's kept blocks (_retrieval_union_kernel). H100, 2026-11-25 (docs/kernels.md, bench_decode, d 5%,
# whole 1of4 layer, union with fused visit lists vs per-head): 40.5 vs 49.4 us at 32K, 68.2 vs 75.6 at
# 128K, 259.8 vs 270.5 at 1M with independent heads (220.6 vs 258.9 with head overlap 0.8).
RETRIEVAL_UNION_DEFAULT = True
# The union only for cache views of <= this many blocks; 0 = any length. (With its visit lists built by a
# separate launch the union lost at 1M with independent heads and was capped at 4096 blocks; with the fused
# lists it is the fastest at every measured length.) The rule depends only on the (static) view length, so
# a CUDA-graph bucket always runs the same kernel.
UNION_MAX_BLOCKS_DEFAULT = 0
# How the union kernel gets its visit lists: "kernel" = the separate _union_kernel launch (8.1 / 9.6 /
# 29.8 us at 32K / 128K / 1M on the H100), "fused" = packed mask bits written by the select kernel, each
# union program builds its own slice (no extra launch; retrieval part 26.7 vs 31.4 us at 128K, 89.5 vs
# 111.4 at 1M, same H100 run).
UNION_LISTS_DEFAULT = "fused"
UNION_LISTS_CHOICES = ("kernel", "fused")
# Top-p select of views longer than select_cand_tile blocks: True = a candidate pass over the blocks by
# many programs, then one few-warp program per head searches the candidates in registers (a wide program
# takes the heads whose candidates do not fit); False = one wide program per head does every pass itself
# (H100, 1M, d 5%, same run: select = scoring + search 165.2 us streaming, 134.1 split with a 16-warp
# search of <= 2048 candidates; 128K and shorter views use the resident path either way).
SELECT_SPLIT_DEFAULT = True
# Diagnostics: a callable given, after each split select, the per-row candidate counts and masses (device
# tensors; reading them syncs, so benchmarks install it only around eager steps). None in normal use.
SPLIT_STATS_HOOK = None


@dataclass(frozen=True)
class TritonDecodeConfig:
    """Launch knobs of the decode kernels (defaults chosen by measurement, see docs/kernels.md)."""

    fused_select: bool = False  # top-p search in the last scoring program instead of a 2nd launch
    # views of more blocks than select_wide_tile: candidates gathered by a many-program pass first
    # (_candidates_kernel), then the search per head over them in registers (_select_split_kernel)
    select_split: bool = SELECT_SPLIT_DEFAULT
    select_split_tile: int = 1024  # min blocks per program of the candidate pass (<= 16 programs/head)
    select_cand_tile: int = 2048  # split select: candidates searched in registers (more: the wide search)
    # ... by this many warps (H100, 1M, d 5%: select 134.1 us with 16 warps, 252.6 with 2, 259.1 with 1 warp
    # and 1024 candidates; few warps make each of the search's reductions long and serial)
    select_cand_warps: int = 16
    # split select, heads whose candidates do not fit: with more than select_flat_min_cand candidates (flat
    # indexer distributions) and a view of <= select_flat_tile blocks, the search keeps every block in
    # registers (H100, 1M, same run: d 65% select 203.8 us vs 300.0 streamed; d 20%, ~3300 candidates:
    # streamed 180.8 vs 211.3 resident, hence the 8192 floor). 0 disables.
    select_flat_tile: int = 16384
    select_flat_min_cand: int = 8192
    fused_reduction: bool = False  # split-K merge in the last program (atomic counter)
    search_arity: int = 4  # thresholds per pass of the top-p search (power of 2; 1 = bisection)
    overlap_local: bool = True  # CUDA: local heads on a side stream, beside select + retrieval
    select_tile: int = 512  # block masses per tile of the fused search (4 warps)
    select_wide_tile: int = 4096  # separate select kernel tile; fewer blocks stay in registers
    select_num_warps: int = 16  # max warps of the separate select kernel (4096 x 2 values fit)
    score_num_warps: int = 4  # warps of the indexer scoring kernel
    select_max_2d: int = 16384  # threshold x tile elements evaluated as one 2-D reduction
    # key blocks scored by one program of the indexer kernel (H100, bf16 keys, 8 heads: 4 blocks 10.3 / 21.6 /
    # 102.1 us vs 8 blocks 10.8 / 24.1 / 106.0 at 32K / 128K / 1M, same run)
    score_blocks_per_cta: int = 4
    num_splits: Optional[int] = None  # retrieval split-K programs per head (None: fill the GPU)
    local_num_splits: Optional[int] = None  # local split-K programs per KV head (None: fill)
    local_tile: int = 64  # ring tokens per tile of the local kernel
    max_splits: int = 64
    num_warps: int = 4
    # GQA-union retrieval (retrieval_decode_triton): each K/V block read once per KV group
    retrieval_union: bool = RETRIEVAL_UNION_DEFAULT
    union_max_blocks: int = UNION_MAX_BLOCKS_DEFAULT  # union only for views of <= this many blocks (0: any)
    union_num_splits: Optional[int] = None  # split-K programs per (batch, retrieval KV head)
    union_max_splits: int = 128  # few groups (1 at B=1 with one retrieval KV head): more splits
    union_tile: int = 4096  # blocks per tile of the union-list build (one program per group)
    union_num_warps: int = 4  # warps of the union attention kernel
    union_lists: str = UNION_LISTS_DEFAULT  # "kernel" (_union_kernel launch) | "fused" (in-kernel)
    union_word_tile: int = 512  # fused lists: 32-block words per tile of the union count pass
    union_expand_words: int = 8  # fused lists: words expanded to block indices per sub-tile
    # software-pipelining stages (None: Triton's default, 3 on Hopper). Local / dense kernel: 1 (H100,
    # 2026-11-25, docs/kernels.md "Session 13": dense decode at 1M 712.2 us with 1 stage, 719.7 with 2, 837.0
    # with Triton's 3 (cuDNN 708.3); an all-local layer 20.4 / 20.1 / 21.6 us). Union kernel: Triton's (1
    # stage 135.1 us, 2 stages 105.2, 3 89.7, 4 91.6 at 1M, d 5%)
    union_num_stages: Optional[int] = None
    local_num_stages: Optional[int] = 1

    def __post_init__(self):
        if self.union_lists not in UNION_LISTS_CHOICES:
            raise ValueError(f"union_lists must be one of {UNION_LISTS_CHOICES}, got {self.union_lists!r}")
        for name in ("union_num_stages", "local_num_stages"):
            v = getattr(self, name)
            if v is not None and not 1 <= v <= 8:
                raise ValueError(f"{name} must be None or in [1, 8], got {v}")


DEFAULT_CONFIG = TritonDecodeConfig()


def uses_union(cfg: TritonDecodeConfig, n_blocks: int) -> bool:
    """Whether retrieval attention runs the GQA-union kernel for a cache view of n_blocks blocks."""
    return bool(cfg.retrieval_union) and (cfg.union_max_blocks <= 0 or n_blocks <= cfg.union_max_blocks)


def uses_mask_bits(cfg: TritonDecodeConfig, n_blocks: int) -> bool:
    """Whether the select kernel writes packed mask bits (the union kernel's fused visit lists)."""
    return uses_union(cfg, n_blocks) and cfg.union_lists == "fused"


DENSE_CONFIG = TritonDecodeConfig(max_splits=128)  # dense_decode_triton (the whole cache, few KV heads)


@dataclass
class SelectResult:
    block_mask: torch.Tensor  # [B, Hr, nB] bool, selected blocks (forced sink/window ones included)
    kept_idx: torch.Tensor  # [B*Hr, nB] int32, first kept_count entries: the mask's blocks, ascending
    kept_count: torch.Tensor  # [B*Hr] int32
    # [B*Hr, ceil(nB/32)] int32, bit j of word w = mask block 32 w + j (union_lists="fused"; else None)
    block_bits: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _forced_ranges(L, window, sinks, BS: tl.constexpr):
    """Forced blocks of the query at L - 1 (kernels/sparse_decode.decode_forced_blocks): the sink
    blocks [0, sb_end) hold a token t < min(sinks, L); the window blocks [wb_lo, nb) hold a token
    t >= max(L - window, 0) (none when window == 0). Returns (nb, sb_end, wb_lo)."""
    nb = (L + BS - 1) // BS
    sb_end = (tl.minimum(sinks, L) + BS - 1) // BS
    wb_lo = tl.where(window > 0, tl.maximum(L - window, 0) // BS, nb)
    return nb, sb_end, wb_lo


@triton.jit
def _is_forced(blk, nb, sb_end, wb_lo):
    return (blk < nb) & ((blk < sb_end) | (blk >= wb_lo))


@triton.jit
def _append_kept(idx_row, blk, keep, cnt):
    """Append the blocks to visit (keep) to the compacted list at position cnt."""
    k32 = keep.to(tl.int32)
    pos = cnt + tl.cumsum(k32, 0) - 1
    tl.store(idx_row + pos, blk, mask=keep)
    return cnt + tl.sum(k32, 0)


@triton.jit
def _or_combine(a, b):
    return a | b


@triton.jit
def _popc32(x):
    """Set bits of each int32 word (SWAR; arithmetic shifts are masked off)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    return x & 0x3F


@triton.jit
def _range_bits(wi, lo, hi):
    """int32 words wi with the bits of blocks lo <= blk < hi set (bit j of word w = block 32 w + j)."""
    base = wi * 32
    a = tl.minimum(tl.maximum(lo - base, 0), 32).to(tl.int64)
    c = tl.minimum(tl.maximum(hi - base, 0), 32).to(tl.int64)
    one = (wi * 0 + 1).to(tl.int64)
    return (((one << c) - 1) ^ ((one << a) - 1)).to(tl.int32)


@triton.jit
def _pack_keep_bits(bits_row, b0, keep, NW, TILE: tl.constexpr):
    """Store keep [TILE] (blocks b0 ..., b0 a multiple of 32) as TILE / 32 bit words."""
    kb = tl.reshape(keep.to(tl.int32), [TILE // 32, 32])
    word = tl.sum(kb << tl.arange(0, 32)[None, :], 1)
    wv = b0 // 32 + tl.arange(0, TILE // 32)
    tl.store(bits_row + wv, word, mask=wv < NW)


@triton.jit
def _union_words(bits_ptr, row0, hr, hm, wi, NW, nb, sb_end, wb_lo):
    """Union words wi of one group: OR of its heads' bit rows (row0 + hr; padding heads hm = False
    are masked loads), the sink / window blocks added, blocks >= nb removed."""
    rows = (row0 + tl.maximum(hr, 0)).to(tl.int64) * NW
    x = tl.load(bits_ptr + rows[:, None] + wi[None, :], mask=hm[:, None] & (wi < NW)[None, :],
                other=0)
    u = tl.reduce(x, 0, _or_combine)
    u = u | _range_bits(wi, 0, sb_end) | _range_bits(wi, wb_lo, nb)
    return u & _range_bits(wi, 0, nb)


@triton.jit
def _write_list_slice(bits_ptr, row0, hr, hm, NW, nb, sb_end, wb_lo, wi, pc, base, i0, i1,
                      idx_row, EW: tl.constexpr):
    """Entries i0 <= i < i1 of the union list (ascending blocks) that fall in the words wi (their
    popcounts pc; base = entries before wi[0]): find the words holding them (prefix sums), expand
    those EW words at a time to block indices and store them at idx_row + i."""
    incl = base + tl.cumsum(pc, 0)
    excl = incl - pc
    hit = (excl < i1) & (incl > i0)
    wa = tl.min(tl.where(hit, wi, 0x7FFFFFFF), 0)
    wb = tl.max(tl.where(hit, wi, -1), 0)
    pa = tl.sum(tl.where(wi == wa, excl, 0), 0)
    jj = tl.arange(0, 32)
    for s0 in range(wa, wb + 1, EW):  # no iteration when no word is hit
        si = s0 + tl.arange(0, EW)
        uu = _union_words(bits_ptr, row0, hr, hm, si, NW, nb, sb_end, wb_lo)
        uu = tl.where(si <= wb, uu, 0)
        pcs = _popc32(uu)
        bit = (uu[:, None] >> jj[None, :]) & 1  # [EW, 32]
        pos = pa + (tl.cumsum(pcs, 0) - pcs)[:, None] + tl.cumsum(bit, 1) - 1
        st = (bit != 0) & (pos >= i0) & (pos < i1)
        tl.store(idx_row + pos, si[:, None] * 32 + jj[None, :], mask=st)
        pa += tl.sum(pcs, 0)


@triton.jit
def _block_mass(lse_row, blk, nb, Z):
    in_range = blk < nb
    lse = tl.load(lse_row + blk, mask=in_range, other=float("-inf"), cache_modifier=".cg")
    w = tl.where(in_range, tl.exp(lse - Z), 0.0)
    return w, w.to(tl.int32, bitcast=True), in_range


@triton.jit
def _free_mass(lse_row, blk, nb, Z, sb_end, wb_lo):
    """Masses of the free (valid, non-forced) blocks among blk; 0 (bits 0) elsewhere."""
    free = (blk < nb) & (blk >= sb_end) & (blk < wb_lo)
    lse = tl.load(lse_row + blk, mask=free, other=float("-inf"), cache_modifier=".cg")
    w = tl.where(free, tl.exp(lse - Z), 0.0)
    return w, w.to(tl.int32, bitcast=True), free


@triton.jit
def _interval_bounds(bits, in_range, lo, hi):
    """Smallest and largest bit pattern inside [lo, hi) (INT_MAX / -1 when none)."""
    inside = in_range & (bits >= lo) & (bits < hi)
    return (tl.min(tl.where(inside, bits, 0x7FFFFFFF), 0),
            tl.max(tl.where(inside, bits, -1), 0))


@triton.jit
def _threshold_mass(bits, w, lo, step, K: tl.constexpr, TILE: tl.constexpr,
                    MAX_2D: tl.constexpr):
    """F(t_j) = sum of w over bits >= t_j, t_j = lo + (j + 1) step, j < K, as a [K] vector."""
    kk = tl.arange(0, K)
    if K * TILE <= MAX_2D:  # one 2-D reduction
        t = lo + (kk + 1) * step
        F = tl.sum(tl.where(bits[None, :] >= t[:, None], w[None, :], 0.0), 1)
    else:  # big register-resident tiles: K 1-D reductions keep register use flat
        F = tl.zeros([K], tl.float32)
        for j in tl.static_range(K):
            fj = tl.sum(tl.where(bits >= lo + (j + 1) * step, w, 0.0), 0)
            F = tl.where(kk == j, fj, F)
    return F


@triton.jit
def _search_step(F, lo, hi, step, top_p, K: tl.constexpr):
    """Move [lo, hi) to the pair of neighbouring thresholds around the top-p crossing."""
    t = lo + (tl.arange(0, K) + 1) * step
    live = t < hi
    ok = live & (F >= top_p)
    bad = live & (~(F >= top_p))  # NaN counts as "not reached": the search always moves
    lo = tl.maximum(lo, tl.max(tl.where(ok, t, lo), 0))
    hi = tl.minimum(hi, tl.min(tl.where(bad, t, hi), 0))
    return lo, hi


@triton.jit
def _shrink(lo, hi, mn, mx):
    """[lo, hi) -> [min, max + 1) of the data inside it (no block in between: F unchanged)."""
    empty = mx < 0
    return tl.where(empty, lo, mn), tl.where(empty, lo + 1, mx + 1)


@triton.jit
def _search_regs(bits, w, valid, lo, hi, top_p, K: tl.constexpr, TILE: tl.constexpr,
                 MAX_2D: tl.constexpr):
    """Threshold search over masses held in registers (one tile)."""
    while hi - lo > 1:
        mn, mx = _interval_bounds(bits, valid, lo, hi)
        lo, hi = _shrink(lo, hi, mn, mx)
        if hi - lo > 1:
            step = (hi - lo + K) // (K + 1)
            F = _threshold_mass(bits, w, lo, step, K, TILE, MAX_2D)
            lo, hi = _search_step(F, lo, hi, step, top_p, K)
    return lo, hi


@triton.jit
def _search_tiles(lse_row, nb, Z, sb_end, wb_lo, lo, hi, top_p, K: tl.constexpr, TILE: tl.constexpr,
                  MAX_2D: tl.constexpr):
    """Threshold search over the free blocks, streaming their LSEs from L2 on each pass (any
    block count)."""
    offs = tl.arange(0, TILE)
    while hi - lo > 1:
        mn = tl.full([], 0x7FFFFFFF, tl.int32)
        mx = tl.full([], -1, tl.int32)
        for b0 in range(0, nb, TILE):
            w, bits, in_range = _free_mass(lse_row, b0 + offs, nb, Z, sb_end, wb_lo)
            a, c = _interval_bounds(bits, in_range, lo, hi)
            mn = tl.minimum(mn, a)
            mx = tl.maximum(mx, c)
        lo, hi = _shrink(lo, hi, mn, mx)
        if hi - lo > 1:
            step = (hi - lo + K) // (K + 1)
            F = tl.zeros([K], tl.float32)
            for b0 in range(0, nb, TILE):
                w, bits, in_range = _free_mass(lse_row, b0 + offs, nb, Z, sb_end, wb_lo)
                F += _threshold_mass(bits, w, lo, step, K, TILE, MAX_2D)
            lo, hi = _search_step(F, lo, hi, step, top_p, K)
    return lo, hi


@triton.jit
def _select_head(lse_row, chunk_row, n_chunks, mask_row, idx_row, cnt_ptr, L, n_blocks, top_p,
                 window, sinks, bits_row, NW, BS: tl.constexpr, SEARCH_K: tl.constexpr,
                 TILE: tl.constexpr, RESIDENT: tl.constexpr, MAX_2D: tl.constexpr,
                 WRITE_BITS: tl.constexpr):
    """Block selection of one head from its block LSEs (the prefill rule: forced sink/window
    blocks + the smallest top set of free blocks bringing the mass to top_p); writes the mask row
    (forced blocks included), the kept list (= the mask's blocks, ascending) and its count.
    RESIDENT: all n_blocks fit one TILE, so the masses stay in registers during the search.
    Otherwise the blocks that can matter are gathered first (see the pruning note below)."""
    offs = tl.arange(0, TILE)
    # normaliser Z = logsumexp of the chunk LSEs (loads bypass L1: other programs wrote them)
    M = tl.full([], float("-inf"), tl.float32)
    for c0 in range(0, n_chunks, TILE):
        x = tl.load(chunk_row + c0 + offs, mask=c0 + offs < n_chunks, other=float("-inf"),
                    cache_modifier=".cg")
        M = tl.maximum(M, tl.max(x, 0))
    M_safe = tl.where(M == float("-inf"), 0.0, M)
    S = tl.zeros([], tl.float32)
    for c0 in range(0, n_chunks, TILE):
        x = tl.load(chunk_row + c0 + offs, mask=c0 + offs < n_chunks, other=float("-inf"),
                    cache_modifier=".cg")
        S += tl.sum(tl.exp(x - M_safe), 0)
    Z = M_safe + tl.log(S)
    nb, sb_end, wb_lo = _forced_ranges(L, window, sinks, BS)

    # The forced blocks' mass counts toward top_p: the free blocks must bring tgt = p - F_forced.
    # (Masked loads: only the forced blocks' LSEs are read.)
    F_forced = tl.zeros([], tl.float32)
    for b0 in range(0, nb, TILE):
        blk = b0 + offs
        forced = _is_forced(blk, nb, sb_end, wb_lo)
        lse = tl.load(lse_row + blk, mask=forced, other=float("-inf"), cache_modifier=".cg")
        F_forced += tl.sum(tl.where(forced, tl.exp(lse - Z), 0.0), 0)
    keep_all = top_p > 3.0e38  # top_p >= 1 (passed as inf): every valid block
    tgt = tl.where(keep_all, top_p, top_p - F_forced)

    # Search over the free blocks on the bit pattern, F(x) = sum of free w over bits >= x.
    # Invariant: F(hi) < tgt and F(lo) >= tgt (unless no threshold reaches tgt: then every free
    # block of positive mass is kept). Each round first shrinks [lo, hi) to the data inside it,
    # stopping once one distinct value is left, then evaluates F at SEARCH_K thresholds inside.
    # tgt <= 0 keeps no free block, tgt = inf every one.
    lo = tl.where(tgt <= 0.0, 0x7F7FFFFF, 0)
    hi = tl.where(keep_all, 1, 0x7F800000)
    if RESIDENT:
        w_r, bits_r, free_r = _free_mass(lse_row, offs, nb, Z, sb_end, wb_lo)
        lo, hi = _search_regs(bits_r, w_r, free_r, lo, hi, tgt, SEARCH_K, TILE, MAX_2D)
    elif hi - lo > 1:
        # Pruning: the chosen free set S is a minimal top set, so F(S) - v < tgt for its smallest
        # mass v, and F(S) >= (1 - F_forced) - nb * v (no other free block exceeds v); hence
        # v > (1 - p) / (nb + 1). Blocks under half that bound are dropped, the rest gathered
        # (their indices go to idx_row, overwritten later). Exact: if the candidates' mass
        # reaches tgt, F over all free blocks equals F over the candidates at every threshold the
        # search can end on; otherwise search all free blocks.
        tau = 0.5 * (1.0 - top_p) / (nb + 1).to(tl.float32)
        n_cand = tl.zeros([], tl.int32)
        F_cand = tl.zeros([], tl.float32)
        for b0 in range(0, nb, TILE):
            blk = b0 + offs
            w, bits, free = _free_mass(lse_row, blk, nb, Z, sb_end, wb_lo)
            cand = free & (w > tau)
            c32 = cand.to(tl.int32)
            tl.store(idx_row + n_cand + tl.cumsum(c32, 0) - 1, blk, mask=cand)
            n_cand += tl.sum(c32, 0)
            F_cand += tl.sum(tl.where(cand, w, 0.0), 0)
        if (n_cand <= TILE) & (F_cand >= tgt):
            tl.debug_barrier()  # candidate indices were stored by other threads of this program
            cm = offs < n_cand
            ci = tl.load(idx_row + offs, mask=cm, other=0, cache_modifier=".cg")
            lse_c = tl.load(lse_row + ci, mask=cm, other=float("-inf"), cache_modifier=".cg")
            w_c = tl.where(cm, tl.exp(lse_c - Z), 0.0)
            lo, hi = _search_regs(w_c.to(tl.int32, bitcast=True), w_c, cm, lo, hi, tgt,
                                  SEARCH_K, TILE, MAX_2D)
        else:
            lo, hi = _search_tiles(lse_row, nb, Z, sb_end, wb_lo, lo, hi, tgt, SEARCH_K, TILE,
                                   MAX_2D)
        tl.debug_barrier()  # the candidate list is read before the kept list overwrites it

    # [lo, hi) now holds one mass value: free blocks above it are chosen, ties at it in index
    # order while the mass ranked ahead stays below tgt; zero-mass blocks never (unless keep_all)
    F_hi = tl.zeros([], tl.float32)
    for b0 in range(0, nb, TILE):
        w, bits, free = _free_mass(lse_row, b0 + offs, nb, Z, sb_end, wb_lo)
        F_hi += tl.sum(tl.where(bits >= hi, w, 0.0), 0)
    need = tgt - F_hi

    tie_before = tl.zeros([], tl.float32)
    cnt = tl.zeros([], tl.int32)
    for b0 in range(0, n_blocks, TILE):
        blk = b0 + offs
        w, bits, free = _free_mass(lse_row, blk, nb, Z, sb_end, wb_lo)
        tie = free & (bits >= lo) & (bits < hi)
        tie_w = tl.where(tie, w, 0.0)
        before = tie_before + tl.cumsum(tie_w, 0) - tie_w
        chosen = free & ((bits >= hi) | (tie & (before < need))) & ((w > 0.0) | keep_all)
        tie_before += tl.sum(tie_w, 0)
        keep = chosen | _is_forced(blk, nb, sb_end, wb_lo)
        tl.store(mask_row + blk, keep.to(tl.uint8), mask=blk < n_blocks)
        if WRITE_BITS:  # the same row packed as bits (TILE >= 32): the union kernel's input
            _pack_keep_bits(bits_row, b0, keep, NW, TILE)
        cnt = _append_kept(idx_row, blk, keep, cnt)
    tl.store(cnt_ptr, cnt)


@triton.jit
def _combine_row(pm_row, pl_row, pacc_row, out_row, D, NS: tl.constexpr, NS_PAD: tl.constexpr,
                 D_PAD: tl.constexpr):
    """Merge NS partial (max, sum, acc) of one output row and store it."""
    sp = tl.arange(0, NS_PAD)
    spm = sp < NS
    ms = tl.load(pm_row + sp, mask=spm, other=float("-inf"), cache_modifier=".cg")
    ls = tl.load(pl_row + sp, mask=spm, other=0.0, cache_modifier=".cg")
    M = tl.max(ms, 0)
    M_safe = tl.where(M == float("-inf"), 0.0, M)
    wgt = tl.exp(ms - M_safe)
    den = tl.sum(wgt * ls, 0)
    d = tl.arange(0, D_PAD)
    acc = tl.load(pacc_row + sp[:, None] * D_PAD + d[None, :], mask=spm[:, None], other=0.0,
                  cache_modifier=".cg")
    num = tl.sum(wgt[:, None] * acc, 0)
    out = tl.where(den > 0, num / den, 0.0)
    tl.store(out_row + d, out.to(out_row.dtype.element_ty), mask=d < D)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["window", "sinks"])
def _indexer_select_kernel(qi_ptr, ki_ptr, lens_ptr, lse_ptr, chunk_ptr, counter_ptr, mask_ptr,
                           idx_ptr, cnt_ptr, bits_ptr, s_qb, s_qh, s_kb, s_kh, s_kl, H, n_blocks,
                           n_chunks, NW, top_p, window, sinks, R, BS: tl.constexpr,
                           BPC: tl.constexpr, R_PAD: tl.constexpr, FUSED: tl.constexpr,
                           SEARCH_K: tl.constexpr, TILE: tl.constexpr, RESIDENT: tl.constexpr,
                           MAX_2D: tl.constexpr, WRITE_BITS: tl.constexpr):
    pid_c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    L = tl.load(lens_ptr + b).to(tl.int32)
    blk = pid_c * BPC + tl.arange(0, BPC)
    tok = blk[:, None] * BS + tl.arange(0, BS)[None, :]  # [BPC, BS]
    r = tl.arange(0, R_PAD)
    valid = tok < L
    qi = tl.load(qi_ptr + b * s_qb + h * s_qh + r, mask=r < R, other=0.0).to(tl.float32)
    kp = (ki_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
          + tok[:, :, None].to(tl.int64) * s_kl + r[None, None, :])
    k = tl.load(kp, mask=valid[:, :, None] & (r < R)[None, None, :], other=0.0).to(tl.float32)
    s = tl.where(valid, tl.sum(k * qi[None, None, :], 2), float("-inf"))  # [BPC, BS]
    m = tl.max(s, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lsum = tl.sum(tl.exp(s - m_safe[:, None]), 1)
    lse = tl.where(lsum > 0, m_safe + tl.log(lsum), float("-inf"))
    tl.store(lse_ptr + bh * n_blocks + blk, lse, mask=blk < n_blocks)
    mc = tl.max(lse, 0)
    mc_safe = tl.where(mc == float("-inf"), 0.0, mc)
    lc = tl.sum(tl.exp(lse - mc_safe), 0)
    tl.store(chunk_ptr + bh * n_chunks + pid_c, tl.where(lc > 0, mc_safe + tl.log(lc),
                                                         float("-inf")))
    if FUSED:
        tl.debug_barrier()  # every thread's stores precede the (releasing) counter increment
        done = tl.atomic_add(counter_ptr + bh, 1, sem="acq_rel", scope="gpu")
        if done == n_chunks - 1:
            _select_head(lse_ptr + bh * n_blocks, chunk_ptr + bh * n_chunks, n_chunks,
                         mask_ptr + bh * n_blocks, idx_ptr + bh * n_blocks, cnt_ptr + bh, L,
                         n_blocks, top_p, window, sinks, bits_ptr + bh * NW, NW, BS, SEARCH_K,
                         TILE, RESIDENT, MAX_2D, WRITE_BITS)


@triton.jit(do_not_specialize=["window", "sinks"])
def _select_kernel(lse_ptr, chunk_ptr, lens_ptr, mask_ptr, idx_ptr, cnt_ptr, bits_ptr, H,
                   n_blocks, n_chunks, NW, top_p, window, sinks, BS: tl.constexpr,
                   SEARCH_K: tl.constexpr, TILE: tl.constexpr, RESIDENT: tl.constexpr,
                   MAX_2D: tl.constexpr, WRITE_BITS: tl.constexpr):
    bh = tl.program_id(0)
    L = tl.load(lens_ptr + bh // H).to(tl.int32)
    _select_head(lse_ptr + bh * n_blocks, chunk_ptr + bh * n_chunks, n_chunks,
                 mask_ptr + bh * n_blocks, idx_ptr + bh * n_blocks, cnt_ptr + bh, L, n_blocks,
                 top_p, window, sinks, bits_ptr + bh * NW, NW, BS, SEARCH_K, TILE, RESIDENT,
                 MAX_2D, WRITE_BITS)


@triton.jit(do_not_specialize=["window", "sinks"])
def _candidates_kernel(lse_ptr, chunk_ptr, lens_ptr, z_ptr, cand_ptr, part_ptr, mask_ptr, bits_ptr,
                       H, n_blocks, n_chunks, NW, top_p, window, sinks, BS: tl.constexpr,
                       CTILE: tl.constexpr, ZTILE: tl.constexpr, NT_PAD: tl.constexpr,
                       WRITE_BITS: tl.constexpr):
    """Split select, pass 1 (grid tiles of CTILE blocks x B*Hr): the normaliser Z (every program
    computes it from the chunk LSEs; tile 0 stores it), this tile's pruning candidates (free blocks
    of mass > tau, the bound of _select_head) stored ascending in the tile's own slot of cand_ptr,
    their count, their mass and the tile's forced mass (part_ptr: 3 x NT_PAD floats per row), and
    the tile's mask bytes and bit words zeroed (the select pass writes only the kept ones)."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    L = tl.load(lens_ptr + bh // H).to(tl.int32)
    chunk_row = chunk_ptr + bh * n_chunks
    oz = tl.arange(0, ZTILE)
    M = tl.full([], float("-inf"), tl.float32)  # one pass: running max, sum rescaled when it grows
    S = tl.zeros([], tl.float32)
    for c0 in range(0, n_chunks, ZTILE):
        x = tl.load(chunk_row + c0 + oz, mask=c0 + oz < n_chunks, other=float("-inf"),
                    cache_modifier=".cg")
        M_new = tl.maximum(M, tl.max(x, 0))
        M_safe = tl.where(M_new == float("-inf"), 0.0, M_new)
        S = S * tl.exp(M - M_safe) + tl.sum(tl.exp(x - M_safe), 0)
        M = M_new
    M_safe = tl.where(M == float("-inf"), 0.0, M)
    Z = M_safe + tl.log(S)
    if t == 0:
        tl.store(z_ptr + bh, Z)
    nb, sb_end, wb_lo = _forced_ranges(L, window, sinks, BS)
    blk = t * CTILE + tl.arange(0, CTILE)
    valid = blk < nb
    lse = tl.load(lse_ptr + bh * n_blocks + blk, mask=valid, other=float("-inf"),
                  cache_modifier=".cg")
    w = tl.where(valid, tl.exp(lse - Z), 0.0)
    forced = _is_forced(blk, nb, sb_end, wb_lo)
    free = valid & (blk >= sb_end) & (blk < wb_lo)
    tau = 0.5 * (1.0 - top_p) / (nb + 1).to(tl.float32)  # -inf when top_p = inf: every free block
    cand = free & (w > tau)
    c32 = cand.to(tl.int32)
    tl.store(cand_ptr + bh * n_blocks + t * CTILE + tl.cumsum(c32, 0) - 1, blk, mask=cand)
    part = part_ptr + bh * 3 * NT_PAD + t
    tl.store(part, tl.sum(c32, 0).to(tl.float32))
    tl.store(part + NT_PAD, tl.sum(tl.where(cand, w, 0.0), 0))
    tl.store(part + 2 * NT_PAD, tl.sum(tl.where(forced, w, 0.0), 0))
    tl.store(mask_ptr + bh * n_blocks + blk, tl.zeros([CTILE], tl.uint8), mask=blk < n_blocks)
    if WRITE_BITS:
        wv = t * (CTILE // 32) + tl.arange(0, CTILE // 32)
        tl.store(bits_ptr + bh * NW + wv, tl.zeros([CTILE // 32], tl.int32), mask=wv < NW)


@triton.jit
def _mark_range(mask_row, idx_row, bits_row, lo, hi, pos0, WRITE_BITS: tl.constexpr,
                FT: tl.constexpr):
    """Blocks lo <= blk < hi kept: mask bytes 1, list entries pos0 ..., bits OR-ed into their words."""
    o = tl.arange(0, FT)
    for b0 in range(lo, hi, FT):
        b = b0 + o
        m = b < hi
        tl.store(mask_row + b, tl.full([FT], 1, tl.uint8), mask=m)
        tl.store(idx_row + pos0 + (b - lo), b, mask=m)
    if WRITE_BITS:
        for w0 in range(lo // 32, (hi + 31) // 32, FT):
            wi = w0 + o
            val = _range_bits(wi, lo, hi)
            tl.atomic_or(bits_row + wi, val, mask=val != 0)


@triton.jit(do_not_specialize=["window", "sinks"])
def _select_split_kernel(lse_ptr, chunk_ptr, lens_ptr, z_ptr, part_ptr, mask_ptr, idx_ptr, cnt_ptr,
                         bits_ptr, H, n_blocks, n_chunks, NW, NT, top_p, window, sinks,
                         BS: tl.constexpr, CTILE: tl.constexpr, NT_PAD: tl.constexpr,
                         SEARCH_K: tl.constexpr, TILE: tl.constexpr, MAX_2D: tl.constexpr,
                         WRITE_BITS: tl.constexpr, FT: tl.constexpr, FALLBACK: tl.constexpr,
                         CAND_TILE: tl.constexpr, RESIDENT: tl.constexpr, flat_min,
                         FLAT_TILE: tl.constexpr):
    """Split select, pass 2 (one program per head), launched twice. FALLBACK False (select_cand_warps
    warps; 16 measured fastest, 2 twice as slow): if the candidates fit CAND_TILE (= TILE)
    and reach the target, gathers them (in block order) into registers, runs the threshold search
    there and writes the kept blocks (the tiles' zeroed mask / bits get their ones; the list is
    sinks, chosen, window: ascending); otherwise does nothing. FALLBACK True (the wide launch): for
    exactly the other heads, runs _select_head over all blocks (resident in one TILE or streamed),
    which rewrites the whole row; a head with more than flat_min candidates (a flat distribution:
    pruning keeps nearly every block) runs it with every block resident in one FLAT_TILE (>= the
    view) instead. Same rule, same result."""
    bh = tl.program_id(0)
    L = tl.load(lens_ptr + bh // H).to(tl.int32)
    lse_row = lse_ptr + bh * n_blocks
    mask_row = mask_ptr + bh * n_blocks
    idx_row = idx_ptr + bh * n_blocks
    bits_row = bits_ptr + bh * NW
    nb, sb_end, wb_lo = _forced_ranges(L, window, sinks, BS)
    tt = tl.arange(0, NT_PAD)
    part = part_ptr + bh * 3 * NT_PAD + tt
    cnts = tl.load(part, mask=tt < NT, other=0.0, cache_modifier=".cg").to(tl.int32)
    F_cand = tl.sum(tl.load(part + NT_PAD, mask=tt < NT, other=0.0, cache_modifier=".cg"), 0)
    F_forced = tl.sum(tl.load(part + 2 * NT_PAD, mask=tt < NT, other=0.0, cache_modifier=".cg"), 0)
    n_cand = tl.sum(cnts, 0)
    keep_all = top_p > 3.0e38
    tgt = tl.where(keep_all, top_p, top_p - F_forced)
    fits = (n_cand <= CAND_TILE) & ((F_cand >= tgt) | keep_all)
    if FALLBACK:
        if not fits:
            if n_cand > flat_min:
                _select_head(lse_row, chunk_ptr + bh * n_chunks, n_chunks, mask_row, idx_row, cnt_ptr + bh,
                             L, n_blocks, top_p, window, sinks, bits_row, NW, BS, SEARCH_K, FLAT_TILE, True,
                             MAX_2D, WRITE_BITS)
            else:
                _select_head(lse_row, chunk_ptr + bh * n_chunks, n_chunks, mask_row, idx_row, cnt_ptr + bh,
                             L, n_blocks, top_p, window, sinks, bits_row, NW, BS, SEARCH_K, TILE, RESIDENT,
                             MAX_2D, WRITE_BITS)
    elif fits:
        Z = tl.load(z_ptr + bh, cache_modifier=".cg")
        i = tl.arange(0, TILE)
        incl = tl.cumsum(cnts, 0)
        excl = incl - cnts
        ti = tl.sum((incl[None, :] <= i[:, None]).to(tl.int32), 1)  # tile of candidate i
        ex_i = tl.sum(tl.where(tt[None, :] == ti[:, None], excl[None, :], 0), 1)
        cm = i < n_cand
        blk = tl.load(idx_row + ti * CTILE + i - ex_i, mask=cm, other=0, cache_modifier=".cg")
        lse_c = tl.load(lse_row + blk, mask=cm, other=float("-inf"), cache_modifier=".cg")
        w = tl.where(cm, tl.exp(lse_c - Z), 0.0)
        bits = w.to(tl.int32, bitcast=True)
        lo = tl.where(tgt <= 0.0, 0x7F7FFFFF, 0)
        hi = tl.where(keep_all, 1, 0x7F800000)
        lo, hi = _search_regs(bits, w, cm, lo, hi, tgt, SEARCH_K, TILE, MAX_2D)
        F_hi = tl.sum(tl.where(cm & (bits >= hi), w, 0.0), 0)
        need = tgt - F_hi
        tie = cm & (bits >= lo) & (bits < hi)
        tie_w = tl.where(tie, w, 0.0)
        before = tl.cumsum(tie_w, 0) - tie_w
        chosen = cm & ((bits >= hi) | (tie & (before < need))) & ((w > 0.0) | keep_all)
        tl.debug_barrier()  # every candidate slot is read before the list overwrites them
        n1 = tl.minimum(sb_end, nb)
        c32 = chosen.to(tl.int32)
        n_ch = tl.sum(c32, 0)
        tl.store(mask_row + blk, tl.full([TILE], 1, tl.uint8), mask=chosen)
        tl.store(idx_row + n1 + tl.cumsum(c32, 0) - 1, blk, mask=chosen)
        if WRITE_BITS:
            one = (blk * 0 + 1).to(tl.int64)  # bit 31 through int64, as _range_bits
            tl.atomic_or(bits_row + blk // 32, (one << (blk % 32)).to(tl.int32), mask=chosen)
        lo3 = tl.maximum(wb_lo, n1)
        _mark_range(mask_row, idx_row, bits_row, 0, n1, 0, WRITE_BITS, FT)
        _mark_range(mask_row, idx_row, bits_row, lo3, nb, n1 + n_ch, WRITE_BITS, FT)
        tl.store(cnt_ptr + bh, n1 + n_ch + tl.maximum(nb - lo3, 0))


@triton.jit
def _pack_bits_kernel(mask_ptr, bits_ptr, n_blocks, NW, PW: tl.constexpr):
    """Mask rows [rows, n_blocks] uint8 -> bit words [rows, NW] int32 (retrieval_decode called with
    a mask but no bits, union_lists="fused"). Grid (rows, cdiv(NW, PW))."""
    row = tl.program_id(0)
    w = tl.program_id(1) * PW + tl.arange(0, PW)
    j = tl.arange(0, 32)
    blk = w[:, None] * 32 + j[None, :]
    x = tl.load(mask_ptr + row.to(tl.int64) * n_blocks + blk, mask=blk < n_blocks, other=0)
    word = tl.sum((x != 0).to(tl.int32) << j[None, :], 1)
    tl.store(bits_ptr + row.to(tl.int64) * NW + w, word, mask=w < NW)


@triton.jit(do_not_specialize=["window", "sinks"])
def _compact_kernel(mask_ptr, lens_ptr, idx_ptr, cnt_ptr, H, n_blocks, window, sinks,
                    BS: tl.constexpr, TILE: tl.constexpr):
    """Kept-block list of a given mask (retrieval_decode called on its own): the mask's valid
    blocks plus the blocks holding sink or window tokens (attended token-level)."""
    bh = tl.program_id(0)
    L = tl.load(lens_ptr + bh // H).to(tl.int32)
    nb, sb_end, wb_lo = _forced_ranges(L, window, sinks, BS)
    offs = tl.arange(0, TILE)
    cnt = tl.zeros([], tl.int32)
    for b0 in range(0, n_blocks, TILE):
        blk = b0 + offs
        in_range = blk < nb
        sel = tl.load(mask_ptr + bh * n_blocks + blk, mask=in_range, other=0) != 0
        keep = in_range & (sel | _is_forced(blk, nb, sb_end, wb_lo))
        cnt = _append_kept(idx_ptr + bh * n_blocks, blk, keep, cnt)
    tl.store(cnt_ptr + bh, cnt)


@triton.jit(do_not_specialize=["window", "sinks"])
def _retrieval_attn_kernel(q_ptr, k_ptr, v_ptr, kvh_ptr, qh_ptr, lens_ptr, mask_ptr, idx_ptr,
                           cnt_ptr, pm_ptr, pl_ptr, pacc_ptr, counter_ptr, out_ptr, s_qb, s_qh,
                           s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_ob, s_oh, H, n_blocks, D, scale,
                           window, sinks, BS: tl.constexpr, D_PAD: tl.constexpr,
                           NS: tl.constexpr, NS_PAD: tl.constexpr, FUSED: tl.constexpr):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    L = tl.load(lens_ptr + b).to(tl.int32)
    kvh = tl.load(kvh_ptr + h)
    qh = tl.load(qh_ptr + h)
    cnt = tl.load(cnt_ptr + bh)
    per = (cnt + NS - 1) // NS
    i0 = split * per
    i1 = tl.minimum(i0 + per, cnt)
    d = tl.arange(0, D_PAD)
    dm = d < D
    q = tl.load(q_ptr + b * s_qb + qh * s_qh + d, mask=dm, other=0.0).to(tl.float32) * scale
    kbase = k_ptr + b.to(tl.int64) * s_kb + kvh.to(tl.int64) * s_kh
    vbase = v_ptr + b.to(tl.int64) * s_vb + kvh.to(tl.int64) * s_vh
    win_lo = L - window
    m = tl.full([], float("-inf"), tl.float32)
    lsum = tl.zeros([], tl.float32)
    acc = tl.zeros([D_PAD], tl.float32)
    for i in range(i0, i1):
        blk = tl.load(idx_ptr + bh * n_blocks + i)
        sel = tl.load(mask_ptr + bh * n_blocks + blk).to(tl.int32)
        t = blk * BS + tl.arange(0, BS)
        # broadcast the block's mask bit as a vector (the interpreter mistypes scalar | vector)
        keep = (t < L) & ((t * 0 + sel != 0) | (t < sinks) | (t >= win_lo))
        lm = keep[:, None] & dm[None, :]
        k = tl.load(kbase + t[:, None].to(tl.int64) * s_kl + d[None, :], mask=lm, other=0.0)
        v = tl.load(vbase + t[:, None].to(tl.int64) * s_vl + d[None, :], mask=lm, other=0.0)
        s = tl.where(keep, tl.sum(k.to(tl.float32) * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe)
        lsum = lsum * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m = m_new
    if NS == 1:
        o = tl.where(lsum > 0, acc / lsum, 0.0)
        tl.store(out_ptr + b * s_ob + qh * s_oh + d, o.to(out_ptr.dtype.element_ty), mask=dm)
    else:
        row = bh * NS + split
        tl.store(pm_ptr + row, m)
        tl.store(pl_ptr + row, lsum)
        tl.store(pacc_ptr + row * D_PAD + d, acc)
        if FUSED:
            tl.debug_barrier()
            done = tl.atomic_add(counter_ptr + bh, 1, sem="acq_rel", scope="gpu")
            if done == NS - 1:
                _combine_row(pm_ptr + bh * NS, pl_ptr + bh * NS, pacc_ptr + bh * NS * D_PAD,
                             out_ptr + b * s_ob + qh * s_oh, D, NS, NS_PAD, D_PAD)


@triton.jit
def _online_update_group(q, k, v, keep, m, lsum, acc, scale, IEEE: tl.constexpr):
    """One KV tile for a group of query heads: q [GP, D], k/v [N, D], keep [1, N] (the same keys for
    every head) or [GP, N] (each head its own kept keys)."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(keep, s * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    lsum = lsum * alpha + tl.sum(p, 1)
    if IEEE:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, lsum, acc


@triton.jit
def _finish_group(m, lsum, acc, heads, heads_row, pid_row, split, b, out_ptr, s_ob, s_oh, pm_ptr, pl_ptr,
                  pacc_ptr, counter_ptr, D, GP: tl.constexpr, NS: tl.constexpr, NS_PAD: tl.constexpr,
                  D_PAD: tl.constexpr, FUSED: tl.constexpr):
    """End of a split program over a group of query heads (local and GQA-union kernels): with one split the
    normalised rows; else this split's partial (max, sum, acc) rows, and with FUSED the last program to
    finish merges every split. heads [GP]: the rows' query heads (-1 = padding, never stored), also at
    heads_row in memory; pid_row: the (batch, group) index of the program's partial rows and counter."""
    d = tl.arange(0, D_PAD)
    hm = heads >= 0
    if NS == 1:
        o = tl.where(lsum[:, None] > 0, acc / lsum[:, None], 0.0)
        tl.store(out_ptr + b * s_ob + heads[:, None] * s_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=hm[:, None] & (d < D)[None, :])
    else:
        rows = (pid_row * GP + tl.arange(0, GP)) * NS + split
        tl.store(pm_ptr + rows, m, mask=hm)
        tl.store(pl_ptr + rows, lsum, mask=hm)
        tl.store(pacc_ptr + rows[:, None] * D_PAD + d[None, :], acc, mask=hm[:, None])
        if FUSED:
            tl.debug_barrier()
            done = tl.atomic_add(counter_ptr + pid_row, 1, sem="acq_rel", scope="gpu")
            if done == NS - 1:
                for gi in range(GP):
                    head = tl.load(heads_row + gi)
                    if head >= 0:
                        row0 = (pid_row * GP + gi) * NS
                        _combine_row(pm_ptr + row0, pl_ptr + row0, pacc_ptr + row0 * D_PAD,
                                     out_ptr + b * s_ob + head * s_oh, D, NS, NS_PAD, D_PAD)


@triton.jit(do_not_specialize=["window", "sinks"])
def _local_attn_kernel(q_ptr, sk_ptr, sv_ptr, rk_ptr, rv_ptr, heads_ptr, lens_ptr, pm_ptr, pl_ptr,
                       pacc_ptr, counter_ptr, out_ptr, s_qb, s_qh, s_skb, s_skh, s_skl, s_svb,
                       s_svh, s_svl, s_rkb, s_rkh, s_rkl, s_rvb, s_rvh, s_rvl, s_ob, s_oh, HKV, W,
                       D, scale, window, sinks, GP: tl.constexpr, BN: tl.constexpr,
                       SP: tl.constexpr, D_PAD: tl.constexpr, NS: tl.constexpr,
                       NS_PAD: tl.constexpr, FUSED: tl.constexpr, IEEE: tl.constexpr):
    split = tl.program_id(0)
    bk = tl.program_id(1)
    b = bk // HKV
    kvh = bk % HKV
    L = tl.load(lens_ptr + b).to(tl.int32)
    n_sink = tl.minimum(sinks, L)
    w_lo = tl.maximum(L - window, n_sink)  # first window token; tokens < n_sink come from sinks
    n_win = tl.maximum(L - w_lo, 0)
    n_tiles = (n_win + BN - 1) // BN
    per = (n_tiles + NS - 1) // NS
    j0 = split * per
    j1 = tl.minimum(j0 + per, n_tiles)

    g = tl.arange(0, GP)
    heads = tl.load(heads_ptr + kvh * GP + g)  # query head index, -1 for padding rows
    hm = heads >= 0
    d = tl.arange(0, D_PAD)
    dm = d < D
    q = tl.load(q_ptr + b * s_qb + heads[:, None] * s_qh + d[None, :],
                mask=hm[:, None] & dm[None, :], other=0.0).to(rk_ptr.dtype.element_ty)
    m = tl.full([GP], float("-inf"), tl.float32)
    lsum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D_PAD], tl.float32)

    if (split == 0) & (n_sink > 0):
        ts = tl.arange(0, SP)
        keep = ts < n_sink
        lm = keep[:, None] & dm[None, :]
        k = tl.load(sk_ptr + b.to(tl.int64) * s_skb + kvh * s_skh + ts[:, None] * s_skl
                    + d[None, :], mask=lm, other=0.0)
        v = tl.load(sv_ptr + b.to(tl.int64) * s_svb + kvh * s_svh + ts[:, None] * s_svl
                    + d[None, :], mask=lm, other=0.0)
        m, lsum, acc = _online_update_group(q, k, v, keep[None, :], m, lsum, acc, scale, IEEE)

    rk = rk_ptr + b.to(tl.int64) * s_rkb + kvh.to(tl.int64) * s_rkh
    rv = rv_ptr + b.to(tl.int64) * s_rvb + kvh.to(tl.int64) * s_rvh
    for j in range(j0, j1):
        t = w_lo + j * BN + tl.arange(0, BN)
        keep = t < L
        slot = (t % W).to(tl.int64)
        lm = keep[:, None] & dm[None, :]
        k = tl.load(rk + slot[:, None] * s_rkl + d[None, :], mask=lm, other=0.0)
        v = tl.load(rv + slot[:, None] * s_rvl + d[None, :], mask=lm, other=0.0)
        m, lsum, acc = _online_update_group(q, k, v, keep[None, :], m, lsum, acc, scale, IEEE)

    _finish_group(m, lsum, acc, heads, heads_ptr + kvh * GP, bk, split, b, out_ptr, s_ob, s_oh, pm_ptr,
                  pl_ptr, pacc_ptr, counter_ptr, D, GP, NS, NS_PAD, D_PAD, FUSED)


@triton.jit
def _combine_kernel(pm_ptr, pl_ptr, pacc_ptr, heads_ptr, out_ptr, s_ob, s_oh, HK, D,
                    GP: tl.constexpr, NS: tl.constexpr, NS_PAD: tl.constexpr,
                    D_PAD: tl.constexpr):
    """Second-launch merge of split partials: one program per (batch, kv/retrieval head, row)."""
    row = tl.program_id(0)
    bk = row // GP
    gi = row % GP
    b = bk // HK
    head = tl.load(heads_ptr + (bk % HK) * GP + gi)
    if head >= 0:
        _combine_row(pm_ptr + row * NS, pl_ptr + row * NS, pacc_ptr + row * NS * D_PAD,
                     out_ptr + b * s_ob + head * s_oh, D, NS, NS_PAD, D_PAD)


@triton.jit(do_not_specialize=["window", "sinks"])
def _union_kernel(mask_ptr, lens_ptr, hr_ptr, idx_ptr, cnt_ptr, H, NG, n_blocks, window, sinks,
                  BS: tl.constexpr, GP: tl.constexpr, TILE: tl.constexpr):
    """Visit list of one (batch, retrieval KV head): the valid blocks that a head of the group
    selected (mask row) or that hold a sink / window token, ascending, and its count. Padding
    heads (-1) are masked loads: no memory traffic."""
    bg = tl.program_id(0)
    b = bg // NG
    grp = bg % NG
    L = tl.load(lens_ptr + b).to(tl.int32)
    nb, sb_end, wb_lo = _forced_ranges(L, window, sinks, BS)
    offs = tl.arange(0, TILE)
    idx_row = idx_ptr + bg.to(tl.int64) * n_blocks
    cnt = tl.zeros([], tl.int32)
    for b0 in range(0, nb, TILE):
        blk = b0 + offs
        in_range = blk < nb
        keep = _is_forced(blk, nb, sb_end, wb_lo)
        for gi in tl.static_range(GP):
            hr = tl.load(hr_ptr + grp * GP + gi)
            # (vector form of the head test: the interpreter mistypes scalar & vector)
            lm = in_range & (blk * 0 + hr >= 0)
            row = mask_ptr + (b * H + tl.maximum(hr, 0)).to(tl.int64) * n_blocks
            keep = keep | (tl.load(row + blk, mask=lm, other=0, cache_modifier=".cg") != 0)
        cnt = _append_kept(idx_row, blk, keep & in_range, cnt)
    tl.store(cnt_ptr + bg, cnt)


@triton.jit(do_not_specialize=["window", "sinks"])
def _retrieval_union_kernel(q_ptr, k_ptr, v_ptr, kvg_ptr, hr_ptr, qh_ptr, lens_ptr, mask_ptr,
                            idx_ptr, cnt_ptr, bits_ptr, pm_ptr, pl_ptr, pacc_ptr, counter_ptr,
                            out_ptr, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_ob, s_oh, H,
                            NG, n_blocks, NW, D, scale, window, sinks, BS: tl.constexpr,
                            BN: tl.constexpr, GP: tl.constexpr, D_PAD: tl.constexpr,
                            NS: tl.constexpr, NS_PAD: tl.constexpr, FUSED: tl.constexpr,
                            IEEE: tl.constexpr, FAST_LISTS: tl.constexpr = False,
                            LISTS_ONLY: tl.constexpr = False, CW: tl.constexpr = 1,
                            EW: tl.constexpr = 1):
    """Split-K retrieval attention of all query heads of one retrieval KV head: each block of the
    group's union visit list is read once; one tl.dot gives every head's scores; a head keeps the
    block's tokens t < L if its mask row selected the block, else only its sink / window tokens
    (the per-head kernel's token rule). BN = BS rounded up to a power of 2 >= 16 token rows.
    FAST_LISTS (union_lists="fused"): no list from _union_kernel; the program counts the group's
    union from the heads' bit rows (bits_ptr [B*H, NW], CW words per tile), writes its own slice
    [i0, i1) of the list into idx (the slices of a group's programs tile it; split 0 stores the
    count) and attends over it. LISTS_ONLY: stop after the list (tests, benchmarks)."""
    split = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // NG
    grp = bg % NG
    L = tl.load(lens_ptr + b).to(tl.int32)
    kvh = tl.load(kvg_ptr + grp)
    g = tl.arange(0, GP)
    hr = tl.load(hr_ptr + grp * GP + g)  # mask row of each head, -1 for padding rows
    qh = tl.load(qh_ptr + grp * GP + g)  # its row in q / out
    hm = hr >= 0
    idx_row = idx_ptr + bg.to(tl.int64) * n_blocks
    if FAST_LISTS:
        nb, sb_end, wb_lo = _forced_ranges(L, window, sinks, BS)
        nw_b = (nb + 31) // 32  # words holding valid blocks
        wo = tl.arange(0, CW)
        u = _union_words(bits_ptr, b * H, hr, hm, wo, NW, nb, sb_end, wb_lo)
        pc = _popc32(u)
        cnt = tl.sum(pc, 0)
        for w0 in range(CW, nw_b, CW):  # views of more than CW words (32 CW blocks)
            cnt += tl.sum(_popc32(_union_words(bits_ptr, b * H, hr, hm, w0 + wo, NW, nb, sb_end,
                                               wb_lo)), 0)
    else:
        cnt = tl.load(cnt_ptr + bg)
    per = (cnt + NS - 1) // NS
    i0 = split * per
    i1 = tl.minimum(i0 + per, cnt)
    if FAST_LISTS:
        if i0 < i1:
            # the first tile's words are still in registers; later tiles are loaded again
            _write_list_slice(bits_ptr, b * H, hr, hm, NW, nb, sb_end, wb_lo, wo, pc, 0, i0, i1,
                              idx_row, EW)
            base = tl.sum(pc, 0)
            for w0 in range(CW, nw_b, CW):
                wi = w0 + wo
                pci = _popc32(_union_words(bits_ptr, b * H, hr, hm, wi, NW, nb, sb_end, wb_lo))
                _write_list_slice(bits_ptr, b * H, hr, hm, NW, nb, sb_end, wb_lo, wi, pci, base,
                                  i0, i1, idx_row, EW)
                base += tl.sum(pci, 0)
        if split == 0:
            tl.store(cnt_ptr + bg, cnt)
        tl.debug_barrier()  # the slice was stored by other threads of this program
    if not LISTS_ONLY:
        _union_attend(q_ptr, k_ptr, v_ptr, mask_ptr, idx_row, pm_ptr, pl_ptr, pacc_ptr,
                      counter_ptr, out_ptr, qh_ptr, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh,
                      s_vl, s_ob, s_oh, H, n_blocks, D, scale, window, sinks, split, bg, b, grp,
                      L, kvh, g, hr, qh, hm, i0, i1, BS, BN, GP, D_PAD, NS, NS_PAD, FUSED, IEEE,
                      FAST_LISTS)


@triton.jit
def _union_attend(q_ptr, k_ptr, v_ptr, mask_ptr, idx_row, pm_ptr, pl_ptr, pacc_ptr, counter_ptr,
                  out_ptr, qh_ptr, s_qb, s_qh, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_ob, s_oh, H,
                  n_blocks, D, scale, window, sinks, split, bg, b, grp, L, kvh, g, hr, qh, hm, i0,
                  i1, BS: tl.constexpr, BN: tl.constexpr, GP: tl.constexpr, D_PAD: tl.constexpr,
                  NS: tl.constexpr, NS_PAD: tl.constexpr, FUSED: tl.constexpr,
                  IEEE: tl.constexpr, LIST_CG: tl.constexpr):
    """The union kernel's attention over list entries [i0, i1) and its output / partials."""
    d = tl.arange(0, D_PAD)
    dm = d < D
    q = tl.load(q_ptr + b * s_qb + qh[:, None] * s_qh + d[None, :],
                mask=hm[:, None] & dm[None, :], other=0.0).to(k_ptr.dtype.element_ty)
    mrow = mask_ptr + (b * H + tl.maximum(hr, 0)).to(tl.int64) * n_blocks
    kbase = k_ptr + b.to(tl.int64) * s_kb + kvh.to(tl.int64) * s_kh
    vbase = v_ptr + b.to(tl.int64) * s_vb + kvh.to(tl.int64) * s_vh
    win_lo = L - window
    j = tl.arange(0, BN)
    m = tl.full([GP], float("-inf"), tl.float32)
    lsum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D_PAD], tl.float32)
    for i in range(i0, i1):
        if LIST_CG:  # entries stored by this program (other threads): read from L2
            blk = tl.load(idx_row + i, cache_modifier=".cg")
        else:
            blk = tl.load(idx_row + i)
        sel = tl.load(mrow + blk, mask=hm, other=0) != 0  # [GP]
        t = blk * BS + j
        valid = (j < BS) & (t < L)
        forced_tok = (t < sinks) | (t >= win_lo)
        keep = hm[:, None] & valid[None, :] & (sel[:, None] | forced_tok[None, :])
        lm = valid[:, None] & dm[None, :]
        k = tl.load(kbase + t[:, None].to(tl.int64) * s_kl + d[None, :], mask=lm, other=0.0)
        v = tl.load(vbase + t[:, None].to(tl.int64) * s_vl + d[None, :], mask=lm, other=0.0)
        m, lsum, acc = _online_update_group(q, k, v, keep, m, lsum, acc, scale, IEEE)
    _finish_group(m, lsum, acc, qh, qh_ptr + grp * GP, bg, split, b, out_ptr, s_ob, s_oh, pm_ptr,
                  pl_ptr, pacc_ptr, counter_ptr, D, GP, NS, NS_PAD, D_PAD, FUSED)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

_index_cache: dict = {}
_sm_cache: dict = {}


def _index_tensor(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """Static head maps as int32 device tensors, cached so CUDA-graph replays reuse them."""
    key = (tuple(int(v) for v in values), str(device))
    t = _index_cache.get(key)
    if t is None:
        t = torch.tensor(key[0], dtype=torch.int32, device=device)
        _index_cache[key] = t
    return t


def _interpreting() -> bool:
    """True when these kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return not isinstance(_local_attn_kernel, triton.runtime.JITFunction)


def interpreter_ready() -> bool:
    """True when these kernels and triton's own library both run in the CPU interpreter."""
    import triton.language.standard as std

    return _interpreting() and not isinstance(std.sum, triton.runtime.JITFunction)


_side_streams: dict = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _side_streams:
        _side_streams[idx] = torch.cuda.Stream(device=idx)
    return _side_streams[idx]


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small grids keep the CPU tests fast
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_cache:
        _sm_cache[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_cache[idx]


def _pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, triton.next_power_of_2(max(int(n), 1)))


def _auto_splits(requested: Optional[int], rows: int, max_items: int, cfg: TritonDecodeConfig,
                 device: torch.device) -> int:
    if requested is not None:
        ns = requested
    else:  # ~4 programs per SM in total, but not more splits than there are tiles of work
        ns = -(-4 * _num_sms(device) // max(rows, 1))
    return int(max(1, min(ns, cfg.max_splits, max(max_items, 1))))


def _stages(n: Optional[int]) -> dict:
    """Launch option num_stages when a config sets it (None: Triton's default)."""
    return {} if n is None else {"num_stages": int(n)}


def _lens_i32(cache_lens: torch.Tensor) -> torch.Tensor:
    return cache_lens if cache_lens.dtype == torch.int32 else cache_lens.to(torch.int32)


def _split_partials(n_rows: int, ns: int, D: int, cfg: TritonDecodeConfig, dev,
                    counters: Optional[torch.Tensor], n_counters: int):
    """Split-K partial buffers of n_rows output rows x ns splits: (pm, pl, pacc [.., D padded], fused,
    counters); fused = the last-program merge (needs > 1 split), its counters allocated when not given."""
    pm = torch.empty((n_rows * ns,), dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    pacc = torch.empty((n_rows * ns, _pow2(D, 16)), dtype=torch.float32, device=dev)
    fused = cfg.fused_reduction and ns > 1
    if fused and counters is None:
        counters = torch.zeros((n_counters,), dtype=torch.int32, device=dev)
    return pm, pl, pacc, fused, counters


def select_decode_blocks_triton(qi, ki_cache, cache_lens, *, top_p, block_size, window, sinks,
                                config: Optional[TritonDecodeConfig] = None,
                                counters: Optional[torch.Tensor] = None,
                                _scores_only: bool = False) -> SelectResult:
    """_scores_only (benchmarks): run only the indexer scoring pass; the mask is left unset."""
    cfg = config or DEFAULT_CONFIG
    B, Hr, R = qi.shape
    L = ki_cache.shape[2]
    dev = qi.device
    nb = -(-L // block_size)
    if ki_cache.stride(3) != 1:
        ki_cache = ki_cache.contiguous()
    if qi.stride(2) != 1:
        qi = qi.contiguous()
    bpc = min(cfg.score_blocks_per_cta, _pow2(nb))
    n_chunks = -(-nb // bpc)
    rows = B * Hr
    lse = torch.empty((rows, nb), dtype=torch.float32, device=dev)
    chunk = torch.empty((rows, n_chunks), dtype=torch.float32, device=dev)
    mask = torch.empty((B, Hr, nb), dtype=torch.uint8, device=dev)
    kept_idx = torch.empty((rows, max(nb, 1)), dtype=torch.int32, device=dev)
    kept_cnt = torch.empty((rows,), dtype=torch.int32, device=dev)
    # top_p >= 1 keeps every valid block: an unreachable target does exactly that
    p_eff = float("inf") if top_p >= 1.0 else max(float(top_p), 0.0)
    lens = _lens_i32(cache_lens)
    # union_lists="fused": the mask rows also packed as bits (the union kernel's input)
    write_bits = uses_mask_bits(cfg, nb) and not _scores_only
    n_words = -(-nb // 32)
    bits = (torch.empty((rows, max(n_words, 1)), dtype=torch.int32, device=dev) if write_bits
            else None)
    if rows == 0 or nb == 0:
        return SelectResult(mask.zero_().view(torch.bool), kept_idx, kept_cnt.zero_(),
                            None if bits is None else bits.zero_())
    fused = cfg.fused_select and not _scores_only
    if fused and counters is None:
        counters = torch.zeros((rows,), dtype=torch.int32, device=dev)
    # fused: the search runs in one program of the (4-warp) scoring kernel; separate: in one wide
    # program per head, all blocks in registers when they fit one tile
    tile = min(cfg.select_tile if fused else cfg.select_wide_tile, _pow2(nb))
    if write_bits:  # whole 32-block words per tile
        tile = max(tile, 32)
    bits_arg = bits if write_bits else lens
    _indexer_select_kernel[(n_chunks, rows)](
        qi, ki_cache, lens, lse, chunk, counters if fused else lens, mask, kept_idx,
        kept_cnt, bits_arg, qi.stride(0), qi.stride(1), ki_cache.stride(0), ki_cache.stride(1),
        ki_cache.stride(2), Hr, nb, n_chunks, n_words, p_eff, window, sinks, R, BS=block_size,
        BPC=bpc, R_PAD=_pow2(R), FUSED=fused, SEARCH_K=cfg.search_arity, TILE=tile,
        RESIDENT=nb <= tile, MAX_2D=cfg.select_max_2d, WRITE_BITS=write_bits,
        num_warps=cfg.score_num_warps)
    cand_tile = max(_pow2(cfg.select_cand_tile), 32 if write_bits else 1)
    if not fused and not _scores_only and cfg.select_split and nb > cand_tile:
        # <= 16 programs per head; whole 32-block words per program when it zeroes the bits
        ctile = max(_pow2(cfg.select_split_tile), _pow2(-(-nb // 16)), 32 if write_bits else 1)
        n_tiles = -(-nb // ctile)
        nt_pad = _pow2(n_tiles)
        z = torch.empty((rows,), dtype=torch.float32, device=dev)
        part = torch.empty((rows, 3 * nt_pad), dtype=torch.float32, device=dev)
        _candidates_kernel[(n_tiles, rows)](
            lse, chunk, lens, z, kept_idx, part, mask, bits_arg, Hr, nb, n_chunks, n_words, p_eff,
            window, sinks, BS=block_size, CTILE=ctile, ZTILE=min(4096, _pow2(n_chunks)),
            NT_PAD=nt_pad, WRITE_BITS=write_bits, num_warps=4 if ctile <= 1024 else 8)
        common = (lse, chunk, lens, z, part, mask, kept_idx, kept_cnt, bits_arg, Hr, nb, n_chunks,
                  n_words, n_tiles, p_eff, window, sinks)
        ckw = dict(BS=block_size, CTILE=ctile, NT_PAD=nt_pad, SEARCH_K=cfg.search_arity,
                   MAX_2D=cfg.select_max_2d, WRITE_BITS=write_bits, FT=128, CAND_TILE=cand_tile)
        _select_split_kernel[(rows,)](*common, **ckw, TILE=cand_tile, FALLBACK=False, RESIDENT=True,
                                      flat_min=0, FLAT_TILE=cand_tile, num_warps=cfg.select_cand_warps)
        # flat heads: every block resident when the view fits select_flat_tile (else that branch is
        # compiled with the streaming tile and never taken)
        flat_ok = cfg.select_flat_tile > 0 and nb <= cfg.select_flat_tile
        flat = _pow2(nb) if flat_ok else tile
        _select_split_kernel[(rows,)](*common, **ckw, TILE=tile, FALLBACK=True, RESIDENT=nb <= tile,
                                      flat_min=cfg.select_flat_min_cand if flat_ok else 2 ** 31 - 1,
                                      FLAT_TILE=flat,
                                      num_warps=max(4, min(cfg.select_num_warps, max(tile, flat) // 256)))
        if SPLIT_STATS_HOOK is not None:  # diagnostics (benchmarks): which path each head took
            SPLIT_STATS_HOOK(dict(n_cand=part[:, :n_tiles].sum(1), cand_mass=part[:, nt_pad:nt_pad + n_tiles].sum(1),
                                  forced_mass=part[:, 2 * nt_pad:2 * nt_pad + n_tiles].sum(1),
                                  cand_tile=cand_tile, top_p=p_eff, n_blocks=nb))
    elif not fused and not _scores_only:
        _select_kernel[(rows,)](lse, chunk, lens, mask, kept_idx, kept_cnt, bits_arg, Hr, nb,
                                n_chunks, n_words, p_eff, window, sinks, BS=block_size,
                                SEARCH_K=cfg.search_arity, TILE=tile, RESIDENT=nb <= tile,
                                MAX_2D=cfg.select_max_2d, WRITE_BITS=write_bits,
                                # small tiles: fewer warps make each block-wide reduction cheaper
                                num_warps=max(4, min(cfg.select_num_warps, tile // 256)))
    return SelectResult(mask.view(torch.bool), kept_idx, kept_cnt, bits)


def retrieval_decode_triton(q_r, k_cache, v_cache, kv_head_of_r, block_mask, cache_lens, *,
                            window, sinks, block_size, scale=None,
                            config: Optional[TritonDecodeConfig] = None,
                            kept: Optional[tuple] = None, out: Optional[torch.Tensor] = None,
                            q_heads: Optional[Sequence[int]] = None,
                            counters: Optional[torch.Tensor] = None,
                            mask_bits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Retrieval decode. `q_heads[h]` is retrieval head h's row in q_r and in `out` (default h),
    so rtpurbo_decode can pass the whole q and write in place without gathers. mask_bits: the
    select kernel's packed mask (SelectResult.block_bits) for the union kernel's fused lists;
    packed here from block_mask when not given."""
    cfg = config or DEFAULT_CONFIG
    B, _, D = q_r.shape
    Hr = len(kv_head_of_r)
    L = k_cache.shape[2]
    dev = q_r.device
    nb = -(-L // block_size)
    rows = B * Hr
    if out is None:  # rows q_heads[h] of out are written: as many rows as q_r (Hr by default)
        out = torch.empty((B, q_r.shape[1], D), dtype=q_r.dtype, device=dev)
    if rows == 0:
        return out
    lens = _lens_i32(cache_lens)
    mask_u8 = block_mask.view(torch.uint8)
    if uses_union(cfg, block_mask.shape[-1]):  # the union kernel builds its own visit lists from the mask
        return _retrieval_union_triton(q_r, k_cache, v_cache, kv_head_of_r, mask_u8, lens, out,
                                       window=window, sinks=sinks, block_size=block_size,
                                       scale=scale, cfg=cfg, q_heads=q_heads, counters=counters,
                                       mask_bits=mask_bits)
    if kept is None:
        kept_idx = torch.empty((rows, max(nb, 1)), dtype=torch.int32, device=dev)
        kept_cnt = torch.empty((rows,), dtype=torch.int32, device=dev)
        _compact_kernel[(rows,)](mask_u8, lens, kept_idx, kept_cnt, Hr, nb, window, sinks,
                                 BS=block_size, TILE=min(1024, _pow2(nb)), num_warps=cfg.num_warps)
    else:
        kept_idx, kept_cnt = kept
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    if q_r.stride(2) != 1:
        q_r = q_r.contiguous()
    ns = _auto_splits(cfg.num_splits, rows, nb, cfg, dev)
    d_pad = _pow2(D, 16)
    pm, pl, pacc, fused, counters = _split_partials(rows, ns, D, cfg, dev, counters, rows)
    qh = _index_tensor(list(range(Hr)) if q_heads is None else q_heads, dev)
    _retrieval_attn_kernel[(ns, rows)](
        q_r, k_cache, v_cache, _index_tensor(kv_head_of_r, dev), qh, lens, mask_u8, kept_idx,
        kept_cnt, pm, pl, pacc, counters if fused else lens, out, q_r.stride(0), q_r.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0),
        v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), Hr, nb, D,
        1.0 / math.sqrt(D) if scale is None else float(scale), window, sinks, BS=block_size,
        D_PAD=d_pad, NS=ns, NS_PAD=_pow2(ns), FUSED=fused, num_warps=cfg.num_warps)
    if ns > 1 and not fused:
        _combine_kernel[(rows,)](pm, pl, pacc, qh, out, out.stride(0), out.stride(1), Hr, D, GP=1,
                                 NS=ns, NS_PAD=_pow2(ns), D_PAD=d_pad, num_warps=cfg.num_warps)
    return out


def retrieval_groups(kv_head_of_r: Sequence[int], q_heads: Optional[Sequence[int]] = None):
    """Retrieval heads grouped by KV head, for the union kernel: (kv heads [NG] ascending,
    mask-row table [NG * GP], q-row table [NG * GP], GP). Group g's heads (ascending retrieval
    index, any order in q) fill rows g * GP ...; -1 pads every group to GP = max group size
    rounded up to a power of 2 >= 16 (tl.dot's minimum)."""
    Hr = len(kv_head_of_r)
    q_heads = list(range(Hr)) if q_heads is None else [int(h) for h in q_heads]
    kvs = sorted(set(int(k) for k in kv_head_of_r))
    groups = [[h for h in range(Hr) if kv_head_of_r[h] == kv] for kv in kvs]
    gp = _pow2(max((len(g) for g in groups), default=1), 16)
    hr_table = [h for grp in groups for h in grp + [-1] * (gp - len(grp))]
    qh_table = [q_heads[h] if h >= 0 else -1 for h in hr_table]
    return kvs, hr_table, qh_table, gp


def _union_lists(mask_u8, lens, hr_table, NG, gp, *, window, sinks, block_size,
                 cfg: TritonDecodeConfig):
    B, Hr, nb = mask_u8.shape
    dev = mask_u8.device
    rows = B * NG
    idx = torch.empty((rows, max(nb, 1)), dtype=torch.int32, device=dev)
    cnt = torch.empty((rows,), dtype=torch.int32, device=dev)
    if rows == 0 or nb == 0:
        return idx, cnt.zero_()
    tile = min(cfg.union_tile, _pow2(nb))
    _union_kernel[(rows,)](mask_u8, lens, _index_tensor(hr_table, dev), idx, cnt, Hr, NG, nb,
                           window, sinks, BS=block_size, GP=gp, TILE=tile,
                           num_warps=max(4, min(16, tile // 256)))
    return idx, cnt


def pack_mask_bits(mask_u8: torch.Tensor) -> torch.Tensor:
    """[B, H, nB] uint8 / bool mask -> [B*H, ceil(nB/32)] int32 bit words (bit j of word w = block
    32 w + j), the layout the select kernel writes for union_lists="fused"."""
    B, H, nb = mask_u8.shape
    nw = max(-(-nb // 32), 1)
    bits = torch.empty((B * H, nw), dtype=torch.int32, device=mask_u8.device)
    if B * H == 0 or nb == 0:
        return bits.zero_()
    pw = min(64, _pow2(nw))
    _pack_bits_kernel[(B * H, -(-nw // pw))](mask_u8.view(torch.uint8), bits, nb, nw, PW=pw,
                                            num_warps=4)
    return bits


def _union_splits(cfg: TritonDecodeConfig, rows: int, nb: int, dev) -> int:
    if cfg.union_num_splits is not None:
        ns = cfg.union_num_splits
    else:  # ~4 programs per SM in total
        ns = -(-4 * _num_sms(dev) // max(rows, 1))
    return int(max(1, min(ns, cfg.union_max_splits, max(nb, 1))))


def _fused_list_args(cfg: TritonDecodeConfig, nb: int) -> dict:
    nw = max(-(-nb // 32), 1)
    return dict(FAST_LISTS=True, CW=min(_pow2(cfg.union_word_tile), _pow2(nw)),
                EW=min(_pow2(cfg.union_expand_words), _pow2(nw)))


def union_visit_lists(block_mask, cache_lens, kv_head_of_r, *, window, sinks, block_size,
                      config: Optional[TritonDecodeConfig] = None,
                      mask_bits: Optional[torch.Tensor] = None):
    """(idx [B*NG, nB] int32, count [B*NG] int32): per (batch, retrieval KV head in ascending
    order), the blocks the union kernel visits (first count entries, ascending): valid blocks that
    a head of the group selected or that hold a sink / window token. For tests and benchmarks.
    config.union_lists "kernel": _union_kernel; "fused": the union kernel's own list build
    (LISTS_ONLY: every split program writes its slice, no attention) from mask_bits (packed from
    block_mask when None)."""
    cfg = config or DEFAULT_CONFIG
    kvs, hr_table, qh_table, gp = retrieval_groups(kv_head_of_r)
    mask_u8 = block_mask.view(torch.uint8)
    lens = _lens_i32(cache_lens)
    if cfg.union_lists != "fused":
        return _union_lists(mask_u8, lens, hr_table, len(kvs), gp, window=window, sinks=sinks,
                            block_size=block_size, cfg=cfg)
    B, Hr, nb = mask_u8.shape
    dev = mask_u8.device
    NG = len(kvs)
    rows = B * NG
    idx = torch.empty((rows, max(nb, 1)), dtype=torch.int32, device=dev)
    cnt = torch.empty((rows,), dtype=torch.int32, device=dev)
    if rows == 0 or nb == 0:
        return idx, cnt.zero_()
    bits = pack_mask_bits(mask_u8) if mask_bits is None else mask_bits
    ns = _union_splits(cfg, rows, nb, dev)
    z = 0
    _retrieval_union_kernel[(ns, rows)](
        lens, lens, lens, _index_tensor(kvs, dev), _index_tensor(hr_table, dev),
        _index_tensor(qh_table, dev), lens, mask_u8, idx, cnt, bits, lens, lens, lens, lens, lens,
        z, z, z, z, z, z, z, z, z, z, Hr, NG, nb, bits.shape[1], 1, 1.0, window, sinks,
        BS=block_size, BN=_pow2(block_size, 16), GP=gp, D_PAD=16, NS=ns, NS_PAD=_pow2(ns),
        FUSED=False, IEEE=True, LISTS_ONLY=True, **_fused_list_args(cfg, nb),
        num_warps=cfg.union_num_warps)
    return idx, cnt


def _retrieval_union_triton(q_r, k_cache, v_cache, kv_head_of_r, mask_u8, lens, out, *, window,
                            sinks, block_size, scale, cfg: TritonDecodeConfig, q_heads,
                            counters, mask_bits=None):
    """Retrieval decode through the GQA-union kernel: _union_kernel builds each group's visit
    list (union_lists="kernel"; "fused": each program of the attention kernel builds its slice
    from the packed mask bits), _retrieval_union_kernel reads every listed K/V block once for all
    the group's heads, _combine_kernel (or the last program, fused_reduction) merges the splits."""
    B, Hr, nb = mask_u8.shape
    D = q_r.shape[2]
    dev = q_r.device
    kvs, hr_table, qh_table, gp = retrieval_groups(kv_head_of_r, q_heads)
    NG = len(kvs)
    rows = B * NG
    fast = cfg.union_lists == "fused"
    if fast:
        if mask_bits is None:
            mask_bits = pack_mask_bits(mask_u8)
        elif mask_bits.shape != (B * Hr, max(-(-nb // 32), 1)) or mask_bits.dtype != torch.int32:
            raise ValueError(f"mask_bits must be int32 [{B * Hr}, {max(-(-nb // 32), 1)}], got "
                             f"{mask_bits.dtype} {list(mask_bits.shape)}")
        idx = torch.empty((rows, max(nb, 1)), dtype=torch.int32, device=dev)
        cnt = torch.empty((rows,), dtype=torch.int32, device=dev)
        list_args = _fused_list_args(cfg, nb)
    else:
        idx, cnt = _union_lists(mask_u8, lens, hr_table, NG, gp, window=window, sinks=sinks,
                                block_size=block_size, cfg=cfg)
        mask_bits, list_args = lens, {}
    if _interpreting() and k_cache.dtype == torch.bfloat16:
        # Triton's CPU interpreter (3.9) returns garbage for bf16 tl.dot; fp32 is exact there
        q_r, k_cache, v_cache = q_r.float(), k_cache.float(), v_cache.float()
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    if q_r.stride(2) != 1:
        q_r = q_r.contiguous()
    ns = _union_splits(cfg, rows, nb, dev)
    d_pad = _pow2(D, 16)
    pm, pl, pacc, fused, counters = _split_partials(rows * gp, ns, D, cfg, dev, counters, rows)
    qh = _index_tensor(qh_table, dev)
    _retrieval_union_kernel[(ns, rows)](
        q_r, k_cache, v_cache, _index_tensor(kvs, dev), _index_tensor(hr_table, dev), qh, lens,
        mask_u8, idx, cnt, mask_bits, pm, pl, pacc, counters if fused else lens, out,
        q_r.stride(0), q_r.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), Hr,
        NG, nb, mask_bits.shape[-1] if fast else 1, D,
        1.0 / math.sqrt(D) if scale is None else float(scale), window, sinks, BS=block_size,
        BN=_pow2(block_size, 16), GP=gp, D_PAD=d_pad, NS=ns, NS_PAD=_pow2(ns), FUSED=fused,
        IEEE=k_cache.dtype == torch.float32, **list_args, num_warps=cfg.union_num_warps,
        **_stages(cfg.union_num_stages))
    if ns > 1 and not fused:
        _combine_kernel[(rows * gp,)](pm, pl, pacc, qh, out, out.stride(0), out.stride(1), NG, D,
                                      GP=gp, NS=ns, NS_PAD=_pow2(ns), D_PAD=d_pad,
                                      num_warps=cfg.num_warps)
    return out


def local_decode_triton(q_l, sink_k, sink_v, ring_k, ring_v, cache_lens, *, window, sinks,
                        scale=None, kv_head_of_l: Sequence[int],
                        config: Optional[TritonDecodeConfig] = None,
                        out: Optional[torch.Tensor] = None,
                        q_heads: Optional[Sequence[int]] = None,
                        counters: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Local decode. kv_head_of_l[j] is local head j's KV head; q_heads[j] its row in q_l / out."""
    cfg = config or DEFAULT_CONFIG
    B, _, D = q_l.shape
    Hl = len(kv_head_of_l)
    HKV, W = ring_k.shape[1], ring_k.shape[2]
    dev = q_l.device
    if out is None:  # rows q_heads[j] of out are written: as many rows as q_l (Hl by default)
        out = torch.empty((B, q_l.shape[1], D), dtype=q_l.dtype, device=dev)
    if B * Hl == 0:
        return out
    q_heads = list(range(Hl)) if q_heads is None else list(q_heads)
    if _interpreting() and ring_k.dtype == torch.bfloat16:
        # Triton's CPU interpreter (3.9) returns garbage for bf16 tl.dot; fp32 is exact there
        q_l, sink_k, sink_v, ring_k, ring_v = (t.float() for t in (q_l, sink_k, sink_v, ring_k,
                                                                    ring_v))
    groups = [[q_heads[j] for j in range(Hl) if kv_head_of_l[j] == k] for k in range(HKV)]
    gp = _pow2(max(len(g) for g in groups), 16)  # tl.dot needs >= 16 rows
    table = [h for g in groups for h in (g + [-1] * (gp - len(g)))]
    sink_k, sink_v, ring_k, ring_v = (t if t.stride(3) == 1 else t.contiguous()
                                      for t in (sink_k, sink_v, ring_k, ring_v))
    if q_l.stride(2) != 1:
        q_l = q_l.contiguous()
    rows = B * HKV
    bn = cfg.local_tile
    max_tiles = -(-window // bn) if window > 0 else 1
    ns = _auto_splits(cfg.local_num_splits, rows, max_tiles, cfg, dev)
    d_pad = _pow2(D, 16)
    pm, pl, pacc, fused, counters = _split_partials(rows * gp, ns, D, cfg, dev, counters, rows)
    heads = _index_tensor(table, dev)
    lens = _lens_i32(cache_lens)
    if sink_k.shape[2] == 0:  # keep valid pointers for the (never taken) sink branch
        sink_k = sink_v = ring_k
    _local_attn_kernel[(ns, rows)](
        q_l, sink_k, sink_v, ring_k, ring_v, heads, lens, pm, pl, pacc,
        counters if fused else lens, out, q_l.stride(0), q_l.stride(1), sink_k.stride(0),
        sink_k.stride(1), sink_k.stride(2), sink_v.stride(0), sink_v.stride(1), sink_v.stride(2),
        ring_k.stride(0), ring_k.stride(1), ring_k.stride(2), ring_v.stride(0), ring_v.stride(1),
        ring_v.stride(2), out.stride(0), out.stride(1), HKV, W, D,
        1.0 / math.sqrt(D) if scale is None else float(scale), window, sinks, GP=gp, BN=bn,
        SP=_pow2(sinks, 16), D_PAD=d_pad, NS=ns, NS_PAD=_pow2(ns), FUSED=fused,
        IEEE=ring_k.dtype == torch.float32, num_warps=cfg.num_warps, **_stages(cfg.local_num_stages))
    if ns > 1 and not fused:
        _combine_kernel[(rows * gp,)](pm, pl, pacc, heads, out, out.stride(0), out.stride(1), HKV,
                                      D, GP=gp, NS=ns, NS_PAD=_pow2(ns), D_PAD=d_pad,
                                      num_warps=cfg.num_warps)
    return out


def dense_decode_triton(q, k_cache, v_cache, cache_lens, *, scale=None,
                        config: Optional[TritonDecodeConfig] = None,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense GQA decode over keys n < cache_lens[b] of k/v_cache [B, Hkv, L, D] (arguments
    validated by the caller): _local_attn_kernel with the cache as a ring of W = L slots,
    window = L and no sinks. Token t < cache_lens <= L is in slot t % L = t; the kernel walks
    only the valid tiles, so the cost follows cache_lens, not L."""
    B, Hq, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    empty_k, empty_v = k_cache[:, :, :0], v_cache[:, :, :0]
    # few KV heads and a long cache: up to 128 splits per head (~4 programs per SM on an H100 at B=1, 4
    # KV heads); the local heads' own default caps at 64 (their window is short). 128 splits of the local
    # kernel were run on the H100 (docs/kernels.md).
    return local_decode_triton(q, empty_k, empty_v, k_cache, v_cache, cache_lens, window=max(L, 1),
                               sinks=0, scale=scale, kv_head_of_l=[h // G for h in range(Hq)],
                               config=config or DENSE_CONFIG, out=out)


def rtpurbo_decode_triton(q, cache_lens, *, retrieval_heads: Sequence[int],
                          local_heads: Sequence[int], top_p, block_size, window, sinks, sink_k,
                          sink_v, ring_k, ring_v, kv_head_of_l, k_cache, v_cache, kv_head_of_r,
                          qi, ki_cache, scale=None, config: Optional[TritonDecodeConfig] = None):
    """One decode step, arguments already validated. Writes both roles straight into one output
    tensor in the original head order; one zeroed counter buffer serves every fused reduction."""
    from kernels.sparse_decode import DecodeOutput

    cfg = config or DEFAULT_CONFIG
    B = q.shape[0]
    out = torch.empty_like(q)
    n_r = B * len(retrieval_heads)
    n_l = B * (ring_k.shape[1] if local_heads else 0)
    counters = (torch.zeros((2 * n_r + n_l,), dtype=torch.int32, device=q.device)
                if cfg.fused_reduction or cfg.fused_select else None)
    mask = None
    # Local heads need nothing from the selection: on CUDA they run on a side stream so their
    # (latency-bound, few-program) kernels overlap the selection and retrieval kernels.
    side = None
    if cfg.overlap_local and q.is_cuda and local_heads and retrieval_heads:
        side = _side_stream(q.device)
        side.wait_stream(torch.cuda.current_stream(q.device))
    if local_heads:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            local_decode_triton(
                q, sink_k, sink_v, ring_k, ring_v, cache_lens, window=window, sinks=sinks,
                scale=scale, kv_head_of_l=kv_head_of_l, config=cfg, out=out, q_heads=local_heads,
                counters=None if counters is None else counters[2 * n_r:])
    if retrieval_heads:
        sel = select_decode_blocks_triton(
            qi, ki_cache, cache_lens, top_p=top_p, block_size=block_size, window=window,
            sinks=sinks, config=cfg, counters=None if counters is None else counters[:n_r])
        mask = sel.block_mask
        retrieval_decode_triton(
            q, k_cache, v_cache, kv_head_of_r, mask, cache_lens, window=window, sinks=sinks,
            block_size=block_size, scale=scale, config=cfg, kept=(sel.kept_idx, sel.kept_count),
            out=out, q_heads=retrieval_heads,
            counters=None if counters is None else counters[n_r:2 * n_r],
            mask_bits=sel.block_bits)
    if side is not None:
        torch.cuda.current_stream(q.device).wait_stream(side)
    return DecodeOutput(out=out, block_mask=mask)
