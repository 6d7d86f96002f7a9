"""InferenceEngine.prefill modes (models/inference/prefill.py): the one-shot (layer-at-once) prefill equals the
exact chunked prefill on CPU (logits, every cache tensor where valid, the greedy decode that follows), the
"auto" rule, the memory estimate and its errors, and scripts/generate.py --prefill."""

import copy
import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch

from models.inference import InferenceEngine
from models.inference import prefill as pf
from models.inference.kv_cache import LayerPlan
from models.qwen3 import build_model, get_flavor
from models.rtpurbo.convert import apply_rtpurbo
from models.rtpurbo.roles import HeadRoles
from torchtitan_rtpurbo.config.job_config import RTPurbo

# 5 layers, 8 query heads, 2 KV heads (heads 0-3 -> KV 0, 4-7 -> KV 1):
#   0: retrieval 0, 1 (query-head roles: KV 0 full, local 2, 3 read it with the window mask; KV 1 sinks + ring)
#   1: retrieval 5 (one query head: KV 1 full, KV 0 ring)   2: all local (rings only)
#   3: retrieval 4-7 (a KV-head role: KV 1 full, KV 0 all local on a ring)   4: all retrieval
RETRIEVAL = [[0, 1], [5], [], [4, 5, 6, 7], list(range(8))]
T_PROMPT = 37  # a multiple of no chunk below (chunk 8, proj 16, ffn 12) and longer than the window
CHUNKS = dict(chunk_size=8, proj_chunk=16, ffn_chunk=12)

pytestmark = pytest.mark.usefixtures("one_thread")


def _base(moe=False):
    torch.manual_seed(0)
    args = get_flavor("debug_moe" if moe else "debug")
    return build_model(dataclasses.replace(args, n_layers=len(RETRIEVAL))).eval()


def _rtpurbo(model, *, window, sinks=2):
    m = copy.deepcopy(model)
    flags = [[h in r for h in range(8)] for r in RETRIEVAL]
    roles = HeadRoles(scores=[[float(x) for x in row] for row in flags], retrieval=flags, window=window, sinks=sinks)
    cfg = RTPurbo(window=window, sinks=sinks, top_p=0.6, block_size=4, indexer_dim=8)
    torch.manual_seed(1)
    apply_rtpurbo(m, roles, cfg, check=False)
    return m.eval()


@pytest.fixture(scope="module")
def models():
    dense = _base()
    return {"dense": dense, "rtpurbo": _rtpurbo(dense, window=5), "moe": _base(moe=True)}


