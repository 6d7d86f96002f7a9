"""Context parallelism (CP): one sequence split over the ranks of the `cp` mesh dimension.

Layout (load-balanced for causal attention, as in TorchTitan / Megatron): the sequence of T tokens is cut into
2 * cp chunks of near-equal size (the first T % (2 cp) chunks one token longer); rank r holds chunk r (a "head"
chunk) and chunk 2 cp - 1 - r (a "tail" chunk), concatenated in that order. Every rank then has about the same
causal attention work. Token positions (RoPE), labels and document ids are sharded with the same layout
(`shard_sequence`), so the model code runs unchanged on the local tokens with their global positions.

This file holds what every CP attention needs:
  * CPLayout / load_balanced_layout / shard_sequence / unshard_sequence,
  * CPContext: the process group, every rank's layout, the global doc ids, a byte counter,
  * all_gather_sequence: differentiable all-gather of a sequence-sharded tensor (backward: reduce-scatter,
    or all-reduce + slice on gloo, which has no reduce-scatter),
  * cp_dense_attention: exact causal (document-masked) attention of the local queries over the gathered keys
    (the dense teacher under CP; "all-gather CP", what TorchTitan uses for FlexAttention),
  * shard_batch: a trainer micro-batch (full sequences, identical on every cp rank) -> this rank's part, with
    its CPContext under batch["cp"].

Memory: nothing here builds a T x T tensor on the GPU. Causal chunks without documents use SDPA's
lower-right causal bias; packed documents use FlexAttention with a BlockMask built from block indices
(O(T/128 x T/128 / cp) block entries). Only the CPU path (tests, short T) builds a dense [C, T] mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------
# layout
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CPLayout:
    T: int  # global sequence length
    cp: int  # context-parallel degree
    rank: int  # this rank's index in the cp group
    chunks: tuple[tuple[int, int], ...]  # global [start, end) of this rank's chunks, in local order

    @property
    def local_len(self) -> int:
        return sum(e - s for s, e in self.chunks)

    def local_positions(self, device=None) -> torch.Tensor:
        """[local_len] global position of each local token."""
        return torch.cat([torch.arange(s, e, device=device) for s, e in self.chunks])

    def local_slices(self) -> list[tuple[int, int, int, int]]:
        """(local_start, local_end, global_start, global_end) per chunk."""
        out, off = [], 0
        for s, e in self.chunks:
            out.append((off, off + e - s, s, e))
            off += e - s
        return out


def chunk_bounds(T: int, n: int) -> list[tuple[int, int]]:
    """T split into n contiguous chunks whose sizes differ by at most one (longer ones first)."""
    base, extra = divmod(T, n)
    bounds, s = [], 0
    for i in range(n):
        e = s + base + (1 if i < extra else 0)
        bounds.append((s, e))
        s = e
    return bounds


def load_balanced_layout(T: int, cp: int, rank: int) -> CPLayout:
    if cp < 1 or not 0 <= rank < cp:
        raise ValueError(f"context parallel: rank {rank} out of range for degree {cp}")
    if T < 2 * cp:
        raise ValueError(f"context parallel: sequence length {T} is shorter than 2 x cp = {2 * cp} chunks")
    b = chunk_bounds(T, 2 * cp)
    return CPLayout(T=T, cp=cp, rank=rank, chunks=(b[rank], b[2 * cp - 1 - rank]))


def shard_sequence(x: torch.Tensor, layout: CPLayout, dim: int = 1) -> torch.Tensor:
    """The local part of a full-sequence tensor (x.shape[dim] == layout.T)."""
    if x.shape[dim] != layout.T:
        raise ValueError(f"shard_sequence: dim {dim} has {x.shape[dim]} tokens, layout expects {layout.T}")
    return torch.cat([x.narrow(dim, s, e - s) for s, e in layout.chunks], dim=dim)


def unshard_sequence(parts: list[torch.Tensor], layouts: list[CPLayout], dim: int = 1) -> torch.Tensor:
    """Inverse of shard_sequence over all ranks: parts[r] is rank r's local tensor."""
    pieces = []
    for part, lay in zip(parts, layouts):
        for ls, le, gs, _ in lay.local_slices():
            pieces.append((gs, part.narrow(dim, ls, le - ls)))
    pieces.sort(key=lambda p: p[0])
    return torch.cat([p for _, p in pieces], dim=dim)


