"""fp8 indexer keys in the inference engine (InferenceEngine(indexer_cache_dtype="float8_e4m3fn")), on CPU.

What runs on CPU (the references, torch 2.13 CPU here): every write of the indexer keys (chunked prefill,
one-shot prefill, eager decode, the static graph-safe step) with the saturating cast, the torch reference
selection on the upcast fp8 keys, the memory report, the option's errors, scripts/bench_inference.py
--indexer-fp8 (smoke --check) and scripts/generate.py --indexer-fp8. In Triton's CPU interpreter (a
subprocess): the static step with the fused decode kernels and every attention kernel in Triton (impl="triton")
on fp8 keys: the scoring kernel's fp8 loads + upcast (kernels/triton_decode.py) and the fused step's ki writes
(torch, after the fused qk_norm_rope kernel, which never writes ki). NOT covered on CPU: CUDA graph capture with
fp8 keys, the sm_89+ check on a real GPU (fp8_capability_reason is tested on given capabilities), and the fp8
cast on CUDA (torch 2.11 on the GPU machine): scripts/bench_inference.py --check --indexer-fp8 checks those.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.attention import AttentionContext
from models.inference import InferenceEngine, RoleKVCache
from models.inference.engine import fp8_capability_reason, resolve_indexer_cache_dtype
from models.inference.kv_cache import FP8_E4M3_MAX, indexer_store_cast
from models.qwen3 import build_model, get_flavor
from models.rtpurbo.convert import iter_rtpurbo_backends

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_inference import RETRIEVAL, _teacher_forced, prompt, rtpurbo_copy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FP8 = torch.float8_e4m3fn

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return build_model(get_flavor("debug")).eval()


@pytest.fixture(scope="module")
def rt(dense):
    return rtpurbo_copy(dense, window=5, sinks=2, top_p=0.6, block_size=4)


def q8(x):
    """x rounded through the fp8 cache (saturating cast) and back, in x's dtype."""
    return indexer_store_cast(x, FP8).to(x.dtype)


class _EmulatedFp8Cache:
    """Patch RoleKVCache.store_indexer_keys so that an fp32 cache stores fp8-rounded keys: an engine whose
    selection sees exactly the fp8 cache's values, with every other tensor in fp32 (the reference)."""

    def __enter__(self):
        self.orig = RoleKVCache.store_indexer_keys

        def store(cache, li, index, ki):
            cache.ki[li][index] = q8(ki).to(cache.ki[li].dtype)

        RoleKVCache.store_indexer_keys = store
        return self

    def __exit__(self, *exc):
        RoleKVCache.store_indexer_keys = self.orig


def _valid_ki_equal(e8, eref, lens):
    """Every valid cached indexer key of e8 (fp8) == eref's key (any dtype) cast to fp8, bit for bit."""
    n = 0
    for li, (a, b) in enumerate(zip(e8.cache.ki, eref.cache.ki)):
        if a is None:
            assert b is None
            continue
        assert a.dtype == FP8 and b.dtype == torch.float32
        for bi, L in enumerate(lens):
            got, ref = a[bi, :, :L].view(torch.uint8), indexer_store_cast(b[bi, :, :L], FP8).view(torch.uint8)
            assert torch.equal(got, ref), (li, bi)
            n += got.numel()
    assert n > 0


