"""RTPurbo attention under context parallelism (CP): exact, forward and backward, with less traffic than a
dense all-gather.

The trainer (torchtitan_rtpurbo/distributed/context_parallel.py, models/qwen3/parallelize.py) gives every layer
the local tokens of the load-balanced layout (rank r holds global chunks r and 2 cp - 1 - r) with their
global positions, and the CPContext in ctx.extras["cp"]. `make_cp_aware(backend)` swaps an RTPurboAttention's
class for ContextParallelRTPurboAttention in place (same parameters, same state-dict keys); without a "cp"
entry in ctx.extras it runs the normal single-process path.

What moves, per layer (bytes RECEIVED by a rank are counted in cp.comm_bytes under these kinds):
  * local (window + sinks) heads: no all-gather. Each local chunk [gs, ge) needs the K/V of the local heads'
    KV heads at [max(0, gs - window + 1), gs) ("halo") and the first `sinks` tokens of the document of gs
    when they lie before the halo ("sinks"). Every rank derives who-needs-what from the layouts and the global
    doc ids and the rows move point to point (torchtitan_rtpurbo/distributed/halo.py); backward returns their
    gradients to the owners ("halo_grad", "sinks_grad").
  * retrieval heads, dense (infer prefill="dense", stage 2 stage2_retrieval="dense"): all-gather of the K/V
    of only the KV heads that serve retrieval query heads ("retrieval_kv"), then each local chunk attends to
    its causal prefix (context_parallel.attend_chunk).
  * retrieval heads, sparse (infer prefill="sparse", stage 2 stage2_retrieval="topp"): all-gather of the
    16-d indexer keys ("indexer_keys"), the indexer queries of query blocks that straddle a chunk boundary
    ("indexer_queries", < 2 q blocks per chunk), top-p block selection for the local query blocks, an
    all-gather of each rank's per-chunk block bitmaps ("select_index", nKB bytes per chunk), then only the
    selected key blocks' K/V move point to point ("retrieval_blocks"), and a [B, Hr] all-reduce of the
    density denominator ("stats").
  * stage 1: the output is the frozen model's dense attention of all heads (cp_dense_attention, "dense_kv");
    the indexer KL needs the indexer keys (all-gathered, differentiable: the gradient reaches wk on the owner
    ranks, "indexer_keys") and the retrieval heads' true keys (detached, "retrieval_k").

Contract on ctx.collect under CP (the trainer sums over cp ranks): every entry this module appends is the
rank's PARTIAL value normalised by the GLOBAL number of query rows (B * T), so the sum over the cp ranks is
the single-process value: "indexer_kl" (and its gradient), "indexer_recall", and in the "density" dicts
"density", "teacher_density" (stage 1) and "density", "keys_per_query" (sparse; density's denominator is
all-reduced so that the partial numerators add up to the global ratio). Entries carry cp_partial=True.

Cost notes. Local heads attend in query tiles of `cp_query_tile` rows against [sinks + halo + tile] keys with
a [B, 1, tile, <= window + tile + B * sinks] bool mask: O(tile * (window + tile)) memory, never T x T (no
FlexAttention path yet). Sparse retrieval selects exactly like kernels/block_select.py (torch "bisect"
threshold) for the local query blocks only, then attends each tile to the selected keys with a dense
[B, Hr, tile, keys] mask: exact, O(tile * selected keys) memory, but not the block-sparse kernel's speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models.attention import AttentionContext
from models.rtpurbo.attention import MODES, RTPurboAttention, _take, indexer_kl_stats
from torchtitan_rtpurbo.distributed.context_parallel import (
    CPContext,
    all_gather_sequence,
    attend_chunk,
    chunk_bounds,
    cp_dense_attention,
)
from torchtitan_rtpurbo.distributed.halo import ExchangePlan, exchange_rows, plan_exchange

__all__ = ["ContextParallelRTPurboAttention", "make_cp_aware", "comm_model_bytes", "comm_model_table"]

DEFAULT_QUERY_TILE = 4096  # local / sparse heads: query rows per attention call (mask = tile x keys)
SPARSE_MASK_ELEMS = 1 << 28  # sparse retrieval: the [B, Hr, tile, keys] mask of one tile stays under this


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _kv_of(heads: list[int], group: int) -> list[int]:
    return sorted({h // group for h in heads})


def _sub_grouped(fn, q: torch.Tensor, k_sub: torch.Tensor, v_sub: torch.Tensor, heads: list[int],
                 group: int) -> torch.Tensor:
    """RTPurboAttention._grouped for k_sub / v_sub that hold only the KV heads _kv_of(heads) (in that order):
    one GQA call when `heads` are whole KV groups, else one call per KV group. -> [B, len(heads), Tq, D]."""
    kvs = _kv_of(heads, group)
    whole = [h for kv in kvs for h in range(kv * group, (kv + 1) * group)]
    if whole == heads:
        return fn(_take(q, heads), k_sub, v_sub)
    outs = []
    for i, kv in enumerate(kvs):
        hs = [h for h in heads if h // group == kv]
        outs.append(fn(_take(q, hs), k_sub[:, i:i + 1], v_sub[:, i:i + 1]))
    return torch.cat(outs, dim=1)


def _cache(cp: CPContext) -> dict:
    """Per-forward memo shared by all layers (CPContext.cache; a private one if an older CPContext has none)."""
    c = getattr(cp, "cache", None)
    if c is None:
        c = cp.__dict__.setdefault("_rtpurbo_cache", {})
    return c


def _segments(cp: CPContext):
    """(segment id, document start) [B, T] of the global doc ids, or (None, None) without documents."""
    if cp.doc_ids is None:
        return None, None
    c = _cache(cp)
    if "rtpurbo_segments" not in c:
        from kernels.masks import document_segments

        c["rtpurbo_segments"] = document_segments(cp.doc_ids)
    return c["rtpurbo_segments"]


class _Rows:
    """Rows of a [B, H, N, C] tensor addressed by global position (local shard + rows received from peers)."""

    def __init__(self, x: torch.Tensor, positions: torch.Tensor):
        self.x = x
        self.order = torch.argsort(positions)
        self.sorted_pos = positions[self.order]

    def take(self, pos: torch.Tensor) -> torch.Tensor:
        i = torch.searchsorted(self.sorted_pos, pos).clamp(max=max(self.sorted_pos.numel() - 1, 0))
        if self.sorted_pos.numel() == 0 or not bool((self.sorted_pos[i] == pos).all()):
            missing = pos[self.sorted_pos[i] != pos] if self.sorted_pos.numel() else pos
            raise RuntimeError(f"context parallel: positions {missing[:8].tolist()} are neither local nor received")
        return self.x.index_select(2, self.order[i].to(self.x.device))


def _local_rows(x: torch.Tensor, recv: torch.Tensor, plan: ExchangePlan, cp: CPContext) -> _Rows:
    pos = torch.cat([cp.layout.local_positions(), plan.recv_positions])
    return _Rows(torch.cat([x, recv], dim=2), pos)


def _arange(a: int, b: int) -> torch.Tensor:
    return torch.arange(a, max(a, b), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------
# local heads: which keys a query range needs, and the exact window + sinks mask
# ----------------------------------------------------------------------------------------------------------
def _sink_positions(a: int, lo: int, sinks: int, doc_start: torch.Tensor | None) -> torch.Tensor:
    """Sink keys of queries starting at a that lie before lo: the first `sinks` tokens of the document of a
    (per batch row; their union). A document starting later than a starts inside [a, ...): its sinks are
    inside the window range already."""
    if sinks <= 0 or lo <= 0:
        return _arange(0, 0)
    if doc_start is None:
        return _arange(0, min(sinks, lo))
    ds = torch.unique(doc_start[:, a].cpu())
    parts = [_arange(int(d), min(int(d) + sinks, lo)) for d in ds.tolist()]
    return torch.unique(torch.cat(parts))


def local_key_positions(a: int, b: int, window: int, sinks: int, doc_start: torch.Tensor | None) -> torch.Tensor:
    """Sorted global key positions that queries [a, b) of a window + sinks head can see (for some batch row)."""
    lo = max(0, a - window + 1)
    return torch.cat([_sink_positions(a, lo, sinks, doc_start), _arange(lo, b)])


def local_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int, sinks: int, seg: torch.Tensor | None,
               doc_start: torch.Tensor | None) -> torch.Tensor:
    """[B|1, 1, Q, K] bool, kernels/masks.py semantics: key n visible from query m iff n <= m, same document
    (segment), and m - n < window or n is among the first `sinks` tokens of m's document."""
    m, n = qpos[:, None], kpos[None, :]
    causal, near = n <= m, (m - n) < window
    if seg is None:
        return (causal & (near | (n < sinks)))[None, None]
    same = seg[:, qpos][:, :, None] == seg[:, kpos][:, None, :]
    sink = (n[None] - doc_start[:, qpos][:, :, None]) < sinks
    return (same & causal[None] & (near[None] | sink))[:, None]


