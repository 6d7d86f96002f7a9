"""kernels/window_sdpa.py: window + sink attention from square causal SDPA calls merged by LSE,
checked on the CPU with the pure-torch causal primitive injected (the whole decomposition: chunk
folding, flipped previous-chunk squares, sink term, merge), the aten backends' first-use probe on
fake ops, kernels/masks.local_attention's dispatch, the Triton merge under the interpreter, and
the scripts/bench_attention.py integration."""

import json
import logging
import math
import textwrap

import pytest
import torch
from tests.triton_interp import run_script_in_interpreter

from kernels import masks
from kernels import window_sdpa as ws
from kernels.masks import local_attention, local_attention_reference, local_mask_dense
from kernels.window_sdpa import (
    WindowSDPAUnavailable,
    causal_attention_with_lse_reference,
    plan_head_calls,
    window_attention_sdpa,
    window_sdpa_unavailable_reason,
)

REF = causal_attention_with_lse_reference
pytestmark = [pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"), pytest.mark.usefixtures("one_thread")]



def _qkv(B, Hq, Hkv, T, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _dense64(q, k, v, window, sinks, scale=None):
    """Independent float64 masked attention (masks.local_attention_reference computes in fp32)."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = local_mask_dense(T, window, sinks)[0]
    s = torch.einsum("bhmd,bhnd->bhmn", q.double(), k.double().repeat_interleave(G, 1)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v.double().repeat_interleave(G, 1)


# --------------------------------------------------------------------------- the algebra


@pytest.mark.parametrize("window", [16, 24])
@pytest.mark.parametrize("sinks", [0, 1, 4, 40])
def test_matches_reference_many_lengths(window, sinks):
    # T < window (one chunk), == window, multiples and non-multiples of the window, one token;
    # sinks 40 > window: sinks inside and outside the window; GQA 6/2, batch 2, float64
    for T in (1, 5, 15, 16, 17, 24, 25, 47, 48, 49, 72, 100):
        q, k, v = _qkv(2, 6, 2, T, 8, seed=T * 7 + window + sinks)
        out = window_attention_sdpa(q, k, v, window=window, sinks=sinks, backend=REF)
        assert out.dtype == torch.float64 and out.shape == q.shape
        torch.testing.assert_close(out, _dense64(q, k, v, window, sinks), atol=1e-11, rtol=1e-11)
        ref32 = local_attention_reference(q, k, v, window=window, sinks=sinks)
        torch.testing.assert_close(out, ref32, atol=2e-5, rtol=2e-5)


def test_equal_heads_float32_custom_scale_and_edge_windows():
    q, k, v = _qkv(2, 4, 4, 77, 16, seed=3, dtype=torch.float32)
    for window, sinks in ((16, 4), (1, 0), (1, 3), (2, 5), (77, 4), (200, 2), (10, 77), (10, 500)):
        out = window_attention_sdpa(q, k, v, window=window, sinks=sinks, scale=0.37, backend=REF)
        ref = local_attention_reference(q, k, v, window=window, sinks=sinks, scale=0.37)
        torch.testing.assert_close(out, ref, atol=3e-6, rtol=3e-6, msg=f"window {window} sinks {sinks}")
    # the default scale is 1/sqrt(D)
    out = window_attention_sdpa(q, k, v, window=16, sinks=4, backend=REF)
    torch.testing.assert_close(out, local_attention_reference(q, k, v, window=16, sinks=4), atol=3e-6, rtol=3e-6)


def test_non_contiguous_inputs_and_lse_with_trailing_one():
    q, k, v = _qkv(2, 6, 2, 53, 8, seed=5)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, D] memory, [B, H, T, D] view
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)

    def ref_4d(q_, k_, v_, scale):  # a backend returning lse [N, H, L, 1]
        o, lse = REF(q_, k_, v_, scale)
        return o, lse[..., None]

    out = window_attention_sdpa(qt, kt, v, window=16, sinks=3, backend=ref_4d)
    torch.testing.assert_close(out, _dense64(q, k, v, 16, 3), atol=1e-11, rtol=1e-11)


def test_calls_and_shapes_seen_by_the_backend():
    # T = 40, window 16: 3 chunks (tail padded to 48); diagonal [B*3, H, 16, D], previous [B*2, H, 16, D];
    # T <= window: one causal call on the unpadded length
    seen = []

    def spy(q_, k_, v_, scale):
        seen.append((tuple(q_.shape), tuple(k_.shape)))
        return REF(q_, k_, v_, scale)

    q, k, v = _qkv(2, 6, 2, 40, 8, seed=9)
    window_attention_sdpa(q, k, v, window=16, sinks=2, backend=spy, heads_per_call=6)
    assert seen == [((6, 6, 16, 8), (6, 2, 16, 8)), ((4, 6, 16, 8), (4, 2, 16, 8))]
    seen.clear()
    window_attention_sdpa(q[:, :, :13], k[:, :, :13], v[:, :, :13], window=16, sinks=2, backend=spy)
    assert seen == [((2, 6, 13, 8), (2, 2, 13, 8))]


def test_heads_per_call_splits():
    q, k, v = _qkv(2, 6, 2, 50, 8, seed=11)
    want = _dense64(q, k, v, 16, 4)
    for hpc, plan in (
        (None, [(0, 6, 0, 2)]),
        (6, [(0, 6, 0, 2)]),
        (4, [(0, 3, 0, 1), (3, 6, 1, 2)]),  # rounded down to whole KV groups
        (3, [(0, 3, 0, 1), (3, 6, 1, 2)]),
        (2, [(0, 2, 0, 1), (2, 3, 0, 1), (3, 5, 1, 2), (5, 6, 1, 2)]),  # parts of one group
        (1, [(h, h + 1, h // 3, h // 3 + 1) for h in range(6)]),
    ):
        assert plan_head_calls(6, 2, hpc, 2 * 64 * 8) == plan, hpc
        seen = []

        def spy(q_, k_, v_, scale):
            seen.append((q_.shape[1], k_.shape[1]))
            return REF(q_, k_, v_, scale)

        out = window_attention_sdpa(q, k, v, window=16, sinks=4, backend=spy, heads_per_call=hpc)
        torch.testing.assert_close(out, want, atol=1e-11, rtol=1e-11)
        assert seen == [(h1 - h0, g1 - g0) for h0, h1, g0, g1 in plan for _ in range(2)]
    # automatic size: whole groups while a call's q fits MAX_CALL_ELEMENTS, else parts of a group
    assert plan_head_calls(24, 3, None, 2**20) == [(0, 24, 0, 3)]
    assert plan_head_calls(24, 3, None, 2**25) == [(0, 8, 0, 1), (8, 16, 1, 2), (16, 24, 2, 3)]
    assert plan_head_calls(24, 3, None, 2**27)[:2] == [(0, 2, 0, 1), (2, 4, 0, 1)]
    assert len(plan_head_calls(24, 3, None, 2**40)) == 24


def test_torch_merge_slabs(monkeypatch):
    # a slab of one chunk at a time gives the same result as one slab
    q, k, v = _qkv(1, 4, 2, 70, 8, seed=13)
    want = window_attention_sdpa(q, k, v, window=16, sinks=5, backend=REF)
    monkeypatch.setattr(ws, "MERGE_SLAB_ELEMENTS", 1)
    torch.testing.assert_close(window_attention_sdpa(q, k, v, window=16, sinks=5, backend=REF), want, atol=0, rtol=0)


def test_reference_primitive():
    q, k, v = _qkv(2, 4, 2, 9, 8, seed=17)
    o, lse = causal_attention_with_lse_reference(q, k, v, 0.5)
    G = 2
    s = torch.einsum("nhld,nhmd->nhlm", q, k.repeat_interleave(G, 1)) * 0.5
    s = s.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    torch.testing.assert_close(o, torch.softmax(s, -1) @ v.repeat_interleave(G, 1))
    assert lse.dtype == torch.float64
    o32, lse32 = causal_attention_with_lse_reference(q.float(), k.float(), v.float())
    assert o32.dtype == torch.float32 and lse32.dtype == torch.float32


def test_errors_name_the_argument():
    q, k, v = _qkv(1, 4, 2, 20, 8, seed=1)
    cases = [
        (dict(q=q[0]), "q must be a 4-D"),
        (dict(k=k[:, :, :10]), "k must be"),
        (dict(v=v[:, :1]), "v must have"),
        (dict(k=k[:, :1].expand(1, 3, 20, 8), v=v[:, :1].expand(1, 3, 20, 8)), "multiple of k/v heads"),
        (dict(k=k.float(), v=v.float()), "dtype"),
        (dict(window=0), "window"),
        (dict(window=2.5), "window"),
        (dict(sinks=-1), "sinks"),
        (dict(heads_per_call=0), "heads_per_call"),
        (dict(merge="fast"), "merge"),
        (dict(backend="mystery"), "backend"),
    ]
    for over, msg in cases:
        kw = dict(q=q, k=k, v=v, window=8, sinks=2, backend=REF)
        kw.update(over)
        with pytest.raises(ValueError, match=msg):
            window_attention_sdpa(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)
    qg = q.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="forward-only"):
        window_attention_sdpa(qg, k, v, window=8, sinks=2, backend=REF)
    with torch.no_grad():  # no gradient wanted: fine
        window_attention_sdpa(qg, k, v, window=8, sinks=2, backend=REF)


def test_string_backends_need_cuda():
    q, k, v = _qkv(1, 4, 2, 20, 8, seed=1, dtype=torch.float32)
    for backend in ("cudnn", "flash"):
        reason = window_sdpa_unavailable_reason(q, k, v, backend=backend)
        assert reason is not None and "CUDA" in reason
        with pytest.raises(WindowSDPAUnavailable, match="CUDA"):
            window_attention_sdpa(q, k, v, window=8, sinks=2, backend=backend)
    assert window_sdpa_unavailable_reason(q, k, v, backend=REF) is None


# -------------------------------------------------------- first-use probe on fake aten ops


def _fake_op(*, lse_form="NHL", base2=False, gqa=True, strided_ok=True, lse_bias=0.0, raises=False):
    def op(backend, q, k, v, scale):
        if raises:
            raise RuntimeError("no kernel for these inputs")
        if not gqa and k.shape[1] != q.shape[1]:
            raise RuntimeError("GQA is not supported")
        o, lse = REF(q, k, v, scale)
        if not strided_ok and not q.is_contiguous():
            o = o.flip(2)  # wrong results on strided inputs
        lse = lse + lse_bias
        if base2:
            lse = lse / math.log(2.0)
        N, H, L = lse.shape
        if lse_form == "NHL1":
            lse = lse[..., None]
        elif lse_form == "NLH":
            lse = lse.transpose(1, 2).contiguous()
        elif lse_form == "NHLpad":
            lse = torch.cat([lse, torch.full((N, H, 56), float("nan"))], -1)
        return o, lse

    return op


@pytest.mark.parametrize(
    "fake, want",
    [
        (dict(lse_form="NHL1", base2=True, gqa=False), dict(lse_layout="NHL1", gqa_native=False, contiguous_inputs=False, base2=True)),
        (dict(lse_form="NLH", strided_ok=False), dict(lse_layout="NLH", gqa_native=True, contiguous_inputs=True, base2=False)),
        (dict(lse_form="NHLpad"), dict(lse_layout="NHLpad", gqa_native=True, contiguous_inputs=False, base2=False)),
        (dict(lse_bias=1.0), None),
        (dict(raises=True), None),
    ],
)
def test_probe_detects_lse_layout_base_and_gqa(monkeypatch, fake, want):
    monkeypatch.setattr(ws, "_PROBES", {})
    monkeypatch.setattr(ws, "_raw_op", _fake_op(**fake))
    info = ws.backend_info("cudnn", "cpu", torch.float32, 16)
    assert ws.backend_info("cudnn", "cpu", torch.float32, 16) is info  # cached
    if want is None:
        assert not info.ok and "_scaled_dot_product_cudnn_attention" in info.reason
        assert ("matches no known layout" in info.reason) if "lse_bias" in fake else ("no kernel" in info.reason)
        return
    assert info.ok, info.reason
    assert info.lse_layout == want["lse_layout"]
    assert info.gqa_native == want["gqa_native"] and info.contiguous_inputs == want["contiguous_inputs"]
    assert math.isclose(info.lse_scale, math.log(2.0) if want["base2"] else 1.0)
    assert info.end_to_end_rel_err < 1e-5
    # the op wrapper built from the probe gives the right window attention
    q, k, v = _qkv(1, 6, 2, 45, 16, seed=21, dtype=torch.float32)
    out = window_attention_sdpa(q, k, v, window=16, sinks=3, backend=ws._make_op_fn("cudnn", info))
    torch.testing.assert_close(out, local_attention_reference(q, k, v, window=16, sinks=3), atol=3e-6, rtol=3e-6)


def test_probe_wrong_end_to_end_is_unavailable(monkeypatch):
    # an op that is right on the probe's causal square but wrong on the chunked calls
    good = _fake_op()

    def op(backend, q, k, v, scale):
        o, lse = good(backend, q, k, v, scale)
        return (o if q.shape[2] == 200 else o * 1.5), lse

    monkeypatch.setattr(ws, "_PROBES", {})
    monkeypatch.setattr(ws, "_raw_op", op)
    info = ws.backend_info("flash", "cpu", torch.float32, 16)
    assert not info.ok and "differs from the reference" in info.reason


# ------------------------------------------------------------- masks.local_attention dispatch


class _FakeCuda:
    """Stands for a CUDA tensor in local_prefill_impl (which reads is_cuda, dtype, requires_grad)."""

    def __init__(self, dtype=torch.bfloat16, requires_grad=False):
        self.is_cuda, self.dtype, self.requires_grad = True, dtype, requires_grad
        self.device = torch.device("cuda")


def test_local_prefill_impl_selection(monkeypatch):
    asked = []

    def reason(q, k, v, *, backend):
        asked.append(backend)
        return None

    monkeypatch.setattr(ws, "window_sdpa_unavailable_reason", reason)
    x = _FakeCuda()
    assert masks.LOCAL_PREFILL_IMPL == "cudnn_chunked"
    assert masks.local_prefill_impl(x, x, x) == ("cudnn_chunked", None)
    assert masks.local_prefill_impl(x, x, x, impl="flash_chunked") == ("flash_chunked", None)
    assert asked == ["cudnn", "flash"]
    assert masks.local_prefill_impl(x, x, x, impl="flex") == ("flex", None)
    monkeypatch.setattr(masks, "LOCAL_PREFILL_IMPL", "flex")
    assert masks.local_prefill_impl(x, x, x) == ("flex", None)
    monkeypatch.setattr(masks, "LOCAL_PREFILL_IMPL", "cudnn_chunked")
    for args, kw, word in (
        ((_FakeCuda(requires_grad=True), x, x), {}, "grad"),
        ((x, x, x), {"doc_ids": torch.zeros(1, 4)}, "doc_ids"),
        ((_FakeCuda(torch.float32), x, x), {}, "dtype"),
    ):
        impl, why = masks.local_prefill_impl(*args, **kw)
        assert impl == "flex" and word in why
    with torch.no_grad():  # grad mode off: requires_grad inputs are fine
        assert masks.local_prefill_impl(_FakeCuda(requires_grad=True), x, x)[0] == "cudnn_chunked"
    monkeypatch.setattr(ws, "window_sdpa_unavailable_reason", lambda q, k, v, *, backend: "op missing")
    assert masks.local_prefill_impl(x, x, x) == ("flex", "cudnn_chunked: op missing")
    q = torch.randn(1, 2, 8, 4)
    impl, why = masks.local_prefill_impl(q, q[:, :1], q[:, :1])
    assert impl == "flex" and "CUDA only" in why
    with pytest.raises(ValueError, match="impl"):
        masks.local_prefill_impl(x, x, x, impl="cudnn")


def test_local_attention_cpu_keeps_flex_and_explicit_impl_raises(monkeypatch):
    q, k, v = _qkv(1, 6, 2, 90, 16, seed=23, dtype=torch.float32)
    calls = []
    real = masks.flex_attention_call

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(masks, "flex_attention_call", spy)
    out = local_attention(q, k, v, window=40, sinks=4, block_size=32)
    torch.testing.assert_close(out, local_attention_reference(q, k, v, window=40, sinks=4), atol=2e-5, rtol=2e-5)
    assert calls  # FlexAttention ran, as before
    with pytest.raises(RuntimeError, match="impl='cudnn_chunked'.*CUDA only"):
        local_attention(q, k, v, window=40, sinks=4, impl="cudnn_chunked")


def test_local_attention_runs_the_chunked_path_when_selected(monkeypatch):
    q, k, v = _qkv(2, 6, 2, 90, 16, seed=29, dtype=torch.float32)
    monkeypatch.setattr(masks, "local_prefill_impl", lambda q_, k_, v_, *, doc_ids=None, impl=None: ("cudnn_chunked", None))
    monkeypatch.setattr(masks, "_CHUNKED_BACKENDS", {"cudnn_chunked": REF})
    monkeypatch.setattr(masks, "flex_attention_call", lambda *a, **kw: pytest.fail("flex ran"))
    out = local_attention(q, k, v, window=40, sinks=4, scale=0.3, heads_per_call=3)
    torch.testing.assert_close(out, local_attention_reference(q, k, v, window=40, sinks=4, scale=0.3), atol=3e-6, rtol=3e-6)


def test_fallback_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(masks, "_LOCAL_FALLBACK_LOGGED", set())
    with caplog.at_level(logging.DEBUG, logger="kernels.masks"):
        for _ in range(3):
            masks._log_local_fallback("cudnn_chunked: op missing", True)
        masks._log_local_fallback("cpu reason", False)
    recs = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "kernels.masks"]
    assert recs == [(logging.WARNING, "local_attention runs FlexAttention: cudnn_chunked: op missing"),
                    (logging.DEBUG, "local_attention runs FlexAttention: cpu reason")]


# ------------------------------------------------------------ Triton merge (interpreter)

_MERGE_SCRIPT = textwrap.dedent(
    """
    import torch
    from kernels import window_sdpa as ws
    assert type(ws._window_merge_kernel).__name__ == "InterpretedFunction", type(ws._window_merge_kernel)
    ref = ws.causal_attention_with_lse_reference
    g = torch.Generator().manual_seed(0)
    n = 0
    for (B, Hq, Hkv, T, D, W, S, dt, hpc) in [
        (2, 6, 2, 100, 24, 16, 4, torch.float32, 2),   # tail chunk, sinks, parts of a KV group
        (1, 4, 4, 48, 16, 16, 0, torch.float32, None),  # T multiple of the window, no sinks
        (1, 4, 2, 40, 16, 8, 30, torch.float32, None),  # sinks beyond the window and beyond T - window
        (1, 2, 1, 9, 16, 1, 2, torch.float32, None),    # window 1: no previous-chunk term
        (1, 4, 2, 77, 32, 16, 4, torch.bfloat16, None),
    ]:
        q = torch.randn(B, Hq, T, D, generator=g).to(dt)
        k = torch.randn(B, Hkv, T, D, generator=g).to(dt)
        v = torch.randn(B, Hkv, T, D, generator=g).to(dt)
        a = ws.window_attention_sdpa(q, k, v, window=W, sinks=S, backend=ref, merge="torch", heads_per_call=hpc)
        b = ws.window_attention_sdpa(q, k, v, window=W, sinks=S, backend=ref, merge="triton", heads_per_call=hpc)
        tol = 1e-5 if dt == torch.float32 else 1.6e-2
        err = (a.float() - b.float()).abs().max().item()
        assert err <= tol, (B, Hq, Hkv, T, W, S, dt, err)
        n += 1
    print("MERGE_OK", n)
    """
)


def test_triton_merge_interpreter():
    assert "MERGE_OK 5" in run_script_in_interpreter(_MERGE_SCRIPT)


# ------------------------------------------------------------- scripts/bench_attention.py


def test_bench_local_sweep_includes_chunked(monkeypatch, tmp_path):
    from scripts import bench_attention as bench

    monkeypatch.setitem(bench.LOCAL_CHUNKED_CANDIDATES, "cudnn_chunked", REF)  # the CPU stand-in for cuDNN
    assert "cudnn_chunked" in bench.DEFAULT_LOCAL_CONFIGS and "flash_chunked" in bench.DEFAULT_LOCAL_CONFIGS
    out = tmp_path / "b.json"
    rc = bench.main(["--device", "cpu", "--seq-lens", "256", "--only", "local", "--window", "64", "--hq", "4", "--hkv", "2",
                     "--head-dim", "16", "--check-local-t", "128", "--no-decode", "--out", str(out),
                     "--local-configs", "default", "cudnn_chunked", "flash_chunked"])
    assert rc == 0
    res = json.loads(out.read_text())
    checks = {c["check"]: c for c in res["checks"]}
    assert checks["local cudnn_chunked T=128"]["pass"] and checks["local default T=128"]["pass"]
    assert "local flash_chunked T=128" not in checks  # needs CUDA: skipped on the CPU, not failed
    names = [r["name"] for r in res["prefill"]]
    assert "local cudnn_chunked (2h)" in names and "local default (2h)" in names
    assert res["notes"]["local_choice"]["256"] in ("default", "cudnn_chunked")
    chunked = next(r for r in res["prefill"] if r["name"] == "local cudnn_chunked (2h)")
    assert chunked["spot_rel_err"] < 1e-5


def test_bench_layer_rows_name_the_local_variant():
    from scripts import bench_attention as bench

    layer = {"dense": 10.0, "local24": 4.0, "local24_best": 3.0, "local_best_name": "cudnn_chunked", "local32": 5.0,
             "local32_best": 3.9, "select": 1.0, "select:pooled/triton": 1.0, "select:pooled/sort": 0.8,
             "sparse": 2.0, "density": 0.05}
    rows = []
    bench.add_layer_rows(rows, 32768, layer, {}, None, 32, 4)
    by = {r["name"]: r for r in rows}
    one = by["LAYER rtp_1of4 best[local=cudnn_chunked] (density 0.050)"]
    assert one["ms"] == pytest.approx(3.0 + 0.8 + 2.0) and one["local_variant"] == "cudnn_chunked"
    assert by["LAYER rtp_0of4 best[local=cudnn_chunked]"]["ms"] == pytest.approx(3.9)
    assert by["LAYER rtp_1of4 flex (density 0.050)"]["ms"] == pytest.approx(4.0 + 1.0 + 2.0)
    assert max(len(n) for n in by) <= 64  # the printed table shows 64 characters
    del layer["local32_best"]  # 32 heads not timed with the best variant: scaled, and said so
    rows = []
    bench.add_layer_rows(rows, 32768, layer, {}, None, 32, 4)
    assert any(r["name"] == "LAYER rtp_0of4 best[local=cudnn_chunked][32h scaled]" and r["ms"] == pytest.approx(5.0 * 3 / 4)
               for r in rows)
