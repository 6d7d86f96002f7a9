"""RTPurbo decode kernels: Triton (CPU interpreter) vs pure-torch references, and the references
against independent dense computations.

Triton's interpreter must be switched on (TRITON_INTERPRET=1) before triton is first imported,
and other test modules may import triton earlier in the same pytest process. So, unless this
process already has a working interpreter, the kernel tests are skipped here and
test_triton_kernels_in_interpreter_subprocess reruns this file in a fresh interpreter with
TRITON_INTERPRET=1 set from the start. Every fast call uses impl="triton", which raises instead of
falling back, and the `td` fixture asserts that the kernels are interpreted ones: the tests fail
if Triton did not execute.
"""

import logging
import os

import pytest
import torch

from kernels import sparse_decode as sd
from tests.triton_interp import interpreter_ready, run_module_in_interpreter

BS = 16  # small key blocks keep the interpreter fast while giving many blocks per head
CHILD_FLAG = "RTPURBO_DECODE_TEST_CHILD"


INTERPRETER_READY = interpreter_ready()
needs_triton = pytest.mark.skipif(
    not INTERPRETER_READY,
    reason="Triton kernels run in the TRITON_INTERPRET=1 subprocess test of this module")


@pytest.mark.skipif(INTERPRETER_READY or os.environ.get(CHILD_FLAG) == "1",
                    reason="the kernel tests already run in this process (or this is the child)")
def test_triton_kernels_in_interpreter_subprocess():
    pytest.importorskip("triton")
    run_module_in_interpreter(__file__, CHILD_FLAG)


@pytest.fixture()
def td():
    from kernels import triton_decode

    assert triton_decode._interpreting(), "Triton decode kernels were not built for the interpreter"
    return triton_decode


def cfg(td, **kw):
    base = dict(select_tile=8, score_blocks_per_cta=4, local_tile=16, select_split_tile=4, select_cand_tile=8)
    base.update(kw)
    return td.TritonDecodeConfig(**base)


# ---------------------------------------------------------------------------- data builders


def poison_beyond(x, lens, dim=2):
    """NaN in every cache entry at position >= lens[b]: a kernel that reads one fails."""
    x = x.clone()
    for b, n in enumerate(lens.tolist()):
        x[b].narrow(dim - 1, n, x.shape[dim] - n).fill_(float("nan"))
    return x


