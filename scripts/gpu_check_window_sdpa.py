"""GPU check + timing of kernels/window_sdpa.py (window heads through chunked causal cuDNN SDPA).

  python scripts/gpu_check_window_sdpa.py --out $OUT/window_sdpa.json          (~1-2 min on an H100)
  python scripts/gpu_check_window_sdpa.py --long --out $OUT/window_sdpa.json   (adds T = 1M)

(a) LSE probe: each aten backend's first-use probe (kernels/window_sdpa.backend_info: LSE layout,
    base, native GQA, strided inputs, tiny end-to-end window attention), and a direct call at
    T = 1000 (contiguous, equal heads) whose raw logsumexp is printed (shape, dtype, strides) and
    compared with fp32 math as natural-log and base-2 values.
(b) correctness, bf16, window 8192, sinks 4, Hq 24 / Hkv 3, D 128, T in --check-seq-lens
    (5000: one chunk; 20000: tail chunk not a multiple of 8192; 32768): window_attention_sdpa
    ("cudnn", and "flash" when available) and local_attention(impl="flex") vs fp32 attention on
    sampled rows (chunk edges, sink-relevant rows, random rows; every head), chunked vs flex on
    the whole output, the Triton merge vs the torch merge, and kernels.masks.local_attention's
    default dispatch (no_grad, bf16) == the chunked result. PASS: rel err vs fp32 <= 1e-2 and not
    worse than flex's by more than 2x + 1e-3.
(c) timing (torch.cuda.Event, median of --reps after a warm-up call) at --time-seq-lens (32K,
    128K; + 1M with --long): cudnn_chunked / flash_chunked / flex on 24 local heads, the chunked
    path's parts (diagonal call alone, previous-chunk call alone, Triton merge alone), and dense
    cuDNN causal SDPA of 32 q / 4 kv heads (at 1M one KV group, x4). TF/s per useful FLOP:
    4 * D * visible (query, key) pairs, counted exactly (band: sum_m min(m+1, window) + sinks
    outside the window; dense: T(T+1)/2), and % of dense cuDNN's TF/s at the same T.
Prints PASS/FAIL per check and a last line ALL PASS / SOME FAILED; writes JSON to --out.
--device cpu runs the same code at toy sizes with the pure-torch primitive (a smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import window_sdpa as ws  # noqa: E402
from kernels.masks import local_attention, local_prefill_impl  # noqa: E402

REL_TOL = 1e-2


def band_pairs(T: int, window: int, sinks: int) -> int:
    """Visible (query, key) pairs of the window + sink mask (no documents), exactly."""
    W = min(window, T)
    pairs = W * (W + 1) // 2 + (T - W) * W  # window part: min(m + 1, window) per query
    # sinks outside the window: query m >= window sees min(sinks, m - window + 1) extra keys
    n_q = T - window
    if sinks > 0 and n_q > 0:
        full = max(0, n_q - sinks)  # queries with every sink outside the window
        ramp = n_q - full  # m - window + 1 = 1, 2, ..., ramp
        pairs += full * sinks + ramp * (ramp + 1) // 2
    return pairs


def causal_pairs(T: int) -> int:
    return T * (T + 1) // 2


def tflops(pairs: int, D: int, ms: float) -> float:
    return 4.0 * D * pairs / (ms * 1e-3) / 1e12


def time_ms(fn, dev, reps: int) -> dict:
    fn()  # warm-up (compiles, cuDNN graph build, probe)
    if dev.type != "cuda":
        ts = []
        for _ in range(max(1, min(reps, 3))):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return {"ms": statistics.median(ts), "n": len(ts), "method": "perf_counter"}
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return {"ms": statistics.median(ts), "n": reps, "min_ms": min(ts), "method": "cuda events median"}


def rows_reference(q, k, v, rows, window, sinks, scale):
    """fp32 attention of the given query rows, every head: [Hq, R, D]."""
    T, D = q.shape[2], q.shape[3]
    G = q.shape[1] // k.shape[1]
    n = torch.arange(T, device=q.device)
    m = rows[:, None]
    vis = (n[None] <= m) & (((m - n[None]) < window) | (n[None] < sinks))
    out = []
    for h in range(q.shape[1]):
        s = (q[0, h, rows].float() @ k[0, h // G].float().T) * scale
        s = s.masked_fill(~vis, float("-inf"))
        out.append(torch.softmax(s, -1) @ v[0, h // G].float())
    return torch.stack(out)


def errs(a, b) -> dict:
    a, b = a.float(), b.float()
    d = (a - b).abs()
    return {"max_abs": float(d.max()), "rel": float((a - b).norm() / b.norm().clamp_min(1e-30))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check_window_sdpa.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--hq", type=int, default=24)
    ap.add_argument("--hkv", type=int, default=3)
    ap.add_argument("--dense-hq", type=int, default=32)
    ap.add_argument("--dense-hkv", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--check-seq-lens", type=int, nargs="+", default=[5000, 20000, 32768])
    ap.add_argument("--time-seq-lens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--long", action="store_true", help="also time T = 1048576")
    ap.add_argument("--dense-full-max", type=int, default=131072, help="above this T time one dense KV group, x groups")
    ap.add_argument("--reps", type=int, default=0, help="timing repetitions (0: 20 / 10 / 3 by T)")
    ap.add_argument("--backends", nargs="+", default=list(ws.BACKENDS))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    on_cuda = dev.type == "cuda"
    dt = torch.bfloat16 if on_cuda else torch.float32
    W, S, HQ, HKV, D = args.window, args.sinks, args.hq, args.hkv, args.head_dim
    scale = 1.0 / math.sqrt(D)
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True  # an eager flex fallback would be T x T
    t_start = time.time()
    res: dict = {"info": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "argv": sys.argv,
                          "device": torch.cuda.get_device_name(dev) if on_cuda else "cpu", "dtype": str(dt)},
                 "checks": [], "probe": {}, "timing": []}
    try:
        import triton

        res["info"]["triton"] = triton.__version__
    except ImportError:
        pass
    if on_cuda:
        res["info"]["cudnn"] = torch.backends.cudnn.version()
    print(json.dumps(res["info"]), flush=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out_path.write_text(json.dumps(res, indent=1, default=str))

    def check(name, ok, **detail):
        res["checks"].append({"check": name, "pass": bool(ok), **detail})
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: " + ", ".join(f"{k}={v}" for k, v in detail.items()), flush=True)

    def failed(name, exc):
        """A step that raised: its traceback, and a failed check that names it."""
        traceback.print_exc()
        check(name, False, error=f"{type(exc).__name__}: {exc}"[:300])

    def end_length():
        if on_cuda:
            torch.cuda.empty_cache()
        save()

    # backends by name; on the CPU the pure-torch primitive stands in for both (smoke test)
    def backend(name):
        return name if on_cuda else ws.causal_attention_with_lse_reference

    available = []
    g = torch.Generator(device=dev).manual_seed(0)

    # ------------------------------------------------------------------ (a) probe + LSE layout
    print("==== (a) first-use probes and the raw logsumexp at T = 1000", flush=True)
    for name in args.backends:
        if not on_cuda:
            available.append(name)
            continue
        try:
            info = ws.backend_info(name, dev, dt, D)
            res["probe"][name] = dataclasses.asdict(info)
            print(f"  {name}: ok={info.ok} lse_layout={info.lse_layout} lse_scale={info.lse_scale:.6f} "
                  f"({'natural' if info.lse_scale == 1.0 else 'base-2'}) gqa_native={info.gqa_native} "
                  f"contiguous_inputs={info.contiguous_inputs} raw_lse={info.raw_lse_shape} {info.raw_lse_dtype} "
                  f"merge={info.merge} end_to_end_rel_err={info.end_to_end_rel_err}", flush=True)
            for a in info.attempts:
                print(f"      tried {a}", flush=True)
            if info.reason:
                print(f"      reason: {info.reason}", flush=True)
            # direct call at T = 1000, equal heads, contiguous
            T0 = 1000
            q = torch.randn(1, 4, T0, D, device=dev, dtype=dt, generator=g)
            k = torch.randn(1, 4, T0, D, device=dev, dtype=dt, generator=g)
            v = torch.randn(1, 4, T0, D, device=dev, dtype=dt, generator=g)
            o, raw = ws._raw_op(name, q, k, v, scale)
            ref_o, ref_lse = ws.causal_attention_with_lse_reference(q.float(), k.float(), v.float(), scale)
            detail = {"raw_lse_shape": tuple(raw.shape), "raw_lse_dtype": str(raw.dtype), "raw_lse_strides": raw.stride(),
                      "out_shape": tuple(o.shape), "out_strides": o.stride(), "out_rel_err": f"{errs(o, ref_o)['rel']:.2e}"}
            cands = ws._lse_layout_candidates(raw, 1, 4, T0)
            best = None
            for layout in cands:
                lse = ws._lse_view(raw, layout, 1, 4, T0).float()
                for base, sc in (("natural", 1.0), ("base2", math.log(2.0))):
                    e = float((lse * sc - ref_lse).abs().max())
                    detail[f"lse_{layout}_{base}_max_abs_err"] = f"{e:.2e}"
                    if best is None or e < best[2]:
                        best = (layout, base, e)
            detail["best_match"] = best
            ok = info.ok and best is not None and best[2] <= 5e-2
            check(f"(a) {name} probe + raw lse at T={T0}", ok, **detail)
            if info.ok:
                available.append(name)
            del q, k, v, o, raw
        except Exception as exc:
            failed(f"(a) {name} probe", exc)
    save()

    # --------------------------------------------------------------------------- (b) correctness
    print(f"==== (b) correctness: window {W}, sinks {S}, Hq {HQ} / Hkv {HKV}, D {D}, {dt}", flush=True)
    for T in args.check_seq_lens:
        try:
            q = torch.randn(1, HQ, T, D, device=dev, dtype=dt, generator=g)
            k = torch.randn(1, HKV, T, D, device=dev, dtype=dt, generator=g)
            v = torch.randn(1, HKV, T, D, device=dev, dtype=dt, generator=g)
            cand = {0, 1, 2, 3, 4, 5, W - 2, W - 1, W, W + 1, W + 2, W + 3, W + 4, W + 5, 2 * W - 1, 2 * W, 2 * W + 3,
                    T - 2, T - 1}
            cand |= {int(x) for x in torch.randint(0, T, (48,), generator=torch.Generator().manual_seed(T))}
            rows = torch.tensor(sorted(c for c in cand if 0 <= c < T), device=dev)
            ref = rows_reference(q, k, v, rows, W, S, scale)
            with torch.no_grad():
                out_f = local_attention(q, k, v, window=W, sinks=S, impl="flex")
            e_f = errs(out_f[0][:, rows], ref)
            print(f"  T={T}: flex vs fp32 rows: max_abs {e_f['max_abs']:.2e} rel {e_f['rel']:.2e}", flush=True)
            for name in available:
                with torch.no_grad():
                    out_c = ws.window_attention_sdpa(q, k, v, window=W, sinks=S, backend=backend(name))
                if on_cuda:
                    torch.cuda.synchronize()
                e_c = errs(out_c[0][:, rows], ref)
                e_cf = errs(out_c, out_f)
                ok = e_c["rel"] <= REL_TOL and e_c["rel"] <= 2 * e_f["rel"] + 1e-3 and bool(torch.isfinite(out_c).all())
                check(f"(b) {name}_chunked T={T}", ok, vs_fp32_rows_max_abs=f"{e_c['max_abs']:.2e}",
                      vs_fp32_rows_rel=f"{e_c['rel']:.2e}", flex_vs_fp32_rows_rel=f"{e_f['rel']:.2e}",
                      vs_flex_max_abs=f"{e_cf['max_abs']:.2e}", vs_flex_rel=f"{e_cf['rel']:.2e}", rows=len(rows))
                if name == available[0]:
                    if on_cuda:  # the Triton merge against the torch merge on the same inputs
                        with torch.no_grad():
                            out_t = ws.window_attention_sdpa(q, k, v, window=W, sinks=S, backend=name, merge="torch")
                        e_m = errs(out_c, out_t)
                        check(f"(b) {name}_chunked T={T} Triton merge vs torch merge", e_m["rel"] <= 2e-3,
                              max_abs=f"{e_m['max_abs']:.2e}", rel=f"{e_m['rel']:.2e}")
                        del out_t
                    # the model's entry point: default dispatch under no_grad
                    with torch.no_grad():
                        impl, why = local_prefill_impl(q, k, v)
                        out_d = local_attention(q, k, v, window=W, sinks=S)
                    want = f"{name}_chunked" if on_cuda and name == "cudnn" else "flex"
                    same = torch.equal(out_d, out_c) if impl != "flex" else None
                    close = same or impl == "flex" or errs(out_d, out_c)["rel"] <= 1e-3  # bitwise unless nondeterministic
                    check(f"(b) local_attention default dispatch T={T}", impl == want and close,
                          impl=impl, reason=why, bitwise_equal_to_chunked=same)
                    del out_d
                del out_c
            del q, k, v, out_f, ref
        except Exception as exc:
            failed(f"(b) T={T}", exc)
        end_length()

    # ------------------------------------------------------------------------------ (c) timing
    print("==== (c) timing", flush=True)
    time_lens = list(args.time_seq_lens) + ([1048576] if args.long else [])
    for T in time_lens:
        reps = args.reps or (20 if T <= 32768 else 10 if T <= 131072 else 3)
        rows_t = []

        def add(name, r, pairs, **extra):
            row = {"name": name, "T": T, **r, "pairs": pairs, "tflops_useful": tflops(pairs, D, r["ms"]), **extra}
            rows_t.append(row)
            res["timing"].append(row)
            print(f"  T={T:>8} {name:<44} {r['ms']:10.3f} ms {row['tflops_useful']:7.1f} TF/s", flush=True)
            return row

        try:
            # dense cuDNN causal, 32 q / 4 kv heads (one KV group above --dense-full-max, x groups)
            full = T <= args.dense_full_max
            hq_d, hkv_d = (args.dense_hq, args.dense_hkv) if full else (args.dense_hq // args.dense_hkv, 1)
            qd = torch.randn(1, hq_d, T, D, device=dev, dtype=dt, generator=g)
            kd = torch.randn(1, hkv_d, T, D, device=dev, dtype=dt, generator=g)
            vd = torch.randn(1, hkv_d, T, D, device=dev, dtype=dt, generator=g)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            sdpb = SDPBackend.CUDNN_ATTENTION if on_cuda else SDPBackend.MATH

            def dense():
                with sdpa_kernel(sdpb):
                    return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=hq_d != hkv_d)

            with torch.no_grad():
                rd = add(f"dense cuDNN causal ({hq_d}q/{hkv_d}kv heads)", time_ms(dense, dev, max(2, reps // 2)),
                         causal_pairs(T) * hq_d, scaled_to_heads=args.dense_hq)
            dense_tf = rd["tflops_useful"]
            del qd, kd, vd
            if on_cuda:
                torch.cuda.empty_cache()
            q = torch.randn(1, HQ, T, D, device=dev, dtype=dt, generator=g)
            k = torch.randn(1, HKV, T, D, device=dev, dtype=dt, generator=g)
            v = torch.randn(1, HKV, T, D, device=dev, dtype=dt, generator=g)
            pairs = band_pairs(T, W, S) * HQ
            fns = {f"{n}_chunked ({HQ}h)": (lambda n=n: ws.window_attention_sdpa(q, k, v, window=W, sinks=S, backend=backend(n)))
                   for n in available}
            fns[f"flex tuned ({HQ}h)"] = lambda: local_attention(q, k, v, window=W, sinks=S, impl="flex")
            for name, fn in fns.items():
                try:
                    if on_cuda:
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    with torch.no_grad():
                        r = add(name, time_ms(fn, dev, reps), pairs)
                    r["pct_of_dense_tflops"] = 100.0 * r["tflops_useful"] / dense_tf
                    if on_cuda:
                        r["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
                    print(f"      {r['pct_of_dense_tflops']:.1f}% of dense cuDNN's {dense_tf:.0f} TF/s"
                          + (f", peak extra memory {r['peak_extra_gib']:.2f} GiB" if on_cuda else ""), flush=True)
                except Exception as exc:
                    failed(f"(c) timing {name} T={T}", exc)
            # parts of the chunked path (first available backend), one call of the automatic plan
            if available and T > W:
                name = available[0]
                attn = ws._resolve_backend(backend(name), q)
                h0, h1, g0, g1 = ws.plan_head_calls(HQ, HKV, None, -(-T // W) * W * D)[0]
                n = -(-T // W)
                qc, kc, vc = q[:, h0:h1], k[:, g0:g1], v[:, g0:g1]
                if n * W != T:
                    pad = (0, 0, 0, n * W - T)
                    qc, kc, vc = F.pad(qc, pad), F.pad(kc, pad), F.pad(vc, pad)
                Qf, Kf, Vf = ws._fold(qc, n, W), ws._fold(kc, n, W), ws._fold(vc, n, W)
                idx = ws._prev_query_index(W, dev)
                Qp = Qf.unflatten(0, (1, n))[:, 1:].index_select(3, idx).flatten(0, 1)
                Kp = Kf.unflatten(0, (1, n))[:, :-1].flip(3).flatten(0, 1)
                Vp = Vf.unflatten(0, (1, n))[:, :-1].flip(3).flatten(0, 1)
                hc = h1 - h0
                calls = (HQ // hc)
                with torch.no_grad():
                    diag_pairs = n * W * (W + 1) // 2 * hc
                    prev_pairs = (n - 1) * W * (W + 1) // 2 * hc
                    add(f"  part: {name} diagonal call ({hc}h of {HQ})", time_ms(lambda: attn(Qf, Kf, Vf, scale), dev, reps),
                        diag_pairs, heads=hc, calls_per_layer=calls)
                    add(f"  part: flipped q/k/v copies ({hc}h)", time_ms(
                        lambda: (Qf.unflatten(0, (1, n))[:, 1:].index_select(3, idx), Kf.unflatten(0, (1, n))[:, :-1].flip(3),
                                 Vf.unflatten(0, (1, n))[:, :-1].flip(3)), dev, reps), 0, heads=hc)
                    add(f"  part: {name} previous-chunk call ({hc}h)", time_ms(lambda: attn(Qp, Kp, Vp, scale), dev, reps),
                        prev_pairs, heads=hc)
                    o_d, l_d = ws._call(attn, Qf, Kf, Vf, scale)
                    o_p, l_p = ws._call(attn, Qp, Kp, Vp, scale)
                    oc = torch.empty(1, hc, T, D, device=dev, dtype=dt)
                    ks_, vs_ = k[:, g0:g1, :S], v[:, g0:g1, :S]
                    merge = ws._resolve_merge(ws.MERGE_IMPL, q)
                    if merge == "triton":
                        mfn = lambda: ws._merge_triton(oc, q[:, h0:h1], o_d, l_d, o_p, l_p, ks_ if S else None,  # noqa: E731
                                                       vs_ if S else None, C=W, n=n, scale=scale)
                    else:
                        mfn = lambda: ws._merge_torch(oc, qc, o_d, l_d, o_p, l_p, ks_ if S else None,  # noqa: E731
                                                      vs_ if S else None, C=W, n=n, scale=scale)
                    add(f"  part: merge + sinks ({merge}, {hc}h)", time_ms(mfn, dev, reps), 0, heads=hc)
                del Qf, Kf, Vf, Qp, Kp, Vp, qc, kc, vc, o_d, o_p, l_d, l_p, oc
            del q, k, v
        except Exception as exc:
            failed(f"(c) timing T={T}", exc)
        end_length()

    # ---------------------------------------------------------------------------------- summary
    print("\n==== summary (TF/s per useful FLOP; parts: one call of the plan, TF/s of its own pairs)")
    print(f"{'T':>8}  {'what':<46} {'ms':>10} {'TF/s':>7} {'% dense':>8}")
    for r in res["timing"]:
        pct = f"{r['pct_of_dense_tflops']:8.1f}" if "pct_of_dense_tflops" in r else " " * 8
        tf = f"{r['tflops_useful']:7.1f}" if r["pairs"] else " " * 7
        print(f"{r['T']:>8}  {r['name'][:46]:<46} {r['ms']:10.3f} {tf} {pct}")
    n_fail = sum(not c["pass"] for c in res["checks"])
    res["info"]["elapsed_s"] = round(time.time() - t_start, 1)
    save()
    print(f"checks: {len(res['checks']) - n_fail} PASS, {n_fail} FAIL; elapsed {res['info']['elapsed_s']} s; wrote {out_path}")
    print("ALL PASS" if n_fail == 0 else "SOME FAILED")
    return 0 if n_fail == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
