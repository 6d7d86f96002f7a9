"""RTPurboAttention: the per-layer attention backend of an RTPurbo model (see models/attention.py for the
backend interface).

Heads of one layer are split by the roles file:
  * local heads: causal window of `window` tokens (the query itself included) plus the first `sinks` tokens
    of the query's document, document-masked;
  * retrieval heads: dense causal attention (prefill="dense", the paper), or block-sparse top-p attention
    chosen by the indexer (prefill="sparse", ours): per query block of q_block_size tokens, the sink and
    window key blocks plus the smallest set of other causal key blocks (block_size tokens) that brings the
    indexer mass to top_p, attended exactly with the full post-RoPE q, k, v (kernels/block_select.py,
    kernels/sparse_prefill.py).
The outputs are put back in the original head order.

mode:
  "infer"  - as above (retrieval heads follow `prefill`).
  "stage1" - the layer returns the frozen model's dense attention for every head (the backbone is the
             original model while the selector learns), and, when ctx.collect is a dict, appends per layer
             the selector's KL(true attention || indexer softmax) per retrieval head [Hr] (differentiable
             w.r.t. the indexer only), its top-p recall and kept density (see indexer_kl_stats).
  "stage2" - local heads windowed; retrieval heads dense (stage2_retrieval="dense") or selected by the
             frozen indexer (stage2_retrieval="topp"). No gradient reaches the indexer.

ctx.collect keys written (lists, one entry per layer with retrieval heads, in forward order):
  "indexer_kl":      Tensor [Hr] (stage 1; carries grad to the indexer)
  "indexer_recall":  Tensor [Hr] (stage 1; detached)
  "density":         dict(layer=int, heads=list[int], density=Tensor [Hr], source="stage1" | "prefill", ...)
                     stage 1: density = |indexer token top-p set| / |visible keys| (token level), plus
                       teacher_density, the same for the true attention's own top-p set;
                     prefill (sparse): density = kept / selectable key blocks beyond the always-kept sink and
                       window blocks (kernels/block_select.py BlockSelection.density), plus keys_per_query,
                       the mean number of key tokens listed per query (forced blocks included).
  "indexer_layers":  int layer ids, parallel to "indexer_kl"
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import AttentionContext
from models.attention import dense_causal_attention as dense_attention
from models.rtpurbo.indexer import LayerIndexer

MODES = ("infer", "stage1", "stage2")


# ----------------------------------------------------------------------------------------------------------
# attention pieces (kernels/ does the work: FlexAttention masks, block top-p selection, block-sparse prefill)
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _cached_local_mask(T: int, window: int, sinks: int, device: str) -> torch.Tensor:
    """One [1, 1, T, T] mask per shape, shared by every layer and forward (CPU path, short T)."""
    from kernels.masks import local_mask_dense

    return local_mask_dense(T, window, sinks, device=torch.device(device))[:, None]


def local_attention(q, k, v, *, window: int, sinks: int, doc_ids=None) -> torch.Tensor:
    """Window + sinks attention (kernels/masks.py: key n visible from query m iff n <= m, same document, and
    m - n < window or n is one of the first `sinks` tokens of the document). GQA."""
    if q.is_cuda:
        from kernels.masks import local_attention as _flex

        return _flex(q, k, v, window=window, sinks=sinks, doc_ids=doc_ids)
    # CPU (short sequences): SDPA with the dense boolean mask is ~10x faster than eager FlexAttention or the
    # fp32 einsum reference, and equal to it (tests/test_rtpurbo_attention.py).
    if doc_ids is None:
        mask = _cached_local_mask(q.shape[2], window, sinks, str(q.device))
    else:
        from kernels.masks import local_mask_dense

        mask = local_mask_dense(q.shape[2], window, sinks, device=q.device, doc_ids=doc_ids)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def sparse_retrieval_attention(
    q_r, k_r, v_r, qi, ki, *, top_p, block_size, q_block_size, window, sinks, doc_ids=None, mode="mean"
) -> tuple[torch.Tensor, Any]:
    """Block-sparse top-p attention for retrieval heads (kernels/block_select.py + kernels/sparse_prefill.py).

    q_r [B, Hr, T, D]; k_r / v_r [B, Hkv_r, T, D] with retrieval head j reading kv head j // (Hr // Hkv_r);
    qi / ki [B, Hr, T, r]. Per query block: the sink and window key blocks, plus the smallest set of other
    causal key blocks that brings the indexer mass to top_p. Returns (out [B, Hr, T, D], BlockSelection)."""
    from kernels.block_select import select_blocks
    from kernels.sparse_prefill import block_sparse_attention, block_sparse_attention_reference

    sel = select_blocks(qi, ki, top_p=top_p, block_size=block_size, q_block_size=q_block_size, window=window,
                        sinks=sinks, mode=mode, doc_ids=doc_ids)
    attend = block_sparse_attention if q_r.is_cuda else block_sparse_attention_reference
    return attend(q_r, k_r, v_r, sel, window=window, sinks=sinks, block_size=block_size), sel


# ----------------------------------------------------------------------------------------------------------
# stage 1: chunked KL(true attention || indexer softmax), forward and gradient in one pass
# ----------------------------------------------------------------------------------------------------------
# stage-1 KL targets (rtpurbo.stage1_target): the true attention over every visible key, its own top-p set,
# or only the keys beyond the local window and sinks
STAGE1_TARGETS = ("full", "topp", "far")


def _chunk_allowed(c0: int, c1: int, doc_ids, device) -> torch.Tensor:
    rows = torch.arange(c0, c1, device=device)
    cols = torch.arange(c1, device=device)
    m = (cols[None, :] <= rows[:, None])[None, None]
    if doc_ids is not None:
        m = m & (doc_ids[:, None, c0:c1, None] == doc_ids[:, None, None, :c1])
    return m  # [B|1, 1, C, c1]


def _far_keys(c0: int, c1: int, window: int, sinks: int, doc_ids, device) -> torch.Tensor:
    """[B|1, 1, C, c1] True where key n lies outside the local window and sinks of query m (global rows
    c0..c1-1): m - n >= window and n is not one of its document's first `sinks` tokens."""
    rows = torch.arange(c0, c1, device=device)
    cols = torch.arange(c1, device=device)
    far = (rows[:, None] - cols[None, :] >= window)[None, None]
    if doc_ids is None:
        return far & (cols >= sinks)[None, None, None, :]
    d = doc_ids[:, :c1]
    is_start = torch.ones_like(d, dtype=torch.bool)
    is_start[:, 1:] = d[:, 1:] != d[:, :-1]
    start = torch.where(is_start, cols[None, :], torch.zeros_like(cols)[None, :]).cummax(dim=1).values
    return far & ((cols[None, :] - start) >= sinks)[:, None, None, :]


