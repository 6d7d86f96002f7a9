"""kernels/masks.py: BlockMasks built from block indices vs dense token masks, and the
FlexAttention ops vs dense references (CPU: eager flex, one compiled-flex case)."""

import pytest
import torch
import torch.nn.functional as F

from kernels import masks
from kernels.masks import (
    block_mask_to_dense,
    causal_attention,
    causal_block_mask,
    document_segments,
    local_attention,
    local_attention_reference,
    local_mask_dense,
    transpose_block_lists,
    window_sink_block_mask,
)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _tiles(dense: torch.Tensor, bq: int, bk: int):
    """Brute-force tile classes of a dense [T, T] mask: (any visible, fully visible and in bounds)."""
    T = dense.shape[-1]
    nq, nk = -(-T // bq), -(-T // bk)
    pad = torch.zeros(nq * bq, nk * bk, dtype=torch.bool)
    pad[:T, :T] = dense
    inb = torch.zeros_like(pad)
    inb[:T, :T] = True
    t = pad.view(nq, bq, nk, bk)
    i = inb.view(nq, bq, nk, bk)
    any_vis = t.any(3).any(1)
    full = (t | ~i).all(3).all(1) & i.all(3).all(1)
    return any_vis, full


def _listed(num, idx, n_cols):
    out = torch.zeros(*num.shape, n_cols + 1, dtype=torch.bool)
    valid = torch.arange(idx.shape[-1]) < num[..., None]
    out.scatter_(-1, torch.where(valid, idx.long(), n_cols), True)
    return out[..., :n_cols]


def _check_structure(bm, dense_b: torch.Tensor, block: int):
    """dense_b [B, T, T]: the block lists must be exactly the brute-force tile classes."""
    T = dense_b.shape[-1]
    nk = -(-T // block)
    part = _listed(bm.kv_num_blocks, bm.kv_indices, nk)
    full = _listed(bm.full_kv_num_blocks, bm.full_kv_indices, nk)
    for b in range(dense_b.shape[0]):
        any_vis, full_ref = _tiles(dense_b[b], block, block)
        bb = min(b, part.shape[0] - 1)
        assert torch.equal(full[bb, 0], full_ref), "full blocks misclassified"
        assert torch.equal(part[bb, 0] | full[bb, 0], any_vis), "visible blocks missing or extra"
        assert not (part[bb, 0] & full[bb, 0]).any()


CASES = [
    # T, window, sinks, block
    (300, 40, 4, 16),  # T not a multiple of the block
    (256, 64, 0, 32),  # no sinks
    (200, 1000, 4, 32),  # window >= T (causal)
    (190, 17, 20, 16),  # sinks > block, window not a multiple
    (129, 1, 1, 16),  # window 1: diagonal + sink
]


@pytest.mark.parametrize("T,window,sinks,block", CASES)
def test_window_sink_block_mask_matches_dense(T, window, sinks, block):
    bm = window_sink_block_mask(T, window, sinks, block_size=block)
    ref = local_mask_dense(T, window, sinks)
    assert torch.equal(block_mask_to_dense(bm)[:, 0], ref)
    # mask_mod alone is the whole rule too (what eager flex applies)
    t = torch.arange(T)
    assert torch.equal(bm.mask_mod(0, 0, t[:, None], t[None, :]), ref[0])
    _check_structure(bm, ref, block)
    assert bm.kv_num_blocks.shape[:2] == (1, 1)  # batch/head independent


def _doc_ids():
    return torch.tensor([[0] * 3 + [1] * 70 + [2] * 130 + [3] * 97, [5] * 300, [0] * 150 + [7] * 150])


@pytest.mark.parametrize("window,sinks", [(40, 4), (1000, 0), (25, 6)])
def test_window_sink_block_mask_docs(window, sinks):
    doc = _doc_ids()
    bm = window_sink_block_mask(300, window, sinks, block_size=16, doc_ids=doc)
    ref = local_mask_dense(300, window, sinks, doc_ids=doc)
    assert bm.kv_num_blocks.shape[:2] == (3, 1)
    assert torch.equal(block_mask_to_dense(bm)[:, 0], ref)
    _check_structure(bm, ref, 16)


def test_causal_block_mask_matches_dense():
    for T in (128, 300):
        bm = causal_block_mask(T, block_size=32)
        ref = local_mask_dense(T, T, 0)
        assert torch.equal(block_mask_to_dense(bm)[:, 0], ref)
        _check_structure(bm, ref, 32)
    doc = _doc_ids()
    bm = causal_block_mask(300, block_size=32, doc_ids=doc)
    ref = local_mask_dense(300, 300, 0, doc_ids=doc)
    assert torch.equal(block_mask_to_dense(bm)[:, 0], ref)
    _check_structure(bm, ref, 32)


def test_dense_reference_definition():
    # brute force of the visibility rule for one small case
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2]])
    T, w, s = 10, 2, 1
    d = local_mask_dense(T, w, s, doc_ids=doc)[0]
    seg, start = document_segments(doc)
    for m in range(T):
        for n in range(T):
            exp = n <= m and seg[0, m] == seg[0, n] and (m - n < w or n - start[0, m] < s)
            assert bool(d[m, n]) == exp