def _prompt(n, seed):
    return torch.randint(0, 4096, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _tokens(prompts):
    tok = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
    for b, p in enumerate(prompts):
        tok[b, : len(p)] = torch.tensor(p)
    return tok


def _valid_views(cache, li, name, b, n):
    """The part of cache tensor `name` of layer li that sequence b (n prompt tokens) has written."""
    t = getattr(cache, name)[li]
    if t is None:
        return None
    p = cache.plans[li]
    if name in ("k", "v", "ki"):
        return t[b, :, :n]
    if name in ("sink_k", "sink_v"):
        return t[b, :, : min(p.sinks, n)]
    W = t.shape[2]
    slots = torch.remainder(torch.arange(max(0, n - W), n), W)
    return t[b, :, slots]


def _assert_same_cache(a, b, lens, tol):
    assert a.plans == b.plans
    n_cmp = 0
    for li in range(len(a.plans)):
        for name in ("k", "v", "ki", "sink_k", "sink_v", "ring_k", "ring_v"):
            for s, n in enumerate(lens):
                x, y = _valid_views(a, li, name, s, n), _valid_views(b, li, name, s, n)
                assert (x is None) == (y is None), (li, name)
                if x is not None:
                    torch.testing.assert_close(y, x, atol=tol, rtol=tol, msg=f"layer {li} {name} seq {s}")
                    n_cmp += x.numel() > 0
    return n_cmp


def _compare(model, prompts, *, max_len=64, tol, steps=6):
    """one_shot vs chunked: last-token logits, every cache tensor, then teacher-forced decode logits and the
    greedy tokens of a fresh generate() with each mode."""
    lens = [len(p) for p in prompts]
    tok = _tokens(prompts)
    ec = InferenceEngine(model, max_len=max_len, **CHUNKS)
    eo = InferenceEngine(model, max_len=max_len, **CHUNKS)
    lc = ec.prefill(tok, lens, mode="chunked")
    lo = eo.prefill(tok, lens, mode="one_shot")
    assert (ec.last_prefill_mode, eo.last_prefill_mode) == ("chunked", "one_shot")
    torch.testing.assert_close(lo, lc, atol=tol, rtol=tol)
    assert eo.lens == ec.lens == lens
    assert _assert_same_cache(ec.cache, eo.cache, lens, tol) > 0
    nxt = lc.argmax(-1)
    for _ in range(steps):  # decode from each cache, fed the same tokens
        dc, do = ec.decode_step(nxt), eo.decode_step(nxt)
        torch.testing.assert_close(do, dc, atol=10 * tol, rtol=10 * tol)
        nxt = dc.argmax(-1)
    gc = InferenceEngine(model, max_len=max_len, **CHUNKS).generate(prompts, max_new_tokens=steps,
                                                                     prefill_mode="chunked")
    go = InferenceEngine(model, max_len=max_len, **CHUNKS).generate(prompts, max_new_tokens=steps,
                                                                     prefill_mode="one_shot")
    assert go.tokens == gc.tokens and (go.prefill_mode, gc.prefill_mode) == ("one_shot", "chunked")
    return ec, eo


TOL = {torch.float32: 2e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["dense", "rtpurbo", "moe"])
def test_one_shot_equals_chunked_batch_of_two(models, kind, dtype):
    model = copy.deepcopy(models[kind]).to(dtype)
    _, eo = _compare(model, [_prompt(T_PROMPT, 1), _prompt(T_PROMPT, 2)], tol=TOL[dtype])
    if kind == "rtpurbo":  # the roles above give every cache kind
        ps = eo.cache.plans
        assert all(p.rtpurbo for p in ps) and any(p.local_full for p in ps) and any(p.local_ring for p in ps)
        assert [bool(p.ring_kv) for p in ps] == [True, True, True, True, False]


@pytest.mark.parametrize("window", [40, 70])
def test_one_shot_equals_chunked_wide_windows(models, window):
    """window 40 > prompt: ring partly filled; window 70 + sinks >= max_len: every KV head in full, local heads
    on the full cache with the window mask. One sequence."""
    model = _rtpurbo(models["dense"], window=window).to(torch.float64)
    _, eo = _compare(model, [_prompt(T_PROMPT, 3)], tol=1e-10, steps=4)
    assert any(p.ring_kv for p in eo.cache.plans) == (window == 40)


def test_one_shot_unequal_lengths_and_auto_rule(models, caplog):
    """one_shot with padding (lengths 9 and 23: the short one writes only its own tokens into sinks and ring)
    equals chunked; "auto" picks chunked here (CPU), and on CUDA too for unequal lengths."""
    model = copy.deepcopy(models["rtpurbo"]).to(torch.float64)
    _compare(model, [_prompt(9, 4), _prompt(23, 5)], max_len=48, tol=1e-10, steps=4)
    eng = InferenceEngine(model, max_len=48, **CHUNKS)
    with caplog.at_level(logging.INFO, logger="models.inference.engine"):
        eng.prefill(_tokens([_prompt(9, 4), _prompt(23, 5)]), [9, 23])
    assert eng.last_prefill_mode == "chunked" and "not CUDA" in eng.prefill_status
    assert any(r.getMessage().startswith("prefill: chunked (auto: the model is on cpu") for r in caplog.records)
    kw = dict(device_type="cuda", need_one_shot=10, need_chunked=1, free=100)
    mode, why = pf.choose_mode("auto", B=2, lens=[9, 23], **kw)
    assert mode == "chunked" and "differ" in why
    assert pf.choose_mode("auto", B=2, lens=[23, 23], **kw)[0] == "one_shot"
    assert pf.choose_mode("auto", B=1, lens=[23], chunk_size=8, **kw)[0] == "one_shot"
    mode, why = pf.choose_mode("auto", B=1, lens=[23], chunk_size=23, **kw)  # one chunk: one pass either way
    assert mode == "chunked" and "one chunk" in why
    with pytest.raises(ValueError, match="prefill mode must be one of"):
        eng.prefill(_tokens([_prompt(9, 4)]), [9], mode="fast")


def test_all_logits_and_hooks(models):
    """all_logits in one_shot == chunked; the benchmark's hooks (retrieval_attention, on_layer) see every
    retrieval group and layer, and a hook returning dense causal attention changes nothing."""
    model = copy.deepcopy(models["rtpurbo"]).to(torch.float64)
    tok = _tokens([_prompt(T_PROMPT, 6)])
    ref = InferenceEngine(model, max_len=64, **CHUNKS).prefill(tok, [T_PROMPT], all_logits=True, mode="chunked")
    got = InferenceEngine(model, max_len=64, **CHUNKS).prefill(tok, [T_PROMPT], all_logits=True, mode="one_shot")
    assert got.shape == ref.shape == (1, T_PROMPT, 4096)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)
    calls, marks = [], []

    def retrieval(li, p, q_r, k_g, v_g, qi, ki):
        calls.append((li, q_r.shape[1], qi.shape, ki.shape))
        return pf.dense_causal(q_r, k_g, v_g)

    eng = InferenceEngine(model, max_len=64, **CHUNKS)
    last = pf.one_shot_prefill(eng, tok, [T_PROMPT], proj_chunk=16, ffn_chunk=12, retrieval_attention=retrieval,
                               on_layer=marks.append)
    torch.testing.assert_close(last, ref[:, -1], atol=1e-10, rtol=1e-10)
    assert marks == list(range(len(RETRIEVAL) + 1))
    # one call per KV group holding retrieval heads: layers 0 (2 heads), 1 (1), 3 (4), 4 (4 + 4)
    assert [(li, h) for li, h, _, _ in calls] == [(0, 2), (1, 1), (3, 4), (4, 4), (4, 4)]
    assert all(qs == ks == (1, h, T_PROMPT, 8) for _, h, qs, ks in calls)


