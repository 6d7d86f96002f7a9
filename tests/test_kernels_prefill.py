"""kernels/block_select.py, kernels/triton_block_select.py, kernels/sparse_prefill.py:
top-p vs brute force, block mass fast paths vs references, selection, block-sparse
attention vs dense masked attention (forward and gradients)."""

import itertools
import textwrap

import pytest
import torch
import torch.nn.functional as F
from tests.triton_interp import run_script_in_interpreter

from kernels.block_select import (
    forced_and_candidate_blocks,
    indexer_block_mass_pooled_reference,
    indexer_block_mass_reference,
    indexer_block_mass_torch,
    random_selection,
    select_blocks,
    select_blocks_reference,
    selection_from_dense,
    selection_to_dense,
    topp_keep_reference,
    topp_keep_threshold,
    topp_mask,
    topp_mask_reference,
)
from kernels.masks import block_mask_to_dense
from kernels.sparse_prefill import (
    block_sparse_attention,
    block_sparse_attention_reference,
    selection_block_mask,
    selection_token_mask,
)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


# ------------------------------------------------------------------------------ top-p


def _brute_force_topp(x: torch.Tensor, p: float) -> torch.Tensor:
    """Smallest subsets with mass >= p by enumeration; among them the one the ordering rule
    picks: largest values first, ties by lower index (lexicographic on (-value, index))."""
    n = x.numel()
    vals = x.double().tolist()
    for size in range(1, n + 1):
        best = None
        for subset in itertools.combinations(range(n), size):
            if sum(vals[i] for i in subset) >= p - 1e-12:
                key = sorted((-vals[i], i) for i in subset)
                if best is None or key < best[0]:
                    best = (key, subset)
        if best is not None:
            keep = torch.zeros(n, dtype=torch.bool)
            keep[list(best[1])] = True
            return keep
    return x > 0


def test_topp_reference_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        # quantised to 1/64 (exact in fp32, many ties); p off the lattice avoids rounding cuts
        counts = torch.randint(0, 6, (7,), generator=g).float()
        if counts.sum() == 0:
            counts[0] = 1
        x = counts / counts.sum()
        x = torch.round(x * 64) / 64
        x = x / x.sum()
        p = float(torch.rand((), generator=g)) * 0.98 + 0.01
        got = topp_mask_reference(x, p)
        exp = _brute_force_topp(x, p)
        assert torch.equal(got, exp), (x, p, got, exp)


def test_topp_edge_cases():
    x = torch.tensor([0.1, 0.4, 0.0, 0.4, 0.1])
    # p -> 0 keeps the argmax only (first of the tied maxima)
    assert topp_mask_reference(x, 1e-9).tolist() == [False, True, False, False, False]
    # p = 1 keeps exactly the nonzero elements
    assert topp_mask_reference(x, 1.0).tolist() == [True, True, False, True, True]
    # all mass on one token
    one = torch.tensor([0.0, 0.0, 1.0, 0.0])
    for p in (1e-6, 0.5, 0.999, 1.0):
        assert topp_mask_reference(one, p).tolist() == [False, False, True, False]
    # the element that crosses p is kept; ties resolved by index
    assert topp_mask_reference(x, 0.5).tolist() == [False, True, False, True, False]
    assert topp_mask_reference(x, 0.85).tolist() == [True, True, False, True, False]
    with pytest.raises(ValueError, match="p must be in"):
        topp_mask_reference(x, 0.0)


@pytest.mark.parametrize("method", ["bisect", "radix"])
def test_topp_threshold_matches_sort_reference(method):
    g = torch.Generator().manual_seed(1)
    cont = torch.softmax(torch.randn(64, 97, generator=g) * 3, -1)
    ties = torch.randint(0, 4, (64, 97), generator=g).float()
    ties = ties / ties.sum(-1, keepdim=True)
    onehot = F.one_hot(torch.randint(0, 97, (64,), generator=g), 97).float()
    for x in (cont, ties, onehot):
        for p in (1e-7, 0.3, 0.9, 0.999, 1.0):
            assert torch.equal(topp_mask(x, p, method=method), topp_mask_reference(x, p))
        # dim other than -1
        assert torch.equal(topp_mask(x.t(), 0.7, dim=0, method=method), topp_mask_reference(x.t(), 0.7, dim=0))
    # per-row absolute targets, including <= 0 (keep nothing) and > total (keep all nonzero)
    target = torch.rand(64, generator=g) * 1.4 - 0.2
    mass = cont * torch.rand(64, 1, generator=g)
    assert torch.equal(topp_keep_threshold(mass, target, method=method), topp_keep_reference(mass, target))


