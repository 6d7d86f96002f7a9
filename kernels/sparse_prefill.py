"""Block-sparse prefill attention for retrieval heads (FlexAttention), forward and backward.

Inputs: q_r [B, Hr, T, D] (the retrieval query heads of a layer, post-RoPE) and k_r / v_r
[B, Hkv_r, T, D] with Hr % Hkv_r == 0: retrieval query head h reads kv head
h // (Hr // Hkv_r), the project's GQA rule. A layer whose retrieval heads are whole KV
groups passes those groups' kv heads; a layer whose retrieval heads are scattered over KV
groups passes k/v gathered per retrieval head (Hkv_r = Hr, e.g. k[:, head_to_kv]).

Semantics: query m of query block i attends to every key n <= m of the same document
that lies in a key block selected for (b, h, i). select_blocks always selects the sink and
window blocks, so a retrieval head sees at least what a local head sees.

Two BlockMask layouts, same result. In both, mask_mod is the whole truth (causal, document,
and the 64-token selection read from a [B, Hr, nQB, nKB] bool table, O(T^2 / 8192) bytes:
2 MiB per head at 128K, 128 MiB at 1M): eager flex and Dynamo's eager fallback apply only
mask_mod and ignore the block lists, and a mask_mod that relied on the lists computed dense
causal attention there (seen on the H100 once Dynamo hit its recompile limit, 2026-11-24).
  * fine   (no gradient needed): BLOCK_SIZE = (q_block_size, block_size) with the selection
    as kv_indices; only diagonal / document-boundary tiles are partial (mask_mod evaluated),
    every other selected tile is a full block.
  * coarse (a backward is needed): BLOCK_SIZE = (q_block_size, q_block_size), because the
    only Hopper backward config of FlexAttention uses 128-wide kv tiles and is skipped for
    64-token sparse blocks (no kernel left); a 128-token tile with one selected half is partial.
"""

from __future__ import annotations


import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from kernels.block_select import BlockSelection, selection_to_dense
from kernels.masks import (
    _check_qkv,
    _compact_rows,
    _needs_grad,
    block_lists_to_block_mask,
    document_segments,
    flex_attention_call,
    masked_attention_reference,
)

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "selection_block_mask",
    "selection_token_mask",
]


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, sel: BlockSelection, window: int, sinks: int, block_size: int) -> None:
    B, Hr, _, T, _ = _check_qkv(q, k, v)
    n_qb = _cdiv(T, sel.q_block_size)
    if T != sel.seq_len:
        raise ValueError(f"q has T={T} but the selection was made for seq_len={sel.seq_len}")
    if tuple(sel.kv_num_blocks.shape) != (B, Hr, n_qb):
        raise ValueError(
            f"selection.kv_num_blocks must be [B={B}, Hr={Hr}, nQB={n_qb}], got {tuple(sel.kv_num_blocks.shape)}"
        )
    if (window, sinks, block_size) != (sel.window, sel.sinks, sel.block_size):
        raise ValueError(
            f"window/sinks/block_size ({window}, {sinks}, {block_size}) differ from the selection's "
            f"({sel.window}, {sel.sinks}, {sel.block_size})"
        )
    if sel.kv_num_blocks.device != q.device:
        raise ValueError(f"selection is on {sel.kv_num_blocks.device} but q is on {q.device}")


def _segments(sel: BlockSelection, device) -> Tensor | None:
    return document_segments(sel.doc_ids.to(device))[0] if sel.doc_ids is not None else None