def test_memory_estimate_and_errors(models):
    """The estimate grows with T and the batch, counts all_logits; the mode choice raises when one_shot is
    required and does not fit, falls back to chunked under auto, and raises when neither fits."""
    eng = InferenceEngine(models["rtpurbo"], max_len=4096)
    e = lambda B, T, **kw: pf.one_shot_activation_bytes(eng, B, T, **kw)  # noqa: E731
    assert e(1, 1024) < e(1, 2048) < e(2, 2048) < e(2, 2048, all_logits=True)
    assert pf.chunked_activation_bytes(eng, 1, 2048) < e(1, 2048)
    kw = dict(B=1, lens=[2048], device_type="cuda", need_one_shot=e(1, 2048),
              need_chunked=pf.chunked_activation_bytes(eng, 1, 2048))
    assert pf.choose_mode("one_shot", free=None, **kw)[0] == "one_shot"
    with pytest.raises(pf.PrefillMemoryError, match="one-shot prefill of 1 x 2048 tokens needs"):
        pf.choose_mode("one_shot", free=1000, **kw)
    mode, why = pf.choose_mode("auto", free=kw["need_one_shot"] - 1, **kw)
    assert mode == "chunked" and "would not fit" in why
    with pytest.raises(pf.PrefillMemoryError, match="does not fit"):
        pf.choose_mode("auto", free=1000, **kw)
    assert pf.choose_mode("chunked", free=0, **kw) == ("chunked", "requested (mode='chunked')")
    assert pf.free_device_bytes(torch.device("cpu")) is None


def _bench_like_eng(rtp: bool):
    """The benchmark's 5-layer Qwen3-30B-A3B stack (bf16), as far as the estimate reads it (no weights)."""
    a = get_flavor("30B-A3B").replace(n_layers=5, vocab_size=4096)
    moe = SimpleNamespace(num_experts=a.num_experts, top_k=a.num_experts_per_tok,
                          experts=SimpleNamespace(w1=torch.empty(0, a.moe_hidden_dim, 0)))
    plans = []
    for i in range(5):
        if not rtp:
            plans.append(LayerPlan(i, False, 32, 4, full_kv=[0, 1, 2, 3]))
        else:
            r = [0, 1, 2, 3, 4, 5, 6, 7] if i in (0, 2, 4) else []  # --retrieval-layer-frac 0.6
            plans.append(LayerPlan(i, True, 32, 4, retrieval=r, full_kv=[0] if r else [],
                                   ring_kv=[1, 2, 3] if r else [0, 1, 2, 3], window=8192, sinks=4, indexer_dim=16))
    emb = SimpleNamespace(weight=torch.empty(0, dtype=torch.bfloat16))
    return SimpleNamespace(args=a, proj_chunk=65536, ffn_chunk=16384, device=torch.device("cuda"),
                           model=SimpleNamespace(tok_embeddings=emb), cache=SimpleNamespace(plans=plans),
                           layers=[SimpleNamespace(moe_enabled=True, moe=moe)] * 5)


@pytest.mark.parametrize("rtp,measured", [(False, 15240), (True, 20577)])
def test_memory_estimate_calibration(rtp, measured):
    """Against the peaks measured on the H100 at 1M tokens (docs/benchmarks.md, bytes per prompt token above
    weights and cache): the estimate is conservative, by at most 25%."""
    T = 1 << 20
    per_token = pf.one_shot_activation_bytes(_bench_like_eng(rtp), 1, T) / T
    assert measured <= per_token <= 1.25 * measured, per_token