def halo_needs(cp: CPContext, window: int, sinks: int) -> list[dict[str, torch.Tensor]]:
    """Per rank: {"halo": positions, "sinks": positions} its chunks need (own positions included; the plan
    drops them). Same on every rank: built from the layouts and the global doc ids only."""
    _, doc_start = _segments(cp)
    ds_cpu = None if doc_start is None else doc_start.cpu()
    needs = []
    for lay in cp.layouts:
        halo, snk = [], []
        for gs, _ in lay.chunks:
            lo = max(0, gs - window + 1)
            halo.append(_arange(lo, gs))
            snk.append(_sink_positions(gs, lo, sinks, ds_cpu))
        needs.append({"halo": torch.cat(halo), "sinks": torch.cat(snk)})
    return needs


def _halo_plan(cp: CPContext, window: int, sinks: int) -> ExchangePlan:
    c = _cache(cp)
    key = ("rtpurbo_halo_plan", window, sinks)
    if key not in c:
        c[key] = plan_exchange(cp, halo_needs(cp, window, sinks))
    return c[key]


# ----------------------------------------------------------------------------------------------------------
# sparse retrieval: selection for a range of query blocks (kernels/block_select.select_blocks, restricted)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class _ChunkSelection:
    qb0: int  # first query block of the chunk's rows
    table: torch.Tensor  # [B, Hr, qb1 - qb0, nKB] bool: selected key blocks per query block
    kept: torch.Tensor  # [B, Hr] float64: extra kept blocks weighted by this chunk's rows in each q block
    selectable: torch.Tensor  # [B, Hr] float64: selectable blocks, same weighting
    listed: torch.Tensor  # [B, Hr] float64: sum over the chunk's rows of the listed key tokens