class _ChunkedIndexerKL(torch.autograd.Function):
    """KL per retrieval head, averaged over query tokens. The gradient w.r.t. the indexer logits of a row is
    (softmax(s) - p) / N; it is folded into dqi / dki chunk by chunk during the forward, so neither pass
    ever holds more than a [B, Hr, chunk, T] block and nothing is recomputed in backward."""

    @staticmethod
    def forward(ctx, qi, ki, q_r, k_r, doc_ids, chunk, target, top_p, scale, want_grad, want_stats,
                q_offset=0, norm_rows=None, window=0, sinks=0):
        # sort + cumsum top-p: cheaper than the 31-pass bisection on CPU, on a par on GPU at these row sizes
        from kernels.block_select import topp_mask_reference as topp_mask

        # q_r / qi hold the queries at global positions [q_offset, q_offset + T); k_r / ki (and doc_ids) hold
        # the keys from position 0 (at least up to q_offset + T). q_offset = 0 is the whole-sequence case.
        B, Hr, T, _ = q_r.shape
        dev = q_r.device
        kl = torch.zeros(Hr, dtype=torch.float64, device=dev)
        rec = torch.zeros(Hr, dtype=torch.float64, device=dev)
        dens = torch.zeros(Hr, dtype=torch.float64, device=dev)
        tdens = torch.zeros(Hr, dtype=torch.float64, device=dev)
        n_rows = B * T if norm_rows is None else norm_rows
        qi32, ki32 = qi.detach().float(), ki.detach().float()
        dqi = torch.zeros_like(qi32) if want_grad else None
        dki = torch.zeros_like(ki32) if want_grad else None
        for c0 in range(0, T, chunk):
            c1 = min(c0 + chunk, T)
            g1 = q_offset + c1  # keys [0, g1) are visible to some row of this chunk
            allowed = _chunk_allowed(q_offset + c0, g1, doc_ids, dev)
            if target == "far":
                # only the keys that selection decides (beyond the window and sinks); a row without any
                # gets one dummy key (its first) in both distributions: KL 0, gradient 0
                allowed = allowed & _far_keys(q_offset + c0, g1, window, sinks, doc_ids, dev)
                empty = ~allowed.any(-1, keepdim=True)
                allowed = allowed | (empty & (torch.arange(g1, device=dev) == 0))
            tl = (q_r[:, :, c0:c1].float() @ k_r[:, :, :g1].float().transpose(-1, -2)) * scale
            logp_full = tl.masked_fill(~allowed, float("-inf")).log_softmax(-1)
            p_full = logp_full.exp()
            if target == "topp":
                pmask = topp_mask(p_full, top_p) & allowed
                logp = (logp_full - (p_full * pmask).sum(-1, keepdim=True).log()).masked_fill(~pmask, float("-inf"))
                p = logp.exp()
            else:
                pmask = allowed.expand_as(p_full)
                logp, p = logp_full, p_full
            sl = (qi32[:, :, c0:c1] @ ki32[:, :, :g1].transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
            logs = sl.log_softmax(-1)
            term = p * (logp.masked_fill(~pmask, 0.0) - logs.masked_fill(~allowed, 0.0))
            kl += term.sum(dim=(0, 2, 3)).double()
            s = logs.exp()
            if want_grad:
                G = (s - p) / n_rows  # d KL_mean / d logits, [B, Hr, C, c1]
                dqi[:, :, c0:c1] += G @ ki32[:, :, :g1]
                dki[:, :, :g1] += G.transpose(-1, -2) @ qi32[:, :, c0:c1]
            if want_stats:
                tset = pmask if target == "topp" else topp_mask(p_full, top_p) & allowed
                sset = topp_mask(s, top_p) & allowed
                tm = (p_full * tset).sum(-1)
                rec += ((p_full * (tset & sset)).sum(-1) / tm.clamp_min(1e-30)).sum(dim=(0, 2)).double()
                nvis = allowed.sum(-1).clamp_min(1)
                row_ok = (~empty[..., 0]).float() if target == "far" else 1.0  # dummy-key rows: density 0
                dens += (sset.sum(-1) / nvis * row_ok).sum(dim=(0, 2)).double()
                tdens += (tset.sum(-1) / nvis * row_ok).sum(dim=(0, 2)).double()
        ctx.save_for_backward(dqi, dki)
        ctx.in_dtypes = (qi.dtype, ki.dtype)
        out = (kl / n_rows).float(), (rec / n_rows).float(), (dens / n_rows).float(), (tdens / n_rows).float()
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, g_kl, *_):
        dqi, dki = ctx.saved_tensors
        if dqi is None:
            return (None,) * 15
        g = g_kl.float()[None, :, None, None]
        return ((dqi * g).to(ctx.in_dtypes[0]), (dki * g).to(ctx.in_dtypes[1])) + (None,) * 13