# ------------------------------------------------------------------------- block mass


def _indexer(B, H, T, r=16, seed=0, scale=0.6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, r, generator=g) * scale, torch.randn(B, H, T, r, generator=g)


DOCS = torch.tensor([[0] * 70 + [1] * 5 + [2] * 125 + [3] * 100, [9] * 300])


@pytest.mark.parametrize("mode", ["mean", "pooled"])
@pytest.mark.parametrize("use_doc", [False, True])
def test_block_mass_torch_matches_reference(mode, use_doc):
    qi, ki = _indexer(2, 3, 300)
    doc = DOCS if use_doc else None
    ref_fn = indexer_block_mass_reference if mode == "mean" else indexer_block_mass_pooled_reference
    ref = ref_fn(qi, ki, block_size=32, q_block_size=64, doc_ids=doc)
    assert ref.shape == (2, 3, 5, 10)
    torch.testing.assert_close(ref.sum(-1), torch.ones(2, 3, 5), atol=1e-5, rtol=0)
    fast = indexer_block_mass_torch(qi, ki, block_size=32, q_block_size=64, mode=mode, doc_ids=doc, max_chunk_elems=5000)
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)
    part = indexer_block_mass_torch(qi, ki, block_size=32, q_block_size=64, mode=mode, doc_ids=doc, q_block_start=1, q_block_end=3)
    torch.testing.assert_close(part, ref[:, :, 1:3], atol=1e-6, rtol=1e-5)


def test_mean_mass_definition_brute_force():
    qi, ki = _indexer(1, 1, 40, r=4, seed=3)
    mass = indexer_block_mass_reference(qi, ki, block_size=8, q_block_size=16)
    # query block 1 (queries 16..31), key block 2 (keys 16..23)
    tot = 0.0
    for m in range(16, 32):
        s = torch.stack([qi[0, 0, m] @ ki[0, 0, n] for n in range(m + 1)])
        p = torch.softmax(s, 0)
        tot += float(p[16 : min(24, m + 1)].sum())
    assert abs(float(mass[0, 0, 1, 2]) - tot / 16) < 1e-6


_TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    import kernels.triton_block_select as tbs
    from kernels.block_select import (indexer_block_mass_reference, indexer_block_mass_pooled_reference,
                                      select_blocks, select_blocks_reference, selection_to_dense)
    assert type(tbs._indexer_block_mass_kernel).__name__ == "InterpretedFunction", type(tbs._indexer_block_mass_kernel)
    g = torch.Generator().manual_seed(0)
    B, H, T, r = 2, 3, 200, 16
    qi = torch.randn(B, H, T, r, generator=g) * 0.6
    ki = torch.randn(B, H, T, r, generator=g)
    doc = torch.tensor([[0] * 50 + [1] * 3 + [2] * 147, [4] * 200])
    n = 0
    for d in (None, doc):
        for mode, ref_fn in (("mean", indexer_block_mass_reference), ("pooled", indexer_block_mass_pooled_reference)):
            ref = ref_fn(qi, ki, block_size=16, q_block_size=32, doc_ids=d)
            out = tbs.indexer_block_mass_triton(qi, ki, block_size=16, q_block_size=32, mode=mode, doc_ids=d)
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
            part = tbs.indexer_block_mass_triton(qi, ki, block_size=16, q_block_size=32, mode=mode, doc_ids=d,
                                                 q_block_start=2, q_block_end=5)
            torch.testing.assert_close(part, ref[:, :, 2:5], atol=1e-6, rtol=1e-5)
            n += 2
    # bf16 inputs, rank not a power of two (padded to 16)
    qb, kb = qi[..., :12].bfloat16(), ki[..., :12].bfloat16()
    ref = indexer_block_mass_reference(qb, kb, block_size=16, q_block_size=32)
    out = tbs.indexer_block_mass_triton(qb, kb, block_size=16, q_block_size=32, mode="mean")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    n += 1
    # fused top-p kernel (threshold="triton") vs the sort + cumsum reference, small rows
    qs, ks = qi[:, :2], ki[:, :2]
    for d in (None, doc):
        for p in (0.3, 0.8, 1.0):
            kw = dict(top_p=p, block_size=16, q_block_size=32, window=40, sinks=4, mode="pooled", doc_ids=d)
            sel = select_blocks(qs, ks, threshold="triton", backend="triton", max_chunk_bytes=4 * 2 * 2 * 13 * 3, **kw)
            ref = select_blocks(qs, ks, threshold="sort", backend="torch", **kw)
            assert torch.equal(selection_to_dense(sel), select_blocks_reference(qs, ks, **kw))
            assert torch.equal(sel.kv_indices, ref.kv_indices) and torch.equal(sel.kv_num_blocks, ref.kv_num_blocks)
            torch.testing.assert_close(sel.density, ref.density)
            n += 1
    print("TRITON_OK", n)
    """
)


def test_triton_block_mass_interpreter():
    assert "TRITON_OK 15" in run_script_in_interpreter(_TRITON_SCRIPT)


_HIST_SCRIPT = textwrap.dedent(
    """
    import torch
    import kernels.triton_block_select as tbs
    from kernels.block_select import (_compact_selected, forced_and_candidate_blocks, indexer_block_mass_pooled_reference,
                                      select_blocks, select_blocks_reference, selection_to_dense, topp_keep_reference)
    assert type(tbs._topp_select_hist_kernel).__name__ == "InterpretedFunction", type(tbs._topp_select_hist_kernel)
    HC = tbs.HistConfig
    SMALL = HC(tile=16, cand=4, thresholds=4, search_arity=2)  # several tiles, rounds and a gather per row
    RESTART = HC(tile=16, cand=2, thresholds=2, search_arity=2, bound_scale=10.0)  # bracket misses: restart from 0
    g = torch.Generator().manual_seed(0)
    B, H, T, r = 2, 2, 300, 16  # T not a multiple of the 16-token key block or the 32-token query block
    qi = torch.randn(B, H, T, r, generator=g) * 0.6
    ki = torch.randn(B, H, T, r, generator=g)
    doc = torch.tensor([[0] * 70 + [1] * 3 + [2] * 127 + [3] * 100, [4] * 300])
    n = 0
    # one-pass log-mass (pooled) vs the fp32 reference mass; only the causal range is written
    for d in (None, doc):
        ref = indexer_block_mass_pooled_reference(qi, ki, block_size=16, q_block_size=32, doc_ids=d)
        _, cand = forced_and_candidate_blocks(T, block_size=16, q_block_size=32, window=40, sinks=4, doc_ids=d, device="cpu")
        L = tbs.indexer_block_logmass_triton(qi, ki, block_size=16, q_block_size=32, doc_ids=d, fill=True,
                                             block_m=16, chunk_blocks=4)
        torch.testing.assert_close(tbs.mass_from_log2(L, cand), ref, atol=1e-6, rtol=1e-5)
        assert torch.isfinite(L[cand.expand_as(L)]).all() and torch.isinf(L[~cand.expand_as(L)]).all()
        part = tbs.indexer_block_logmass_triton(qi, ki, block_size=16, q_block_size=32, doc_ids=d, fill=True,
                                                q_block_start=3, q_block_end=7, block_m=16, chunk_blocks=4)
        torch.testing.assert_close(part, L[:, :, 3:7])
        n += 2
    # select_blocks(threshold="triton_hist") vs the sort + cumsum reference (dense T x T masses)
    cases = [("pooled", "triton", None, 0.3, SMALL), ("pooled", "triton", doc, 0.8, SMALL), ("pooled", "triton", None, 0.9, None),
             ("mean", "torch", doc, 0.6, SMALL), ("pooled", "triton", doc, 1.0, SMALL)]
    for mode, backend, d, p, cfg in cases:
        kw = dict(top_p=p, block_size=16, q_block_size=32, window=40, sinks=4, mode=mode, doc_ids=d)
        sel = select_blocks(qi, ki, threshold="triton_hist", backend=backend, hist_config=cfg,
                            max_chunk_bytes=4 * 2 * 2 * 19 * 4, **kw)
        ref = select_blocks(qi, ki, threshold="sort", backend="torch", **kw)
        assert torch.equal(selection_to_dense(sel), select_blocks_reference(qi, ki, **kw)), (mode, backend, p)
        assert torch.equal(sel.kv_indices, ref.kv_indices) and torch.equal(sel.kv_num_blocks, ref.kv_num_blocks)
        torch.testing.assert_close(sel.density, ref.density)
        n += 1
    # the selection kernel alone on given masses: ties, zeros, rows whose window holds top_p
    # (keeps nothing extra), unnormalised rows whose free mass is under target (keeps all > 0)
    T2, n_kb, n_qb = 700, 44, 22
    forced, cand = forced_and_candidate_blocks(T2, block_size=16, q_block_size=32, window=96, sinks=5, doc_ids=None, device="cpu")
    free = cand & ~forced
    def check(mass, p, cfg, c0=3, n_rows=8):
        mass = mass[:, :, c0:c0 + n_rows].contiguous()
        f, fr, ca = forced[:, :, c0:c0 + n_rows], free[:, :, c0:c0 + n_rows], cand[:, :, c0:c0 + n_rows]
        idx, num, kept, nfree = tbs.topp_select_rows_hist_triton(
            mass, log_input=False, batch=2, heads=2, n_rows=n_rows, seq_len=T2, window=96, sinks=5, block_size=16,
            q_block_size=32, q_block_start=c0, top_p=p, config=cfg)
        extra = topp_keep_reference(torch.where(fr, mass, 0.0), p - torch.where(f, mass, 0.0).sum(-1)) & fr
        want_num, want_idx = _compact_selected((f | extra).expand(2, 2, -1, -1))
        assert torch.equal(num, want_num) and torch.equal(tbs.trim_selection_lists(idx, num), want_idx), p
        assert torch.equal(kept, extra.sum(-1).int()) and torch.equal(nfree, fr.sum(-1).int().expand(2, 2, -1))
        return extra
    u = torch.rand(2, 2, n_qb, n_kb, generator=g)
    cont = torch.where(cand, torch.softmax(torch.randn(2, 2, n_qb, n_kb, generator=g) * 2, -1), 0.0)
    cont = cont / cont.sum(-1, keepdim=True)
    # exact ties: three random values (not integers: integer ratios put cumulative sums exactly on target)
    ties = torch.where(cand, (torch.rand(3, generator=g) + 0.5)[torch.randint(0, 3, (2, 2, n_qb, n_kb), generator=g)], 0.0)
    ties = ties / ties.sum(-1, keepdim=True)
    heavy = torch.where(forced, 1.0, torch.where(cand, 1e-3, 0.0)).expand(2, 2, -1, -1)
    for mass, p, cfg in ((ties, 0.5, SMALL), (ties, 0.9, RESTART), (cont, 0.9, RESTART), (cont * (u > 0.3), 0.8, SMALL)):
        check(mass, p, cfg)  # (zero masses are never kept)
        n += 1
    assert not check(heavy / heavy.sum(-1, keepdim=True), 0.6, SMALL).any()  # window mass >= top_p
    assert (check(cont * 0.5, 0.9, SMALL) == (free[:, :, 3:11] & (cont[:, :, 3:11] > 0))).all()
    n += 2
    print("HIST_OK", n)
    """
)


def test_triton_hist_selection_interpreter():
    out = run_script_in_interpreter(_HIST_SCRIPT, timeout=600)
    assert "HIST_OK 15" in out, out[-2000:]


# -------------------------------------------------------------------------- selection


@pytest.mark.parametrize("mode", ["mean", "pooled"])
@pytest.mark.parametrize("threshold", ["sort", "bisect", "radix"])
def test_select_blocks_matches_reference(mode, threshold):
    qi, ki = _indexer(2, 3, 300, seed=5)
    for doc in (None, DOCS):
        sel = select_blocks(qi, ki, top_p=0.75, block_size=16, q_block_size=32, window=40, sinks=4, mode=mode,
                            doc_ids=doc, threshold=threshold, max_chunk_bytes=4 * 2 * 3 * 19 * 3)
        ref = select_blocks_reference(qi, ki, top_p=0.75, block_size=16, q_block_size=32, window=40, sinks=4,
                                      mode=mode, doc_ids=doc)
        dense = selection_to_dense(sel)
        assert torch.equal(dense, ref)
        # indices ascending, padding zero
        idx, num = sel.kv_indices, sel.kv_num_blocks
        valid = torch.arange(idx.shape[-1]) < num[..., None]
        assert (idx[..., 1:] > idx[..., :-1])[valid[..., 1:]].all()
        assert (idx[~valid] == 0).all()


def test_selection_invariants_and_density():
    qi, ki = _indexer(2, 2, 500, seed=6, scale=1.0)
    kw = dict(block_size=16, q_block_size=32, window=64, sinks=4)
    forced, cand = forced_and_candidate_blocks(500, doc_ids=None, device="cpu", **kw)
    sel = select_blocks(qi, ki, top_p=0.6, **kw)
    dense = selection_to_dense(sel)
    assert (dense | ~forced).all(), "sink/window blocks must always be selected"
    assert not (dense & ~cand).any(), "no non-causal block may be selected"
    # density = weighted kept extra blocks / selectable blocks
    nq = torch.tensor([32.0] * 15 + [500 - 15 * 32])
    free = (cand & ~forced).float()
    kept = ((dense & ~forced).float().sum(-1) * nq).sum(-1)
    selectable = (free.sum(-1) * nq).sum(-1)
    torch.testing.assert_close(sel.density, (kept.sum(0) / selectable.expand(2, 2).sum(0)).double())
    assert 0.0 < float(sel.density.min()) < 1.0
    # top_p = 1: every causal block, density 1
    full = select_blocks(qi, ki, top_p=1.0, **kw)
    assert torch.equal(selection_to_dense(full), cand.expand(2, 2, -1, -1))
    assert torch.equal(full.density, torch.ones(2, dtype=torch.float64))
    # lower top_p never keeps more
    low = select_blocks(qi, ki, top_p=0.3, **kw)
    assert not (selection_to_dense(low) & ~dense).any()


def test_selection_from_dense_and_random_selection():
    g = torch.Generator().manual_seed(7)
    kw = dict(block_size=16, q_block_size=32, window=48, sinks=4)
    choice = torch.rand(2, 3, 10, 20, generator=g) < 0.3
    sel = selection_from_dense(choice, seq_len=320, **kw)
    forced, cand = forced_and_candidate_blocks(320, doc_ids=None, device="cpu", **kw)
    assert torch.equal(selection_to_dense(sel), forced | (choice & cand))
    rs = random_selection(2, 3, 4096, 0.25, device="cpu", generator=g, **kw)
    assert abs(float(rs.density.mean()) - 0.25) < 0.02
    with pytest.raises(ValueError, match="nQB"):
        selection_from_dense(choice, seq_len=400, **kw)


def test_select_blocks_errors():
    qi, ki = _indexer(1, 1, 64)
    with pytest.raises(ValueError, match="top_p"):
        select_blocks(qi, ki, top_p=0.0, window=8, sinks=1, block_size=16, q_block_size=32)
    with pytest.raises(ValueError, match="multiple of block_size"):
        select_blocks(qi, ki, top_p=0.5, window=8, sinks=1, block_size=32, q_block_size=48)
    with pytest.raises(ValueError, match=r"\[B, Hr, T, r\]"):
        select_blocks(qi, ki[..., :8], top_p=0.5, window=8, sinks=1, block_size=16, q_block_size=32)


# ------------------------------------------------------------------ block-sparse attention


def _listed(num, idx, n_cols):
    out = torch.zeros(*num.shape, n_cols + 1, dtype=torch.bool)
    valid = torch.arange(idx.shape[-1]) < num[..., None]
    out.scatter_(-1, torch.where(valid, idx.long(), n_cols), True)
    return out[..., :n_cols]


def _qkv(B, Hq, Hkv, T, D, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, h, T, D, generator=g).requires_grad_(grad)  # noqa: E731
    return mk(Hq), mk(Hkv), mk(Hkv)


@pytest.mark.parametrize("use_doc", [False, True])
def test_selection_block_masks_match_token_mask(use_doc):
    qi, ki = _indexer(2, 4, 300, seed=8)
    doc = DOCS if use_doc else None
    sel = select_blocks(qi, ki, top_p=0.7, block_size=16, q_block_size=32, window=40, sinks=4, doc_ids=doc)
    tok = selection_token_mask(sel)
    for coarse in (False, True):
        bm = selection_block_mask(sel, coarse=coarse, compute_q_blocks=True)
        assert torch.equal(block_mask_to_dense(bm), tok)
        # q-side lists are the transpose of the kv-side ones
        assert int(bm.q_num_blocks.sum()) == int(bm.kv_num_blocks.sum())
        assert int(bm.full_q_num_blocks.sum()) == int(bm.full_kv_num_blocks.sum())
    # fine layout: a selected tile is a full block iff all its tokens are visible and in
    # bounds (brute force over the token mask); every selected tile is listed
    fine = selection_block_mask(sel, coarse=False, compute_q_blocks=False)
    T, n_qb, n_kb = 300, 10, 19
    pad = torch.zeros(2, 4, n_qb * 32, n_kb * 16, dtype=torch.bool)
    pad[..., :T, :T] = tok
    tiles_full = pad.view(2, 4, n_qb, 32, n_kb, 16).all(5).all(3)
    listed_full = _listed(fine.full_kv_num_blocks, fine.full_kv_indices, n_kb)
    listed_part = _listed(fine.kv_num_blocks, fine.kv_indices, n_kb)
    chosen = selection_to_dense(sel)
    assert torch.equal(listed_full, tiles_full & chosen)
    assert torch.equal(listed_full | listed_part, chosen)
    assert int(fine.full_kv_num_blocks.sum()) > 0


@pytest.mark.parametrize("use_doc", [False, True])
def test_block_sparse_attention_forward_and_grad(use_doc):
    B, Hr, Hkv, T, D = 2, 4, 2, 300, 16
    qi, ki = _indexer(B, Hr, T, seed=9)
    doc = DOCS if use_doc else None
    sel = select_blocks(qi, ki, top_p=0.6, block_size=16, q_block_size=32, window=40, sinks=4, doc_ids=doc)
    assert float(sel.density.max()) < 0.9  # the test must exercise sparsity
    q, k, v = _qkv(B, Hr, Hkv, T, D, 10, grad=True)
    out = block_sparse_attention(q, k, v, sel, window=40, sinks=4, block_size=16)
    ref = block_sparse_attention_reference(q, k, v, sel, window=40, sinks=4, block_size=16)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)
    with torch.no_grad():  # eager forward-only path
        torch.testing.assert_close(block_sparse_attention(q, k, v, sel, window=40, sinks=4, block_size=16), ref, atol=2e-5, rtol=2e-5)


def test_block_sparse_top_p_one_is_dense_causal():
    B, Hr, Hkv, T, D = 2, 4, 1, 200, 16
    qi, ki = _indexer(B, Hr, T, seed=11)
    sel = select_blocks(qi, ki, top_p=1.0, block_size=16, q_block_size=32, window=24, sinks=4)
    q, k, v = _qkv(B, Hr, Hkv, T, D, 12)
    out = block_sparse_attention(q, k, v, sel, window=24, sinks=4, block_size=16)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)


def _mask_mod_dense(bm, B, H, T):
    t = torch.arange(T)
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(H)[None, :, None, None]
    return torch.as_tensor(bm.mask_mod(b, h, t[None, None, :, None], t[None, None, None, :])).expand(B, H, T, T)


@pytest.mark.parametrize("use_doc", [False, True])
def test_mask_mod_alone_is_the_selection(use_doc):
    # eager flex and Dynamo's eager fallback apply only mask_mod: it must encode the whole
    # selection in both layouts (a causal-only mask_mod gave dense attention on the H100)
    qi, ki = _indexer(2, 3, 300, seed=15)
    doc = DOCS if use_doc else None
    sel = select_blocks(qi, ki, top_p=0.6, block_size=16, q_block_size=32, window=40, sinks=4, doc_ids=doc)
    tok = selection_token_mask(sel)
    for coarse in (False, True):
        bm = selection_block_mask(sel, coarse=coarse, compute_q_blocks=False)
        assert torch.equal(_mask_mod_dense(bm, 2, 3, 300), tok)


def test_block_sparse_errors():
    qi, ki = _indexer(1, 2, 100)
    sel = select_blocks(qi, ki, top_p=0.5, block_size=16, q_block_size=32, window=20, sinks=2)
    q, k, v = _qkv(1, 2, 1, 100, 16, 0)
    with pytest.raises(ValueError, match="window/sinks/block_size"):
        block_sparse_attention(q, k, v, sel, window=21, sinks=2, block_size=16)
    q3, k3, v3 = _qkv(1, 3, 1, 100, 16, 0)
    with pytest.raises(ValueError, match="kv_num_blocks"):
        block_sparse_attention(q3, k3, v3, sel, window=20, sinks=2, block_size=16)
    q4, k4, v4 = _qkv(1, 2, 1, 96, 16, 0)
    with pytest.raises(ValueError, match="seq_len"):
        block_sparse_attention(q4, k4, v4, sel, window=20, sinks=2, block_size=16)