def test_fp8_cache_writes_and_decode_match_fp8_rounded_reference(rt):
    """Chunked prefill + eager decode (batch 2, lengths 9 / 23, sparse top-p): the fp8 cache holds the fp32 path's
    keys cast to fp8 (prefill: vs the plain fp32 engine; decode positions: vs the emulation, whose selection sees
    the same rounded keys), and the greedy tokens / teacher-forced logits equal the emulation's."""
    prompts = [prompt(9, 6), prompt(23, 7)]
    mk = lambda **kw: InferenceEngine(rt, max_len=48, chunk_size=8, **kw)  # noqa: E731
    e8 = mk(indexer_cache_dtype="float8_e4m3fn")
    assert e8.indexer_cache_dtype == "float8_e4m3fn" and mk().indexer_cache_dtype == "float32"
    e32 = mk()
    tok = torch.zeros(2, 23, dtype=torch.long)
    for b, p in enumerate(prompts):
        tok[b, : len(p)] = torch.tensor(p)
    torch.testing.assert_close(e8.prefill(tok, [9, 23]), e32.prefill(tok, [9, 23]), atol=0, rtol=0)  # dense prefill
    assert all(t is None or t.dtype == FP8 for t in e8.cache.ki) and any(t is not None for t in e8.cache.ki)
    assert e8.cache.k[0].dtype == torch.float32  # only the indexer keys change dtype
    _valid_ki_equal(e8, e32, [9, 23])

    res8 = mk(indexer_cache_dtype="float8_e4m3fn").generate(prompts, max_new_tokens=10)
    with _EmulatedFp8Cache():
        emu = mk()
        res_emu = emu.generate(prompts, max_new_tokens=10)
    assert res8.tokens == res_emu.tokens and res8.indexer_cache_dtype == "float8_e4m3fn"
    assert 0.0 < res8.mean_density < 1.0 and res8.mean_density == pytest.approx(res_emu.mean_density, rel=1e-6)
    forced = [[res8.tokens[0][i], res8.tokens[1][i]] for i in range(9)]
    e8 = mk(indexer_cache_dtype="float8_e4m3fn")
    l8 = _teacher_forced(e8, prompts, forced)
    with _EmulatedFp8Cache():
        emu = mk()
        le = _teacher_forced(emu, prompts, forced)
    torch.testing.assert_close(l8, le, atol=1e-5, rtol=1e-5)
    _valid_ki_equal(e8, emu, [9 + 9, 23 + 9])  # decode positions included


def test_fp8_decode_matches_model_decode_rows_emulation_with_rounded_keys(dense):
    """Independent of the engine: the model's no-cache decode emulation (ctx.extras['decode_from']) with its
    indexer keys rounded through fp8 gives the fp8 engine's decode logits."""
    p = prompt(30, 5)
    rt2 = rtpurbo_copy(dense, window=4, sinks=2, top_p=0.5, block_size=4)
    eng = InferenceEngine(rt2, max_len=64, chunk_size=8, indexer_cache_dtype="float8_e4m3fn")
    logits = [eng.prefill(torch.tensor([p]), [len(p)])[0]]
    toks = []
    for _ in range(8):
        toks.append(int(logits[-1].argmax()))
        logits.append(eng.decode_step(torch.tensor([toks[-1]]))[0])
    got = torch.stack(logits[:-1])
    seq = p + toks
    patched = []
    for _, be in iter_rtpurbo_backends(rt2):
        ix = be.indexer
        if ix is None:
            continue
        fwd = ix.forward
        ix.forward = (lambda f: lambda qp, kp: (lambda qi, ki: (qi, q8(ki)))(*f(qp, kp)))(fwd)
        patched.append(ix)
    try:
        ctx = AttentionContext(collect={})
        ctx.extras["decode_from"] = len(p)
        with torch.no_grad():
            ref = rt2(torch.tensor([seq]), ctx=ctx)[0]
    finally:
        for ix in patched:
            del ix.forward
    assert patched
    torch.testing.assert_close(got, ref[len(p) - 1: len(seq) - 1], atol=1e-4, rtol=1e-4)


def test_fp8_static_step_and_one_shot_prefill(rt):
    """The graph-safe step (static_decode=True, buckets 16 -> 32 -> 48) with fp8 keys == the eager fp8 path
    (tokens, teacher-forced logits, density); the one-shot prefill writes the fp32 one-shot keys cast to fp8."""
    prompts = [prompt(9, 12), prompt(23, 13)]
    mk = lambda **kw: InferenceEngine(rt, max_len=48, chunk_size=8, graph_min_bucket=16,  # noqa: E731
                                      indexer_cache_dtype="float8_e4m3fn", **kw)
    a, b = mk().generate(prompts, max_new_tokens=12), mk(static_decode=True).generate(prompts, max_new_tokens=12)
    assert b.decode_path == "static" and a.tokens == b.tokens
    assert 0.0 < b.mean_density < 1.0 and b.mean_density == pytest.approx(a.mean_density, rel=1e-5)
    forced = [[a.tokens[0][i], a.tokens[1][i]] for i in range(11)]
    ea, es = mk(), mk(static_decode=True)
    torch.testing.assert_close(_teacher_forced(es, prompts, forced), _teacher_forced(ea, prompts, forced),
                               atol=2e-5, rtol=2e-5)
    for x, y in zip(es.cache.ki, ea.cache.ki):  # the static step wrote the same fp8 keys as the eager one
        if x is not None:
            for bi, L in enumerate((9 + 11, 23 + 11)):
                assert torch.equal(x[bi, :, :L].view(torch.uint8), y[bi, :, :L].view(torch.uint8))
    # one-shot prefill (equal lengths, proj_chunk 16: three projection chunks)
    toks = torch.tensor([prompt(37, 0), prompt(37, 1)])
    e8 = InferenceEngine(rt, max_len=48, proj_chunk=16, ffn_chunk=12, indexer_cache_dtype="float8_e4m3fn")
    e32 = InferenceEngine(rt, max_len=48, proj_chunk=16, ffn_chunk=12)
    l8, l32 = e8.prefill(toks, [37, 37], mode="one_shot"), e32.prefill(toks, [37, 37], mode="one_shot")
    torch.testing.assert_close(l8, l32, atol=0, rtol=0)
    assert e8.last_prefill_mode == "one_shot"
    _valid_ki_equal(e8, e32, [37, 37])


