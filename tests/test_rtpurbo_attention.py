import math

import pytest
import torch

from models.attention import AttentionContext
from kernels.block_select import topp_mask_reference
from models.rtpurbo.attention import RTPurboAttention, indexer_kl_stats

B, HQ, HKV, T, D = 2, 8, 2, 75, 16  # T is not a multiple of any block size


def _qkv(seed=0, T=T):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, T, D, generator=g)
    k = torch.randn(B, HKV, T, D, generator=g)
    v = torch.randn(B, HKV, T, D, generator=g)
    return q, k, v


def _docs(T=T):
    d = torch.zeros(B, T, dtype=torch.long)
    d[0, 30:] = 1
    d[0, 52:] = 2
    d[1, 9:] = 1
    return d


def brute_attention(q, k, v, doc_ids, window=None, sinks=0):
    """Row by row, from the definition: causal, same document, and (within window or a document sink)."""
    Bq, H, Tq, Dq = q.shape
    g = H // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(Bq):
        doc = doc_ids[b].tolist() if doc_ids is not None else [0] * Tq
        first = []
        for n in range(Tq):
            first.append(n if n == 0 or doc[n - 1] != doc[n] else first[n - 1])
        for h in range(H):
            for m in range(Tq):
                keys = [n for n in range(m + 1) if doc[n] == doc[m]
                        and (window is None or m - n < window or n - first[n] < sinks)]
                logits = q[b, h, m] @ k[b, h // g, keys].T / math.sqrt(Dq)
                out[b, h, m] = logits.softmax(-1) @ v[b, h // g, keys]
    return out


@pytest.mark.parametrize("retrieval", [[1, 6], [4, 5, 6, 7], []])
@pytest.mark.parametrize("use_docs", [False, True])
def test_local_and_dense_heads_match_brute_force(retrieval, use_docs):
    q, k, v = _qkv()
    doc_ids = _docs() if use_docs else None
    window, sinks = 11, 3
    att = RTPurboAttention(n_heads=HQ, n_kv_heads=HKV, head_dim=D, retrieval_heads=retrieval, window=window,
                           sinks=sinks, indexer_dim=4)
    out = att(q, k, v, q_pre=q, k_pre=k, ctx=AttentionContext(doc_ids=doc_ids))
    ref_local = brute_attention(q, k, v, doc_ids, window, sinks)
    ref_dense = brute_attention(q, k, v, doc_ids)
    for h in range(HQ):
        ref = ref_dense if h in retrieval else ref_local
        torch.testing.assert_close(out[:, h], ref[:, h], atol=1e-5, rtol=1e-5)
    assert (att.indexer is None) == (not retrieval)


@pytest.mark.parametrize("use_docs", [False, True])
def test_sparse_prefill_top_p_one_equals_dense(use_docs):
    q, k, v = _qkv(1)
    doc_ids = _docs() if use_docs else None
    att = RTPurboAttention(n_heads=HQ, n_kv_heads=HKV, head_dim=D, retrieval_heads=[0, 3, 5], window=8, sinks=2,
                           top_p=1.0, block_size=16, q_block_size=32, prefill="sparse", indexer_dim=4)
    ctx = AttentionContext(doc_ids=doc_ids, collect={})
    out = att(q, k, v, q_pre=q, k_pre=k, ctx=ctx)
    ref = brute_attention(q, k, v, doc_ids)
    torch.testing.assert_close(out[:, [0, 3, 5]], ref[:, [0, 3, 5]], atol=1e-5, rtol=1e-5)
    (entry,) = ctx.collect["density"]
    assert entry["heads"] == [0, 3, 5] and torch.allclose(entry["density"], torch.ones(3))


@pytest.mark.parametrize("retrieval", [[1, 6], [4, 5, 6, 7]])  # scattered heads (k gathered) / a whole KV group
@pytest.mark.parametrize("use_docs", [False, True])
def test_sparse_prefill_attends_exactly_the_selected_blocks(retrieval, use_docs):
    from kernels.block_select import select_blocks_reference

    q, k, v = _qkv(2)
    doc_ids = _docs() if use_docs else None
    bs, qbs, window, sinks = 8, 16, 6, 2
    att = RTPurboAttention(n_heads=HQ, n_kv_heads=HKV, head_dim=D, retrieval_heads=retrieval, window=window,
                           sinks=sinks, top_p=0.6, block_size=bs, q_block_size=qbs, prefill="sparse", indexer_dim=4)
    with torch.no_grad():
        att.indexer.wq.mul_(4.0)  # a peaky indexer, so that blocks really get dropped
    q_pre, k_pre = q * 0.5, k * 0.5  # any pre-RoPE tensors: the indexer only routes
    ctx = AttentionContext(doc_ids=doc_ids, collect={})
    out = att(q, k, v, q_pre=q_pre, k_pre=k_pre, ctx=ctx)
    qi, ki = att.indexer(q_pre, k_pre)
    blocks = select_blocks_reference(qi, ki, top_p=0.6, block_size=bs, q_block_size=qbs, window=window,
                                     sinks=sinks, doc_ids=doc_ids)
    t = torch.arange(T)
    docs = doc_ids if doc_ids is not None else torch.zeros(B, T, dtype=torch.long)
    dense_ref = brute_attention(q, k, v, doc_ids)
    kept = 0
    for j, h in enumerate(retrieval):
        for b in range(B):
            doc = docs[b]
            for m in range(T):
                keys = [n for n in range(m + 1) if doc[n] == doc[m] and blocks[b, j, m // qbs, n // bs]]
                kept += len(keys)
                logits = q[b, h, m] @ k[b, h // 4, keys].T / math.sqrt(D)
                ref = logits.softmax(-1) @ v[b, h // 4, keys]
                torch.testing.assert_close(out[b, h, m], ref, atol=1e-5, rtol=1e-5)
    visible = len(retrieval) * int(((t[None, :] <= t[:, None]) & (docs[:, :, None] == docs[:, None, :])).sum())
    assert kept < 0.9 * visible  # something was skipped, so the test checks more than dense attention
    assert not torch.allclose(out[:, retrieval], dense_ref[:, retrieval], atol=1e-3)
    local = [h for h in range(HQ) if h not in retrieval]
    torch.testing.assert_close(out[:, local], brute_attention(q, k, v, doc_ids, window, sinks)[:, local],
                               atol=1e-5, rtol=1e-5)
    (entry,) = ctx.collect["density"]
    assert entry["source"] == "prefill" and ((entry["density"] >= 0) & (entry["density"] < 1)).all()


def naive_kl(q_r, k_r, qi, ki, doc_ids, target, top_p):
    """Full [T, T] matrices and autograd, the obvious way."""
    Tn = q_r.shape[2]
    i = torch.arange(Tn)
    allowed = (i[None, :] <= i[:, None])[None, None]
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    tl = (q_r @ k_r.transpose(-1, -2) / math.sqrt(q_r.shape[-1])).masked_fill(~allowed, float("-inf"))
    p = tl.softmax(-1)
    if target == "topp":
        p = p * topp_mask_reference(p, top_p)
        p = p / p.sum(-1, keepdim=True)
    logs = (qi @ ki.transpose(-1, -2)).masked_fill(~allowed, float("-inf")).log_softmax(-1)
    logp = torch.where(p > 0, p.log(), torch.zeros_like(p))
    kl = torch.where(p > 0, p * (logp - logs.masked_fill(~allowed, 0)), torch.zeros_like(p)).sum(-1)
    return kl.mean(dim=(0, 2))


@pytest.mark.parametrize("target", ["full", "topp"])
@pytest.mark.parametrize("use_docs", [False, True])
def test_stage1_kl_chunked_equals_full_matrix(target, use_docs):
    g = torch.Generator().manual_seed(3)
    Hr, r = 3, 4
    q_r = torch.randn(B, Hr, T, D, generator=g) * 2
    k_r = torch.randn(B, Hr, T, D, generator=g)
    qi0 = torch.randn(B, Hr, T, r, generator=g)
    ki0 = torch.randn(B, Hr, T, r, generator=g)
    doc_ids = _docs() if use_docs else None
    w = torch.tensor([1.0, 0.5, 2.0])  # a non-uniform upstream gradient per head
    results = []
    for chunk in (T, 16, 7):
        qi, ki = qi0.clone().requires_grad_(), ki0.clone().requires_grad_()
        kl, rec, dens, tdens = indexer_kl_stats(q_r, k_r, qi, ki, doc_ids=doc_ids, chunk=chunk, target=target)
        (kl * w).sum().backward()
        results.append((kl.detach(), rec, dens, tdens, qi.grad, ki.grad))
    qi, ki = qi0.clone().requires_grad_(), ki0.clone().requires_grad_()
    ref = naive_kl(q_r, k_r, qi, ki, doc_ids, target, 0.9)
    (ref * w).sum().backward()
    for res in results:
        torch.testing.assert_close(res[0], ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res[4], qi.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(res[5], ki.grad, atol=1e-6, rtol=1e-4)
        for a, b in zip(res[1:4], results[0][1:4]):
            torch.testing.assert_close(a, b)
    rec, dens, tdens = results[0][1:4]
    assert ((rec > 0) & (rec <= 1 + 1e-6)).all() and ((dens > 0) & (dens <= 1)).all()
    # a perfect indexer (its logits = the true logits) has zero KL (full target) and recall 1
    if target == "full":
        kl, rec, dens2, tdens2 = indexer_kl_stats(q_r, k_r, q_r / D**0.5, k_r, doc_ids=doc_ids, chunk=16)
        assert kl.abs().max() < 1e-5 and torch.allclose(rec, torch.ones(Hr)) and torch.allclose(dens2, tdens2)


def test_decode_rows_emulation():
    """ctx.extras["decode_from"]: rows from there on use decode-time top-p (models/rtpurbo/decode_rows.py)."""
    q, k, v = _qkv(4, T=130)
    att = RTPurboAttention(n_heads=HQ, n_kv_heads=HKV, head_dim=D, retrieval_heads=[1, 6], window=16, sinks=4,
                           top_p=1.0, block_size=16, indexer_dim=4)
    ref = att(q, k, v, q_pre=q, k_pre=k)
    ctx = AttentionContext(collect={}, extras={"decode_from": 120})
    torch.testing.assert_close(att(q, k, v, q_pre=q, k_pre=k, ctx=ctx), ref, atol=1e-5, rtol=1e-5)
    assert ctx.collect["decode_density"] == [1.0]
    att.top_p = 0.5
    ctx = AttentionContext(collect={}, extras={"decode_from": 120})
    out = att(q, k, v, q_pre=q, k_pre=k, ctx=ctx)
    torch.testing.assert_close(out[:, :, :120], ref[:, :, :120])
    assert not torch.allclose(out[:, [1, 6], 120:], ref[:, [1, 6], 120:], atol=1e-3)
    assert 0 < ctx.collect["decode_density"][0] < 1


@pytest.mark.parametrize("use_docs", [False, True])
def test_stage1_far_target_equals_brute_force(use_docs):
    """stage1_target "far": KL between teacher and indexer both restricted to the keys beyond the local window
    and the document's sinks (renormalised there), rows without such keys contributing 0; chunked == a T x T
    brute force, values and gradients, also with a query offset (context-parallel slices)."""
    g = torch.Generator().manual_seed(5)
    Hr, r, window, sinks = 2, 4, 9, 2
    q_r = torch.randn(B, Hr, T, D, generator=g) * 2
    k_r = torch.randn(B, Hr, T, D, generator=g)
    qi0 = torch.randn(B, Hr, T, r, generator=g)
    ki0 = torch.randn(B, Hr, T, r, generator=g)
    doc_ids = _docs() if use_docs else None
    # brute force
    m = torch.arange(T)[:, None]
    n = torch.arange(T)[None, :]
    allowed = (n <= m)[None, None].expand(B, 1, T, T)
    if doc_ids is not None:
        allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
        start = torch.stack([torch.tensor([int((doc_ids[b, :j + 1] == doc_ids[b, j]).nonzero()[0])
                                           for j in range(T)]) for b in range(B)])
        not_sink = (torch.arange(T)[None, :] - start >= sinks)[:, None, None, :]
    else:
        not_sink = (n >= sinks)[None, None]
    far = allowed & (m - n >= window)[None, None] & not_sink
    has = far.any(-1)  # [B, 1, T]
    qi, ki = qi0.clone().requires_grad_(), ki0.clone().requires_grad_()
    tl = (q_r @ k_r.transpose(-1, -2) / math.sqrt(D)).masked_fill(~far, float("-inf"))
    p = tl.softmax(-1).nan_to_num(0.0)
    logs = (qi @ ki.transpose(-1, -2)).masked_fill(~far, float("-inf")).log_softmax(-1)
    kl_rows = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - logs.masked_fill(~far, 0)), torch.zeros_like(p))
    ref = kl_rows.sum(-1).mean(dim=(0, 2))
    w = torch.tensor([1.0, 0.5])
    (ref * w).sum().backward()
    assert has.any() and (~has).any()  # both kinds of rows occur
    for chunk in (T, 7):
        qc, kc = qi0.clone().requires_grad_(), ki0.clone().requires_grad_()
        kl, rec, dens, tdens = indexer_kl_stats(q_r, k_r, qc, kc, doc_ids=doc_ids, chunk=chunk, target="far",
                                                window=window, sinks=sinks)
        (kl * w).sum().backward()
        torch.testing.assert_close(kl.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(qc.grad, qi.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(kc.grad, ki.grad, atol=1e-6, rtol=1e-4)
        assert ((rec > 0) & (rec <= 1 + 1e-6)).all() and ((dens > 0) & (dens < 1)).all()
    # query-offset slices (context parallelism) sum to the whole
    whole = indexer_kl_stats(q_r, k_r, qi0, ki0, doc_ids=doc_ids, chunk=5, target="far", window=window, sinks=sinks)
    parts = [indexer_kl_stats(q_r[:, :, a:b], k_r[:, :, :b], qi0[:, :, a:b], ki0[:, :, :b], doc_ids=doc_ids,
                              chunk=4, target="far", window=window, sinks=sinks, q_offset=a, norm_rows=B * T)
             for a, b in [(0, 11), (11, T)]]
    for i in range(4):
        torch.testing.assert_close(sum(pp[i] for pp in parts), whole[i], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the local window"):
        indexer_kl_stats(q_r, k_r, qi0, ki0, target="far")