def _lookup_mask_mod(table: Tensor, seg: Tensor | None, q_block_size: int, block_size: int):
    if seg is None:

        def selected_causal(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & table[b, h, q_idx // q_block_size, kv_idx // block_size]

        return selected_causal

    def selected_causal_doc(b, h, q_idx, kv_idx):
        return (
            (kv_idx <= q_idx)
            & (seg[b, q_idx] == seg[b, kv_idx])
            & table[b, h, q_idx // q_block_size, kv_idx // block_size]
        )

    return selected_causal_doc


def _full_tiles(qs: Tensor, q_block: int, ks: Tensor, kv_block: int, T: int, seg: Tensor | None) -> Tensor:
    """Tiles fully visible under causal (+document) masking and fully in bounds.
    qs broadcasts against ks; with seg, both are [B, ...]-leading."""
    qe = torch.clamp(qs + q_block, max=T) - 1
    ke = torch.clamp(ks + kv_block, max=T) - 1
    full = (ks + kv_block <= T) & (qs + q_block <= T) & (ke <= qs)
    if seg is not None:
        Bn = seg.shape[0]
        seg_k = torch.gather(seg, 1, torch.clamp(ks, max=T - 1).reshape(Bn, -1)).view_as(ks)
        seg_q = torch.gather(seg, 1, qe.expand_as(ks).reshape(Bn, -1)).view_as(ks)
        full = full & (seg_k == seg_q)
    return full


def _fine_block_mask_no_docs(sel: BlockSelection, compute_q_blocks: bool) -> BlockMask:
    """Fine layout without documents, straight from the ascending selection lists.

    Query block i covers key blocks d_i = qs_i / Bk ... qe_i / Bk; these are forced (window),
    so they are the last n_diag_i entries of the row, and every entry before them ends
    before qs_i: a full tile, provided the query block itself is complete (qs + Bq <= T).
    So full lists = the selection lists with count num - n_diag, and partial lists = the
    same rows shifted left by that count (one gather, same width as required by 2.11).
    """
    T, Bq, Bk = sel.seq_len, sel.q_block_size, sel.block_size
    dev = sel.kv_num_blocks.device
    n_qb = sel.kv_num_blocks.shape[-1]
    qs = torch.arange(n_qb, device=dev) * Bq
    qe = torch.clamp(qs + Bq, max=T) - 1
    n_diag = (qe // Bk - qs // Bk + 1).to(torch.int32)
    complete = qs + Bq <= T
    num = sel.kv_num_blocks
    full_num = torch.where(complete, num - n_diag, torch.zeros_like(num)).to(torch.int32).contiguous()
    partial_num = (num - full_num).to(torch.int32).contiguous()
    W = sel.kv_indices.shape[-1]
    col = torch.arange(W, device=dev, dtype=torch.int64)
    src = torch.clamp(full_num[..., None].long() + col, max=W - 1)
    partial_idx = torch.gather(sel.kv_indices, -1, src).contiguous()
    return block_lists_to_block_mask(
        partial_num, partial_idx, full_num, sel.kv_indices.contiguous(), seq_len=T, q_block_size=Bq,
        kv_block_size=Bk, mask_mod=_lookup_mask_mod(selection_to_dense(sel), None, Bq, Bk),
        compute_q_blocks=compute_q_blocks,
    )


def selection_block_mask(selection: BlockSelection, *, coarse: bool, compute_q_blocks: bool) -> BlockMask:
    """BlockMask for block_sparse_attention (see the module docstring for the two layouts)."""
    sel = selection
    T, Bq, Bk = sel.seq_len, sel.q_block_size, sel.block_size
    dev = sel.kv_num_blocks.device
    B, H, n_qb = sel.kv_num_blocks.shape
    seg = _segments(sel, dev)
    if seg is not None and seg.shape[0] != B:
        seg = seg.expand(B, -1).contiguous()
    qs = (torch.arange(n_qb, device=dev) * Bq)[None, None, :, None]
    if not coarse and seg is None:
        return _fine_block_mask_no_docs(sel, compute_q_blocks)
    if not coarse:
        idx = sel.kv_indices.long()
        valid = torch.arange(idx.shape[-1], device=dev) < sel.kv_num_blocks[..., None].long()
        qs_b = qs.expand(B, H, n_qb, 1)
        full = valid & _full_tiles(qs_b, Bq, idx * Bk, Bk, T, seg)
        p_num, p_idx = _compact_rows(idx, valid & ~full, None)
        f_num, f_idx = _compact_rows(idx, full, None)
        return block_lists_to_block_mask(
            p_num, p_idx, f_num, f_idx, seq_len=T, q_block_size=Bq, kv_block_size=Bk,
            mask_mod=_lookup_mask_mod(selection_to_dense(sel), seg, Bq, Bk), compute_q_blocks=compute_q_blocks,
        )
    ratio = Bq // Bk
    table = selection_to_dense(sel)  # [B, H, nQB, nKB]
    n_kb = table.shape[-1]
    n_cb = _cdiv(T, Bq)
    padded = torch.nn.functional.pad(table, (0, n_cb * ratio - n_kb))
    grouped = padded.view(B, H, n_qb, n_cb, ratio)
    listed = grouped.any(-1)
    cols = torch.arange(n_cb, device=dev).expand(B, H, n_qb, n_cb)
    full = listed & grouped.all(-1) & _full_tiles(qs.expand(B, H, n_qb, 1), Bq, cols * Bq, Bq, T, seg)
    p_num, p_idx = _compact_rows(cols, listed & ~full, None)
    f_num, f_idx = _compact_rows(cols, full, None)
    return block_lists_to_block_mask(
        p_num, p_idx, f_num, f_idx, seq_len=T, q_block_size=Bq, kv_block_size=Bq,
        mask_mod=_lookup_mask_mod(table, seg, Bq, Bk), compute_q_blocks=compute_q_blocks,
    )


def block_sparse_attention(
    q_r: Tensor,
    k_r: Tensor,
    v_r: Tensor,
    selection: BlockSelection,
    *,
    window: int,
    sinks: int,
    block_size: int = 64,
    scale: float | None = None,
    compiled: bool | None = None,
) -> Tensor:
    """Attention of the retrieval heads over their selected key blocks; differentiable.

    window/sinks/block_size must be the selection's (checked); compiled defaults to CUDA.
    """
    _check_inputs(q_r, k_r, v_r, selection, window, sinks, block_size)
    if compiled is None:
        compiled = q_r.is_cuda
    need_grad = _needs_grad(q_r, k_r, v_r)
    bm = selection_block_mask(selection, coarse=need_grad, compute_q_blocks=need_grad)
    return flex_attention_call(q_r, k_r, v_r, bm, scale=scale, compiled=compiled)


def selection_token_mask(selection: BlockSelection) -> Tensor:
    """Dense bool [B, Hr, T, T] token mask of a selection (references/tests, small T)."""
    T, Bq, Bk = selection.seq_len, selection.q_block_size, selection.block_size
    table = selection_to_dense(selection)
    t = torch.arange(T, device=table.device)
    tok = table[:, :, t // Bq][:, :, :, t // Bk]
    mask = tok & (t[None, :] <= t[:, None])
    seg = _segments(selection, table.device)
    if seg is not None:
        mask = mask & (seg[:, :, None] == seg[:, None, :])[:, None]
    return mask


def block_sparse_attention_reference(
    q_r: Tensor,
    k_r: Tensor,
    v_r: Tensor,
    selection: BlockSelection,
    *,
    window: int,
    sinks: int,
    block_size: int = 64,
    scale: float | None = None,
) -> Tensor:
    """Dense masked attention in fp32 over the selection's token mask (T x T; small T)."""
    _check_inputs(q_r, k_r, v_r, selection, window, sinks, block_size)
    return masked_attention_reference(q_r, k_r, v_r, selection_token_mask(selection), scale=scale)