def test_fp8_saturating_cast_no_nan(dense):
    """Indexer keys beyond the e4m3 range are stored as +-448 (unscaled, clamped), never NaN, in every write
    path; the values inside the range round as a plain cast."""
    x = torch.tensor([0.0, 1.0, -3.3, 447.0, 448.0, 449.0, 470.0, -1e4, float("inf"), float("-inf")])
    y = indexer_store_cast(x, FP8).float()
    assert torch.equal(y[4:], torch.tensor([448.0, 448, 448, -448, 448, -448]))
    assert torch.equal(y[:4], x[:4].to(FP8).float()) and not y.isnan().any()
    assert torch.equal(indexer_store_cast(x, torch.float32), x)  # other dtypes: a plain cast (no clamp)
    big = rtpurbo_copy(dense, window=5, sinks=2, top_p=0.6, block_size=4)
    with torch.no_grad():
        for _, be in iter_rtpurbo_backends(big):
            if be.indexer is not None:
                be.indexer.wk.mul_(3000.0)  # |ki| well beyond 448
    prompts = [prompt(20, 3)]
    for kw in (dict(), dict(static_decode=True)):
        e8 = InferenceEngine(big, max_len=32, chunk_size=8, indexer_cache_dtype="float8_e4m3fn", **kw)
        e32 = InferenceEngine(big, max_len=32, chunk_size=8)
        e8.prefill(torch.tensor(prompts), [20])
        e32.prefill(torch.tensor(prompts), [20])
        _valid_ki_equal(e8, e32, [20])
        for _ in range(3):
            e8.decode_step(torch.tensor([5]))
        hi = max(float(t[:, :, :23].float().abs().max()) for t in e8.cache.ki if t is not None)
        assert hi == FP8_E4M3_MAX
        assert not any(t[:, :, :23].float().isnan().any() for t in e8.cache.ki if t is not None)


def test_fp8_memory_report(dense, rt):
    n_ix = sum(len(r) for r in RETRIEVAL) * 8  # indexer elements per token (indexer_dim 8)
    r32 = RoleKVCache(rt, 2, 512).memory_report()
    r8 = RoleKVCache(rt, 2, 512, indexer_dtype=FP8).memory_report()
    assert (r32["indexer_bytes_per_token"], r8["indexer_bytes_per_token"]) == (4 * n_ix, n_ix)
    assert r32["bytes_per_token"] - r8["bytes_per_token"] == 3 * n_ix
    assert r32["total_bytes"] - r8["total_bytes"] == 2 * 512 * 3 * n_ix
    assert r8["dense_bytes_per_token"] == r32["dense_bytes_per_token"]
    assert r8["fixed_bytes_per_sequence"] == r32["fixed_bytes_per_sequence"]
    assert RoleKVCache.estimate(rt, 2, 512, indexer_dtype=FP8) == r8
    eng = InferenceEngine(rt, max_len=64, indexer_cache_dtype="float8_e4m3fn")
    res = eng.generate([prompt(7, 1)], max_new_tokens=2)
    assert res.memory["indexer_bytes_per_token"] == n_ix and res.memory["indexer_element_bytes"] == 1
    assert "indexer keys 88, float8_e4m3fn" in eng.cache.memory_summary()
    # bf16 model: 2 -> 1 byte per element
    bf = dict(dtype=torch.bfloat16)
    assert (RoleKVCache(rt, 1, 64, **bf).memory_report()["bytes_per_token"]
            - RoleKVCache(rt, 1, 64, **bf, indexer_dtype=FP8).memory_report()["bytes_per_token"]) == n_ix
    # dense model: no indexer keys, nothing changes
    assert RoleKVCache(dense, 1, 64, indexer_dtype=FP8).memory_report() == {
        **RoleKVCache(dense, 1, 64).memory_report(), "indexer_element_bytes": 1}