# ----------------------------------------------------------------------------------------------------------
# context passed to the attention backends (ctx.extras["cp"])
# ----------------------------------------------------------------------------------------------------------
@dataclass
class CPContext:
    group: dist.ProcessGroup
    layout: CPLayout  # this rank's
    layouts: list[CPLayout]  # every rank's, indexed by rank in the cp group
    doc_ids: torch.Tensor | None = None  # [B, T] global document ids (None: one document per row)
    comm_bytes: dict[str, int] = field(default_factory=dict)  # bytes received by this rank, per kind
    # Per-forward memo of derived tensors (document segments, chunk BlockMasks): every layer of one forward
    # (and its backward) reuses them instead of rebuilding them per layer.
    cache: dict = field(default_factory=dict)

    @property
    def cp(self) -> int:
        return self.layout.cp

    @property
    def rank(self) -> int:
        return self.layout.rank

    def count(self, kind: str, nbytes: int) -> None:
        self.comm_bytes[kind] = self.comm_bytes.get(kind, 0) + int(nbytes)

    def local_doc_ids(self) -> torch.Tensor | None:
        return None if self.doc_ids is None else shard_sequence(self.doc_ids, self.layout, dim=1)


def build_cp_context(group: dist.ProcessGroup, T: int, doc_ids: torch.Tensor | None = None) -> CPContext:
    """The CPContext of one forward over sequences of T tokens; doc_ids, if given, are the global [B, T]."""
    if doc_ids is not None and (doc_ids.dim() != 2 or doc_ids.shape[1] != T):
        raise ValueError(f"build_cp_context: doc_ids must be the global [B, T={T}], got {tuple(doc_ids.shape)}")
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    layouts = [load_balanced_layout(T, cp, r) for r in range(cp)]
    return CPContext(group=group, layout=layouts[rank], layouts=layouts, doc_ids=doc_ids)


# ----------------------------------------------------------------------------------------------------------
# differentiable all-gather along the sequence
# ----------------------------------------------------------------------------------------------------------
def _pad_to(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    if x.shape[dim] == n:
        return x.contiguous()
    pad_shape = list(x.shape)
    pad_shape[dim] = n - x.shape[dim]
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim).contiguous()


def _gather_forward(x: torch.Tensor, cp: CPContext, dim: int, kind: str) -> torch.Tensor:
    lmax = max(lay.local_len for lay in cp.layouts)
    xp = _pad_to(x, dim, lmax)
    bufs = [torch.empty_like(xp) for _ in range(cp.cp)]
    dist.all_gather(bufs, xp, group=cp.group)
    cp.count(kind, xp.numel() * xp.element_size() * (cp.cp - 1))
    parts = [b.narrow(dim, 0, lay.local_len) for b, lay in zip(bufs, cp.layouts)]
    return unshard_sequence(parts, cp.layouts, dim=dim)