def select_query_blocks(qi_full, ki_full, gs: int, ge: int, *, top_p: float, block_size: int, q_block_size: int,
                        window: int, sinks: int, mode: str, doc_ids) -> _ChunkSelection:
    """select_blocks' decision for the query blocks overlapping [gs, ge) only. qi_full must hold the indexer
    queries of those blocks' rows (other rows may be anything), ki_full the keys [0, T). Same rule as
    select_blocks (forced sink / window blocks, then the smallest set of free blocks reaching top_p, ties to
    the lower block, threshold by bisection); statistics weighted by the rows of [gs, ge) in each block."""
    from kernels.block_select import forced_and_candidate_blocks, indexer_block_mass, topp_keep_threshold

    B, Hr, T, _ = ki_full.shape
    qb0, qb1 = gs // q_block_size, -(-ge // q_block_size)
    forced, cand = forced_and_candidate_blocks(
        T, block_size=block_size, q_block_size=q_block_size, window=window, sinks=sinks, doc_ids=doc_ids,
        device=ki_full.device, q_block_start=qb0, q_block_end=qb1)
    free = cand & ~forced
    if top_p >= 1.0:
        sel, extra = cand.expand(B, Hr, -1, -1), free.expand(B, Hr, -1, -1)
    else:
        mass = indexer_block_mass(qi_full, ki_full, block_size=block_size, q_block_size=q_block_size, mode=mode,
                                  doc_ids=doc_ids, q_block_start=qb0, q_block_end=qb1)
        target = top_p - torch.where(forced, mass, 0.0).sum(-1)
        extra = topp_keep_threshold(torch.where(free, mass, 0.0), target, method="bisect") & free
        sel = forced | extra
    qs = torch.arange(qb0, qb1, device=ki_full.device) * q_block_size
    rows = ((qs + q_block_size).clamp(max=ge) - qs.clamp(min=gs)).double()  # this chunk's rows per q block
    kept = (extra.sum(-1).double() * rows).sum(-1)
    selectable = (free.sum(-1).double() * rows).sum(-1).expand(B, Hr)
    listed = (sel.sum(-1).double() * rows).sum(-1) * block_size
    return _ChunkSelection(qb0=qb0, table=sel.expand(B, Hr, -1, -1), kept=kept, selectable=selectable,
                           listed=listed)


