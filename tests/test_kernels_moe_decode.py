"""Fused decode kernels (kernels/moe_decode.py, kernels/fused_decode.py) in Triton's CPU interpreter vs their
pure-torch references (random inputs, never zeros; outputs poisoned with NaN before each call), and the
engine's fused decode step vs its unfused (model modules) static step.

Triton's interpreter must be on (TRITON_INTERPRET=1) before triton is first imported, and other test modules
may import triton earlier in the same pytest process: unless this process already interprets, the kernel
tests are skipped here and test_in_interpreter_subprocess reruns this file in a fresh interpreter with
TRITON_INTERPRET=1 set from the start (as tests/test_kernels_decode.py does).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.triton_interp import interpreter_ready, run_module_in_interpreter

ROOT = Path(__file__).resolve().parents[1]
CHILD_FLAG = "MOE_DECODE_TEST_CHILD"

pytestmark = pytest.mark.usefixtures("one_thread")


INTERPRETER_READY = interpreter_ready()
needs_triton = pytest.mark.skipif(not INTERPRETER_READY,
                                  reason="runs in the TRITON_INTERPRET=1 subprocess test of this module")


@pytest.mark.skipif(INTERPRETER_READY or os.environ.get(CHILD_FLAG) == "1",
                    reason="the kernel tests already run in this process (or this is the child)")
def test_in_interpreter_subprocess():
    pytest.importorskip("triton")
    run_module_in_interpreter(__file__, CHILD_FLAG)



def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def _tol(dt):  # vs the same-dtype reference / vs the float64 reference
    return (1e-5, 1e-5) if dt == torch.float32 else (1e-2, 2e-2)


# ------------------------------------------------------------------------------------------- MoE decode
# (N tokens, top-k, experts E, dim D, hidden H): non-power-of-two sizes; E small so tokens share experts
MOE_CASES = [(1, 8, 16, 40, 48), (3, 2, 5, 64, 24), (3, 8, 8, 40, 40), (16, 2, 3, 24, 20)]


@needs_triton
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_decode_matches_reference(dt, case):
    from kernels import moe_decode as md

    N, k, E, D, H = case
    g = torch.Generator().manual_seed(hash(case) % 1000)
    x = torch.randn(N, D, generator=g).to(dt)
    # expert tensors as strided views of larger ones (expert stride != H * D): weights are read in place
    w1 = (torch.randn(E + 1, H + 3, D, generator=g) / D**0.5).to(dt)[1:, :H]
    w3 = (torch.randn(E, H, D, generator=g) / D**0.5).to(dt)
    w2 = (torch.randn(E, D, H + 5, generator=g) / H**0.5).to(dt)[:, :, :H]
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)]).to(torch.int32)
    if N > 1:
        assert len(set(ids.flatten().tolist())) < N * k  # some expert serves several tokens
    wts = (torch.rand(N, k, generator=g) + 0.1).to(dt)
    res = torch.randn(N, D, generator=g).to(dt)
    nw = (1 + 0.2 * torch.randn(D, generator=g)).to(dt)
    small = md.MoEDecodeConfig(block_h=16, block_k=16, block_d=4, tile_down=4 * 4 * 16)  # many tiles, masked
    t_ref, t_64 = _tol(dt)
    # the default tiles without norm / residual; with them, small tiles (many programs, partial tiles) where
    # the interpreter can afford them
    for kw, cfgs in (({}, [None]), (dict(norm_weight=nw, residual=res), [small] if N * k <= 8 else [None])):
        ref = md.moe_decode_reference(x, ids, wts, w1, w3, w2, **kw)
        ref64 = md.moe_decode_reference(x.double(), ids.long(), wts.double(), w1.double(), w3.double(), w2.double(),
                                        **{n: v.double() for n, v in kw.items()})
        for cfg in cfgs:
            out = nan_like((N, D), dt)
            got = md.moe_decode(x, ids.long() if cfg is small else ids, wts, w1, w3, w2, out=out, config=cfg, **kw)
            assert got is out and torch.isfinite(got).all()
            assert rel(got, ref) < t_ref and rel(got, ref64) < t_64, (kw.keys(), cfg, rel(got, ref), rel(got, ref64))


@needs_triton
def test_moe_decode_as_dense_ffn_and_bad_args():
    """E = 1, k = 1 with weight 1: the engine's dense SwiGLU FFN (w1.weight[None], ...)."""
    from kernels import moe_decode as md
    from models.qwen3.model import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(48, 72)
    x = torch.randn(3, 48)
    ones, zeros = torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.int32)
    got = md.moe_decode(x, zeros, ones, ff.w1.weight[None], ff.w3.weight[None], ff.w2.weight[None], residual=x,
                        out=nan_like((3, 48), torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(got, x + ff(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="w2 must be"):
        md.moe_decode(x, zeros, ones, ff.w1.weight[None], ff.w3.weight[None], ff.w1.weight[None])
    with pytest.raises(ValueError, match="topk_ids"):
        md.moe_decode(x, zeros[:2], ones, ff.w1.weight[None], ff.w3.weight[None], ff.w2.weight[None])


# ------------------------------------------------------------------------------------------ norm_linear
@needs_triton
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 200, 96), (3, 40, 130), (16, 33, 48), (20, 24, 40)])
def test_norm_linear_matches_reference(dt, M, N, K):
    from kernels import fused_decode as fd

    g = torch.Generator().manual_seed(M * 1000 + N)
    x = torch.randn(M, K, generator=g).to(dt)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dt)
    b = torch.randn(N, generator=g).to(dt)
    r = torch.randn(M, N, generator=g).to(dt)
    nw = (1 + 0.2 * torch.randn(K, generator=g)).to(dt)
    t_ref, _ = _tol(dt)
    small = (min(16, triton_pow2(M)), 8, 32)  # several programs, partial N and K tiles
    for kw, tl in ((dict(norm_weight=nw), [None, small]), (dict(bias=b, residual=r), [small]),
                   (dict(norm_weight=nw, bias=b, residual=r), [None])):
        ref = fd.norm_linear_reference(x, W, eps=1e-6, **kw)
        for tiles in tl:
            out = nan_like((M, N), dt)
            got = fd.norm_linear(x, W, eps=1e-6, out=out, tiles=tiles, **kw)
            assert torch.isfinite(got).all() and rel(got, ref) < t_ref, (kw.keys(), tiles, rel(got, ref))