class _AllGatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cp, dim, kind):
        ctx.cp, ctx.dim, ctx.kind = cp, dim, kind
        return _gather_forward(x, cp, dim, kind)

    @staticmethod
    def backward(ctx, g):
        cp, dim = ctx.cp, ctx.dim
        g = g.contiguous()
        if dist.get_backend(cp.group) == "nccl":
            # reduce-scatter over per-rank local layouts (padded to one length)
            lmax = max(lay.local_len for lay in cp.layouts)
            stacked = torch.cat([_pad_to(shard_sequence(g, lay, dim), dim, lmax) for lay in cp.layouts], dim=dim)
            out = torch.empty_like(_pad_to(shard_sequence(g, cp.layout, dim), dim, lmax))
            _reduce_scatter_along(out, stacked, dim, lmax, cp)
            grad = out.narrow(dim, 0, cp.layout.local_len)
            cp.count(ctx.kind + "_grad", out.numel() * out.element_size() * (cp.cp - 1))
        else:
            # gloo has no reduce-scatter: all-reduce the full gradient, keep the local chunks (2x the bytes).
            # Clone first: all_reduce works in place and autograd's grad_output must not be modified.
            g = g.clone()
            dist.all_reduce(g, group=cp.group)
            grad = shard_sequence(g, cp.layout, dim)
            cp.count(ctx.kind + "_grad", g.numel() * g.element_size() * (cp.cp - 1) * 2 // cp.cp)
        return grad, None, None, None


def _reduce_scatter_along(out, stacked, dim, lmax, cp):
    # reduce_scatter_tensor splits along dim 0: move the sequence dim to the front so rank r's block is
    # [r * lmax, (r + 1) * lmax) of the stacked tensor.
    src = stacked.movedim(dim, 0).contiguous()
    dst = torch.empty((lmax,) + tuple(src.shape[1:]), dtype=src.dtype, device=src.device)
    dist.reduce_scatter_tensor(dst, src, group=cp.group)
    out.copy_(dst.movedim(0, dim))


def all_gather_sequence(x: torch.Tensor, cp: CPContext, dim: int = 2, kind: str = "all_gather") -> torch.Tensor:
    """Local shard (x.shape[dim] == local_len) -> full sequence in global order, differentiable.
    Counts the bytes this rank receives under comm_bytes[kind] (and kind + "_grad" in backward)."""
    if x.shape[dim] != cp.layout.local_len:
        raise ValueError(f"all_gather_sequence: dim {dim} has {x.shape[dim]} tokens, the local shard has "
                         f"{cp.layout.local_len}")
    return _AllGatherSequence.apply(x, cp, dim, kind)


# ----------------------------------------------------------------------------------------------------------
# dense causal attention under CP (all-gather K/V)
# ----------------------------------------------------------------------------------------------------------
def _chunk_mask(gs: int, ge: int, doc_ids: torch.Tensor | None, device) -> torch.Tensor:
    """[B|1, 1, ge - gs, ge] bool: queries [gs, ge) x keys [0, ge), causal and same document. CPU / tests only."""
    rows = torch.arange(gs, ge, device=device)
    cols = torch.arange(ge, device=device)
    m = (cols[None, :] <= rows[:, None])[None, None]
    if doc_ids is not None:
        m = m & (doc_ids[:, None, gs:ge, None] == doc_ids[:, None, None, :ge])
    return m


def _segments(doc_ids: torch.Tensor, cache: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(segment id, document start) per token of the global doc ids (kernels/masks.py document_segments),
    memoised in the CPContext cache so all layers of a forward share one computation."""
    from kernels.masks import document_segments

    if cache is not None and "dense_segments" in cache:
        return cache["dense_segments"]
    out = document_segments(doc_ids)
    if cache is not None:
        cache["dense_segments"] = out
    return out


def doc_chunk_block_mask(gs: int, ge: int, doc_ids: torch.Tensor, *, block_size: int = 128,
                         compute_q_blocks: bool = True, cache: dict | None = None):
    """FlexAttention BlockMask for queries at global [gs, ge) (Q_LEN = ge - gs) against keys [0, ge)
    (KV_LEN = ge): causal and same document. Built from block indices: a query block sees the key blocks
    from its first query's document start to its last query, so no [ge - gs, ge] tensor exists; the block
    lists are [B, 1, Q_LEN / block, KV_LEN / block] at most (kernels/masks.py explains the conventions)."""
    from torch.nn.attention.flex_attention import BlockMask

    from kernels.masks import _compact_rows, _pad_last, transpose_block_lists

    key = ("dense_block_mask", gs, ge, block_size, compute_q_blocks)
    if cache is not None and key in cache:
        return cache[key]
    seg, doc_start = _segments(doc_ids, cache)
    dev = doc_ids.device
    B, C = doc_ids.shape[0], ge - gs
    nqb, nkb = -(-C // block_size), -(-ge // block_size)
    qs = gs + torch.arange(nqb, device=dev) * block_size  # first global query of each query block
    qe = (qs + block_size).clamp(max=ge)  # one past its last query
    ks = torch.arange(nkb, device=dev) * block_size
    ke = (ks + block_size).clamp(max=ge)
    lo = doc_start[:, qs] // block_size  # [B, nqb]: doc_start is non-decreasing, the first query's is the min
    hi = (qe - 1) // block_size  # [nqb]: the block of the last query (causal)
    cand = torch.arange(nkb, device=dev).expand(B, nqb, nkb)
    visible = (cand >= lo[:, :, None]) & (cand <= hi[None, :, None])
    # full: every (query, key) pair of the tile visible, i.e. whole tiles, keys all before the first query,
    # and one segment from the first key to the last query (segments are non-decreasing).
    whole = ((qe - qs) == block_size)[None, :, None] & ((ke - ks) == block_size)[None, None, :]
    before = (ke - 1)[None, None, :] <= qs[None, :, None]
    one_doc = seg[:, ks][:, None, :] == seg[:, qe - 1][:, :, None]
    full = visible & whole & before & one_doc
    p_num, p_idx = _compact_rows(cand, visible & ~full, None)
    f_num, f_idx = _compact_rows(cand, full, None)
    # torch's Triton template reads the full lists with the partial lists' strides: one common width.
    width = max(p_idx.shape[-1], f_idx.shape[-1])
    p_num, p_idx, f_num, f_idx = p_num[:, None], _pad_last(p_idx, width)[:, None], f_num[:, None], \
        _pad_last(f_idx, width)[:, None]
    q_lists = (None, None, None, None)
    if compute_q_blocks:  # the backward kernel walks key blocks -> query blocks
        q_num, q_idx = transpose_block_lists(p_num, p_idx, nkb)
        fq_num, fq_idx = transpose_block_lists(f_num, f_idx, nkb)
        qw = max(q_idx.shape[-1], fq_idx.shape[-1])
        q_lists = (q_num, _pad_last(q_idx, qw), fq_num, _pad_last(fq_idx, qw))

    offset = torch.tensor(gs, device=dev)  # a tensor, not a Python int: one compiled kernel for every chunk

    def cp_doc_mask(b, h, q_idx, kv_idx):
        qg = q_idx + offset
        return (kv_idx <= qg) & (seg[b, qg] == seg[b, kv_idx])

    bm = BlockMask(seq_lengths=(C, ge), kv_num_blocks=p_num, kv_indices=p_idx, full_kv_num_blocks=f_num,
                   full_kv_indices=f_idx, q_num_blocks=q_lists[0], q_indices=q_lists[1],
                   full_q_num_blocks=q_lists[2], full_q_indices=q_lists[3], BLOCK_SIZE=(block_size, block_size),
                   mask_mod=cp_doc_mask)
    if cache is not None:
        cache[key] = bm
    return bm


def attend_chunk(q_c: torch.Tensor, k_full: torch.Tensor, v_full: torch.Tensor, gs: int, ge: int,
                 doc_ids: torch.Tensor | None, scale: float | None = None, *, impl: str = "auto",
                 cache: dict | None = None) -> torch.Tensor:
    """Queries at global positions [gs, ge) against keys [0, ge) of the full sequence, causal (and same
    document). q_c [B, Hq, ge-gs, D]; k_full / v_full [B, Hkv, >=ge, D].

    impl: "auto" (CUDA: SDPA lower-right causal, FlexAttention for packed documents; CPU: SDPA with a dense
    [ge - gs, ge] mask, test-sized T only), or "causal" (ignores doc_ids) / "mask" / "flex" to force one path.
    cache: a per-forward dict (CPContext.cache) where the document segments and BlockMasks are memoised."""
    if impl not in ("auto", "causal", "mask", "flex"):
        raise ValueError(f"attend_chunk: impl must be auto|causal|mask|flex, got {impl!r}")
    k, v = k_full[:, :, :ge], v_full[:, :, :ge]
    gqa = q_c.shape[1] != k.shape[1]
    has_docs = doc_ids is not None and bool((doc_ids[:, :ge] != doc_ids[:, :1]).any())
    if impl == "auto":
        impl = ("flex" if has_docs else "causal") if q_c.is_cuda else "mask"
    if impl == "causal":
        from torch.nn.attention.bias import causal_lower_right

        # lower-right causal: query i of the chunk is global gs + i and sees keys <= gs + i
        return F.scaled_dot_product_attention(q_c, k, v, attn_mask=causal_lower_right(ge - gs, ge),
                                              scale=scale, enable_gqa=gqa)
    if impl == "flex":
        from kernels.masks import _needs_grad, flex_attention_call

        docs = doc_ids if doc_ids is not None else torch.zeros(q_c.shape[0], ge, dtype=torch.int32,
                                                                device=q_c.device)
        bm = doc_chunk_block_mask(gs, ge, docs, compute_q_blocks=_needs_grad(q_c, k, v), cache=cache)
        return flex_attention_call(q_c, k, v, bm, scale=scale)
    mask = _chunk_mask(gs, ge, doc_ids if has_docs else None, q_c.device)
    return F.scaled_dot_product_attention(q_c, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def cp_dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: CPContext,
                       scale: float | None = None, kind: str = "dense_kv", impl: str = "auto") -> torch.Tensor:
    """Exact causal attention for the local queries q [B, Hq, Tl, D] with local k / v [B, Hkv, Tl, D]
    (CP layout): K and V are all-gathered (one differentiable collective for both), each local chunk attends
    to its causal prefix [0, chunk end) of the full sequence."""
    if q.shape[2] != cp.layout.local_len or k.shape[2] != cp.layout.local_len:
        raise ValueError(f"cp_dense_attention: q has {q.shape[2]} and k {k.shape[2]} tokens, the local shard "
                         f"has {cp.layout.local_len}")
    kv_full = all_gather_sequence(torch.stack((k, v)), cp, dim=3, kind=kind)
    k_full, v_full = kv_full[0], kv_full[1]
    outs = [attend_chunk(q[:, :, ls:le], k_full, v_full, gs, ge, cp.doc_ids, scale, impl=impl, cache=cp.cache)
            for ls, le, gs, ge in cp.layout.local_slices()]
    return torch.cat(outs, dim=2)


# ----------------------------------------------------------------------------------------------------------
# trainer micro-batches
# ----------------------------------------------------------------------------------------------------------
SEQUENCE_KEYS = ("input", "labels", "positions", "doc_ids")  # the [B, T] tensors of a data-loader batch


def shard_batch(batch: dict, group: dist.ProcessGroup, use_doc_ids: bool,
                seq_keys: tuple[str, ...] = SEQUENCE_KEYS) -> dict:
    """A micro-batch of full sequences (the same on every rank of the cp group) -> this rank's part.

    The tensors named in seq_keys ([B, T]) are sharded with the load-balanced layout; everything else (e.g.
    stage 2's teacher targets, already computed for this rank's tokens) is passed through. The CPContext
    goes under out["cp"]; it holds the GLOBAL doc ids (use_doc_ids, i.e. training.document_mask) because
    every rank's attention masks keys of the whole sequence."""
    if "cp" in batch:
        raise ValueError("shard_batch: this batch is already context-parallel sharded")
    T = batch["input"].shape[1]
    for key in seq_keys:
        if key in batch and (batch[key].dim() < 2 or batch[key].shape[1] != T):
            raise ValueError(f"shard_batch: batch[{key!r}] has shape {tuple(batch[key].shape)}, expected "
                             f"[B, T={T}] like batch['input']")
    doc_ids = batch.get("doc_ids") if use_doc_ids else None
    cp = build_cp_context(group, T, doc_ids)
    out = {k: shard_sequence(v, cp.layout, dim=1) if k in seq_keys else v for k, v in batch.items()}
    out["cp"] = cp
    return out
