"""Dynamic top-p selection of key blocks for the prefill of retrieval heads.

Indexer tensors: qi [B, Hr, T, r], ki [B, Hr, T, r] (pre-RoPE, projected to r = 16 dims, one
ki per retrieval head). Score s(m, n) = qi[m] . ki[n] (no scaling). Key blocks hold
`block_size` tokens (64), query blocks `q_block_size` tokens (128, FlexAttention's Q block).

Block mass (what top-p thresholds), per (b, head, query block i, key block j):
  mode="mean":   mean over the valid queries m of block i of
                 sum_{n in block j} softmax_{n' <= m, same doc}(s(m, n'))[n]
                 (the exact average of the per-query indexer distributions; costs T^2/2
                 exponentials per head per pass, two passes).
  mode="pooled": qbar_i = mean of qi over the block's valid queries; one softmax over the
                 keys n in [doc_start(first query), last query], summed per key block
                 (T^2 / (2 q_block_size) exponentials: ~128x cheaper).

Selection (select_blocks), per query block:
  forced   = key blocks overlapping the block's sinks or windows (window_sink_block_ranges):
             always kept, so the attention sees at least what a local head sees.
  selected = forced + the smallest set of the remaining causal key blocks, taken in
             descending mass (ties: lower block index first), such that
             mass(forced) + mass(selected extra) >= top_p.
  top_p >= 1 keeps every causal key block (dense causal attention).
  The forced blocks' mass counts toward top_p: a query block whose window already holds
  top_p of the indexer mass adds nothing. (Taking top-p over all blocks and then adding the
  forced ones would be a superset of this.)

Density (per retrieval head): kept extra blocks / selectable blocks (causal, not forced),
each query block weighted by its number of valid queries. Without doc_ids this equals
"kept causal keys beyond window+sinks / causal keys beyond window+sinks" measured with the
query block's window union (the forced range), since every selectable block is fully
causal and outside every window of the block. With doc_ids a selectable block can straddle
a document start and the ratio is then a block-level approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.masks import document_segments, window_sink_block_ranges

__all__ = [
    "BlockSelection",
    "topp_mask_reference",
    "topp_mask",
    "topp_keep_reference",
    "topp_keep_threshold",
    "indexer_block_mass_reference",
    "indexer_block_mass_pooled_reference",
    "indexer_block_mass_torch",
    "indexer_block_mass",
    "forced_and_candidate_blocks",
    "select_blocks",
    "select_blocks_reference",
    "selection_from_dense",
    "selection_to_dense",
    "random_selection",
]


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ------------------------------------------------------------------------------ top-p


def topp_keep_reference(mass: Tensor, target: Tensor | float) -> Tensor:
    """Sort + cumsum reference on the last dim: keep an element iff it has positive mass and
    the mass of the elements before it in descending order (ties: lower index first) is
    < target. target broadcasts against mass[..., 0]. target <= 0 keeps nothing."""
    target = torch.as_tensor(target, dtype=torch.float32, device=mass.device)
    # stable sort on -mass keeps lower indices first among ties
    order = torch.sort(-mass.float(), dim=-1, stable=True).indices
    sorted_mass = torch.gather(mass.float(), -1, order)
    excl = torch.cumsum(sorted_mass, dim=-1) - sorted_mass
    keep_sorted = (excl < target[..., None]) & (sorted_mass > 0)
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(-1, order, keep_sorted)
    return keep


def topp_keep_threshold(mass: Tensor, target: Tensor | float, *, method: str = "bisect") -> Tensor:
    """Same semantics as topp_keep_reference without a sort.

    The threshold tau = largest value with sum(mass >= tau) >= target is found exactly by a
    search on the float bit pattern (masses are >= 0, so their int32 views are ordered):
    method="bisect" does 31 halvings (one masked row-sum each), method="radix" 4 passes of a
    256-bin mass histogram per row (the paper's decode kernel uses a 256-bin histogram too).
    Elements > tau are kept; ties at tau are kept in index order while the running mass stays
    below target.
    """
    m = mass.float().contiguous()
    if (m < 0).any():
        raise ValueError("topp_keep_threshold: masses must be >= 0")
    target = torch.as_tensor(target, dtype=torch.float32, device=m.device).expand(m.shape[:-1]).contiguous()
    bits = m.view(torch.int32)
    lead = m.shape[:-1]
    if method == "bisect":
        lo = torch.zeros(lead, dtype=torch.int32, device=m.device)
        hi = torch.full(lead, 0x7F800001, dtype=torch.int32, device=m.device)  # +inf bits + 1
        # invariant: S(lo) >= target or lo == 0; S(hi) < target or hi is out of range
        for _ in range(31):
            mid = lo + (hi - lo) // 2
            s = torch.where(bits >= mid[..., None], m, 0.0).sum(-1)
            ok = s >= target
            lo = torch.where(ok, mid, lo)
            hi = torch.where(ok, hi, mid)
        tau = lo
    elif method == "radix":
        tau = _radix_threshold(m, bits, target)
    else:
        raise ValueError(f"method must be 'bisect' or 'radix', got {method!r}")
    above = bits > tau[..., None]
    sum_above = torch.where(above, m, 0.0).sum(-1)
    tie_mass = torch.where(bits == tau[..., None], m, 0.0)
    tie_excl = torch.cumsum(tie_mass, dim=-1) - tie_mass
    keep_tie = (bits == tau[..., None]) & ((sum_above[..., None] + tie_excl) < target[..., None])
    return (above | keep_tie) & (m > 0)


def _radix_threshold(m: Tensor, bits: Tensor, target: Tensor) -> Tensor:
    """Largest t with sum(m[bits >= t]) >= target, by MSB-first 8/8/8/7-bit digit passes."""
    lead = m.shape[:-1]
    R = int(math.prod(lead)) if lead else 1
    n = m.shape[-1]
    m2 = m.reshape(R, n)
    b2 = bits.reshape(R, n)
    tgt = target.reshape(R)
    prefix = torch.zeros(R, dtype=torch.int32, device=m.device)  # chosen high bits so far
    carried = torch.zeros(R, dtype=torch.float32, device=m.device)  # mass strictly above prefix range
    row_off = (torch.arange(R, device=m.device, dtype=torch.int64) * 256)[:, None]
    for shift, width in ((23, 8), (15, 8), (7, 8), (0, 7)):
        hi_mask = ~((1 << (shift + width)) - 1)  # bits above this digit
        in_range = (b2 & hi_mask) == prefix[:, None]
        digit = ((b2 >> shift) & ((1 << width) - 1)).to(torch.int64)
        hist = torch.zeros(R * 256, dtype=torch.float32, device=m.device)
        hist.index_add_(0, (row_off + digit).flatten(), torch.where(in_range, m2, 0.0).flatten())
        hist = hist.view(R, 256)[:, : 1 << width]
        # suffix[d] = mass of in-range elements with digit >= d
        suffix = torch.flip(torch.cumsum(torch.flip(hist, [-1]), -1), [-1])
        ok = (carried[:, None] + suffix) >= tgt[:, None]
        # largest digit d with ok[d]; if none, d = 0 (only possible when total < target)
        d = torch.where(ok, torch.arange(1 << width, device=m.device), torch.zeros_like(ok, dtype=torch.int64)).amax(-1)
        above_d = torch.where(torch.arange(1 << width, device=m.device)[None, :] > d[:, None], hist, 0.0).sum(-1)
        carried = carried + above_d
        prefix = prefix | (d.to(torch.int32) << shift)
    return prefix.reshape(lead)


def topp_mask_reference(probs: Tensor, p: float, dim: int = -1) -> Tensor:
    """Bool mask of the smallest set whose mass reaches p (reference: sort + cumsum).

    Order: descending probability, ties broken by lower index first. An element is kept iff
    its probability is > 0 and the mass before it in that order is < p, so the element that
    crosses p is kept. The argmax is always kept (the limit p -> 0). p = 1 keeps exactly the
    elements with nonzero probability (no rounding-dependent cut). p must be in (0, 1].
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    x = probs.movedim(dim, -1)
    if p >= 1.0:
        keep = x > 0
    else:
        keep = topp_keep_reference(x, p)
    argmax = torch.argmax(x, dim=-1, keepdim=True)  # first index among ties
    keep = keep.scatter(-1, argmax, True)
    return keep.movedim(-1, dim)


def topp_mask(probs: Tensor, p: float, dim: int = -1, *, method: str = "bisect") -> Tensor:
    """topp_mask_reference's semantics through the sort-free threshold search."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    x = probs.movedim(dim, -1)
    keep = (x > 0) if p >= 1.0 else topp_keep_threshold(x, p, method=method)
    keep = keep.scatter(-1, torch.argmax(x, dim=-1, keepdim=True), True)
    return keep.movedim(-1, dim)


# ------------------------------------------------------------------------- block mass


def _check_indexer(qi: Tensor, ki: Tensor, block_size: int, q_block_size: int, doc_ids: Tensor | None) -> tuple[int, int, int, int]:
    if qi.dim() != 4 or ki.dim() != 4 or qi.shape != ki.shape:
        raise ValueError(f"qi and ki must both be [B, Hr, T, r]; got {tuple(qi.shape)} and {tuple(ki.shape)}")
    B, H, T, r = qi.shape
    if block_size < 1 or q_block_size < 1:
        raise ValueError(f"block_size and q_block_size must be >= 1, got {block_size}, {q_block_size}")
    if doc_ids is not None and (doc_ids.dim() != 2 or doc_ids.shape[1] != T or doc_ids.shape[0] not in (1, B)):
        raise ValueError(f"doc_ids must be [B={B}, T={T}], got {tuple(doc_ids.shape)}")
    return B, H, T, r


def _query_block_sums(x: Tensor, q_block_size: int) -> Tensor:
    """Sum x [..., T, C] over query blocks -> [..., nQB, C] (zero-padded tail)."""
    T = x.shape[-2]
    n_qb = _cdiv(T, q_block_size)
    x = torch.nn.functional.pad(x, (0, 0, 0, n_qb * q_block_size - T))
    return x.unflatten(-2, (n_qb, q_block_size)).sum(-2)


def _key_block_sums(p: Tensor, block_size: int) -> Tensor:
    """Sum p [..., Tk] over key blocks -> [..., nKB]."""
    Tk = p.shape[-1]
    n_kb = _cdiv(Tk, block_size)
    p = torch.nn.functional.pad(p, (0, n_kb * block_size - Tk))
    return p.unflatten(-1, (n_kb, block_size)).sum(-1)


def _valid_rows_per_q_block(T: int, q_block_size: int, device) -> Tensor:
    n_qb = _cdiv(T, q_block_size)
    qs = torch.arange(n_qb, device=device) * q_block_size
    return (torch.clamp(qs + q_block_size, max=T) - qs).float()


def indexer_block_mass_reference(
    qi: Tensor, ki: Tensor, *, block_size: int, q_block_size: int, doc_ids: Tensor | None = None
) -> Tensor:
    """mode="mean" block mass [B, Hr, nQB, nKB] float32, with a T x T score matrix."""
    B, H, T, r = _check_indexer(qi, ki, block_size, q_block_size, doc_ids)
    s = torch.einsum("bhmr,bhnr->bhmn", qi.float(), ki.float())
    m = torch.arange(T, device=qi.device)
    allowed = (m[None, :] <= m[:, None])[None, None]
    if doc_ids is not None:
        seg, _ = document_segments(doc_ids)
        allowed = allowed & (seg[:, :, None] == seg[:, None, :])[:, None]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    per_query = _key_block_sums(p, block_size)  # [B, H, T, nKB]
    return _query_block_sums(per_query, q_block_size) / _valid_rows_per_q_block(T, q_block_size, qi.device)[:, None]


def _pooled_queries(qi: Tensor, q_block_size: int) -> Tensor:
    T = qi.shape[-2]
    return _query_block_sums(qi.float(), q_block_size) / _valid_rows_per_q_block(T, q_block_size, qi.device)[:, None]


def indexer_block_mass_pooled_reference(
    qi: Tensor, ki: Tensor, *, block_size: int, q_block_size: int, doc_ids: Tensor | None = None
) -> Tensor:
    """mode="pooled" block mass [B, Hr, nQB, nKB] float32 (dense over nQB x T)."""
    B, H, T, r = _check_indexer(qi, ki, block_size, q_block_size, doc_ids)
    qbar = _pooled_queries(qi, q_block_size)  # [B, H, nQB, r]
    s = torch.einsum("bhir,bhnr->bhin", qbar, ki.float())
    n_qb = qbar.shape[-2]
    qs = torch.arange(n_qb, device=qi.device) * q_block_size
    qe = torch.clamp(qs + q_block_size, max=T) - 1
    n = torch.arange(T, device=qi.device)
    allowed = (n[None, :] <= qe[:, None])[None, None]
    if doc_ids is not None:
        _, doc_start = document_segments(doc_ids)
        allowed = allowed & (n[None, None, :] >= doc_start[:, qs][:, :, None])[:, None]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return _key_block_sums(p, block_size)


def _row_ranges(T: int, q_block_size: int, mode: str, doc_ids: Tensor | None, device, qb0: int, qb1: int) -> tuple[Tensor, Tensor]:
    """Key range [lo, hi] per softmax row for query blocks [qb0, qb1): rows are queries
    (mean) or query blocks (pooled). Returns int64 [Bd, R]."""
    doc_start = document_segments(doc_ids.to(device))[1] if doc_ids is not None else None
    if mode == "mean":
        rows = torch.arange(qb0 * q_block_size, min(qb1 * q_block_size, T), device=device)
        lo = doc_start[:, rows] if doc_start is not None else torch.zeros_like(rows)[None]
        return lo, rows[None].expand_as(lo)
    qs = torch.arange(qb0, qb1, device=device) * q_block_size
    qe = torch.clamp(qs + q_block_size, max=T) - 1
    lo = doc_start[:, qs] if doc_start is not None else torch.zeros_like(qs)[None]
    return lo, qe[None].expand_as(lo)


def indexer_block_mass_torch(
    qi: Tensor,
    ki: Tensor,
    *,
    block_size: int = 64,
    q_block_size: int = 128,
    mode: str = "mean",
    doc_ids: Tensor | None = None,
    q_block_start: int = 0,
    q_block_end: int | None = None,
    max_chunk_elems: int = 1 << 26,
) -> Tensor:
    """Chunked pure-torch block mass for query blocks [q_block_start, q_block_end):
    [B, Hr, nQB', nKB] float32. Scores exist only for one chunk of query blocks at a time
    (chunk x q_block_size x keys-up-to-the-chunk), never T x T."""
    B, H, T, r = _check_indexer(qi, ki, block_size, q_block_size, doc_ids)
    if mode not in ("mean", "pooled"):
        raise ValueError(f"mode must be 'mean' or 'pooled', got {mode!r}")
    n_qb, n_kb = _cdiv(T, q_block_size), _cdiv(T, block_size)
    q_block_end = n_qb if q_block_end is None else q_block_end
    out = torch.zeros(B, H, q_block_end - q_block_start, n_kb, dtype=torch.float32, device=qi.device)
    kif = ki.float()
    rows_per_qb = q_block_size if mode == "mean" else 1
    per_qb = B * H * rows_per_qb * T
    chunk = max(1, min(q_block_end - q_block_start, max_chunk_elems // max(per_qb, 1)))
    for c0 in range(q_block_start, q_block_end, chunk):
        c1 = min(c0 + chunk, q_block_end)
        lo, hi = _row_ranges(T, q_block_size, mode, doc_ids, qi.device, c0, c1)  # [Bd, R]
        k_end = int(min(c1 * q_block_size, T))  # keys past the chunk's last query are never seen
        if mode == "mean":
            rows = qi[:, :, c0 * q_block_size : k_end].float()
        else:
            rows = _pooled_queries(qi[:, :, c0 * q_block_size : k_end], q_block_size)
        s = torch.einsum("bhmr,bhnr->bhmn", rows, kif[:, :, :k_end])
        n = torch.arange(k_end, device=qi.device)
        allowed = (n >= lo[..., None]) & (n <= hi[..., None])  # [Bd, R, k_end]
        p = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
        mass = _key_block_sums(p, block_size)  # [B, H, R, nKB']
        if mode == "mean":
            mass = _query_block_sums(mass, q_block_size)
            qs = torch.arange(c0, c1, device=qi.device) * q_block_size
            mass = mass / (torch.clamp(qs + q_block_size, max=T) - qs).float()[:, None]
        out[:, :, c0 - q_block_start : c1 - q_block_start, : mass.shape[-1]] = mass
    return out


def indexer_block_mass(
    qi: Tensor,
    ki: Tensor,
    *,
    block_size: int = 64,
    q_block_size: int = 128,
    mode: str = "mean",
    doc_ids: Tensor | None = None,
    q_block_start: int = 0,
    q_block_end: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Block mass [B, Hr, nQB', nKB] float32 for query blocks [q_block_start, q_block_end).
    backend: "triton" (CUDA; kernels/triton_block_select.py), "torch" (chunked), or "auto"
    (triton on CUDA when the block sizes suit it, else torch)."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton"
    if backend == "auto" and qi.is_cuda:
        from kernels import triton_block_select as tbs

        use_triton = tbs.triton_supports(qi, block_size, q_block_size, mode)
    if use_triton:
        from kernels.triton_block_select import indexer_block_mass_triton

        return indexer_block_mass_triton(
            qi, ki, block_size=block_size, q_block_size=q_block_size, mode=mode, doc_ids=doc_ids,
            q_block_start=q_block_start, q_block_end=q_block_end,
        )
    return indexer_block_mass_torch(
        qi, ki, block_size=block_size, q_block_size=q_block_size, mode=mode, doc_ids=doc_ids,
        q_block_start=q_block_start, q_block_end=q_block_end,
    )


# -------------------------------------------------------------------------- selection


@dataclass
class BlockSelection:
    """Selected key blocks per (batch, retrieval head, query block), FlexAttention layout.

    kv_num_blocks [B, Hr, nQB] int32; kv_indices [B, Hr, nQB, W] int32, ascending, entries at
    or past kv_num_blocks are 0. Every causal (same-document) token of a selected block is
    attended; the sink and window blocks are always among the selected ones.
    kept_weight / selectable_weight [B, Hr] float64: extra (non-forced) kept blocks and
    selectable blocks, each query block weighted by its number of valid queries.
    """

    kv_num_blocks: Tensor
    kv_indices: Tensor
    seq_len: int
    block_size: int
    q_block_size: int
    window: int
    sinks: int
    top_p: float
    doc_ids: Tensor | None
    kept_weight: Tensor
    selectable_weight: Tensor

    @property
    def density(self) -> Tensor:
        """Per-head kept density [Hr] over the batch (1.0 where nothing was selectable)."""
        kept = self.kept_weight.sum(0)
        sel = self.selectable_weight.sum(0)
        return torch.where(sel > 0, kept / sel.clamp(min=1e-30), torch.ones_like(sel))

    @property
    def density_per_sequence(self) -> Tensor:
        """[B, Hr] density per sequence."""
        s = self.selectable_weight
        return torch.where(s > 0, self.kept_weight / s.clamp(min=1e-30), torch.ones_like(s))

    def mean_keys_per_query(self) -> Tensor:
        """[B, Hr] average number of key tokens (including forced blocks, before the causal
        cut) that a query's block lists, for comparing with token budgets."""
        n_q = _valid_rows_per_q_block(self.seq_len, self.q_block_size, self.kv_num_blocks.device)
        listed = (self.kv_num_blocks.double() * n_q.double()).sum(-1) * self.block_size
        return listed / self.seq_len


THRESHOLDS = ("auto", "triton", "triton_bisect", "triton_hist", "bisect", "radix", "sort")
# what threshold="auto" runs on CUDA: "triton_hist" (one-pass log-mass + bracketed threshold), measured
# 2026-11-25 on the H100 at 1.18 / 1.89 / 45.5 ms vs 1.63 / 3.74 / 99.6 ms for the bisection kernel
# ("triton") at 32K / 128K / 1M, 8 heads, pooled mode (docs/kernels.md).
DEFAULT_CUDA_THRESHOLD = "triton_hist"


def _check_selection_args(T: int, top_p: float, block_size: int, q_block_size: int, window: int, sinks: int) -> None:
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if window < 1 or sinks < 0:
        raise ValueError(f"window must be >= 1 and sinks >= 0, got window={window}, sinks={sinks}")
    if q_block_size % block_size:
        raise ValueError(f"q_block_size ({q_block_size}) must be a multiple of block_size ({block_size})")


def forced_and_candidate_blocks(
    T: int,
    *,
    block_size: int,
    q_block_size: int,
    window: int,
    sinks: int,
    doc_ids: Tensor | None,
    device,
    q_block_start: int = 0,
    q_block_end: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(forced, candidate) bool [Bd, 1, nQB', nKB]: forced = sink/window blocks, candidate =
    key blocks some query of the block can see (causal, same document)."""
    doc_start = document_segments(doc_ids.to(device))[1] if doc_ids is not None else None
    rng = window_sink_block_ranges(
        T, window, sinks, q_block_size=q_block_size, kv_block_size=block_size, device=device,
        doc_start=doc_start, q_block_start=q_block_start, q_block_end=q_block_end,
    )
    kb = torch.arange(_cdiv(T, block_size), device=device)
    def within(lo, hi):
        return (kb >= lo[..., None]) & (kb <= hi[..., None])
    forced = within(rng["win_lo"], rng["win_hi"]) | within(rng["sink_lo"], rng["sink_hi"])
    candidate = within(rng["causal_lo"], rng["win_hi"])
    return forced[:, None], candidate[:, None]


def _compact_selected(sel: Tensor) -> tuple[Tensor, Tensor]:
    """bool [..., nKB] -> (num [...] int32, ascending indices [..., W] int32, W = max num)."""
    n_kb = sel.shape[-1]
    num = sel.sum(-1)
    pos = sel.to(torch.int32).cumsum(-1) - 1
    kb = torch.arange(n_kb, device=sel.device, dtype=torch.int32).expand_as(pos)
    out = torch.zeros(*sel.shape[:-1], n_kb + 1, dtype=torch.int32, device=sel.device)
    out.scatter_(-1, torch.where(sel, pos, n_kb).long(), kb)
    width = max(int(num.max().item()) if num.numel() else 1, 1)
    return num.to(torch.int32), out[..., :width]


def _selection_from_chunks(
    nums: list[Tensor], idxs: list[Tensor], kept: Tensor, selectable: Tensor, *, T: int, block_size: int,
    q_block_size: int, window: int, sinks: int, top_p: float, doc_ids: Tensor | None,
) -> BlockSelection:
    width = max(i.shape[-1] for i in idxs)
    idx = torch.cat([torch.nn.functional.pad(i, (0, width - i.shape[-1])) for i in idxs], dim=-2)
    return BlockSelection(
        kv_num_blocks=torch.cat(nums, dim=-1).contiguous(),
        kv_indices=idx.contiguous(),
        seq_len=T, block_size=block_size, q_block_size=q_block_size, window=window, sinks=sinks,
        top_p=top_p, doc_ids=doc_ids, kept_weight=kept, selectable_weight=selectable,
    )


def select_blocks(
    qi: Tensor,
    ki: Tensor,
    *,
    top_p: float,
    block_size: int = 64,
    q_block_size: int = 128,
    window: int,
    sinks: int,
    mode: str = "mean",
    doc_ids: Tensor | None = None,
    threshold: str = "auto",
    backend: str = "auto",
    max_chunk_bytes: int = 1 << 30,
    hist_config=None,
) -> BlockSelection:
    """Dynamic top-p key-block selection for every query block of every retrieval head.

    threshold: how the top-p cut is found.
      "triton" (= "triton_bisect"): block mass kernel, then one fused kernel per (head, query
                block) row: forced blocks, 31-step bisection on the float bits over the row
                padded to a power of two, compaction (kernels/triton_block_select.py);
      "triton_hist": pooled mode: one-pass split-K log-mass kernel; any mode: the streaming
                selection kernel (cumulative mass histogram over a bit-pattern bracket, exact
                finish in registers; HistConfig via hist_config). Same selection rule;
      "bisect" | "radix": the same search in torch ops; "sort": sort + cumsum (reference);
      "auto": DEFAULT_CUDA_THRESHOLD on CUDA, else "bisect".
    backend: block-mass implementation ("auto" | "triton" | "torch", see indexer_block_mass);
      with "triton_hist" and mode "pooled", "auto"/"triton" on CUDA (or "triton" anywhere)
      use the log-mass kernel, "torch" the chunked torch mass.
    Works in chunks of query blocks so [B, Hr, chunk, nKB] tensors stay under max_chunk_bytes.
    """
    B, H, T, r = _check_indexer(qi, ki, block_size, q_block_size, doc_ids)
    _check_selection_args(T, top_p, block_size, q_block_size, window, sinks)
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}")
    if threshold == "auto":
        threshold = DEFAULT_CUDA_THRESHOLD if qi.is_cuda else "bisect"
    if threshold == "triton_bisect":
        threshold = "triton"
    if threshold == "triton_hist":
        return _select_blocks_hist(
            qi, ki, top_p=top_p, block_size=block_size, q_block_size=q_block_size, window=window, sinks=sinks,
            mode=mode, doc_ids=doc_ids, backend=backend, max_chunk_bytes=max_chunk_bytes, config=hist_config,
        )
    n_qb, n_kb = _cdiv(T, q_block_size), _cdiv(T, block_size)
    chunk = max(1, min(n_qb, max_chunk_bytes // (4 * B * H * n_kb)))
    nums, idxs = [], []
    kept = torch.zeros(B, H, dtype=torch.float64, device=qi.device)
    selectable = torch.zeros(B, H, dtype=torch.float64, device=qi.device)
    n_valid = _valid_rows_per_q_block(T, q_block_size, qi.device).double()
    doc_start = document_segments(doc_ids.to(qi.device))[1] if doc_ids is not None else None
    for c0 in range(0, n_qb, chunk):
        c1 = min(c0 + chunk, n_qb)
        if threshold == "triton":
            from kernels.triton_block_select import topp_select_rows_triton

            mass = None
            if top_p < 1.0:
                mass = indexer_block_mass(
                    qi, ki, block_size=block_size, q_block_size=q_block_size, mode=mode, doc_ids=doc_ids,
                    q_block_start=c0, q_block_end=c1, backend=backend,
                )
            rng = window_sink_block_ranges(
                T, window, sinks, q_block_size=q_block_size, kv_block_size=block_size, device=qi.device,
                doc_start=doc_start, q_block_start=c0, q_block_end=c1,
            )
            ranges = torch.stack([rng[k] for k in ("win_lo", "win_hi", "sink_lo", "sink_hi", "causal_lo")], dim=-1)
            idx, num, kept_c, free_c = topp_select_rows_triton(mass, ranges, batch=B, heads=H, n_kb=n_kb, top_p=top_p)
            w = n_valid[c0:c1]
            kept += (kept_c.double() * w).sum(-1)
            selectable += (free_c.double() * w).sum(-1)
            nums.append(num)
            idxs.append(idx[..., : max(int(num.max().item()), 1)])
            del mass, idx
            continue
        forced, cand = forced_and_candidate_blocks(
            T, block_size=block_size, q_block_size=q_block_size, window=window, sinks=sinks,
            doc_ids=doc_ids, device=qi.device, q_block_start=c0, q_block_end=c1,
        )
        free = cand & ~forced
        if top_p >= 1.0:
            sel = cand.expand(B, H, -1, -1)
            extra = free.expand(B, H, -1, -1)
        else:
            mass = indexer_block_mass(
                qi, ki, block_size=block_size, q_block_size=q_block_size, mode=mode, doc_ids=doc_ids,
                q_block_start=c0, q_block_end=c1, backend=backend,
            )
            target = top_p - torch.where(forced, mass, 0.0).sum(-1)
            free_mass = torch.where(free, mass, 0.0)
            if threshold == "sort":
                extra = topp_keep_reference(free_mass, target)
            else:
                extra = topp_keep_threshold(free_mass, target, method=threshold)
            extra = extra & free
            sel = forced | extra
            del mass, free_mass
        w = n_valid[c0:c1]
        kept += (extra.sum(-1).double() * w).sum(-1)
        selectable += (free.sum(-1).double() * w).sum(-1).expand(B, H)
        num, idx = _compact_selected(sel)
        nums.append(num)
        idxs.append(idx)
    return _selection_from_chunks(
        nums, idxs, kept, selectable, T=T, block_size=block_size, q_block_size=q_block_size,
        window=window, sinks=sinks, top_p=top_p, doc_ids=doc_ids,
    )


def _select_blocks_hist(
    qi: Tensor, ki: Tensor, *, top_p: float, block_size: int, q_block_size: int, window: int, sinks: int,
    mode: str, doc_ids: Tensor | None, backend: str, max_chunk_bytes: int, config,
) -> BlockSelection:
    """select_blocks(threshold="triton_hist"): log-mass (pooled) or block-mass kernel per chunk of
    query blocks, then the streaming selection kernel; lists trimmed to the chunk's widest row."""
    from kernels import triton_block_select as tbs

    B, H, T, r = qi.shape
    n_qb, n_kb = _cdiv(T, q_block_size), _cdiv(T, block_size)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    use_log = (
        top_p < 1.0 and mode == "pooled" and tbs.triton_supports(qi, block_size, q_block_size, mode)
        and (backend == "triton" or (backend == "auto" and qi.is_cuda))
    )
    # two [B, Hr, chunk, nKB] 4-byte buffers (masses, lists) per chunk
    chunk = max(1, min(n_qb, max_chunk_bytes // (4 * B * H * n_kb)))
    doc0 = tbs.doc_start_per_q_block(doc_ids, T, q_block_size, qi.device)
    qbar = tbs.pooled_queries_log2(qi, q_block_size) if use_log else None
    n_valid = _valid_rows_per_q_block(T, q_block_size, qi.device).double()
    kept = torch.zeros(B, H, dtype=torch.float64, device=qi.device)
    selectable = torch.zeros(B, H, dtype=torch.float64, device=qi.device)
    nums, idxs = [], []
    for c0 in range(0, n_qb, chunk):
        c1 = min(c0 + chunk, n_qb)
        x = None
        if top_p < 1.0:
            if use_log:
                x = tbs.indexer_block_logmass_triton(
                    qi, ki, block_size=block_size, q_block_size=q_block_size, doc_ids=doc_ids,
                    q_block_start=c0, q_block_end=c1, qbar_log2=qbar, doc0=doc0,
                )
            else:
                x = indexer_block_mass(
                    qi, ki, block_size=block_size, q_block_size=q_block_size, mode=mode, doc_ids=doc_ids,
                    q_block_start=c0, q_block_end=c1, backend=backend,
                )
        idx, num, kept_c, free_c = tbs.topp_select_rows_hist_triton(
            x, log_input=use_log, batch=B, heads=H, n_rows=c1 - c0, seq_len=T, window=window, sinks=sinks,
            block_size=block_size, q_block_size=q_block_size, q_block_start=c0, top_p=top_p, doc0=doc0,
            config=config, device=qi.device,
        )
        del x
        w = n_valid[c0:c1]
        kept += (kept_c.double() * w).sum(-1)
        selectable += (free_c.double() * w).sum(-1)
        nums.append(num)
        idxs.append(tbs.trim_selection_lists(idx, num))
        del idx
    return _selection_from_chunks(
        nums, idxs, kept, selectable, T=T, block_size=block_size, q_block_size=q_block_size,
        window=window, sinks=sinks, top_p=top_p, doc_ids=doc_ids,
    )


def selection_from_dense(
    selected: Tensor,
    *,
    seq_len: int,
    block_size: int = 64,
    q_block_size: int = 128,
    window: int,
    sinks: int,
    top_p: float = float("nan"),
    doc_ids: Tensor | None = None,
) -> BlockSelection:
    """Build a BlockSelection from a bool [B, Hr, nQB, nKB] block choice: the forced blocks
    are added and non-causal blocks dropped, so the invariants of select_blocks hold."""
    B, H, n_qb, n_kb = selected.shape
    if n_qb != _cdiv(seq_len, q_block_size) or n_kb != _cdiv(seq_len, block_size):
        raise ValueError(
            f"selected must be [B, Hr, nQB={_cdiv(seq_len, q_block_size)}, nKB={_cdiv(seq_len, block_size)}], got {tuple(selected.shape)}"
        )
    if q_block_size % block_size:
        raise ValueError(f"q_block_size ({q_block_size}) must be a multiple of block_size ({block_size})")
    forced, cand = forced_and_candidate_blocks(
        seq_len, block_size=block_size, q_block_size=q_block_size, window=window, sinks=sinks,
        doc_ids=doc_ids, device=selected.device,
    )
    free = cand & ~forced
    extra = selected & free
    sel = forced | extra
    w = _valid_rows_per_q_block(seq_len, q_block_size, selected.device).double()
    kept = (extra.sum(-1).double() * w).sum(-1)
    selectable = (free.sum(-1).double() * w).sum(-1).expand(B, H).clone()
    num, idx = _compact_selected(sel.expand(B, H, -1, -1))
    return _selection_from_chunks(
        [num], [idx], kept, selectable, T=seq_len, block_size=block_size, q_block_size=q_block_size,
        window=window, sinks=sinks, top_p=top_p, doc_ids=doc_ids,
    )


def selection_to_dense(selection: BlockSelection) -> Tensor:
    """bool [B, Hr, nQB, nKB] view of a selection (tests, references, lookup tables)."""
    num, idx = selection.kv_num_blocks, selection.kv_indices.long()
    n_kb = _cdiv(selection.seq_len, selection.block_size)
    valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    out = torch.zeros(*num.shape, n_kb + 1, dtype=torch.bool, device=idx.device)
    out.scatter_(-1, torch.where(valid, idx, n_kb), True)
    return out[..., :n_kb]


def select_blocks_reference(
    qi: Tensor,
    ki: Tensor,
    *,
    top_p: float,
    block_size: int = 64,
    q_block_size: int = 128,
    window: int,
    sinks: int,
    mode: str = "mean",
    doc_ids: Tensor | None = None,
) -> Tensor:
    """Reference selection as a dense bool [B, Hr, nQB, nKB] (T x T masses, sort + cumsum)."""
    B, H, T, r = _check_indexer(qi, ki, block_size, q_block_size, doc_ids)
    _check_selection_args(T, top_p, block_size, q_block_size, window, sinks)
    forced, cand = forced_and_candidate_blocks(
        T, block_size=block_size, q_block_size=q_block_size, window=window, sinks=sinks,
        doc_ids=doc_ids, device=qi.device,
    )
    if top_p >= 1.0:
        return cand.expand(B, H, -1, -1).clone()
    ref = indexer_block_mass_reference if mode == "mean" else indexer_block_mass_pooled_reference
    mass = ref(qi, ki, block_size=block_size, q_block_size=q_block_size, doc_ids=doc_ids)
    free = cand & ~forced
    target = top_p - torch.where(forced, mass, 0.0).sum(-1)
    extra = topp_keep_reference(torch.where(free, mass, 0.0), target) & free
    return forced | extra


def random_selection(
    batch: int,
    heads: int,
    seq_len: int,
    density: float,
    *,
    block_size: int = 64,
    q_block_size: int = 128,
    window: int,
    sinks: int,
    device=None,
    generator: torch.Generator | None = None,
) -> BlockSelection:
    """Synthetic selection (benchmarks): each selectable block kept independently with
    probability `density`, plus the forced sink/window blocks. Built in chunks of query
    blocks, so it works at 1M tokens."""
    n_qb, n_kb = _cdiv(seq_len, q_block_size), _cdiv(seq_len, block_size)
    chunk = max(1, min(n_qb, (1 << 28) // max(1, batch * heads * n_kb)))
    nums, idxs = [], []
    kept = torch.zeros(batch, heads, dtype=torch.float64, device=device)
    selectable = torch.zeros(batch, heads, dtype=torch.float64, device=device)
    w_all = _valid_rows_per_q_block(seq_len, q_block_size, device).double()
    for c0 in range(0, n_qb, chunk):
        c1 = min(c0 + chunk, n_qb)
        forced, cand = forced_and_candidate_blocks(
            seq_len, block_size=block_size, q_block_size=q_block_size, window=window, sinks=sinks,
            doc_ids=None, device=device, q_block_start=c0, q_block_end=c1,
        )
        free = cand & ~forced
        u = torch.rand(batch, heads, c1 - c0, n_kb, device=device, generator=generator)
        extra = (u < density) & free
        w = w_all[c0:c1]
        kept += (extra.sum(-1).double() * w).sum(-1)
        selectable += (free.sum(-1).double() * w).sum(-1)
        num, idx = _compact_selected(forced | extra)
        nums.append(num)
        idxs.append(idx)
    return _selection_from_chunks(
        nums, idxs, kept, selectable, T=seq_len, block_size=block_size, q_block_size=q_block_size,
        window=window, sinks=sinks, top_p=float("nan"), doc_ids=None,
    )