def triton_pow2(n):
    import triton

    return triton.next_power_of_2(n)


# ----------------------------------------------------------------------------------------- qk_norm_rope
@needs_triton
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_and_cache_writes(dt):
    from kernels import fused_decode as fd
    from models.qwen3.rope import rope_cos_sin

    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, D, L, W, S, sinks = 3, 8, 4, 32, 16, 4, 3, 2
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, generator=g).to(dt)
    pos = torch.tensor([1, 9, 6])  # a sink position, ring wrap-around
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = (t[:, 0] for t in rope_cos_sin(pos[:, None], inv, 1.0, dt))
    qn, kn = (1 + 0.2 * torch.randn(D, generator=g)).to(dt), (1 + 0.2 * torch.randn(D, generator=g)).to(dt)
    full = torch.tensor([1, -1, 0, -1], dtype=torch.int32)  # KV heads 0 and 2 full, 1 and 3 on sinks + ring
    ring = torch.tensor([-1, 0, -1, 1], dtype=torch.int32)
    shapes = [(2, L), (2, L), (2, W), (2, W), (2, S), (2, S)]
    init = [torch.randn(B, n, ln, D, generator=g).to(dt) for n, ln in shapes]
    kw = dict(n_heads=Hq, n_kv_heads=Hkv, head_dim=D, eps=1e-6, cos=cos, sin=sin, pos=pos, full_slot=full,
              ring_slot=ring, sinks=sinks, want_pre=True, want_kv=True)
    names = ("k_cache", "v_cache", "ring_k", "ring_v", "sink_k", "sink_v")
    for norm in (True, False):
        nkw = dict(q_norm_weight=qn if norm else None, k_norm_weight=kn if norm else None)
        cr = [t.clone() for t in init]
        ref = fd.qk_norm_rope_reference(qkv, **nkw, **kw, **dict(zip(names, cr)))
        # auto (interpreter: one program per token), one head per program (the GPU's), a partial head block
        for hb in ((None, 1) if norm else (8,)):
            cg = [t.clone() for t in init]
            got = fd.qk_norm_rope(qkv, **nkw, **kw, **dict(zip(names, cg)), heads_per_program=hb)
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
            for a, b in zip(cg, cr):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not torch.equal(cr[4], init[4])  # the sink of position 1 was written