def test_block_lists_are_compact_at_1m_tokens():
    # the lists are O(T / block * blocks per row); built on CPU at 1M tokens without padding
    T, w, s, blk = 1 << 20, 8192, 4, 128
    p_num, p_idx, f_num, f_idx = masks._window_sink_block_lists(T, w, s, blk, torch.device("cpu"), None, None)
    n_qb = T // blk
    assert p_idx.shape[:3] == (1, 1, n_qb) and p_idx.shape[-1] <= 3
    assert f_idx.shape[-1] <= w // blk + 1
    # last query block: sink block + 65 window blocks (2 partial ends + diagonal, rest full)
    assert int(p_num[0, 0, -1]) + int(f_num[0, 0, -1]) == 1 + w // blk + 1
    assert int(f_num[0, 0, -1]) == w // blk - 1


def test_block_mask_cache_and_device_key():
    a = window_sink_block_mask(512, 64, 4, block_size=32)
    b = window_sink_block_mask(512, 64, 4, block_size=32, device="cpu")
    c = window_sink_block_mask(512, 64, 5, block_size=32)
    assert a is b and a is not c
    assert causal_block_mask(512, block_size=32) is causal_block_mask(512, block_size=32)


def test_transpose_block_lists_matches_dense_transpose():
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(2, 3, 7, 9, generator=g) < 0.4
    cols = torch.arange(9).expand(2, 3, 7, 9)
    num, idx = masks._compact_rows(cols, dense, None)
    q_num, q_idx = transpose_block_lists(num, idx, 9)
    back = _listed(q_num, q_idx, 7)
    assert torch.equal(back, dense.transpose(-1, -2))
    # row ids ascending within each column
    for i in range(9):
        r = q_idx[0, 0, i, : q_num[0, 0, i]]
        assert torch.equal(r, torch.sort(r).values)


def test_mask_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="window"):
        window_sink_block_mask(100, 0, 4)
    with pytest.raises(ValueError, match="block_size"):
        window_sink_block_mask(100, 10, 4, block_size=48)
    with pytest.raises(ValueError, match="doc_ids"):
        window_sink_block_mask(100, 10, 4, doc_ids=torch.zeros(2, 99, dtype=torch.long))
    q = torch.randn(1, 3, 16, 8)
    k = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        local_attention(q, k, k, window=4, sinks=1)


def _qkv(B, Hq, Hkv, T, D, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g, requires_grad=grad)
    k = torch.randn(B, Hkv, T, D, generator=g, requires_grad=grad)
    v = torch.randn(B, Hkv, T, D, generator=g, requires_grad=grad)
    return q, k, v


@pytest.mark.parametrize("use_doc", [False, True])
def test_local_attention_matches_reference(use_doc):
    q, k, v = _qkv(3, 4, 2, 300, 16, 1)
    doc = _doc_ids() if use_doc else None
    out = local_attention(q, k, v, window=40, sinks=4, doc_ids=doc, block_size=32)
    ref = local_attention_reference(q, k, v, window=40, sinks=4, doc_ids=doc)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_local_attention_gradients_cpu_fallback():
    q, k, v = _qkv(2, 4, 1, 150, 16, 2, grad=True)
    doc = torch.tensor([[0] * 60 + [1] * 90, [3] * 150])
    out = local_attention(q, k, v, window=24, sinks=3, doc_ids=doc, block_size=16)
    ref = local_attention_reference(q, k, v, window=24, sinks=3, doc_ids=doc)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    go = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), go)
    g2 = torch.autograd.grad(ref, (q, k, v), go)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