def sparse_mask(qpos: torch.Tensor, kpos: torch.Tensor, s: _ChunkSelection, q_block_size: int, block_size: int,
                seg: torch.Tensor | None) -> torch.Tensor:
    """[B, Hr, Q, K] bool: kernels/sparse_prefill.py semantics (causal, same segment, key block selected for
    the query's block)."""
    qb = (qpos // q_block_size) - s.qb0
    lo, hi = int(qb[0]), int(qb[-1]) + 1  # the tile's query blocks only: [B, Hr, hi - lo, K] before expanding
    tab = s.table[:, :, lo:hi][:, :, :, kpos // block_size]
    m = tab[:, :, qb - lo] & (kpos[None, :] <= qpos[:, None])[None, None]
    if seg is not None:
        m = m & (seg[:, qpos][:, :, None] == seg[:, kpos][:, None, :])[:, None]
    return m


def _qrow_needs(cp: CPContext, q_block_size: int) -> list[dict[str, torch.Tensor]]:
    """Per rank: the indexer-query rows of its chunks' query blocks (a block straddling a chunk boundary
    needs the other side's rows for its mean block mass)."""
    T = cp.layout.T
    needs = []
    for lay in cp.layouts:
        rows = [_arange((gs // q_block_size) * q_block_size, min(-(-ge // q_block_size) * q_block_size, T))
                for gs, ge in lay.chunks]
        needs.append({"indexer_queries": torch.cat(rows)})
    return needs


def _block_positions(blocks: torch.Tensor, block_size: int, end: int) -> torch.Tensor:
    """Token positions < end of the key blocks `blocks` (int64, ascending)."""
    if blocks.numel() == 0:
        return _arange(0, 0)
    pos = (blocks[:, None] * block_size + torch.arange(block_size)[None, :]).flatten()
    return pos[pos < end]


# ----------------------------------------------------------------------------------------------------------
# the backend
# ----------------------------------------------------------------------------------------------------------
class ContextParallelRTPurboAttention(RTPurboAttention):
    """RTPurboAttention whose forward runs the CP algorithms when ctx.extras["cp"] is a CPContext."""

    cp_query_tile: int = DEFAULT_QUERY_TILE

    def forward(self, q, k, v, *, q_pre=None, k_pre=None, ctx: AttentionContext | None = None) -> torch.Tensor:
        cp = ctx.extras.get("cp") if ctx is not None else None
        if cp is None:
            return super().forward(q, k, v, q_pre=q_pre, k_pre=k_pre, ctx=ctx)
        self._check_cp_inputs(q, k, v, ctx, cp)
        collect = ctx.collect
        if self.mode == "stage1":
            if self.indexer is not None and collect is not None:
                self._cp_stage1(q, k, q_pre, k_pre, cp, collect)
            return cp_dense_attention(q, k, v, cp)
        parts = []
        if self.local_list:
            parts.append(self._cp_local(q, k, v, cp))
        if self.retrieval_list:
            sparse = (self.mode == "infer" and self.prefill == "sparse") or (
                self.mode == "stage2" and self.stage2_retrieval == "topp")
            parts.append(self._cp_sparse(q, k, v, q_pre, k_pre, cp, collect) if sparse
                         else self._cp_dense_retrieval(q, k, v, cp))
        return self._assemble(parts)

    def _check_cp_inputs(self, q, k, v, ctx, cp: CPContext) -> None:
        if self.mode not in MODES:
            raise ValueError(f"RTPurboAttention.mode must be one of {MODES}, got {self.mode!r}")
        if ctx.kv_cache is not None or ctx.extras.get("decode_from") is not None:
            raise NotImplementedError("context parallelism covers whole-sequence forwards (training / prefill); "
                                      "the KV cache and decode_from emulation are single-process")
        Tl = cp.layout.local_len
        if q.shape[2] != Tl or k.shape[2] != Tl or v.shape[2] != Tl:
            raise ValueError(f"context parallel: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must "
                             f"hold this rank's {Tl} tokens on dim 2 (global T = {cp.layout.T}, cp = {cp.cp})")
        if cp.doc_ids is not None and (cp.doc_ids.dim() != 2 or cp.doc_ids.shape != (q.shape[0], cp.layout.T)):
            raise ValueError(f"context parallel: CPContext.doc_ids must be the global [B={q.shape[0]}, "
                             f"T={cp.layout.T}], got {tuple(cp.doc_ids.shape)}")
        if cp.doc_ids is None and ctx.doc_ids is not None and bool((ctx.doc_ids != ctx.doc_ids[:, :1]).any()):
            raise ValueError("context parallel: ctx.doc_ids has several documents but CPContext.doc_ids is None; "
                             "the attention needs the GLOBAL doc ids in the CPContext")

    # ---- local heads: halo + sinks, point to point ----
    def _cp_local(self, q, k, v, cp: CPContext) -> torch.Tensor:
        kvs = _kv_of(self.local_list, self.group)
        kv = torch.cat([_take(k, kvs), _take(v, kvs)], dim=-1)  # K and V of the local heads' KV heads: one message
        plan = _halo_plan(cp, self.window, self.sinks)
        rows = _local_rows(kv, exchange_rows(kv, plan, cp, dim=2), plan, cp)
        seg, doc_start = _segments(cp)
        D, tile = k.shape[-1], int(self.cp_query_tile)
        outs = []
        for ls, _, gs, ge in cp.layout.local_slices():
            for a in range(gs, ge, tile):
                b = min(a + tile, ge)
                kpos = local_key_positions(a, b, self.window, self.sinks, doc_start)
                kt, vt = rows.take(kpos).split(D, dim=-1)
                dev = q.device
                mask = local_mask(torch.arange(a, b, device=dev), kpos.to(dev), self.window, self.sinks, seg,
                                  doc_start)
                q_t = q[:, :, ls + a - gs: ls + b - gs]
                outs.append(_sub_grouped(
                    lambda x, y, z: F.scaled_dot_product_attention(x, y, z, attn_mask=mask,
                                                                   enable_gqa=x.shape[1] != y.shape[1]),
                    q_t, kt, vt, self.local_list, self.group))
        return torch.cat(outs, dim=2)

    # ---- retrieval heads, dense: all-gather only their KV heads ----
    def _cp_dense_retrieval(self, q, k, v, cp: CPContext) -> torch.Tensor:
        kvs = _kv_of(self.retrieval_list, self.group)
        kv_full = all_gather_sequence(torch.stack((_take(k, kvs), _take(v, kvs))), cp, dim=3, kind="retrieval_kv")
        k_full, v_full = kv_full[0], kv_full[1]
        outs = []
        for ls, le, gs, ge in cp.layout.local_slices():
            outs.append(_sub_grouped(
                lambda x, y, z: attend_chunk(x, y, z, gs, ge, cp.doc_ids, cache=_cache(cp)),
                q[:, :, ls:le], k_full, v_full, self.retrieval_list, self.group))
        return torch.cat(outs, dim=2)

    # ---- stage 1: KL of the local query rows against the all-gathered keys ----
    def _cp_stage1(self, q, k, q_pre, k_pre, cp: CPContext, collect: dict) -> None:
        if q_pre is None or k_pre is None:
            raise ValueError("stage 1 needs q_pre / k_pre (pre-RoPE q and k) for the indexer")
        # (the rotary indexer rotates each local row by its global position)
        qi, ki = self.indexer(q_pre.detach(), k_pre.detach(), positions=cp.layout.local_positions(q_pre.device))
        ki_full = all_gather_sequence(ki, cp, dim=2, kind="indexer_keys")  # grad -> wk on the owner ranks
        kvs = _kv_of(self.retrieval_list, self.group)
        k_kv = all_gather_sequence(_take(k.detach(), kvs).contiguous(), cp, dim=2, kind="retrieval_k")
        k_r = k_kv[:, [kvs.index(kv) for kv in self.indexer.kv_head_list]]  # per retrieval query head
        q_r = _take(q.detach(), self.retrieval_list)
        n_rows = q.shape[0] * cp.layout.T  # the GLOBAL query rows: partial sums over ranks add up
        totals = None
        for ls, le, gs, ge in cp.layout.local_slices():
            res = indexer_kl_stats(
                q_r[:, :, ls:le], k_r[:, :, :ge], qi[:, :, ls:le], ki_full[:, :, :ge], doc_ids=cp.doc_ids,
                chunk=self.stage1_query_chunk, target=self.stage1_target, top_p=self.top_p,
                stats=self.stage1_stats, q_offset=gs, norm_rows=n_rows, window=self.window, sinks=self.sinks)
            totals = res if totals is None else tuple(t + r for t, r in zip(totals, res))
        kl, rec, dens, tdens = totals
        collect.setdefault("indexer_kl", []).append(kl)
        collect.setdefault("indexer_layers", []).append(self.layer_id)
        if self.stage1_stats:
            collect.setdefault("indexer_recall", []).append(rec)
            collect.setdefault("density", []).append(dict(
                layer=self.layer_id, heads=list(self.retrieval_list), density=dens, teacher_density=tdens,
                source="stage1", cp_partial=True))

    # ---- retrieval heads, sparse: indexer keys + selected blocks only ----
    def _cp_sparse(self, q, k, v, q_pre, k_pre, cp: CPContext, collect) -> torch.Tensor:
        if q_pre is None or k_pre is None:
            raise ValueError("sparse retrieval needs q_pre / k_pre (pre-RoPE q and k) for the indexer")
        T, B = cp.layout.T, q.shape[0]
        if self.indexer.rope_periods is not None:
            # measured: CP vs one process differed by ~2e-7 (fp64) on packed documents; not yet understood
            raise NotImplementedError("rtpurbo.indexer_rope_periods with context parallelism and rtpurbo.prefill="
                                      "'sparse' is not supported (stage 1 and dense prefill are)")
        with torch.no_grad():
            qi, ki = self.indexer(q_pre.detach(), k_pre.detach())
            ki_full = all_gather_sequence(ki, cp, dim=2, kind="indexer_keys")
            qi_full = self._boundary_queries(qi, cp)
            sels = [select_query_blocks(
                qi_full, ki_full, gs, ge, top_p=self.top_p, block_size=self.block_size,
                q_block_size=self.q_block_size, window=self.window, sinks=self.sinks, mode=self.select_mode,
                doc_ids=cp.doc_ids) for _, _, gs, ge in cp.layout.local_slices()]
            plan = self._block_plan(sels, cp)
        kvs = _kv_of(self.retrieval_list, self.group)
        kv = torch.cat([_take(k, kvs), _take(v, kvs)], dim=-1)
        rows = _local_rows(kv, exchange_rows(kv, plan, cp, dim=2), plan, cp)
        out = [self._sparse_chunk(q, rows, s, sl, cp)
               for s, sl in zip(sels, cp.layout.local_slices())]
        if collect is not None:
            collect.setdefault("density", []).append(self._sparse_stats(sels, cp, B, T))
        return torch.cat(out, dim=2)

    def _boundary_queries(self, qi: torch.Tensor, cp: CPContext) -> torch.Tensor:
        """[B, Hr, T, r] holding the indexer queries of every query block this rank selects for (local rows,
        plus the rows of boundary blocks owned by neighbours); other rows are zero and never read."""
        c = _cache(cp)
        key = ("rtpurbo_qrow_plan", self.q_block_size)
        if key not in c:
            c[key] = plan_exchange(cp, _qrow_needs(cp, self.q_block_size))
        plan = c[key]
        recv = exchange_rows(qi.contiguous(), plan, cp, dim=2)
        B, Hr, _, r = qi.shape
        full = qi.new_zeros(B, Hr, cp.layout.T, r)
        full[:, :, cp.layout.local_positions(qi.device)] = qi
        full[:, :, plan.recv_positions.to(qi.device)] = recv
        return full

    def _block_plan(self, sels: list[_ChunkSelection], cp: CPContext) -> ExchangePlan:
        """All-gather each rank's per-chunk selected-block bitmaps (union over batch rows, heads and query
        blocks), then plan the point-to-point exchange of those blocks' K/V rows."""
        bitmap = torch.stack([s.table.any(dim=(0, 1, 2)) for s in sels]).to(torch.uint8)  # [2, nKB]
        bufs = [torch.empty_like(bitmap) for _ in range(cp.cp)]
        dist.all_gather(bufs, bitmap.contiguous(), group=cp.group)
        cp.count("select_index", bitmap.numel() * (cp.cp - 1))
        needs = []
        for lay, bm in zip(cp.layouts, bufs):
            pos = [_block_positions(torch.nonzero(bm[i].cpu()).flatten(), self.block_size, ge)
                   for i, (_, ge) in enumerate(lay.chunks)]
            needs.append({"retrieval_blocks": torch.cat(pos)})
        return plan_exchange(cp, needs)

    def _sparse_chunk(self, q, rows: _Rows, s: _ChunkSelection, sl, cp) -> torch.Tensor:
        """Exact attention of the chunk's retrieval rows over their selected keys, one call per (query tile,
        KV head) so K/V are never copied per query head; the [B, heads, tile, keys] mask bounds the tile."""
        ls, _, gs, ge = sl
        seg, _ = _segments(cp)
        D, dev = q.shape[-1], q.device
        blocks = torch.nonzero(s.table.any(dim=(0, 1, 2)).cpu()).flatten()
        n_keys = max(int(_block_positions(blocks, self.block_size, ge).numel()), 1)
        budget = SPARSE_MASK_ELEMS // max(q.shape[0] * len(self.retrieval_list) * n_keys, 1)
        tile = max(1, min(int(self.cp_query_tile), budget))
        kvs = _kv_of(self.retrieval_list, self.group)
        groups = [[j for j, h in enumerate(self.retrieval_list) if h // self.group == kv] for kv in kvs]
        q_r = _take(q, self.retrieval_list)
        outs = []
        for a in range(gs, ge, tile):
            b = min(a + tile, ge)
            kpos = _block_positions(blocks, self.block_size, b)  # selected keys up to the tile's last query
            kt, vt = rows.take(kpos).split(D, dim=-1)
            mask = sparse_mask(torch.arange(a, b, device=dev), kpos.to(dev), s, self.q_block_size,
                               self.block_size, seg)
            q_t = q_r[:, :, ls + a - gs: ls + b - gs]
            outs.append(torch.cat([
                F.scaled_dot_product_attention(q_t[:, idx], kt[:, i:i + 1], vt[:, i:i + 1], attn_mask=mask[:, idx],
                                               enable_gqa=len(idx) > 1)
                for i, idx in enumerate(groups)], dim=1))
        return torch.cat(outs, dim=2)

    def _sparse_stats(self, sels: list[_ChunkSelection], cp: CPContext, B: int, T: int) -> dict:
        """Partial density / keys_per_query (sum over cp ranks = the single-process values)."""
        kept = sum(s.kept for s in sels).sum(0)  # [Hr]
        selectable = sum(s.selectable for s in sels).sum(0).contiguous()
        dist.all_reduce(selectable, group=cp.group)  # the global denominator ([Hr] float64)
        cp.count("stats", selectable.numel() * selectable.element_size() * (cp.cp - 1))
        share = cp.layout.local_len / T  # where nothing is selectable the density is 1: split it by rows
        density = torch.where(selectable > 0, kept / selectable.clamp(min=1e-30), torch.full_like(kept, share))
        keys_per_query = (sum(s.listed for s in sels) / T).mean(0)
        return dict(layer=self.layer_id, heads=list(self.retrieval_list), density=density.float(),
                    keys_per_query=keys_per_query.float(), teacher_density=None, source="prefill", cp_partial=True)


def make_cp_aware(backend: RTPurboAttention) -> nn.Module:
    """Give an RTPurboAttention the CP forward, in place (its class becomes ContextParallelRTPurboAttention; no
    parameter, buffer or state-dict key changes). Without ctx.extras["cp"] it behaves exactly as before."""
    if not isinstance(backend, RTPurboAttention):
        raise TypeError(f"make_cp_aware expects an RTPurboAttention, got {type(backend).__name__}")
    cls = type(backend)
    if issubclass(cls, ContextParallelRTPurboAttention):
        return backend
    if cls is RTPurboAttention:
        backend.__class__ = ContextParallelRTPurboAttention
    else:  # a wrapper subclass (e.g. FSDP2's dynamic FSDP<cls>): keep it, put the CP forward in front of it
        backend.__class__ = type(f"ContextParallel{cls.__name__}", (ContextParallelRTPurboAttention, cls), {})
    return backend


# ----------------------------------------------------------------------------------------------------------
# communication model: bytes received per rank per layer (docs/context_parallel.md)
# ----------------------------------------------------------------------------------------------------------
def _union(iv: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in sorted(x for x in iv if x[1] > x[0]):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _minus(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for s, e in _union(a):
        cur = s
        for bs, be in _union(b):
            if be <= cur or bs >= e:
                continue
            if bs > cur:
                out.append((cur, bs))
            cur = max(cur, be)
        if cur < e:
            out.append((cur, e))
    return out


def _intersect(a, b) -> list[tuple[int, int]]:
    return _minus(a, _minus(a, b))


def _length(iv) -> int:
    return sum(e - s for s, e in _union(iv))


def _halo_rows(T: int, cp: int, window: int, sinks: int) -> list[dict[str, int]]:
    """Per rank (no packed documents): rows received / sent of the halo and sink exchange (interval
    arithmetic, O(cp^2), so it runs at 1M tokens)."""
    b = chunk_bounds(T, 2 * cp)
    own = [[b[r], b[2 * cp - 1 - r]] for r in range(cp)]
    need = []
    for r in range(cp):
        halo = _union([(max(0, gs - window + 1), gs) for gs, _ in own[r]])
        snk = _minus(_union([(0, min(sinks, max(0, gs - window + 1))) for gs, _ in own[r]]), halo)
        need.append({"halo": _minus(halo, own[r]), "sinks": _minus(snk, own[r])})
    rows = []
    for r in range(cp):
        d = {k: _length(v) for k, v in need[r].items()}
        for kind in ("halo", "sinks"):
            d[kind + "_sent"] = sum(_length(_intersect(need[o][kind], own[r])) for o in range(cp) if o != r)
        rows.append(d)
    return rows


def comm_model_bytes(*, T: int, cp: int, n_kv_heads: int, head_dim: int, window: int, sinks: int,
                     local_kv_heads: float, retrieval_kv_heads: float, retrieval_q_heads: float,
                     batch: int = 1, dtype_bytes: int = 2, indexer_dim: int = 16, indexer_bytes: int | None = None,
                     selected_fraction: float = 0.0, rank: int | None = None) -> dict[str, float]:
    """Bytes RECEIVED by one rank for one attention layer (forward; "*_bwd" = backward), per scheme.

    rank=None: the mean over ranks (rank 0 has no halo for its first chunk). Kinds match cp.comm_bytes:
      dense_allgather   - all-gather of K and V of every KV head (cp_dense_attention, "dense_kv"; padded to the
                          longest shard, as all_gather_sequence does);
      ring              - ring attention: cp - 1 K/V shards arrive (same bytes; backward also passes dK/dV:
                          2x);
      halo, sinks       - RTPurbo local heads (K and V of `local_kv_heads` KV heads);
      retrieval_kv      - RTPurbo dense retrieval heads: all-gather of K/V of `retrieval_kv_heads` KV heads;
      indexer_keys      - sparse retrieval / stage 1: all-gather of the r-dim indexer keys of the
                          `retrieval_q_heads` retrieval query heads;
      retrieval_blocks  - sparse retrieval: selected key blocks' K/V, `selected_fraction` of the remote keys
                          (the union over the rank's query blocks; measured, not predictable);
      rtpurbo_dense / rtpurbo_sparse - totals (halo + sinks + retrieval part); ratio_* = over dense_allgather.
    Backward (NCCL): all-gather -> reduce-scatter of the same size; halo / sinks gradients go back to their
    owners (bytes received = rows this rank sent in forward); the indexer keys get gradients in stage 1 only.
    Fractional head counts are averages over layers."""
    ib = dtype_bytes if indexer_bytes is None else indexer_bytes
    ranks = list(range(cp)) if rank is None else [rank]
    b = chunk_bounds(T, 2 * cp)
    lmax = max(sum(e - s for s, e in (b[r], b[2 * cp - 1 - r])) for r in range(cp))  # all_gather pads to it
    gather_rows = lmax * (cp - 1)
    kv_row = 2 * head_dim * dtype_bytes * batch  # K and V of one KV head, one token
    halo = _halo_rows(T, cp, window, sinks)
    pick = [halo[r] for r in ranks]
    mean = lambda key: sum(h[key] for h in pick) / len(pick)  # noqa: E731
    out = {
        "dense_allgather": gather_rows * n_kv_heads * kv_row,
        "ring": (T - T / cp) * n_kv_heads * kv_row,
        "halo": mean("halo") * local_kv_heads * kv_row,
        "sinks": mean("sinks") * local_kv_heads * kv_row,
        "retrieval_kv": gather_rows * retrieval_kv_heads * kv_row,
        "indexer_keys": gather_rows * retrieval_q_heads * indexer_dim * ib * batch,
        "retrieval_blocks": selected_fraction * (T - T / cp) * retrieval_kv_heads * kv_row,
    }
    out["rtpurbo_dense"] = out["halo"] + out["sinks"] + out["retrieval_kv"]
    out["rtpurbo_sparse"] = out["halo"] + out["sinks"] + out["indexer_keys"] + out["retrieval_blocks"]
    out["ratio_dense"] = out["rtpurbo_dense"] / out["dense_allgather"]
    out["ratio_sparse"] = out["rtpurbo_sparse"] / out["dense_allgather"]
    out["dense_allgather_bwd"] = out["dense_allgather"]
    out["ring_bwd"] = 2 * out["ring"]
    out["halo_bwd"] = mean("halo_sent") * local_kv_heads * kv_row
    out["sinks_bwd"] = mean("sinks_sent") * local_kv_heads * kv_row
    out["rtpurbo_dense_bwd"] = out["halo_bwd"] + out["sinks_bwd"] + out["retrieval_kv"]
    return out


# Qwen3-30B-A3B attention: 48 layers, 32 query heads, 4 KV heads, head_dim 128, bf16; window 8192, 4 sinks.
QWEN3_30B_A3B = dict(n_kv_heads=4, head_dim=128, window=8192, sinks=4, dtype_bytes=2, n_layers=48, n_heads=32)

# Head-role scenarios (per layer, averaged over layers):
#   kv-granular 15%:  whole KV groups; 15% of 4 KV heads = 0.6 retrieval KV heads (4.8 query heads), 3.4 local;
#   1 of 4 KV heads:  every layer one retrieval KV group (8 of 32 query heads = 25%), 3 local KV heads;
#   query-granular 15%: 4.8 scattered retrieval query heads touch E = 4 (1 - C(24, 4.8) / C(32, 4.8)) ~ 2.9
#                     KV heads, and every KV head still serves local heads (4 local KV heads).
SCENARIOS = {
    "kv-granular 15%": dict(local_kv_heads=3.4, retrieval_kv_heads=0.6, retrieval_q_heads=4.8),
    "1 of 4 KV heads": dict(local_kv_heads=3.0, retrieval_kv_heads=1.0, retrieval_q_heads=8.0),
    "query-granular 15%": dict(local_kv_heads=4.0, retrieval_kv_heads=2.9, retrieval_q_heads=4.8),
}


def comm_model_table(T: int = 1 << 20, cps=(8, 64), selected_fractions=(0.1, 0.3)) -> str:
    """Markdown table of comm_model_bytes for Qwen3-30B-A3B (MiB received per rank per layer, forward)."""
    shape = {k: v for k, v in QWEN3_30B_A3B.items() if k not in ("n_layers", "n_heads")}
    mib = 2.0 ** 20
    lines = ["| GPUs | scenario | dense all-gather | ring | RTPurbo local (halo+sinks) | RTPurbo, dense retrieval "
             "| ratio | " + " | ".join(f"RTPurbo, sparse retrieval (sel {f:g}) | ratio" for f in selected_fractions)
             + " |",
             "|---:|---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(selected_fractions)]
    for cp in cps:
        for name, sc in SCENARIOS.items():
            m = comm_model_bytes(T=T, cp=cp, **shape, **sc)
            cells = [f"{m['dense_allgather'] / mib:.1f}", f"{m['ring'] / mib:.1f}",
                     f"{(m['halo'] + m['sinks']) / mib:.2f}", f"{m['rtpurbo_dense'] / mib:.1f}",
                     f"{m['ratio_dense']:.3f}"]
            for f in selected_fractions:
                ms = comm_model_bytes(T=T, cp=cp, **shape, **sc, selected_fraction=f)
                cells += [f"{ms['rtpurbo_sparse'] / mib:.1f}", f"{ms['ratio_sparse']:.3f}"]
            lines.append(f"| {cp} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m models.rtpurbo.context_parallel  (the table in docs/context_parallel.md)
    print(comm_model_table())
    print()
    sc = SCENARIOS["1 of 4 KV heads"]
    shape = {k: v for k, v in QWEN3_30B_A3B.items() if k not in ("n_layers", "n_heads")}
    for cp in (8, 64):
        m = comm_model_bytes(T=1 << 20, cp=cp, **shape, **sc)
        max_halo = max(h["halo"] for h in _halo_rows(1 << 20, cp, 8192, 4))
        print(f"cp={cp} backward (MiB per rank per layer, 1 of 4 KV heads): dense all-gather "
              f"{m['dense_allgather_bwd'] / 2**20:.1f}, ring {m['ring_bwd'] / 2**20:.1f}, RTPurbo dense retrieval "
              f"{m['rtpurbo_dense_bwd'] / 2**20:.1f}; max-rank halo {max_halo} rows")