def indexer_kl_stats(
    q_r: torch.Tensor,
    k_r: torch.Tensor,
    qi: torch.Tensor,
    ki: torch.Tensor,
    *,
    doc_ids: torch.Tensor | None = None,
    chunk: int = 256,
    target: str = "full",
    top_p: float = 0.9,
    scale: float | None = None,
    stats: bool = True,
    q_offset: int = 0,
    norm_rows: int | None = None,
    window: int = 0,
    sinks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage-1 loss and statistics per retrieval head, computed in query chunks (no T x T tensor).

    Context parallelism (models/rtpurbo/context_parallel.py) scores a slice of the queries: q_r / qi then
    hold the Tq queries at global positions [q_offset, q_offset + Tq) while k_r / ki / doc_ids cover the keys
    from position 0 (k_r, ki: at least q_offset + Tq rows; doc_ids: global [B, >= q_offset + Tq]).
    norm_rows replaces the B * Tq divisor of every returned mean (and of the gradient), so per-slice
    results normalised by the global row count sum to the whole-sequence value.

    q_r, k_r: [B, Hr, T, D] true post-RoPE queries / keys of the retrieval heads (k gathered per query head;
    treated as constants); qi, ki: [B, Hr, T, r] indexer projections.
    Teacher p(m, .) = softmax over visible keys (causal, same document) of q_m . k_n * scale; target "full"
    uses it as is, "topp" restricts it to its own token-level top-p set and renormalises, "far" restricts
    teacher and student to the keys outside the query's local window and sinks (`window`, `sinks`: the keys
    whose selection the indexer decides; both renormalised there; rows with no such key count as KL 0,
    recall 1, density 0). Student
    s(m, .) = softmax of qi_m . ki_n over the visible keys. Returns, each [Hr] and averaged over all B*T query
    tokens:
      kl       - KL(teacher || s) (differentiable w.r.t. qi and ki),
      recall   - mass-weighted recall: teacher mass inside (teacher top-p set AND indexer top-p set) over
                 teacher mass inside the teacher top-p set (token level, p = top_p),
      density  - |indexer top-p set| / |visible keys|,
      teacher_density - |teacher top-p set| / |visible keys|.
    """
    if target not in STAGE1_TARGETS:
        raise ValueError(f"rtpurbo.stage1_target must be one of {STAGE1_TARGETS}, got {target!r}")
    if target == "far" and window < 1:
        raise ValueError(f"stage1_target 'far' needs the local window (>= 1), got window={window}")
    if scale is None:
        scale = q_r.shape[-1] ** -0.5
    if min(k_r.shape[2], ki.shape[2]) < q_offset + q_r.shape[2]:
        raise ValueError(f"indexer_kl_stats: q_r {tuple(q_r.shape)} / qi {tuple(qi.shape)} at offset {q_offset} "
                         f"need k_r / ki with >= {q_offset + q_r.shape[2]} keys, got {tuple(k_r.shape)} / "
                         f"{tuple(ki.shape)}")
    want_grad = torch.is_grad_enabled() and (qi.requires_grad or ki.requires_grad)
    return _ChunkedIndexerKL.apply(qi, ki, q_r.detach(), k_r.detach(), doc_ids, int(chunk), target,
                                   float(top_p), float(scale), want_grad, stats, int(q_offset),
                                   None if norm_rows is None else int(norm_rows), int(window), int(sinks))


# ----------------------------------------------------------------------------------------------------------
# the backend
# ----------------------------------------------------------------------------------------------------------
def _take(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """x[:, idx] as a view when idx is a contiguous range."""
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return x[:, idx[0]: idx[0] + len(idx)]
    return x[:, idx]


class RTPurboAttention(nn.Module):
    def __init__(
        self,
        *,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        retrieval_heads: Sequence[int],
        window: int = 8192,
        sinks: int = 4,
        top_p: float = 0.9,
        block_size: int = 64,
        q_block_size: int = 128,
        prefill: str = "dense",
        indexer_dim: int = 16,
        indexer_rope_periods: Sequence[float] | None = None,
        stage1_target: str = "full",
        stage1_query_chunk: int = 256,
        stage2_retrieval: str = "dense",
        select_mode: str = "mean",
        layer_id: int = -1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        if prefill not in ("dense", "sparse"):
            raise ValueError(f"rtpurbo.prefill must be 'dense' or 'sparse', got {prefill!r}")
        if stage2_retrieval not in ("dense", "topp"):
            raise ValueError(f"rtpurbo.stage2_retrieval must be 'dense' or 'topp', got {stage2_retrieval!r}")
        if stage1_target not in STAGE1_TARGETS:
            raise ValueError(f"rtpurbo.stage1_target must be one of {STAGE1_TARGETS}, got {stage1_target!r}")
        retrieval = sorted({int(h) for h in retrieval_heads})
        if any(h < 0 or h >= n_heads for h in retrieval):
            raise ValueError(f"retrieval heads {retrieval} out of range for {n_heads} heads")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.group = n_heads // n_kv_heads
        self.layer_id = layer_id
        self.window, self.sinks = int(window), int(sinks)
        self.top_p, self.block_size, self.q_block_size = float(top_p), int(block_size), int(q_block_size)
        self.prefill, self.select_mode = prefill, select_mode
        self.stage1_target, self.stage1_query_chunk = stage1_target, int(stage1_query_chunk)
        self.stage2_retrieval = stage2_retrieval
        self.stage1_stats = True  # recall/density in stage 1 cost two sorts per chunk; the trainer may turn off
        self.mode = "infer"
        self.retrieval_list = retrieval
        self.local_list = [h for h in range(n_heads) if h not in set(retrieval)]
        perm = self.local_list + self.retrieval_list
        inv = [0] * n_heads
        for i, h in enumerate(perm):
            inv[h] = i
        self._inv_perm = None if inv == list(range(n_heads)) else inv
        self.indexer = (
            LayerIndexer(retrieval, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                         indexer_dim=indexer_dim, rope_periods=indexer_rope_periods, device=device, dtype=dtype)
            if retrieval else None
        )

    # ---- heads (Python lists inside; tensors on request, so meta-device construction stays safe) ----
    def _device(self) -> torch.device:
        return self.indexer.wq.device if self.indexer is not None else torch.device("cpu")

    @property
    def retrieval_heads(self) -> torch.Tensor:
        return torch.tensor(self.retrieval_list, dtype=torch.long, device=self._device())

    @property
    def local_heads(self) -> torch.Tensor:
        return torch.tensor(self.local_list, dtype=torch.long, device=self._device())

    # ---- head groups ----
    def _grouped(self, fn, q, k, v, heads: list[int]) -> torch.Tensor:
        """fn(q_sub, k_sub, v_sub) with GQA for the query heads `heads` (sorted) -> [B, len(heads), T, D].
        One call when `heads` are whole KV groups, else one call per KV group (no K/V copies)."""
        g = self.group
        kvs = sorted({h // g for h in heads})
        whole = [h for kv in kvs for h in range(kv * g, (kv + 1) * g)]
        if whole == heads:
            return fn(_take(q, heads), _take(k, kvs), _take(v, kvs))
        outs = []
        for kv in kvs:
            hs = [h for h in heads if h // g == kv]
            outs.append(fn(_take(q, hs), k[:, kv:kv + 1], v[:, kv:kv + 1]))
        return torch.cat(outs, dim=1)

    def _assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out if self._inv_perm is None else out[:, self._inv_perm]

    def _gather_kv(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.indexer.kv_head_list]

    # ---- forward ----
    def forward(self, q, k, v, *, q_pre=None, k_pre=None, ctx: AttentionContext | None = None) -> torch.Tensor:
        if ctx is not None and ctx.kv_cache is not None:
            raise NotImplementedError("RTPurboAttention.forward handles whole sequences; the KV-cache path "
                                      "belongs to the inference engine")
        doc_ids = ctx.doc_ids if ctx is not None else None
        collect = ctx.collect if ctx is not None else None
        if self.mode not in MODES:
            raise ValueError(f"RTPurboAttention.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "stage1":
            if self.indexer is not None and collect is not None:
                self._stage1(q, k, q_pre, k_pre, doc_ids, collect)
            return dense_attention(q, k, v, doc_ids)
        parts = []
        if self.local_list:
            parts.append(self._grouped(
                lambda a, b, c: local_attention(a, b, c, window=self.window, sinks=self.sinks, doc_ids=doc_ids),
                q, k, v, self.local_list))
        if self.retrieval_list:
            sparse = (self.mode == "infer" and self.prefill == "sparse") or (
                self.mode == "stage2" and self.stage2_retrieval == "topp")
            if sparse:
                out_r = self._sparse(q, k, v, q_pre, k_pre, doc_ids, collect)
            else:
                out_r = self._grouped(lambda a, b, c: dense_attention(a, b, c, doc_ids), q, k, v, self.retrieval_list)
            decode_from = ctx.extras.get("decode_from") if ctx is not None else None
            if decode_from is not None and self.mode == "infer" and decode_from < q.shape[2]:
                out_r = self._decode_rows(out_r, q, k, v, q_pre, k_pre, int(decode_from), ctx)
            parts.append(out_r)
        return self._assemble(parts)

    def _decode_rows(self, out_r, q, k, v, q_pre, k_pre, decode_from, ctx):
        """Evaluation without a KV cache (ctx.extras["decode_from"]): rows >= decode_from of the retrieval
        heads get decode semantics (per-row dynamic top-p from the indexer; models/rtpurbo/decode_rows.py),
        the earlier rows keep prefill semantics. Appends the mean decode density to collect["decode_density"].
        ctx.extras["indexer_key_dtype"] (e.g. torch.float8_e4m3fn) rounds the indexer keys of those rows'
        selection as an InferenceEngine indexer cache of that dtype stores them."""
        from models.rtpurbo.decode_rows import decode_rows_attention

        if ctx.doc_ids is not None:
            raise ValueError("decode_from emulation does not take packed documents")
        with torch.no_grad():
            qi, ki = self.indexer(q_pre, k_pre)
            rows, dens = decode_rows_attention(
                _take(q, self.retrieval_list), k, v, qi, ki, self.indexer.kv_head_list, decode_from,
                top_p=self.top_p, window=self.window, sinks=self.sinks, block_size=self.block_size,
                top_k_blocks=int(ctx.extras.get("top_k_blocks", 0)),
                indexer_key_dtype=ctx.extras.get("indexer_key_dtype"))
        if ctx.collect is not None:
            ctx.collect.setdefault("decode_density", []).append(float(dens.mean()))
        return torch.cat([out_r[:, :, :decode_from], rows.to(out_r.dtype)], dim=2)

    def _sparse(self, q, k, v, q_pre, k_pre, doc_ids, collect):
        if q_pre is None or k_pre is None:
            raise ValueError("sparse retrieval needs q_pre / k_pre (pre-RoPE q and k) for the indexer")
        with torch.no_grad():
            qi, ki = self.indexer(q_pre.detach(), k_pre.detach())
        heads = self.retrieval_list
        kvs = sorted({h // self.group for h in heads})
        if [h for kv in kvs for h in range(kv * self.group, (kv + 1) * self.group)] == heads:
            k_r, v_r = _take(k, kvs), _take(v, kvs)  # whole KV groups: GQA, no copy
        else:
            k_r, v_r = self._gather_kv(k), self._gather_kv(v)
        out, sel = sparse_retrieval_attention(
            _take(q, heads), k_r, v_r, qi, ki, top_p=self.top_p, block_size=self.block_size,
            q_block_size=self.q_block_size, window=self.window, sinks=self.sinks, doc_ids=doc_ids,
            mode=self.select_mode)
        if collect is not None:
            collect.setdefault("density", []).append(dict(
                layer=self.layer_id, heads=list(heads), density=sel.density.detach().float(),
                keys_per_query=sel.mean_keys_per_query().mean(0).detach().float(), teacher_density=None,
                source="prefill"))
        return out

    def _stage1(self, q, k, q_pre, k_pre, doc_ids, collect):
        if q_pre is None or k_pre is None:
            raise ValueError("stage 1 needs q_pre / k_pre (pre-RoPE q and k) for the indexer")
        qi, ki = self.indexer(q_pre.detach(), k_pre.detach())
        kl, rec, dens, tdens = indexer_kl_stats(
            _take(q.detach(), self.retrieval_list), self._gather_kv(k.detach()), qi, ki,
            doc_ids=doc_ids, chunk=self.stage1_query_chunk, target=self.stage1_target, top_p=self.top_p,
            stats=self.stage1_stats, window=self.window, sinks=self.sinks)
        collect.setdefault("indexer_kl", []).append(kl)
        collect.setdefault("indexer_layers", []).append(self.layer_id)
        if self.stage1_stats:
            collect.setdefault("indexer_recall", []).append(rec)
            collect.setdefault("density", []).append(dict(
                layer=self.layer_id, heads=list(self.retrieval_list), density=dens, teacher_density=tdens,
                source="stage1"))

    def extra_repr(self) -> str:
        return (f"layer={self.layer_id}, mode={self.mode}, retrieval={self.retrieval_list}, window={self.window}, "
                f"sinks={self.sinks}, top_p={self.top_p}, block_size={self.block_size}, prefill={self.prefill}")


def rtpurbo_backend_from_config(cfg, *, layer_id: int, retrieval_heads: Sequence[int], n_heads: int,
                                n_kv_heads: int, head_dim: int, device=None, dtype=None) -> RTPurboAttention:
    """RTPurboAttention for one layer from an RTPurbo config section (torchtitan_rtpurbo.config.RTPurbo)."""
    return RTPurboAttention(
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, retrieval_heads=retrieval_heads,
        window=cfg.window, sinks=cfg.sinks, top_p=cfg.top_p, block_size=cfg.block_size,
        q_block_size=int(getattr(cfg, "q_block_size", 128)), prefill=cfg.prefill, indexer_dim=cfg.indexer_dim,
        indexer_rope_periods=list(getattr(cfg, "indexer_rope_periods", None) or []),
        stage1_target=cfg.stage1_target, stage1_query_chunk=cfg.stage1_query_chunk,
        stage2_retrieval=cfg.stage2_retrieval, select_mode=str(getattr(cfg, "select_mode", "mean")),
        layer_id=layer_id, device=device, dtype=dtype,
    )