# ------------------------------------------------------------------------------------------ router_topk
@needs_triton
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_router_topk(dt):
    from kernels import fused_decode as fd

    g = torch.Generator().manual_seed(4)
    for N, E, k, norm in ((1, 128, 8, True), (3, 10, 2, False), (16, 60, 8, True)):
        lg = torch.randn(N, E, generator=g).to(dt)
        w, ids = fd.router_topk(lg, k, norm)
        wr, idr = fd.router_topk_reference(lg, k, norm)
        torch.testing.assert_close(w.float(), wr.float(), atol=1e-6, rtol=1e-5)
        probs = torch.softmax(lg.float(), -1)
        if dt == torch.float32:
            assert torch.equal(ids, idr)
        # (bf16 logits tie: any order of equal probabilities is a valid top-k) the picked ids hold the top-k
        # probabilities, distinct
        torch.testing.assert_close(probs.gather(1, ids.long()), probs.gather(1, idr.long()), atol=0, rtol=0)
        assert all(len(set(r)) == k for r in ids.tolist())


# ---------------------------------------------------------------------------- the engine's fused step
@needs_triton
@pytest.mark.parametrize("kind", ["moe", "rtpurbo"])
def test_engine_fused_step_matches_unfused(kind):
    """The static step with the fused kernels (attention on the references: impl='torch') == the same step
    with the model's modules: greedy tokens and teacher-forced logits, batch 2 of prompt lengths 9 and 23.
    moe: layer 0 a dense FFN (1-expert path), layers 1-3 MoE top-2 of 8; rtpurbo: full, ring (wrapping) and
    sink KV heads, retrieval heads with their indexer keys."""
    sys.path.insert(0, str(ROOT / "tests"))
    from models.inference import InferenceEngine
    from models.qwen3 import build_model, get_flavor
    from test_inference import _teacher_forced, prompt, rtpurbo_copy

    torch.manual_seed(0)
    if kind == "moe":
        model = build_model(get_flavor("debug_moe")).eval()
    else:
        model = rtpurbo_copy(build_model(get_flavor("debug")).eval(), window=5, sinks=2, top_p=0.6, block_size=4)
    prompts = [prompt(9, 6), prompt(23, 7)]
    mk = lambda **kw: InferenceEngine(model, max_len=40, chunk_size=8, graph_min_bucket=16, impl="torch",  # noqa
                                      static_decode=True, **kw)
    fused = mk(fused_decode=True)
    assert fused.fused and fused.fused_status.startswith("fused Triton kernels")
    a, b = mk().generate(prompts, max_new_tokens=4), fused.generate(prompts, max_new_tokens=4)
    assert a.tokens == b.tokens
    if kind == "rtpurbo":
        assert b.mean_density == pytest.approx(a.mean_density, rel=1e-5)
    forced = [[a.tokens[0][i], a.tokens[1][i]] for i in range(3)]
    la, lb = _teacher_forced(mk(), prompts, forced), _teacher_forced(mk(fused_decode=True), prompts, forced)
    torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