def ring_from_full(k, v, lens, S, W):
    """Sink buffer + ring buffer holding exactly what a decode loop would have written;
    ring slots whose token was never written are NaN."""
    B, H, L, D = k.shape
    sink_k, sink_v = k[:, :, :S].clone(), v[:, :, :S].clone()
    ring_k = torch.full((B, H, W, D), float("nan"), dtype=k.dtype)
    ring_v = ring_k.clone()
    for b, n in enumerate(lens.tolist()):
        for t in range(max(0, n - W), n):
            ring_k[b, :, t % W] = k[b, :, t]
            ring_v[b, :, t % W] = v[b, :, t]
        sink_k[b, :, min(n, S):] = float("nan")
        sink_v[b, :, min(n, S):] = float("nan")
    return sink_k, sink_v, ring_k, ring_v


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def forced_blocks_by_tokens(L, nb, block_size, window, sinks):
    """Forced blocks written out token by token: a block is forced iff it holds a token t < L that
    is a sink (t < sinks) or in the window (t >= L - window)."""
    forced = torch.zeros(nb, dtype=torch.bool)
    for t in range(L):
        if t < sinks or t >= L - window:
            forced[t // block_size] = True
    return forced


def block_mass_brute(qi, ki, lens, block_size):
    """float64 indexer softmax over t < L summed per block, one (b, h) at a time."""
    B, H, L_max, _ = ki.shape
    nb = -(-L_max // block_size)
    mass = torch.zeros(B, H, nb, dtype=torch.float64)
    for b, L in enumerate(lens.tolist()):
        for h in range(H):
            p = torch.softmax(ki[b, h, :L].double() @ qi[b, h].double(), 0)
            for t in range(L):
                mass[b, h, t // block_size] += p[t]
    return mass


def prefill_rule_brute(mass, lens, p, block_size, window, sinks):
    """The prefill rule (kernels/block_select.py) for the one query at L - 1, as a greedy loop:
    forced blocks always; then free blocks by decreasing mass (ties: lower index), each taken
    while forced + taken so far < p and its mass is > 0. p >= 1: every visible block."""
    B, H, nb = mass.shape
    out = torch.zeros(B, H, nb, dtype=torch.bool)
    for b, L in enumerate(lens.tolist()):
        n_valid = -(-L // block_size)
        forced = forced_blocks_by_tokens(L, nb, block_size, window, sinks)
        for h in range(H):
            if p >= 1.0:
                out[b, h, :n_valid] = True
                continue
            m = mass[b, h].tolist()
            out[b, h] = forced
            acc = sum(m[j] for j in range(n_valid) if forced[j])
            for j in sorted((j for j in range(n_valid) if not forced[j]), key=lambda j: (-m[j], j)):
                if not (acc < p and m[j] > 0):
                    break
                out[b, h, j] = True
                acc += m[j]
    return out


def assert_valid_top_p(got, ref, mass, lens, p, block_size, window, sinks):
    """got must equal ref, except where float rounding at the top-p boundary legitimately picks
    another minimal set: it must then still hold the forced blocks, reach p with them, be minimal
    and take a top set of the free blocks (float64 masses)."""
    diff_rows = (got != ref).any(-1)
    assert diff_rows.float().mean() <= 0.34, "too many rows differ from the reference"
    for b, h in diff_rows.nonzero().tolist():
        L = int(lens[b])
        nb = -(-L // block_size)
        forced = forced_blocks_by_tokens(L, nb, block_size, window, sinks)
        m = mass[b, h, :nb].double()
        sel = got[b, h, :nb]
        assert not got[b, h, nb:].any() and sel[forced].all()
        extra = sel & ~forced
        assert m[sel].sum() >= p - 1e-5
        if extra.any():
            assert m[sel].sum() - m[extra].min() < p + 1e-5  # minimal
            free_out = ~sel
            if free_out.any():
                assert m[free_out].max() <= m[extra].min() + 1e-6  # a top set
        assert abs(int(sel.sum()) - int(ref[b, h].sum())) <= 1


def indexer_inputs(B, Hr, L, r=16, peak=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    qi = torch.randn(B, Hr, r, generator=g)
    ki = torch.randn(B, Hr, L, r, generator=g) * peak / r ** 0.5
    return qi, ki


# ------------------------------------------------------------------------- selection (top-p)

LENS = [300, 263, 41]  # full, not a multiple of the block, and shorter than the window

# (window, sinks): not block aligned; sinks over two blocks; no window / sinks (pure top-p);
# window over everything (every block forced)
RULE_CASES = [(64, 4), (40, 20), (0, 0), (25, 0), (400, 4)]


@pytest.mark.parametrize("window,sinks", RULE_CASES)
@pytest.mark.parametrize("p", [0.3, 0.7, 0.9, 1.0, 0.0])
def test_select_reference_is_the_prefill_rule(window, sinks, p):
    """Reference (float64) == the prefill rule written out as a greedy loop, batch 3 with
    different lengths; p = 1 keeps every visible block, p = 0 exactly the forced ones."""
    lens = torch.tensor(LENS)
    qi, ki = indexer_inputs(3, 2, 300, seed=17 + window + sinks)
    ki = poison_beyond(ki, lens)
    got = sd.select_decode_blocks_reference(qi.double(), ki.double(), lens, top_p=p,
                                            block_size=BS, window=window, sinks=sinks)
    mass = block_mass_brute(qi, ki, lens, BS)
    assert torch.equal(got, prefill_rule_brute(mass, lens, p, BS, window, sinks))
    forced, valid = sd.decode_forced_blocks(lens, got.shape[-1], block_size=BS, window=window,
                                            sinks=sinks)
    assert (got <= valid[:, None]).all() and (got >= forced[:, None]).all()
    if p >= 1.0 or window >= 300:
        assert torch.equal(got, valid[:, None].expand_as(got))
    if p == 0.0:
        assert torch.equal(got, forced[:, None].expand_as(got))
    chosen, free = sd.decode_block_density(got, lens, block_size=BS, window=window, sinks=sinks)
    assert torch.equal(chosen, (got & ~forced[:, None]).sum(-1))
    assert torch.equal(free, (valid & ~forced).sum(-1))


@pytest.mark.parametrize("mode", ["mean", "pooled"])
@pytest.mark.parametrize("window,sinks", [(40, 4), (64, 20), (25, 0), (400, 4)])
def test_select_reference_equals_block_select_on_last_query(mode, window, sinks):
    """kernels/block_select.select_blocks_reference itself: with q_block_size = block_size and
    L = 1 (mod block) the last query block holds only the query at L - 1, so its row of the
    prefill selection is that query's decode selection."""
    from kernels.block_select import select_blocks_reference

    lens = torch.tensor([177, 97, 49])  # 11, 6, 3 full blocks + one token
    g = torch.Generator().manual_seed(window + sinks)
    qi_all = torch.randn(3, 2, 177, 16, generator=g)
    ki = torch.randn(3, 2, 177, 16, generator=g) * 3.0 / 4
    for p in (0.5, 0.8, 0.95, 1.0):
        got = sd.select_decode_blocks_reference(
            torch.stack([qi_all[b, :, int(L) - 1] for b, L in enumerate(lens)]),
            poison_beyond(ki, lens), lens, top_p=p, block_size=BS, window=window, sinks=sinks)
        for b, L in enumerate(lens.tolist()):
            ref = select_blocks_reference(qi_all[b:b + 1, :, :L], ki[b:b + 1, :, :L], top_p=p,
                                          block_size=BS, q_block_size=BS, window=window,
                                          sinks=sinks, mode=mode)[0, :, -1]
            nb = ref.shape[-1]
            assert torch.equal(got[b, :, :nb], ref), (p, b)
            assert not got[b, :, nb:].any()


SELECT_CONFIGS = {  # every search path: fused (last program) / separate kernel, in registers
    # or tiled, 2-D or per-threshold reductions, bisection and k-ary
    "fused_k16_tiled": dict(fused_select=True, search_arity=16),
    "fused_k2_tiled": dict(fused_select=True, search_arity=2),
    "sep_k1_resident": dict(fused_select=False, search_arity=1),
    "sep_k4_tiled": dict(fused_select=False, search_arity=4, select_wide_tile=8),  # split select
    "sep_k4_tiled_streaming": dict(fused_select=False, search_arity=4, select_wide_tile=8,
                                   select_split=False),
    "sep_k2_split_wide": dict(fused_select=False, search_arity=2, select_wide_tile=16),
    "sep_k16_resident_1d": dict(fused_select=False, search_arity=16, select_max_2d=64),
}


@needs_triton
@pytest.mark.parametrize("name", list(SELECT_CONFIGS))
@pytest.mark.parametrize("p", [0.5, 0.9])
def test_select_matches_reference(td, name, p):
    lens = torch.tensor(LENS)
    qi, ki = indexer_inputs(3, 2, 300, seed=int(p * 10) + len(name))
    ki = poison_beyond(ki, lens)
    kw = dict(block_size=BS, window=64, sinks=4)
    ref = sd.select_decode_blocks_reference(qi, ki, lens, top_p=p, **kw)
    res = td.select_decode_blocks_triton(qi, ki, lens, top_p=p, config=cfg(td, **SELECT_CONFIGS[name]),
                                         **kw)
    mass = sd.indexer_block_mass_reference(qi.double(), ki.double(), lens, block_size=BS)
    assert res.block_mask.dtype == torch.bool and res.block_mask.shape == ref.shape
    assert_valid_top_p(res.block_mask, ref, mass, lens, p, **kw)
    assert_valid_top_p(res.block_mask, prefill_rule_brute(mass, lens, p, **kw), mass, lens, p,
                       **kw)
    # the kept-block list = the mask's blocks (forced ones included), ascending
    for row in range(6):
        b, h = divmod(row, 2)
        expect = res.block_mask[b, h].nonzero().flatten()
        cnt = int(res.kept_count[row])
        assert torch.equal(res.kept_idx[row, :cnt].long(), expect)


@needs_triton
@pytest.mark.parametrize("window,sinks", RULE_CASES)
@pytest.mark.parametrize("fused", [True, False])
def test_select_triton_is_the_prefill_rule(td, window, sinks, fused):
    """Triton == the written-out prefill rule on every forced-block layout, p in (0, 1], p = 0,
    both search launches, resident and tiled tiles."""
    lens = torch.tensor(LENS)
    qi, ki = indexer_inputs(3, 2, 300, seed=3 + window + sinks)
    ki = poison_beyond(ki, lens)
    mass = block_mass_brute(qi, ki, lens, BS)
    kw = dict(block_size=BS, window=window, sinks=sinks)
    for p, tile in ((0.6, 8), (0.9, 4096), (0.99, 8), (1.0, 8), (0.0, 4096)):
        c = cfg(td, fused_select=fused, select_wide_tile=tile)
        got = td.select_decode_blocks_triton(qi, ki, lens, top_p=p, config=c, **kw).block_mask
        want = prefill_rule_brute(mass, lens, p, **kw)
        if p in (0.0, 1.0):
            assert torch.equal(got, want)
        else:
            assert_valid_top_p(got, want, mass, lens, p, **kw)


SPLIT_CASES = [  # (window, sinks, top_p, select_cand_tile, select_split_tile, peak, mask bits)
    (64, 4, 0.9, 16, 4, 3.0, False), (64, 4, 0.5, 8, 4, 8.0, True), (0, 0, 0.9, 16, 2, 8.0, False),
    (0, 0, 1.0, 16, 4, 3.0, True), (23, 20, 0.99, 8, 2, 3.0, False), (23, 20, 0.0, 16, 4, 3.0, True),
    (400, 4, 0.9, 8, 4, 3.0, True), (37, 4, 0.7, 16, 8, 8.0, False), (37, 4, 0.9, 8, 4, 8.0, True),
]


@needs_triton
@pytest.mark.parametrize("case", [(0, 0, 0.99, 8, 4, 3.0, True), (23, 20, 0.99, 8, 2, 3.0, False),
                                  (0, 0, 1.0, 8, 4, 3.0, False)], ids=str)
def test_select_split_flat_heads_resident(td, case):
    """Fallback heads with more than select_flat_min_cand candidates search with every block resident
    (select_flat_tile >= the view) == the one-program select (mask, kept lists, bits); the flat path is
    taken by some head (more candidates than the candidate tile and than flat_min), and a view larger than
    select_flat_tile keeps the streamed fallback (same result)."""
    window, sinks, p, ct, st, peak, with_bits = case
    lens = torch.tensor([600, 517, 41])
    qi, ki = indexer_inputs(3, 2, 600, peak=peak, seed=window + sinks + int(p * 10))
    ki = poison_beyond(ki, lens)
    kw = dict(block_size=BS, window=window, sinks=sinks, top_p=p)
    c = dict(select_wide_tile=16, retrieval_union=True, union_max_blocks=0,
             union_lists="fused" if with_bits else "kernel")
    a = td.select_decode_blocks_triton(qi, ki, lens, config=cfg(td, select_split=False, **c), **kw)
    for flat_tile in (64, 32):  # 38 blocks: resident flat path / view too large for it
        stats = []
        td.SPLIT_STATS_HOOK = stats.append
        try:
            b = td.select_decode_blocks_triton(qi, ki, lens, config=cfg(
                td, select_split=True, select_split_tile=st, select_cand_tile=ct, select_flat_tile=flat_tile,
                select_flat_min_cand=4, **c), **kw)
        finally:
            td.SPLIT_STATS_HOOK = None
        eff_ct = max(ct, 32 if with_bits else 1)  # the candidate tile (whole 32-block words with bits)
        assert (stats[0]["n_cand"] > max(eff_ct, 4)).any()  # some head leaves the candidate path: flat
        assert torch.equal(a.block_mask, b.block_mask) and torch.equal(a.kept_count, b.kept_count)
        if with_bits:
            assert torch.equal(a.block_bits, b.block_bits)
        for row in range(6):
            n = int(a.kept_count[row])
            assert torch.equal(a.kept_idx[row, :n], b.kept_idx[row, :n])


@needs_triton
@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
def test_select_split_equals_streaming_select(td, case):
    """select_split (a many-program candidate pass, then the search over the candidates in registers by
    a few-warp launch; a wide launch runs the one-program select for the heads whose candidates do not fit)
    == the one-program select: the same mask, kept lists and mask bits, on both of its paths (peak 8
    concentrates the mass: the candidates fit the tile; peak 3 often not), the wide fallback resident
    (one 64-block tile) or streamed (16-block tiles), several candidate tiles per head, forced layouts,
    p = 0 / 1. 38 blocks: more than the candidate tiles (8 / 16, raised to 32 with mask bits)."""
    window, sinks, p, ct, st, peak, with_bits = case
    wt = 16 if ct == 8 else 64
    lens = torch.tensor([600, 517, 41])
    qi, ki = indexer_inputs(3, 2, 600, peak=peak, seed=window + sinks + int(p * 10))
    ki = poison_beyond(ki, lens)
    kw = dict(block_size=BS, window=window, sinks=sinks, top_p=p)
    c = dict(select_wide_tile=wt, retrieval_union=True, union_max_blocks=0,
             union_lists="fused" if with_bits else "kernel")
    a = td.select_decode_blocks_triton(qi, ki, lens, config=cfg(td, select_split=False, **c), **kw)
    stats = []
    td.SPLIT_STATS_HOOK = stats.append
    try:
        b = td.select_decode_blocks_triton(qi, ki, lens, config=cfg(td, select_split=True, select_split_tile=st,
                                                                    select_cand_tile=ct, **c), **kw)
    finally:
        td.SPLIT_STATS_HOOK = None
    # the candidate pass's counts (the diagnostics hook): free blocks of mass > tau = (1 - p) / 2 (nb + 1)
    mass0 = block_mass_brute(qi, ki, lens, BS)
    want_n = []
    for bb, L in enumerate(lens.tolist()):
        nb = -(-L // BS)
        sb_end, wb_lo = -(-min(sinks, L) // BS), (max(L - window, 0) // BS if window > 0 else nb)
        tau = 0.5 * (1.0 - p) / (nb + 1) if p < 1 else float("-inf")
        for h in range(2):
            want_n.append(sum(1 for j in range(sb_end, min(wb_lo, nb)) if float(mass0[bb, h, j]) > tau))
    assert len(stats) == 1 and stats[0]["n_cand"].int().tolist() == want_n
    assert torch.equal(a.block_mask, b.block_mask) and torch.equal(a.kept_count, b.kept_count)
    if with_bits:
        assert torch.equal(a.block_bits, b.block_bits)
        assert torch.equal(b.block_bits, pack_bits_brute(b.block_mask))
    for row in range(6):
        n = int(a.kept_count[row])
        assert torch.equal(a.kept_idx[row, :n], b.kept_idx[row, :n])
    mass = block_mass_brute(qi, ki, lens, BS)
    want = prefill_rule_brute(mass, lens, p, block_size=BS, window=window, sinks=sinks)
    if p in (0.0, 1.0):
        assert torch.equal(b.block_mask, want)
    else:
        assert_valid_top_p(b.block_mask, want, mass, lens, p, block_size=BS, window=window, sinks=sinks)


def test_select_reference_rule_on_known_masses():
    """The reference on a hand-made distribution: masses proportional to exp(scores)."""
    # 4 blocks of 16; block 2 gets 3 tokens with a big score, block 0 a medium one
    ki = torch.zeros(1, 1, 64, 1)
    ki[0, 0, 33:36, 0] = 5.0
    ki[0, 0, 2, 0] = 4.0
    qi = torch.ones(1, 1, 1)
    lens = torch.tensor([64])
    mass = sd.indexer_block_mass_reference(qi, ki, lens, block_size=16)[0, 0]
    assert mass.argmax() == 2 and torch.allclose(mass.sum(), torch.tensor(1.0))
    m = lambda p, w=0, s=0: sd.select_decode_blocks_reference(  # noqa: E731
        qi, ki, lens, top_p=p, block_size=16, window=w, sinks=s)[0, 0].tolist()
    # no forced blocks: plain top-p
    assert m(float(mass[2]) - 1e-4) == [False, False, True, False]
    assert m(float(mass[2] + mass[0]) - 1e-4) == [True, False, True, False]
    assert m(float(mass[2] + mass[0]) + 1e-4) == [True, True, True, False]  # tie 1 vs 3: lower
    # forced blocks count toward p: window 1 forces block 3, sinks 1 forces block 0
    assert m(float(mass[2] + mass[3]) - 1e-4, w=1) == [False, False, True, True]
    assert m(float(mass[0] + mass[3]) - 1e-4, w=1, s=1) == [True, False, False, True]
    assert m(float(mass[0] + mass[3]) + 1e-4, w=1, s=1) == [True, False, True, True]
    assert m(float(mass[0] + mass[2] + mass[3]) + 1e-4, w=1, s=1) == [True, True, True, True]


@needs_triton
@pytest.mark.parametrize("fused", [True, False])
def test_select_ties_take_lower_block_first(td, fused):
    lens = torch.tensor([160, 150])  # 10 full blocks; 9 full + 1 partial
    qi = torch.randn(2, 2, 16)
    ki = torch.randn(1, 1, 1, 16).expand(2, 2, 160, 16).contiguous()  # all scores equal
    for window, sinks in ((0, 0), (16, 4)):
        for p in (0.55, 0.05):
            kw = dict(block_size=BS, window=window, sinks=sinks)
            ref = sd.select_decode_blocks_reference(qi, ki, lens, top_p=p, **kw)
            got = td.select_decode_blocks_triton(qi, ki, lens, top_p=p,
                                                 config=cfg(td, fused_select=fused), **kw)
            assert torch.equal(got.block_mask, ref)
            # L=160: each block holds 1/10 of the mass. No forced block: the first ceil(10 p).
            # Window 16 + sinks 4 force blocks 0 and 9 (mass 0.2): then the lowest free blocks
            # 1, 2, ... while the mass stays below p
            if window == 0:
                want = {i for i in range(-(-int(p * 1000) // 100))}
            else:
                want = {0, 9} | {i for i in range(1, 1 + max(0, -(-int(p * 1000 - 200) // 100)))}
            assert ref[0, 0].tolist() == [i in want for i in range(10)]


@needs_triton
@pytest.mark.parametrize("fused", [True, False])
def test_select_pruned_candidates_and_fallback(td, fused):
    """Blocks more than ~(1-p)/nb below the top can never be kept: the search runs on the
    gathered candidates when they fit one tile (peaky rows), else on all blocks (flat rows)."""
    lens = torch.tensor([300, 290])
    qi = torch.randn(2, 2, 16)
    ki = torch.randn(2, 2, 300, 16) * 0.05
    for b, h, blocks in [(0, 0, [2, 9, 15]), (1, 0, [0, 4, 5, 6, 17])]:  # peaky rows
        for j, blk in enumerate(blocks):
            ki[b, h, blk * BS + 3] = qi[b, h] * (1.0 + 0.1 * j) * 8 / qi[b, h].norm() ** 2
    c = cfg(td, fused_select=fused, select_tile=8, select_wide_tile=8)
    kw = dict(block_size=BS, window=16, sinks=4)
    for p in (0.5, 0.9, 0.999):
        got = td.select_decode_blocks_triton(qi, ki, lens, top_p=p, config=c, **kw).block_mask
        ref = sd.select_decode_blocks_reference(qi, ki, lens, top_p=p, **kw)
        mass = sd.indexer_block_mass_reference(qi.double(), ki.double(), lens, block_size=BS)
        assert_valid_top_p(got, ref, mass, lens, p, **kw)


@needs_triton
def test_select_all_mass_on_one_block(td):
    lens = torch.tensor([200, 200])
    qi = torch.randn(2, 2, 16)
    ki = torch.randn(2, 2, 200, 16) * 0.01
    hot = [[3, 11], [7, 0]]  # 11 is a window block, 0 the sink block
    for b in range(2):
        for h in range(2):
            ki[b, h, hot[b][h] * BS + 5] = qi[b, h] * 10  # one token, huge score
    kw = dict(block_size=BS, window=16, sinks=4)
    got = td.select_decode_blocks_triton(qi, ki, lens, top_p=0.9, config=cfg(td), **kw)
    ref = sd.select_decode_blocks_reference(qi, ki, lens, top_p=0.9, **kw)
    assert torch.equal(got.block_mask, ref)
    forced = {0, 11, 12}  # sink block 0, window tokens 184..199
    for b in range(2):
        for h in range(2):
            want = forced | {hot[b][h]}  # a forced hot block already brings the mass: nothing more
            assert got.block_mask[b, h].nonzero().flatten().tolist() == sorted(want)


@needs_triton
@pytest.mark.parametrize("fused", [True, False])
def test_select_top_p_edges(td, fused):
    lens = torch.tensor([200, 57])
    qi, ki = indexer_inputs(2, 3, 200, seed=5)
    nb = [13, 4]
    c = cfg(td, fused_select=fused)
    mass = sd.indexer_block_mass_reference(qi, ki, lens, block_size=BS)
    for window, sinks in ((16, 4), (0, 0)):
        kw = dict(block_size=BS, window=window, sinks=sinks)
        got = {p: td.select_decode_blocks_triton(qi, ki, lens, top_p=p, config=c, **kw).block_mask
               for p in (0.0, 1.0, 1e-7, -1.0, 2.0)}
        for p, mask in got.items():
            assert torch.equal(mask, sd.select_decode_blocks_reference(qi, ki, lens, top_p=p, **kw))
        forced, _ = sd.decode_forced_blocks(lens, 13, **kw)
        for p in (0.0, -1.0):
            assert torch.equal(got[p], forced[:, None].expand(2, 3, 13))
        for b in range(2):
            for p in (1.0, 2.0):
                assert got[p][b, :, :nb[b]].all() and not got[p][b, :, nb[b]:].any()
        if window == 0:  # no forced block: p -> 0 keeps exactly the top block
            assert got[1e-7].sum(-1).eq(1).all()
            assert torch.equal(got[1e-7].float().argmax(-1), mass.argmax(-1))
        else:  # the forced blocks' mass already exceeds p
            assert torch.equal(got[1e-7], forced[:, None].expand(2, 3, 13))


@needs_triton
def test_select_fp8_indexer_keys(td):
    """ki_cache in float8_e4m3fn (16 instead of 32 B per token and head): the scoring kernel
    upcasts each key to fp32, the reference dequantises the same way, so the selections match the
    reference on the fp8 keys (NaN beyond cache_len in fp8 too)."""
    lens = torch.tensor(LENS)
    qi, ki = indexer_inputs(3, 2, 300, seed=11)
    ki8 = poison_beyond(ki, lens).to(torch.float8_e4m3fn)
    mass = sd.indexer_block_mass_reference(qi.double(), ki8, lens, block_size=BS)
    for p, window, sinks in ((0.9, 64, 4), (0.6, 0, 0)):
        kw = dict(block_size=BS, window=window, sinks=sinks)
        ref = sd.select_decode_blocks_reference(qi, ki8, lens, top_p=p, **kw)
        got = td.select_decode_blocks_triton(qi, ki8, lens, top_p=p, config=cfg(td), **kw)
        assert_valid_top_p(got.block_mask, ref, mass, lens, p, **kw)


# -------------------------------------------------------------------------- retrieval heads


def retrieval_case(B=3, Hkv=2, L=300, D=32, seed=0, lens=LENS, density=0.3):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    q = torch.randn(B, 4, D, generator=g)
    k = poison_beyond(torch.randn(B, Hkv, L, D, generator=g), lens)
    v = poison_beyond(torch.randn(B, Hkv, L, D, generator=g), lens)
    mask = torch.rand(B, 4, -(-L // BS), generator=g) < density
    return q, k, v, mask, lens


@needs_triton
@pytest.mark.parametrize("fused,splits", [(True, 1), (True, 3), (False, 4), (True, 64)])
def test_retrieval_matches_reference(td, fused, splits):
    q, k, v, mask, lens = retrieval_case(seed=splits)
    kv_of = [0, 1, 1, 0]  # GQA: two retrieval heads on each KV head, not in order
    kw = dict(window=40, sinks=4, block_size=BS)
    ref = sd.retrieval_decode_reference(q.double(), k.double(), v.double(), kv_of, mask, lens,
                                        **kw)
    out = sd.retrieval_decode(q, k, v, kv_of, mask, lens, impl="triton",
                              config=cfg(td, fused_reduction=fused, num_splits=splits), **kw)
    assert out.shape == (3, 4, 32) and torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-5


@needs_triton
def test_retrieval_fp16_and_scale(td):
    q, k, v, mask, lens = retrieval_case(seed=7)
    q, k, v = q.half(), k.half(), v.half()
    kw = dict(window=24, sinks=2, block_size=BS, scale=0.3)
    ref = sd.retrieval_decode_reference(q.double(), k.double(), v.double(), [1, 0, 1, 0], mask,
                                        lens, **kw)
    out = sd.retrieval_decode(q, k, v, [1, 0, 1, 0], mask, lens, impl="triton",
                              config=cfg(td, num_splits=2), **kw)
    assert out.dtype == torch.float16 and rel_err(out, ref) < 2e-3


def test_retrieval_reference_independent_checks():
    """All blocks selected = dense attention; no blocks = sinks + window only."""
    q, k, v, _, lens = retrieval_case(seed=3)
    kv_of = [0, 0, 1, 1]
    full = torch.ones(3, 4, -(-300 // BS), dtype=torch.bool)
    got = sd.retrieval_decode_reference(q, k, v, kv_of, full, lens, window=8, sinks=4,
                                        block_size=BS)
    dense = sd.dense_decode_reference(q, k, v, lens)  # Hq=4, Hkv=2: head h -> h // 2
    assert rel_err(got, dense) < 1e-6
    none = torch.zeros_like(full)
    got = sd.retrieval_decode_reference(q, k, v, kv_of, none, lens, window=8, sinks=4,
                                        block_size=BS)
    for b, n in enumerate(lens.tolist()):
        idx = sorted(set(range(min(4, n))) | set(range(max(0, n - 8), n)))
        for h in range(4):
            kk, vv = k[b, kv_of[h], idx], v[b, kv_of[h], idx]
            p = torch.softmax(kk @ q[b, h] / 32 ** 0.5, 0)
            assert torch.allclose(got[b, h], p @ vv, atol=1e-5)


# ------------------------------------------------- retrieval heads: GQA-union kernel


def union_lists_brute(mask, lens, kv_of, block_size, window, sinks):
    """Per (b, retrieval KV head ascending): the valid blocks that a head of the group selected
    or that hold a sink / window token (written out token by token)."""
    out = []
    for b, L in enumerate(lens.tolist()):
        nb = -(-L // block_size)
        forced = forced_blocks_by_tokens(L, nb, block_size, window, sinks)
        for kv in sorted(set(kv_of)):
            heads = [h for h in range(len(kv_of)) if kv_of[h] == kv]
            keep = forced | mask[b, heads, :nb].any(0)
            out.append(keep.nonzero().flatten().tolist())
    return out


UNION_CASES = {  # name: (kv_of, Hkv, block size, splits, fused merge, dtype)
    "gqa_noncontig_ns1": ([0, 1, 1, 0], 2, BS, 1, False, torch.float32),
    "gqa_noncontig_ns3_fused": ([0, 1, 1, 0], 2, BS, 3, True, torch.float32),
    "groups_of_1_ns64_empty_splits": ([2, 0, 3, 1], 4, BS, 64, False, torch.float32),
    "irregular_3_1_block8_fp16": ([1, 1, 0, 1], 2, 8, 4, False, torch.float16),
    "one_group_block32_bf16": ([1, 1, 1, 1], 3, 32, 2, True, torch.bfloat16),
}


@needs_triton
@pytest.mark.parametrize("name", list(UNION_CASES))
def test_retrieval_union_matches_per_head_and_reference(td, name):
    """The GQA-union kernel (each K/V block read once per KV group) == the per-head kernel ==
    the float64 reference: non-contiguous groups, groups of 1 (per-query-head roles), an
    irregular 3 + 1 map, one group of 4, block sizes 8 (< tl.dot's 16 rows: padded) / 16 / 32,
    1 / 3 / 4 / 64 splits (empty ones included), both merges, fp32 / fp16 / bf16, a custom
    scale, batch 3 of different lengths with NaN beyond every cache_len, a random mask that also
    marks blocks beyond L (never read)."""
    kv_of, hkv, bsz, ns, fused, dt = UNION_CASES[name]
    g = torch.Generator().manual_seed(len(name))
    lens = torch.tensor(LENS)
    L, D = 300, 32
    q = torch.randn(3, 4, D, generator=g).to(dt)
    k = poison_beyond(torch.randn(3, hkv, L, D, generator=g), lens).to(dt)
    v = poison_beyond(torch.randn(3, hkv, L, D, generator=g), lens).to(dt)
    mask = torch.rand(3, 4, -(-L // bsz), generator=g) < 0.3
    kw = dict(window=40, sinks=4, block_size=bsz, scale=0.2 if dt == torch.float16 else None)
    ref = sd.retrieval_decode_reference(q.double(), k.double(), v.double(), kv_of, mask, lens, **kw)
    # both ways to get the union's visit lists: the _union_kernel launch and the fused in-kernel build
    lists = "kernel" if name in ("gqa_noncontig_ns1", "irregular_3_1_block8_fp16") else "fused"
    base = dict(num_splits=ns, union_num_splits=ns, fused_reduction=fused, union_lists=lists)
    union = sd.retrieval_decode(q, k, v, kv_of, mask, lens, impl="triton",
                                config=cfg(td, retrieval_union=True, **base), **kw)
    per_head = sd.retrieval_decode(q, k, v, kv_of, mask, lens, impl="triton",
                                   config=cfg(td, retrieval_union=False, **base), **kw)
    tol = 1e-5 if dt == torch.float32 else 2e-3 if dt == torch.float16 else 2e-2
    assert union.dtype == dt and torch.isfinite(union).all()
    assert rel_err(union, ref) < tol and rel_err(union, per_head) < tol
    idx, cnt = td.union_visit_lists(mask, lens, kv_of, window=40, sinks=4, block_size=bsz)
    want = union_lists_brute(mask, lens, kv_of, bsz, 40, 4)
    assert [idx[i, :int(c)].tolist() for i, c in enumerate(cnt)] == want


def test_union_tuning_options_are_checked():
    pytest.importorskip("triton")
    from kernels.triton_decode import TritonDecodeConfig

    with pytest.raises(ValueError, match="union_num_stages"):
        TritonDecodeConfig(union_num_stages=9)
    with pytest.raises(ValueError, match="local_num_stages"):
        TritonDecodeConfig(local_num_stages=0)


@needs_triton
def test_retrieval_union_empty_mask_and_in_place_rows(td):
    """An empty mask gives local semantics (sinks + window, token level: the engine's local heads
    that read a full cache), and q_heads writes each head's row of a shared output in place."""
    q, k, v, _, lens = retrieval_case(seed=5)
    kv_of = [1, 0, 1, 0]
    none = torch.zeros(3, 4, -(-300 // BS), dtype=torch.bool)
    kw = dict(window=24, sinks=4, block_size=BS)
    ref = sd.retrieval_decode_reference(q, k, v, kv_of, none, lens, **kw)
    got = sd.retrieval_decode(q, k, v, kv_of, none, lens, impl="triton",
                              config=cfg(td, retrieval_union=True, union_num_splits=2), **kw)
    assert rel_err(got, ref) < 1e-5
    q6 = torch.randn(3, 6, 32)
    rows = [5, 0, 3, 2]  # retrieval head h is row rows[h] of q6 / out
    q6[:, rows] = q
    out = torch.full((3, 6, 32), 7.0)
    td.retrieval_decode_triton(q6, k, v, kv_of, none, lens, config=cfg(td, retrieval_union=True),
                               out=out, q_heads=rows, **kw)
    assert rel_err(out[:, rows], ref) < 1e-5 and (out[:, [1, 4]] == 7.0).all()


def pack_bits_brute(mask):
    """[B, H, nB] bool -> [B*H, ceil(nB/32)] int32 words, bit j of word w = block 32 w + j."""
    B, H, nb = mask.shape
    nw = max(-(-nb // 32), 1)
    m = torch.zeros(B * H, nw * 32, dtype=torch.int64)
    m[:, :nb] = mask.reshape(B * H, nb).long()
    words = (m.view(B * H, nw, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


# name: (kv_of, Hkv, mask density, lens, (window, sinks), union_word_tile, union_expand_words, splits)
FASTLIST_CASES = {
    "noncontig_dense_one_tile": ([0, 1, 1, 0], 2, 0.9, [1300, 777, 41], (40, 4), 256, 8, 3),
    "groups_of_1_sparse_word_tiles": ([2, 0, 3, 1], 4, 0.05, [1300, 777, 41], (40, 20), 1, 1, 4),
    "irregular_3_1_ns1": ([1, 1, 0, 1], 2, 0.3, [1300, 33, 1000], (100, 4), 2, 1, 1),
    "empty_groups": ([1, 1, 1, 1], 2, 0.0, [1300, 700, 1], (0, 0), 2, 2, 5),
}


@needs_triton
@pytest.mark.parametrize("name", list(FASTLIST_CASES))
def test_union_fused_lists(td, name):
    """union_lists="fused": each split program of the union kernel counts its group's union from
    the packed mask bits and writes its slice of the visit list (LISTS_ONLY here) == a written-out
    union (82 blocks = 3 bit words, words with bit 31 set, word tiles of 1 / 2 / 256 words,
    expansion of 1 / 2 / 8 words, 1 / 3 / 4 / 5 splits incl. empty ones, batch 3 of different
    lengths, a mask that also marks blocks beyond L (never listed), groups of 1, non-contiguous
    and irregular groups, empty groups: no mask, window or sinks); the attention over those lists
    (two cases, one with 2-word tiles) == the "kernel" lists' output bit for bit == the float64
    reference."""
    kv_of, hkv, dens, lens_l, (win, snk), cw, ew, ns = FASTLIST_CASES[name]
    g = torch.Generator().manual_seed(len(name))
    lens = torch.tensor(lens_l)
    L, D = 1300, 32
    mask = torch.rand(3, 4, -(-L // BS), generator=g) < dens
    bits = td.pack_mask_bits(mask)
    assert torch.equal(bits, pack_bits_brute(mask))
    kw = dict(window=win, sinks=snk, block_size=BS)
    c = dict(retrieval_union=True, union_max_blocks=0, union_num_splits=ns)
    fast = cfg(td, union_lists="fused", union_word_tile=cw, union_expand_words=ew, **c)
    idx, cnt = td.union_visit_lists(mask, lens, kv_of, config=fast, **kw)
    want = union_lists_brute(mask, lens, kv_of, BS, win, snk)
    assert [idx[i, :int(n)].tolist() for i, n in enumerate(cnt)] == want
    if dens == 0.0:
        assert int(cnt.sum()) == 0
    if name not in ("noncontig_dense_one_tile", "irregular_3_1_ns1"):  # lists only (time)
        return
    q = torch.randn(3, 4, D, generator=g)
    k = poison_beyond(torch.randn(3, hkv, L, D, generator=g), lens)
    v = poison_beyond(torch.randn(3, hkv, L, D, generator=g), lens)
    got = sd.retrieval_decode(q, k, v, kv_of, mask, lens, impl="triton", config=fast, **kw)
    old = sd.retrieval_decode(q, k, v, kv_of, mask, lens, impl="triton", config=cfg(td, **c), **kw)
    assert torch.equal(got, old)
    if ns == 1:  # bits handed in (as the select kernel's) instead of packed from the mask
        given = sd.retrieval_decode(q, k, v, kv_of, mask, lens, impl="triton", config=fast,
                                    mask_bits=pack_bits_brute(mask), **kw)
        assert torch.equal(given, got)
    ref = sd.retrieval_decode_reference(q.double(), k.double(), v.double(), kv_of, mask, lens, **kw)
    assert rel_err(got, ref) < 1e-5


@needs_triton
def test_select_writes_mask_bits(td):
    """union_lists="fused": the select kernel (separate, tiled: 38 blocks > 32; or fused into
    scoring, its 8-block tile raised to 32: whole words) also writes its mask rows packed as bits;
    the mask is the one selected without bits; no bits for the other configs."""
    lens = torch.tensor([600, 41])
    qi, ki = indexer_inputs(2, 2, 600, seed=4)
    ki = poison_beyond(ki, lens)
    kw = dict(top_p=0.9, block_size=BS, window=40, sinks=4)
    for fused, tile in ((False, 32), (True, 4096)):
        c = dict(fused_select=fused, select_wide_tile=tile)
        mask, bits = sd.select_decode_blocks(qi, ki, lens, **kw, impl="triton", return_bits=True,
                                             config=cfg(td, retrieval_union=True, union_max_blocks=0,
                                                        union_lists="fused", **c))
        assert torch.equal(bits, pack_bits_brute(mask))
        if fused:  # its tile changed (8 -> 32 blocks): the same selection
            plain = td.select_decode_blocks_triton(qi, ki, lens, **kw,
                                                   config=cfg(td, union_lists="kernel", **c))
            assert plain.block_bits is None
            assert torch.equal(mask, plain.block_mask)
    # a view of more blocks than union_max_blocks runs the per-head kernel: no bits written
    c = cfg(td, retrieval_union=True, union_max_blocks=8, union_lists="fused")
    assert td.select_decode_blocks_triton(qi, ki, lens, **kw, config=c).block_bits is None


# ------------------------------------------------------------------------------ local heads


def local_case(lens, B=None, Hq=4, Hkv=2, D=32, L=320, S=4, W=48, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    B = len(lens)
    q = torch.randn(B, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    return (q, k, v, lens) + ring_from_full(k, v, lens, S, W)


def local_dense_masked(q, k, v, lens, window, sinks, kv_of):
    """Independent local reference: dense attention over the full cache with a position mask."""
    B, H, D = q.shape
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b, n in enumerate(lens.tolist()):
        idx = sorted(set(range(min(sinks, n))) | set(range(max(0, n - window), n)))
        for h in range(H):
            kk, vv = k[b, kv_of[h], idx].double(), v[b, kv_of[h], idx].double()
            out[b, h] = torch.softmax(kk @ q[b, h].double() / D ** 0.5, 0) @ vv
    return out


# lens: ring wrapped several times, not a multiple of anything, < window, < sinks, 1 token
LOCAL_LENS = [320, 101, 30, 3, 1]


def test_local_reference_equals_masked_dense():
    q, k, v, lens, sk, sv, rk, rv = local_case(LOCAL_LENS)
    got = sd.local_decode_reference(q, sk, sv, rk, rv, lens, window=40, sinks=4)
    want = local_dense_masked(q, k, v, lens, 40, 4, [0, 0, 1, 1])
    assert rel_err(got, want) < 1e-6


@pytest.mark.parametrize("fused,splits,window", [(True, 1, 40), (True, 3, 48), (False, 2, 40),
                                                 (True, 64, 7)])
@needs_triton
def test_local_matches_reference(td, fused, splits, window):
    q, k, v, lens, sk, sv, rk, rv = local_case(LOCAL_LENS, seed=splits)
    kw = dict(window=window, sinks=4)
    want = local_dense_masked(q, k, v, lens, window, 4, [0, 0, 1, 1])
    out = sd.local_decode(q, sk, sv, rk, rv, lens, impl="triton",
                          config=cfg(td, fused_reduction=fused, local_num_splits=splits), **kw)
    assert torch.isfinite(out).all() and rel_err(out, want) < 1e-5


@needs_triton
def test_local_irregular_groups_fp16_no_sinks(td):
    """kv_head_of_l not of the h // G form (per-query-head roles), fp16, sinks=0, GQA 3:1 + 1:1."""
    q, k, v, lens, sk, sv, rk, rv = local_case([200, 64, 9], Hq=4, S=0, dtype=torch.float16)
    kv_of = [1, 0, 1, 1]
    out = sd.local_decode(q, sk, sv, rk, rv, lens, window=48, sinks=0, kv_head_of_l=kv_of,
                          impl="triton", config=cfg(td, local_num_splits=2))
    want = local_dense_masked(q, k, v, lens, 48, 0, kv_of)
    assert out.dtype == torch.float16 and rel_err(out, want) < 2e-3


# -------------------------------------------------------------------------- whole layer


def layer_case(lens, roles, W=48, S=4, L=320, seed=0, r=16):
    """Per-query-head roles on Hq=8, Hkv=2 (a KV head may serve both roles)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    B, Hq, Hkv, D = len(lens), 8, 2, 32
    q = torch.randn(B, Hq, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, D, generator=g)
    sk, sv, rk, rv = ring_from_full(k, v, lens, S, W)
    retr = [h for h in range(Hq) if roles[h]]
    local = [h for h in range(Hq) if not roles[h]]
    qi = torch.randn(B, len(retr), r, generator=g)
    ki = poison_beyond(torch.randn(B, len(retr), L, r, generator=g), lens)
    return dict(q=q, cache_lens=lens, is_retrieval=roles, sink_k=sk, sink_v=sv, ring_k=rk,
                ring_v=rv, kv_head_of_l=[h // 4 for h in local],
                k_cache=poison_beyond(k, lens), v_cache=poison_beyond(v, lens),
                kv_head_of_r=[h // 4 for h in retr], qi=qi, ki_cache=ki), (k, v)


@needs_triton
@pytest.mark.parametrize("fused,union", [(True, False), (False, False), (True, True),
                                         (False, True)])
def test_rtpurbo_matches_reference(td, fused, union):
    """Whole layer vs reference; union: the GQA-union retrieval kernel (retrieval heads 1 | 6, 7
    on KV heads 0 | 1: groups of 1 and 2), which must also equal the per-head kernel's output."""
    roles = [False, True, False, False, False, False, True, True]
    args, _ = layer_case([320, 187, 25], roles)
    kw = dict(top_p=0.9, block_size=BS, window=40, sinks=4)
    ref = sd.rtpurbo_decode_reference(**args, **kw)
    c = dict(fused_reduction=fused, fused_select=not fused, num_splits=3, local_num_splits=2,
             union_num_splits=3)
    got = sd.rtpurbo_decode(**args, **kw, impl="triton", config=cfg(td, retrieval_union=union, **c))
    if union:
        per_head = sd.rtpurbo_decode(**args, **kw, impl="triton",
                                     config=cfg(td, retrieval_union=False, **c))
        assert torch.equal(got.block_mask, per_head.block_mask)
        assert rel_err(got.out, per_head.out) < 1e-5
    mass = sd.indexer_block_mass_reference(args["qi"], args["ki_cache"], args["cache_lens"],
                                           block_size=BS)
    assert_valid_top_p(got.block_mask, ref.block_mask, mass, args["cache_lens"], 0.9, BS, 40, 4)
    if torch.equal(got.block_mask, ref.block_mask):
        assert rel_err(got.out, ref.out) < 1e-5
    # the same output from the per-role references, given the kernel's own mask
    retr = [1, 6, 7]
    want = sd.retrieval_decode_reference(args["q"][:, retr], args["k_cache"], args["v_cache"],
                                         args["kv_head_of_r"], got.block_mask, args["cache_lens"],
                                         window=40, sinks=4, block_size=BS)
    assert rel_err(got.out[:, retr], want) < 1e-5
    local = [0, 2, 3, 4, 5]
    assert rel_err(got.out[:, local], ref.out[:, local]) < 1e-5


@needs_triton
def test_rtpurbo_union_fused_lists(td, fused_select=False):
    """Whole layer with union_lists="fused" (select kernel writes the mask bits, the union kernel
    builds its own lists) == the same layer with the _union_kernel lists, bit for bit."""
    roles = [False, True, False, False, False, False, True, True]
    args, _ = layer_case([320, 187, 25], roles)
    kw = dict(top_p=0.9, block_size=BS, window=40, sinks=4)
    c = dict(fused_select=fused_select, num_splits=3, local_num_splits=2, union_num_splits=3,
             retrieval_union=True, union_max_blocks=0)
    a = sd.rtpurbo_decode(**args, **kw, impl="triton", config=cfg(td, union_lists="kernel", **c))
    b = sd.rtpurbo_decode(**args, **kw, impl="triton", config=cfg(td, union_lists="fused", **c))
    assert torch.equal(a.block_mask, b.block_mask) and torch.equal(a.out, b.out)


@needs_triton
@pytest.mark.parametrize("union", [False, True])
def test_rtpurbo_full_top_p_and_window_is_dense(td, union):
    """top_p = 1 and window >= cache_len: every head attends to everything = dense decode."""
    roles = [True, False, False, True, False, False, False, True]
    args, (k, v) = layer_case([60, 33], roles, W=64, L=64)
    dense = sd.dense_decode_reference(args["q"].double(), k.double(), v.double(),
                                      args["cache_lens"])
    kw = dict(top_p=1.0, block_size=BS, window=64, sinks=4)
    c = cfg(td, num_splits=2, union_num_splits=2, retrieval_union=union)
    got = sd.rtpurbo_decode(**args, **kw, impl="triton", config=c)
    assert rel_err(got.out, dense) < 1e-5
    assert rel_err(sd.rtpurbo_decode_reference(**args, **kw).out, dense) < 1e-6
    # and with the window too short, top_p = 1 on retrieval heads still makes them dense
    kw["window"] = 8
    got = sd.rtpurbo_decode(**args, **kw, impl="triton", config=c)
    retr = [0, 3, 7]
    assert rel_err(got.out[:, retr], dense[:, retr]) < 1e-5


def selected_tokens_attention(q, k, v, block_mask, lens, kv_of, block_size):
    """Independent retrieval output: dense softmax over every token t < L of the mask's blocks."""
    B, H, D = q.shape
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b, L in enumerate(lens.tolist()):
        for h in range(H):
            idx = [t for t in range(L) if block_mask[b, h, t // block_size]]
            kk, vv = k[b, kv_of[h], idx].double(), v[b, kv_of[h], idx].double()
            out[b, h] = torch.softmax(kk @ q[b, h].double() / D ** 0.5, 0) @ vv
    return out


@needs_triton
@pytest.mark.parametrize("window,sinks", [(40, 4), (24, 20), (400, 4)])
def test_rtpurbo_layer_is_the_prefill_rule(td, window, sinks):
    """Whole layer, GQA (3 retrieval query heads on 2 KV heads), batch 3 of different lengths:
    the kernel's mask is the written-out prefill rule and its retrieval output is exact attention
    over every token of the selected blocks (forced blocks at block granularity)."""
    roles = [False, True, False, False, False, False, True, True]
    args, (k, v) = layer_case([320, 187, 25], roles, W=400, S=max(sinks, 4), seed=window + sinks)
    kw = dict(top_p=0.8, block_size=BS, window=window, sinks=sinks)
    got = sd.rtpurbo_decode(**args, **kw, impl="triton", config=cfg(td, num_splits=3))
    lens = args["cache_lens"]
    mass = block_mass_brute(args["qi"], args["ki_cache"], lens, BS)
    want_mask = prefill_rule_brute(mass, lens, 0.8, BS, window, sinks)
    assert_valid_top_p(got.block_mask, want_mask, mass, lens, 0.8, BS, window, sinks)
    retr = [1, 6, 7]
    want = selected_tokens_attention(args["q"][:, retr], k, v, got.block_mask, lens,
                                     args["kv_head_of_r"], BS)
    assert rel_err(got.out[:, retr], want) < 1e-5


@needs_triton
def test_rtpurbo_p_to_zero_keeps_exactly_the_forced_blocks(td):
    roles = [True] * 4 + [False] * 4
    args, (k, v) = layer_case([300, 150], roles, seed=4)
    kw = dict(block_size=BS, window=24, sinks=4)
    lens = args["cache_lens"]
    forced, _ = sd.decode_forced_blocks(lens, 20, **kw)
    for p in (0.0, 1e-7):  # the forced mass alone exceeds 1e-7
        got = sd.rtpurbo_decode(**args, top_p=p, **kw, impl="triton", config=cfg(td))
        assert torch.equal(got.block_mask, forced[:, None].expand(2, 4, 20))
    for b, n in enumerate(lens.tolist()):
        # sink block 0 and the blocks of tokens n-24..n-1, every token of them
        idx = sorted(set(range(BS)) | set(range((n - 24) // BS * BS, n)))
        for h in range(4):
            kk, vv = k[b, h // 4, idx], v[b, h // 4, idx]
            want = torch.softmax(kk @ args["q"][b, h] / 32 ** 0.5, 0) @ vv
            assert torch.allclose(got.out[b, h], want, atol=1e-5)


@needs_triton
def test_layer_without_retrieval_heads(td):
    args, _ = layer_case([100, 7], [False] * 8)
    for key in ("k_cache", "v_cache", "qi", "ki_cache", "kv_head_of_r"):
        args[key] = None
    kw = dict(top_p=0.9, block_size=BS, window=40, sinks=4)
    got = sd.rtpurbo_decode(**args, **kw, impl="triton", config=cfg(td))
    ref = sd.rtpurbo_decode_reference(**args, **kw)
    assert got.block_mask is None and rel_err(got.out, ref.out) < 1e-5


# ---------------------------------------------------------------------- errors and fallback


def test_errors_name_the_bad_argument():
    q, k, v, mask, lens = retrieval_case()
    kw = dict(window=40, sinks=4, block_size=BS)
    with pytest.raises(ValueError, match="block_mask"):
        sd.retrieval_decode_reference(q, k, v, [0, 1, 1, 0], mask[:, :, :-1], lens, **kw)
    with pytest.raises(ValueError, match="kv_head_of_r"):
        sd.retrieval_decode_reference(q, k, v, [0, 1, 2, 0], mask, lens, **kw)
    with pytest.raises(ValueError, match="cache_lens"):
        sd.retrieval_decode_reference(q, k, v, [0, 1, 1, 0], mask, lens[:2], **kw)
    with pytest.raises(ValueError, match="v_cache"):
        sd.retrieval_decode_reference(q, k, v[:, :, :10], [0, 1, 1, 0], mask, lens, **kw)
    ql, _, _, lens_l, sk, sv, rk, rv = local_case([10, 20])
    with pytest.raises(ValueError, match="ring_k"):
        sd.local_decode_reference(ql, sk, sv, rk, rv, lens_l, window=100, sinks=4)
    with pytest.raises(ValueError, match="sink_k"):
        sd.local_decode_reference(ql, sk, sv, rk, rv, lens_l, window=40, sinks=8)
    qi, ki = indexer_inputs(2, 2, 40)
    with pytest.raises(ValueError, match="ki_cache"):
        sd.select_decode_blocks_reference(qi, ki[:, :1], lens_l, top_p=0.9, block_size=BS,
                                          window=8, sinks=4)
    with pytest.raises(ValueError, match="impl"):
        sd.select_decode_blocks(qi, ki, lens_l, top_p=0.9, block_size=BS, window=8, sinks=4,
                                impl="cuda")


def test_fallback_is_logged_not_silent(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(sd, "_warned", set())
    qi, ki = indexer_inputs(2, 2, 40)
    lens = torch.tensor([40, 23])
    kw = dict(top_p=0.9, block_size=BS, window=8, sinks=4)
    with caplog.at_level(logging.WARNING, logger="kernels.sparse_decode"):
        got = sd.select_decode_blocks(qi, ki, lens, **kw)
    assert "TRITON_INTERPRET" in caplog.text and "reference" in caplog.text
    assert torch.equal(got, sd.select_decode_blocks_reference(qi, ki, lens, **kw))
    with pytest.raises(RuntimeError, match="Triton cannot run"):
        sd.select_decode_blocks(qi, ki, lens, impl="triton", **kw)


@needs_triton
def test_bench_layer_builder_and_checks(td, monkeypatch):
    """scripts/bench_decode.py at toy size: inputs, kernel-vs-reference checks, byte counts."""
    from scripts import bench_decode as bd

    for name, val in dict(WINDOW=48, BLOCK=16, HQ=8, HKV=4, D=32).items():
        monkeypatch.setattr(bd, name, val)
    configs = {"fused": cfg(td, num_splits=3, local_num_splits=2),
               "sep": cfg(td, fused_reduction=False, fused_select=False, search_arity=1,
                          num_splits=2),
               "union": cfg(td, retrieval_union=True, union_num_splits=3)}
    args = bd.make_layer(700, 1, 0.2, torch.float16, torch.device("cpu"))
    res = bd.check_layer(args, configs)
    assert res["retrieval_rel_err"] < 2e-3 and res["local_rel_err"] < 2e-3
    assert res["retrieval_rel_err_union"] < 2e-3
    mask = sd.rtpurbo_decode(**args, impl="triton", config=configs["fused"]).block_mask
    nbytes = bd.bytes_rtpurbo(args, mask, 2)
    # chosen free blocks / free blocks: most of the hot 20% (the forced blocks hold some hot mass)
    assert 0.1 < nbytes["density"] < 0.25
    assert nbytes["local"] == 3 * (4 + 48) * 2 * 32 * 2
    assert nbytes["indexer"] == 2 * 700 * 16 * 2
    # union bytes: every valid token of the union of the 2 heads' blocks (+ forced), read once
    lens = args["cache_lens"]
    idx, cnt = td.union_visit_lists(mask, lens, args["kv_head_of_r"], window=48, sinks=4,
                                    block_size=16)
    blocks = idx[0, :int(cnt[0])].long()
    assert nbytes["union_blocks"] == len(blocks) and nbytes["per_head_blocks"] == int(mask.sum())
    n_tok = int((700 - blocks * 16).clamp(max=16).sum())
    assert nbytes["retrieval_union"] == n_tok * 2 * 32 * 2
    assert nbytes["total_union"] == nbytes["indexer"] + nbytes["retrieval_union"] + nbytes["local"]
    assert nbytes["retrieval_union"] <= nbytes["retrieval"] <= 2 * nbytes["retrieval_union"]
    # head overlap: a group's heads share round(x * n_hot) hot blocks; x = 0 is the old builder
    nb = -(-700 // 16)
    n_hot = round(0.2 * nb)
    for x in (0.0, 0.5, 1.0):
        a = bd.make_layer(700, 1, 0.2, torch.float32, torch.device("cpu"), head_overlap=x)
        s = (a["ki_cache"][0] @ a["qi"][0, :, :, None])[..., 0]  # [2, 700]; hot: +4.9 on average
        hot = torch.nn.functional.pad(s, (0, nb * 16 - 700)).view(2, nb, 16).sum(-1) > 2.4 * 16
        assert (hot.sum(-1) == n_hot).all()
        assert int((hot[0] & hot[1]).sum()) >= round(x * n_hot)
        if x == 1.0:
            assert torch.equal(hot[0], hot[1])
    cpu = torch.device("cpu")
    same = bd.make_layer(700, 1, 0.2, torch.float32, cpu)
    again = bd.make_layer(700, 1, 0.2, torch.float32, cpu, head_overlap=0.0)
    assert torch.equal(same["ki_cache"], again["ki_cache"])
    kv = bd.kv_bytes_per_token(1, 2)
    assert kv["dense_per_token"] == 4 * 2 * 32 * 2
    assert kv["rtpurbo_per_token"] == 2 * 32 * 2 + 2 * 16 * 2  # 1 KV head + 2 heads' indexer keys


@needs_triton
def test_bench_dry_run_union_overlap_fp8(td, monkeypatch, tmp_path, capsys):
    """scripts/bench_decode.run_decode_bench end to end on the CPU (device="cpu": one wall-clock
    call per "timing") at toy size: the union variants, --head-overlap, --indexer-fp8 and the
    table run, every check passes, the union rows count the union's bytes."""
    import json

    from scripts import bench_decode as bd

    for name, val in dict(WINDOW=48, BLOCK=16, HQ=8, HKV=4, D=32).items():
        monkeypatch.setattr(bd, name, val)
    ns = __import__("argparse").Namespace(
        seq_lens=[400], densities=[0.2], modes=["graph"], dtype="fp16", device="cpu",
        decode_out=str(tmp_path / "d.json"), head_overlap=[0.5], layers=["1of4"],
        layer_configs=["union", "per_head", "union_fastlists"], parts=["retrieval"],
        indexer_fp8=True, retrieval_variants=["ns_auto", "union_ns_auto", "union_ns64",
                                              "union_fastlists_ns_auto"])
    rows = bd.run_decode_bench(ns)
    bd.print_table(rows, ns.head_overlap)
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["meta"]["errors"] == [] and res["meta"]["head_overlaps"] == [0.5]
    assert not any("failed" in str(v) for v in res["meta"]["checks"].values())
    by = {r["name"]: r for r in rows}
    layer = by["rtp_1of4_d0.2_ov0.5_union"]
    assert layer["retrieval_kernel"] == "union" and layer["head_overlap"] == 0.5
    assert layer["bytes"] == layer["bytes_detail"]["total_union"]
    det = layer["bytes_detail"]
    per_head = by["rtp_1of4_d0.2_ov0.5_per_head"]
    assert per_head["retrieval_kernel"] == "per_head" and per_head["bytes"] == det["total"]
    # the default row is labelled (and its bytes counted) by the kernel the default rule picks at L 400
    default = by["rtp_1of4_d0.2_ov0.5_default"]
    want = "union" if td.uses_union(td.DEFAULT_CONFIG, -(-400 // 16)) else "per_head"
    assert default["retrieval_kernel"] == want
    assert default["bytes"] == (det["total_union"] if want == "union" else det["total"])
    part = by["part_retrieval_attn_d0.2_ov0.5_union_ns_auto"]
    assert part["bytes"] == det["retrieval_union"] and part["block_reads"] == det["union_blocks"]
    assert by["part_retrieval_attn_d0.2_ov0.5_ns_auto"]["bytes"] == det["retrieval"]
    # union lists from the select kernel's bits: same bytes, both list builds timed, lists equal
    fl = by["part_retrieval_attn_d0.2_ov0.5_union_fastlists_ns_auto"]
    assert fl["bytes"] == det["retrieval_union"] and fl["retrieval_kernel"] == "union"
    assert by["rtp_1of4_d0.2_ov0.5_union_fastlists"]["bytes"] == det["total_union"]
    assert "part_union_lists_d0.2_ov0.5" in by and "part_union_lists_fused_d0.2_ov0.5" in by
    checks = res["meta"]["checks"]
    assert checks["rtp_1of4_d0.2_ov0.5_L400_union_lists_fused_vs_kernel"] == "equal"
    assert checks["rtp_1of4_d0.2_ov0.5_L400_select_bits"] == "ok"
    fp8 = res["meta"]["checks"]["rtp_1of4_d0.2_ov0.5_L400_indexer_fp8"]
    assert fp8["kept_mass_fp8_min"] >= 0.9 - 1e-4 and "part_score_d0.2_ov0.5_fp8" in by
    assert "head_overlap = 0.5" in capsys.readouterr().out


@needs_triton
def test_gpu_check_script_decode_section(td):
    """scripts/gpu_check_kernels.py's decode checks (Triton vs reference; the GPU run's PASS/FAIL)
    at CPU size under the interpreter: every check passes."""
    from scripts import gpu_check_kernels as gck

    ck = gck.Checker()
    gck.check_decode(ck, torch.device("cpu"))
    assert len(ck.rows) > 20 and all(r["ok"] for r in ck.rows), [r for r in ck.rows if not r["ok"]]
    assert all(" triton " in r["check"] for r in ck.rows)


def test_decode_rows_topk_baseline_and_density():
    """models/rtpurbo/decode_rows.py: the top-k baseline = forced blocks + the top_k free blocks;
    the emulation's density = chosen free blocks / free blocks over rows and batch."""
    from models.rtpurbo.decode_rows import decode_rows_attention, topk_blocks

    lens = torch.tensor(LENS)
    qi, ki = indexer_inputs(3, 2, 300, seed=9)
    kw = dict(block_size=BS, window=40, sinks=20)
    mask = topk_blocks(qi, poison_beyond(ki, lens), lens, top_k=3, **kw)
    mass = block_mass_brute(qi, ki, lens, BS)
    forced, valid = sd.decode_forced_blocks(lens, mask.shape[-1], **kw)
    for b in range(3):
        free = (valid & ~forced)[b]
        for h in range(2):
            want = forced[b].clone()
            order = sorted(free.nonzero().flatten().tolist(), key=lambda j: (-float(mass[b, h, j]), j))
            want[order[:3]] = True
            assert torch.equal(mask[b, h], want)
    g = torch.Generator().manual_seed(2)
    T, Hkv, D = 150, 2, 16
    q_r = torch.randn(2, 2, T, D, generator=g)
    k, v = torch.randn(2, Hkv, T, D, generator=g), torch.randn(2, Hkv, T, D, generator=g)
    qi_all, ki_all = torch.randn(2, 2, T, 16, generator=g), torch.randn(2, 2, T, 16, generator=g)
    for p in (1.0, 0.6):
        out, dens = decode_rows_attention(q_r, k, v, qi_all, ki_all, [0, 1], 140, top_p=p, **kw)
        chosen, n_free = torch.zeros(2, dtype=torch.float64), 0
        for m in range(140, T):
            lens_m = torch.full((2,), m + 1)
            sel = sd.select_decode_blocks_reference(qi_all[:, :, m], ki_all, lens_m, top_p=p, **kw)
            c, f = sd.decode_block_density(sel, lens_m, **kw)
            chosen += c.sum(0).double()
            n_free += int(f.sum())
            want = sd.retrieval_decode_reference(q_r[:, :, m], k, v, [0, 1], sel, lens_m, **kw)
            assert torch.allclose(out[:, :, m - 140], want)
        assert torch.allclose(dens.double(), chosen / n_free)
        assert (dens == 1.0).all() if p == 1.0 else ((dens > 0) & (dens < 1)).all()


def test_union_rule_by_view_length():
    """The GQA-union kernel runs for views of at most union_max_blocks blocks (0: any), per-head beyond."""
    from kernels import triton_decode as tdm

    C = tdm.TritonDecodeConfig
    assert tdm.uses_union(C(retrieval_union=True, union_max_blocks=4096), 4096)
    assert not tdm.uses_union(C(retrieval_union=True, union_max_blocks=4096), 4097)
    assert tdm.uses_union(C(retrieval_union=True, union_max_blocks=0), 1 << 20)
    assert not tdm.uses_union(C(retrieval_union=False, union_max_blocks=0), 16)
    # the select kernel writes mask bits only for the union kernel's fused lists
    assert tdm.uses_mask_bits(C(retrieval_union=True, union_max_blocks=0, union_lists="fused"), 16)
    assert not tdm.uses_mask_bits(C(retrieval_union=True, union_max_blocks=8, union_lists="fused"), 16)
    assert not tdm.uses_mask_bits(C(retrieval_union=True, union_max_blocks=0, union_lists="kernel"), 16)
    assert C().union_lists == tdm.UNION_LISTS_DEFAULT
    with pytest.raises(ValueError, match="union_lists"):
        C(union_lists="parallel")