def test_fp8_option_errors():
    for bad in ("float8_e5m2", "fp16", "int8", torch.bfloat16, "bfloat16"):
        with pytest.raises(ValueError, match="indexer_cache_dtype must be None"):
            resolve_indexer_cache_dtype(bad, "cpu")
    assert resolve_indexer_cache_dtype(None, "cpu") is None
    assert resolve_indexer_cache_dtype("float8_e4m3fn", "cpu") == FP8
    assert resolve_indexer_cache_dtype(FP8, "cpu", "torch") == FP8
    with pytest.raises(ValueError, match="indexer_cache_dtype='float8_e4m3fn' is not supported here: meta cannot"):
        resolve_indexer_cache_dtype("float8_e4m3fn", "meta")
    assert "8.9" in fp8_capability_reason((8, 0)) and "sm_80" in fp8_capability_reason((8, 0))
    assert fp8_capability_reason((8, 9)) is None and fp8_capability_reason((9, 0)) is None
    torch.manual_seed(0)
    m = build_model(get_flavor("debug")).eval()
    with pytest.raises(ValueError, match="indexer_cache_dtype must be None"):
        InferenceEngine(m, max_len=16, indexer_cache_dtype="float16")


def test_fp8_scripts(tmp_path, capsys):
    from scripts.bench_inference import main as bench
    from scripts.generate import main as generate

    assert bench(["--smoke", "--check", "--check-steps", "2", "--indexer-fp8", "--models", "rtpurbo"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and out.strip().splitlines()[-1].startswith("PASS: "), out[-3000:]
    assert "rtpurbo/ffn fp8: graph decode vs eager reference decode on the same fp8 keys" in out
    pf = tmp_path / "p.txt"
    pf.write_text("def main(argv=None):\n    ")
    rc = generate(["--checkpoint", str(ROOT / "assets/teachers/tiny"), "--tokenizer",
                   str(ROOT / "assets/tokenizer/stdlib_sp4096.model"), "--prompt-file", str(pf), "--max-new-tokens",
                   "4", "--max-len", "64", "--device", "cpu", "--indexer-fp8"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "indexer keys 0 B, float8_e4m3fn" in err  # the tiny teacher is dense: no indexer keys


_TRITON_FP8_SCRIPT = r"""
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from kernels import triton_decode as td
assert td.interpreter_ready(), "the Triton interpreter is not active"
from test_inference import rtpurbo_copy, prompt
from models.inference import InferenceEngine
from models.qwen3 import build_model, get_flavor
torch.set_num_threads(1)
torch.manual_seed(0)
rt = rtpurbo_copy(build_model(get_flavor("debug")).eval(), window=5, sinks=2, top_p=0.6, block_size=4)
prompts = [prompt(9, 6), prompt(23, 7)]
a = InferenceEngine(rt, max_len=48, chunk_size=8, impl="torch",
                    indexer_cache_dtype="float8_e4m3fn").generate(prompts, max_new_tokens=3)
e = InferenceEngine(rt, max_len=48, chunk_size=8, impl="triton", static_decode=True, fused_decode=True,
                    graph_min_bucket=16, indexer_cache_dtype="float8_e4m3fn")
assert e.fused, e.fused_status
b = e.generate(prompts, max_new_tokens=3)
assert a.tokens == b.tokens, (a.tokens, b.tokens)
assert abs(a.mean_density - b.mean_density) < 1e-5, (a.mean_density, b.mean_density)
assert all(t is None or t.dtype == torch.float8_e4m3fn for t in e.cache.ki)
print("TRITON-FP8-OK")
"""


def test_fp8_fused_triton_step_in_interpreter():
    """The GPU's decode step (fused kernels + Triton attention, selection scoring on fp8 keys) under Triton's CPU
    interpreter, in a subprocess (TRITON_INTERPRET must be set before triton's first import) == the torch
    reference path on the same fp8 keys."""
    pytest.importorskip("triton")
    code = _TRITON_FP8_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"))
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "TRITON-FP8-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