def test_causal_attention_matches_sdpa():
    q, k, v = _qkv(2, 4, 2, 200, 16, 3)
    out = causal_attention(q, k, v, block_size=32)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    doc = torch.tensor([[0] * 80 + [1] * 120, [2] * 200])
    out = causal_attention(q, k, v, doc_ids=doc, block_size=32)
    ref = local_attention_reference(q, k, v, window=200, sinks=0, doc_ids=doc)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_local_attention_compiled_cpu_uses_block_lists():
    # compiled flex reads kv_indices / full_kv_indices (eager flex only applies mask_mod),
    # so this checks the partial/full classification end to end
    q, k, v = _qkv(2, 4, 2, 300, 16, 4)
    out = local_attention(q, k, v, window=40, sinks=4, block_size=32, compiled=True)
    ref = local_attention_reference(q, k, v, window=40, sinks=4)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_partial_and_full_lists_share_one_width(monkeypatch):
    # torch 2.11's Triton template reads full_kv_indices / full_q_indices with the strides
    # of kv_indices / q_indices: unequal widths gave wrong results on the H100 (2026-11-24)
    monkeypatch.setattr(masks, "CPU_FULL_WIDTH_LISTS", False)
    masks._cached_window_sink_mask.cache_clear()
    try:
        for doc in (None, _doc_ids()):
            bm = window_sink_block_mask(300, 40, 4, block_size=16, doc_ids=doc, compute_q_blocks=True)
            assert bm.kv_indices.shape == bm.full_kv_indices.shape
            assert bm.q_indices.shape == bm.full_q_indices.shape
            assert bm.kv_indices.shape[-1] < 300 // 16  # still compact
            ref = local_mask_dense(300, 40, 4, doc_ids=doc)
            assert torch.equal(block_mask_to_dense(bm)[:, 0], ref)
    finally:
        masks._cached_window_sink_mask.cache_clear()


def test_local_attention_kernel_options_and_head_split(monkeypatch):
    # kernel_options reach flex_attention (LOCAL_KERNEL_OPTIONS when none are given), IS_DIVISIBLE
    # is dropped when T is not a multiple of 128, and heads_per_call splits by whole KV groups
    q, k, v = _qkv(2, 6, 3, 300, 16, 5)
    ref = local_attention_reference(q, k, v, window=40, sinks=4)
    seen = []
    real_call = masks.flex_attention_call

    def spy(q_, k_, v_, bm, **kw):
        seen.append((q_.shape[1], k_.shape[1], kw.get("kernel_options")))
        return real_call(q_, k_, v_, bm, **kw)

    monkeypatch.setattr(masks, "flex_attention_call", spy)
    opts = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "IS_DIVISIBLE": True}
    out = local_attention(q, k, v, window=40, sinks=4, block_size=32, kernel_options=opts)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    assert seen[-1] == (6, 3, {k_: v_ for k_, v_ in opts.items() if k_ != "IS_DIVISIBLE"})
    for per_call, calls in ((2, [(2, 1)] * 3), (4, [(4, 2), (2, 1)]), (6, [(6, 3)]), (1, [(2, 1)] * 3)):
        seen.clear()
        out = local_attention(q, k, v, window=40, sinks=4, block_size=32, heads_per_call=per_call)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        assert [s[:2] for s in seen] == calls
    # the measured defaults apply on CUDA, forward only, when their tiles divide the mask blocks
    monkeypatch.setattr(masks, "LOCAL_KERNEL_OPTIONS", {"BLOCK_M": 32, "IS_DIVISIBLE": True})
    assert masks.default_local_kernel_options(True, False, 128) == {"BLOCK_M": 32, "IS_DIVISIBLE": True}
    assert masks.default_local_kernel_options(True, True, 128) is None  # backward was not swept
    assert masks.default_local_kernel_options(False, False, 128) is None  # CPU: torch's choice
    assert masks.default_local_kernel_options(True, False, 48) is None  # 32-wide tiles do not divide 48
    q2, k2, v2 = _qkv(1, 2, 1, 256, 16, 6)
    seen.clear()
    out = local_attention(q2, k2, v2, window=40, sinks=4, block_size=32)
    torch.testing.assert_close(out, local_attention_reference(q2, k2, v2, window=40, sinks=4), atol=2e-5, rtol=2e-5)
    assert seen[-1][2] is None  # CPU