def test_generate_script_prefill_option(tmp_path, capsys):
    from pathlib import Path

    from scripts.generate import main

    root = Path(__file__).resolve().parents[1]
    pf_ = tmp_path / "p.txt"
    pf_.write_text("def main(argv=None):\n    return 0\n" * 3)
    base = ["--checkpoint", str(root / "assets/teachers/tiny"), "--tokenizer",
            str(root / "assets/tokenizer/stdlib_sp4096.model"), "--prompt-file", str(pf_), "--max-new-tokens", "4",
            "--max-len", "96", "--device", "cpu", "--chunk-size", "16", "--no-stream"]
    outs = {}
    for mode in ("auto", "one_shot", "chunked"):
        assert main(base + ["--prefill", mode]) == 0
        cap = capsys.readouterr()
        last = cap.err.strip().splitlines()[-1]
        ran = "chunked" if mode == "auto" else mode  # auto on CPU: chunked
        assert last.startswith(f"prefill: {ran} ("), last
        outs[mode] = cap.out
    assert outs["one_shot"] == outs["chunked"] == outs["auto"]


# ---- GPU: one_shot vs chunked at real shapes (skipped without CUDA) ----------------------------------------
def _real_shape_check(dev, lens, bench_argv, dtype=torch.bfloat16, tol=3e-2, steps=4):
    """The benchmark's random real-shape stack (scripts/bench_inference.build_stack, dense SwiGLU FFN layers so
    that no MoE router flips on bf16 rounding), dense and RTPurbo: for each T, one_shot vs chunked last-token
    logits, every cache tensor (rel. max err over the valid part), `steps` teacher-forced decode steps from
    each cache; the auto choice; wall times of both modes (second call, the first compiles) and the one-shot
    estimate vs its measured peak above weights and cache. Prints one line per (model, T)."""
    import time

    from scripts.bench_inference import build_stack, parse_args, rel_max

    args = parse_args(bench_argv)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for kind in ("dense", "rtpurbo"):
        model = build_stack(args, kind, dev, dtype, moe=False)
        for T in lens:
            for B in ((1, 2) if T == min(lens) else (1,)):
                g = torch.Generator(device=dev).manual_seed(T)
                tok = torch.randint(0, model.args.vocab_size, (B, T), device=dev, generator=g)
                mk = lambda: InferenceEngine(model, max_len=T + 64, cuda_graph=False, fused_decode=False)  # noqa
                ec, eo = mk(), mk()
                times = {}
                for mode, e in (("chunked", ec), ("one_shot", eo)):
                    for _ in range(2):
                        if dev.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(dev)
                            base = torch.cuda.memory_allocated(dev)
                        sync()
                        t0 = time.perf_counter()
                        out = e.prefill(tok, [T] * B, mode=mode)
                        sync()
                        times[mode] = time.perf_counter() - t0
                    if mode == "one_shot" and dev.type == "cuda":
                        peak = torch.cuda.max_memory_allocated(dev) - base
                    if mode == "chunked":
                        lc = out
                    else:
                        lo = out
                est = pf.one_shot_activation_bytes(eo, B, T)
                errs = {"logits": rel_max(lo, lc)}
                for name in ("k", "v", "ki", "sink_k", "sink_v", "ring_k", "ring_v"):
                    for li in range(len(ec.cache.plans)):
                        for b in range(B):
                            x = _valid_views(ec.cache, li, name, b, T)
                            if x is not None and x.numel():
                                y = _valid_views(eo.cache, li, name, b, T)
                                errs[name] = max(errs.get(name, 0.0), rel_max(y, x))
                nxt = lc.argmax(-1)
                dec = 0.0
                for _ in range(steps):
                    dc, do = ec.decode_step(nxt), eo.decode_step(nxt)
                    dec = max(dec, rel_max(do, dc))
                    nxt = dc.argmax(-1)
                errs["decode"] = dec
                ea = mk()
                ea.prefill(tok, [T] * B)
                mem = (f"; one-shot peak above weights + cache {peak / 2**20:.0f} MiB, estimate {est / 2**20:.0f} MiB"
                       if dev.type == "cuda" else "")
                print(f"[{kind} B={B} T={T}] auto -> {ea.last_prefill_mode} ({ea.prefill_status}); prefill s: "
                      f"chunked {times['chunked']:.3f}, one_shot {times['one_shot']:.3f}{mem}; rel max err "
                      + ", ".join(f"{k_} {v_:.1e}" for k_, v_ in errs.items()), flush=True)
                assert all(v_ <= tol for v_ in errs.values()), errs
                if dev.type == "cuda":
                    assert ea.last_prefill_mode == "one_shot", ea.prefill_status
                    assert est >= peak, (est, peak)
                del ec, eo, ea
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_one_shot_equals_chunked_real_shapes():
    """GPU: python -m pytest -q -s tests/test_inference_prefill.py -k cuda (PREFILL_CHECK_LENS="4096,32768")."""
    import os

    lens = [int(x) for x in os.environ.get("PREFILL_CHECK_LENS", "4096,32768").split(",")]
    _real_shape_check(torch.device("cuda"), lens, ["--layers", "2", "--window", "1024"])
