"""Prefill benchmark of one decoder layer's attention: dense cuDNN SDPA vs RTPurbo.

Shape: Qwen3-30B-A3B attention (32 query heads, 4 KV heads, head_dim 128), batch 1, bf16.
Per sequence length T:
  dense       cuDNN SDPA, causal; GQA through enable_gqa or by expanding k/v (both timed at
              the first T and checked against each other, the faster one is the baseline).
              At T > --dense-full-max (default 128K) only one KV group (8 q heads, 1 kv head)
              is timed and the layer time is 4x that (per-head cost is what scales).
  local       FlexAttention window 8192 + 4 sinks (kernels/masks.py), 24 heads (3 KV groups)
              and 32 heads (4 groups).
  selection   indexer block mass (Triton; "pooled" and "mean" modes) + top-p threshold
              ("triton" fused kernel; torch "sort" and "bisect" for comparison) for the 8
              retrieval heads of one KV group; indexer
              inputs are synthetic "clustered" data (see make_clustered_indexer), not a trained
              indexer: the density they give is a property of that data.
  sparse      block_sparse_attention (kernels/sparse_prefill.py, compiled flex, forward) for the
              8 retrieval heads, at the density the selection gave, and over a sweep of
              synthetic random selections of given densities (random_selection).
  layers      rtp_1of4 = local(24) + selection(pooled, triton) + sparse(8);  rtp_0of4 = local(32);
              rtp_weighted = 0.6 * rtp_1of4 + 0.4 * rtp_0of4 (15% of query heads retrieval when
              retrieval heads come as whole KV groups: 0.6 of the layers hold one such group).
Times: triton.testing.do_bench median (L2 flushed) for calls under --long-ms; longer calls
(dense at 128K+/1M) are timed with CUDA events, median of --long-reps runs after one warm-up.
TFLOP/s "useful" counts 4 * D FLOPs per visible (query, key) pair of what each variant computes.
Decode rows come from scripts/bench_decode.run_decode_bench when that module exists.

  python scripts/bench_attention.py --seq-lens 32768 131072 1048576 --out bench_prefill.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.block_select import (  # noqa: E402
    BlockSelection,
    indexer_block_mass,
    random_selection,
    select_blocks,
    selection_to_dense,
)
from kernels.masks import local_attention, window_sink_block_mask  # noqa: E402
from kernels.sparse_prefill import block_sparse_attention, selection_block_mask  # noqa: E402

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

LAYER_MIX_1OF4 = 0.6  # fraction of layers with one retrieval KV group -> 15% retrieval heads


# ------------------------------------------------------------------------------ timing


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn, dev, *, long_ms: float, long_reps: int) -> dict:
    """Median milliseconds of fn(); one warm-up call first (compiles, caches masks)."""
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    first = (time.perf_counter() - t0) * 1e3
    if dev.type != "cuda":
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return {"ms": statistics.median(ts), "method": "perf_counter", "n": 3, "first_call_ms": first}
    # second call to estimate without compile time
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    est = s.elapsed_time(e)
    if est < long_ms:
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=max(25, 2 * est), rep=max(100, 10 * est), return_mode="median")
        return {"ms": ms, "method": "do_bench", "first_call_ms": first}
    ts = [est]
    for _ in range(long_reps - 1):
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return {"ms": statistics.median(ts), "method": "events", "n": len(ts), "first_call_ms": first}


# ------------------------------------------------------------------------- spot checks


def spot_check(out, q, k, v, allowed, heads, row_starts, q_block=128) -> float:
    """Worst relative error of out's rows [r0, r0 + q_block) against fp32 attention with the
    bool mask allowed(h, rows) -> [R, T]: verifies every timed output at the timed shape
    (Dynamo recompiles per shape; an eager fallback would ignore the block lists)."""
    T, D = q.shape[2], q.shape[3]
    G = q.shape[1] // k.shape[1]
    worst = 0.0
    for h in heads:
        kf, vf = k[0, h // G].float(), v[0, h // G].float()
        for r0 in row_starts:
            rows = torch.arange(r0, min(r0 + q_block, T), device=q.device)
            s = (q[0, h, rows].float() @ kf.T) / math.sqrt(D)
            s = s.masked_fill(~allowed(h, rows), float("-inf"))
            ref = torch.softmax(s, -1) @ vf
            err = float((out[0, h, rows].float() - ref).norm() / ref.norm())
            worst = max(worst, err if err == err else float("inf"))
    return worst


def local_allowed(T, window, sinks, device):
    n = torch.arange(T, device=device)

    def allowed(h, rows):
        m = rows[:, None]
        return (n[None] <= m) & (((m - n[None]) < window) | (n[None] < sinks))

    return allowed


def selection_allowed(sel: BlockSelection):
    T, Bq, Bk = sel.seq_len, sel.q_block_size, sel.block_size
    n = torch.arange(T, device=sel.kv_indices.device)
    n_kb = -(-T // Bk)

    def allowed(h, rows):
        qb = int(rows[0]) // Bq
        num = int(sel.kv_num_blocks[0, h, qb])
        blocks = torch.zeros(n_kb, dtype=torch.bool, device=n.device)
        blocks[sel.kv_indices[0, h, qb, :num].long()] = True
        return blocks[n // Bk][None] & (n[None] <= rows[:, None])

    return allowed


SPOT_TOL = 2e-2


# ---------------------------------------------------------------------------- counting


def causal_pairs(T: int) -> int:
    return T * (T + 1) // 2


def local_pairs(T: int, window: int, sinks: int) -> int:
    m = torch.arange(T, dtype=torch.int64)
    in_window = torch.clamp(m + 1, max=window)
    extra_sinks = torch.clamp(torch.clamp(m - window + 1, min=0), max=sinks)
    return int((in_window + extra_sinks).sum())


def selection_pairs(sel: BlockSelection) -> int:
    """Visible (query, key) pairs summed over heads and batch (causal, no documents)."""
    T, Bq, Bk = sel.seq_len, sel.q_block_size, sel.block_size
    total = 0
    n_qb = sel.kv_num_blocks.shape[-1]
    for c0 in range(0, n_qb, 512):
        c1 = min(c0 + 512, n_qb)
        idx = sel.kv_indices[:, :, c0:c1].long()
        valid = torch.arange(idx.shape[-1], device=idx.device) < sel.kv_num_blocks[:, :, c0:c1, None]
        qs = (torch.arange(c0, c1, device=idx.device) * Bq)[:, None]
        qe = torch.clamp(qs + Bq, max=T) - 1
        ks = idx * Bk
        ke = torch.clamp(ks + Bk, max=T) - 1
        L = ke - ks + 1
        # queries m in [a, b1] see m - ks + 1 keys, queries in [max(qs, ke), qe] see L keys
        a = torch.maximum(qs, ks)
        b1 = torch.minimum(qe, ke - 1)
        n1 = torch.clamp(b1 - a + 1, min=0)
        s1 = n1 * (a - ks + 1) + n1 * (n1 - 1) // 2
        n2 = torch.clamp(qe - torch.maximum(qs, ke) + 1, min=0)
        total += int(torch.where(valid, s1 + n2 * L, 0).sum())
    return total


def tflops(pairs: int, D: int, ms: float) -> float:
    return 4.0 * D * pairs / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- inputs


def make_clustered_indexer(H: int, T: int, r: int, device, *, topics: int = 64, span: int = 256, q_span: int = 128,
                           center_norm: float = 3.0, noise: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic indexer inputs with retrieval structure: keys come in spans of `span` tokens
    about one of `topics` random centres; each query block of `q_span` tokens looks for one
    topic. With the defaults a query's softmax puts ~90% of its mass on the ~1/64 of the keys
    of its topic. Returns (qi, ki) [1, H, T, r] bf16."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(H, topics, r, device=device, generator=g)
    centres = centres / centres.norm(dim=-1, keepdim=True) * center_norm
    k_topic = torch.randint(0, topics, (H, (T + span - 1) // span), device=device, generator=g)
    k_topic = k_topic.repeat_interleave(span, dim=1)[:, :T]
    q_topic = torch.randint(0, topics, (H, (T + q_span - 1) // q_span), device=device, generator=g)
    q_topic = q_topic.repeat_interleave(q_span, dim=1)[:, :T]
    hidx = torch.arange(H, device=device)[:, None]
    ki = centres[hidx, k_topic] + noise * torch.randn(H, T, r, device=device, generator=g)
    qi = centres[hidx, q_topic] + noise * torch.randn(H, T, r, device=device, generator=g)
    return qi[None].bfloat16(), ki[None].bfloat16()


# ----------------------------------------------------------------------------- bench


def dense_fns(q, k, v, dev):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if dev.type == "cuda" else SDPBackend.MATH
    G = q.shape[1] // k.shape[1]

    def gqa():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def expand():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True)

    return {"cudnn_gqa": gqa, "cudnn_expand": expand}


def run_prefill(args, dev) -> tuple[list[dict], dict]:
    HQ, HKV, D = args.hq, args.hkv, args.head_dim
    G = HQ // HKV
    W, S, BK, BQ, R = args.window, args.sinks, 64, 128, 16
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows: list[dict] = []
    notes: dict = {"selection_agreement": [], "mask_bytes": {}, "errors": []}
    timing = dict(long_ms=args.long_ms, long_reps=args.long_reps)
    dense_choice = None

    def add(name, T, res, pairs=None, **extra):
        row = {"name": name, "T": T, **res, **extra}
        if pairs is not None:
            row["pairs"] = pairs
            row["tflops_useful"] = tflops(pairs, D, res["ms"])
        rows.append(row)
        tf = f"{row['tflops_useful']:7.1f} TF/s" if pairs is not None else ""
        print(f"  {name:<44} {res['ms']:10.3f} ms {tf}  [{res.get('method')}]", flush=True)
        return row

    def report_spot(r):
        bad = not (r["spot_rel_err"] <= SPOT_TOL)
        notes.setdefault("spot_bad", 0)
        notes["spot_bad"] += int(bad)
        print(f"    spot check rows vs fp32 reference: rel_err {r['spot_rel_err']:.2e} {'BAD' if bad else 'ok'}", flush=True)

    for T in args.seq_lens:
        print(f"=== T = {T}", flush=True)
        spot_rows = sorted({(T // 2) // 128 * 128, (T - 1) // 128 * 128})
        t_start = time.time()
        g = torch.Generator(device=dev).manual_seed(T)
        layer = {}
        # ---- dense baseline
        full_layer = T <= args.dense_full_max
        hq_d, hkv_d = (HQ, HKV) if full_layer else (G, 1)
        q = torch.randn(1, hq_d, T, D, device=dev, dtype=dt, generator=g)
        k = torch.randn(1, hkv_d, T, D, device=dev, dtype=dt, generator=g)
        v = torch.randn(1, hkv_d, T, D, device=dev, dtype=dt, generator=g)
        fns = dense_fns(q, k, v, dev)
        if dense_choice is None:  # pick the GQA form once, after checking both agree
            outs, times = {}, {}
            for name, fn in fns.items():
                try:
                    with torch.no_grad():
                        outs[name] = fn()
                    times[name] = add(f"dense {name} ({hq_d}h)", T, time_ms(fn, dev, **timing), causal_pairs(T) * hq_d)["ms"]
                except Exception as exc:  # e.g. cuDNN without GQA support
                    notes["errors"].append(f"dense {name} at T={T}: {exc!r}"[:400])
                    print(f"  dense {name}: failed {exc!r}"[:300], flush=True)
            if len(outs) == 2:
                a, b = outs["cudnn_gqa"].float(), outs["cudnn_expand"].float()
                notes["dense_gqa_vs_expand_rel_err"] = float((a - b).norm() / b.norm())
                print(f"  cudnn gqa vs expand rel err {notes['dense_gqa_vs_expand_rel_err']:.2e}", flush=True)
            dense_choice = min(times, key=times.get)
            notes["dense_choice"] = dense_choice
            dense_ms = times[dense_choice]
            del outs
        else:
            dense_ms = add(f"dense {dense_choice} ({hq_d}h)", T, time_ms(fns[dense_choice], dev, **timing), causal_pairs(T) * hq_d)["ms"]
        per_layer = dense_ms * (HQ // hq_d)
        layer["dense"] = per_layer
        del q, k, v, fns
        # ---- local heads
        t0 = time.perf_counter()
        bm = window_sink_block_mask(T, W, S, block_size=128, device=dev, compute_q_blocks=False)
        _sync(dev)
        notes["mask_bytes"][T] = {
            "build_ms_first_call": (time.perf_counter() - t0) * 1e3,
            "bytes": int(sum(t.numel() * t.element_size() for t in (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices))),
            "kv_indices_shape": list(bm.kv_indices.shape), "full_kv_indices_shape": list(bm.full_kv_indices.shape),
        }
        for n_groups in (HKV - 1, HKV):
            hq = n_groups * G
            q = torch.randn(1, hq, T, D, device=dev, dtype=dt, generator=g)
            k = torch.randn(1, n_groups, T, D, device=dev, dtype=dt, generator=g)
            v = torch.randn(1, n_groups, T, D, device=dev, dtype=dt, generator=g)
            fn = lambda: local_attention(q, k, v, window=W, sinks=S)  # noqa: E731
            r = add(f"local window+sinks ({hq}h)", T, time_ms(fn, dev, **timing), local_pairs(T, W, S) * hq)
            layer[f"local{hq}"] = r["ms"]
            with torch.no_grad():
                r["spot_rel_err"] = spot_check(fn(), q, k, v, local_allowed(T, W, S, dev), [0, hq - 1], spot_rows)
            report_spot(r)
            del q, k, v
        # ---- selection for one retrieval KV group (G query heads)
        qi, ki = make_clustered_indexer(G, T, R, dev, seed=T)
        kw = dict(top_p=args.top_p, block_size=BK, q_block_size=BQ, window=W, sinks=S)
        sel_by_mode = {}
        for mode in ("pooled", "mean"):
            if mode == "mean" and T > args.mean_max:
                continue
            fn = lambda: indexer_block_mass(qi, ki, block_size=BK, q_block_size=BQ, mode=mode, q_block_end=min(2048, -(-T // BQ)))  # noqa: E731
            add(f"block mass {mode} ({G}h, first <=2048 q blocks)", T, time_ms(fn, dev, **timing))
            for thr in ("triton", "sort", "bisect"):
                if mode == "mean" and thr != "triton":
                    continue
                fn = lambda: select_blocks(qi, ki, mode=mode, threshold=thr, **kw)  # noqa: E731
                res = time_ms(fn, dev, **timing)
                sel = select_blocks(qi, ki, mode=mode, threshold=thr, **kw)
                sel_by_mode[mode] = sel
                r = add(f"select_blocks {mode}/{thr} ({G}h)", T, res, density=float(sel.density.mean()),
                        keys_per_query=float(sel.mean_keys_per_query().mean()))
                if mode == "pooled" and thr == "triton":
                    layer["select"] = r["ms"]
        if "mean" in sel_by_mode:
            a = selection_to_dense(sel_by_mode["mean"])
            b = selection_to_dense(sel_by_mode["pooled"])
            mass = indexer_block_mass(qi, ki, block_size=BK, q_block_size=BQ, mode="mean")
            agree = {
                "T": T,
                "jaccard_pooled_vs_mean": float((a & b).sum() / (a | b).sum()),
                "mean_mass_kept_by_mean_sel": float(torch.where(a, mass, 0).sum(-1).mean()),
                "mean_mass_kept_by_pooled_sel": float(torch.where(b, mass, 0).sum(-1).mean()),
                "density_mean": float(sel_by_mode["mean"].density.mean()),
                "density_pooled": float(sel_by_mode["pooled"].density.mean()),
            }
            notes["selection_agreement"].append(agree)
            print(f"  selection agreement: {agree}", flush=True)
            del mass, a, b
        # ---- sparse attention for the retrieval group
        q = torch.randn(1, G, T, D, device=dev, dtype=dt, generator=g)
        k = torch.randn(1, 1, T, D, device=dev, dtype=dt, generator=g)
        v = torch.randn(1, 1, T, D, device=dev, dtype=dt, generator=g)
        sel = sel_by_mode["pooled"]
        fn = lambda: selection_block_mask(sel, coarse=False, compute_q_blocks=False)  # noqa: E731
        add(f"block_sparse mask build only ({G}h)", T, time_ms(fn, dev, **timing))
        with torch.no_grad():
            fn = lambda: block_sparse_attention(q, k, v, sel, window=W, sinks=S, block_size=BK)  # noqa: E731
            r = add(f"block_sparse top_p={args.top_p} pooled ({G}h)", T, time_ms(fn, dev, **timing), selection_pairs(sel),
                    density=float(sel.density.mean()))
            r["spot_rel_err"] = spot_check(fn(), q, k, v, selection_allowed(sel), [0, G - 1], spot_rows)
            report_spot(r)
        layer["sparse"] = r["ms"]
        density_real = float(sel.density.mean())
        sweep = {}
        for d in args.densities:
            if T > args.dense_full_max and d > args.sweep_max_density_long:
                continue
            rs = random_selection(1, G, T, d, block_size=BK, q_block_size=BQ, window=W, sinks=S, device=dev, generator=g)
            with torch.no_grad():
                fn = lambda: block_sparse_attention(q, k, v, rs, window=W, sinks=S, block_size=BK)  # noqa: E731
                r = add(f"block_sparse synthetic density {d} ({G}h)", T, time_ms(fn, dev, **timing), selection_pairs(rs),
                        density=float(rs.density.mean()))
                r["spot_rel_err"] = spot_check(fn(), q, k, v, selection_allowed(rs), [G - 1], spot_rows)
                report_spot(r)
                sweep[d] = r["ms"]
            del rs
        del q, k, v, qi, ki, sel, sel_by_mode
        # ---- layer totals
        dense = layer["dense"]
        one = layer[f"local{HQ - G}"] + layer["select"] + layer["sparse"]
        none = layer[f"local{HQ}"]
        weighted = LAYER_MIX_1OF4 * one + (1 - LAYER_MIX_1OF4) * none
        paper_route = layer[f"local{HQ - G}"] + dense / HKV  # retrieval group dense
        for name, ms, extra in (
            ("LAYER dense cuDNN", dense, {}),
            (f"LAYER rtp_1of4 (top_p {args.top_p}, density {density_real:.3f})", one, {"density": density_real}),
            ("LAYER rtp_0of4 (all local)", none, {}),
            ("LAYER rtp_weighted (0.6 x 1of4 + 0.4 x 0of4)", weighted, {"density": density_real}),
            ("LAYER paper route 1of4 (retrieval group dense)", paper_route, {}),
            ("LAYER paper route weighted", LAYER_MIX_1OF4 * paper_route + (1 - LAYER_MIX_1OF4) * none, {}),
        ):
            rows.append({"name": name, "T": T, "ms": ms, "speedup_vs_dense": dense / ms, "method": "sum of parts", **extra})
            print(f"  {name:<60} {ms:10.3f} ms  x{dense / ms:6.2f}", flush=True)
        for d, sp in sweep.items():
            one_d = layer[f"local{HQ - G}"] + layer["select"] + sp
            w_d = LAYER_MIX_1OF4 * one_d + (1 - LAYER_MIX_1OF4) * none
            rows.append({"name": f"LAYER sweep density {d}: 1of4", "T": T, "ms": one_d, "speedup_vs_dense": dense / one_d,
                         "density": d, "method": "sum of parts (synthetic selection)"})
            rows.append({"name": f"LAYER sweep density {d}: weighted", "T": T, "ms": w_d, "speedup_vs_dense": dense / w_d,
                         "density": d, "method": "sum of parts (synthetic selection)"})
        print(f"--- T={T} done in {time.time() - t_start:.0f}s", flush=True)
        if dev.type == "cuda":
            notes.setdefault("max_memory_gib", {})[T] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.empty_cache()
    return rows, notes


def print_table(rows: list[dict]) -> None:
    print(f"\n{'T':>8}  {'what':<62} {'ms':>10} {'x dense':>8} {'TF/s':>7}")
    for r in rows:
        sp = f"{r['speedup_vs_dense']:8.2f}" if r.get("speedup_vs_dense") else " " * 8
        tf = f"{r['tflops_useful']:7.1f}" if r.get("tflops_useful") else " " * 7
        print(f"{r['T']:>8}  {r['name'][:62]:<62} {r['ms']:10.3f} {sp} {tf}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072, 1048576])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.5])
    ap.add_argument("--sweep-max-density-long", type=float, default=0.2, help="sweep cap above --dense-full-max")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dense-full-max", type=int, default=131072, help="above this T time one KV group of dense and x4")
    ap.add_argument("--mean-max", type=int, default=131072, help="largest T for the (expensive) mean-mode selection")
    ap.add_argument("--long-ms", type=float, default=200.0, help="calls longer than this are timed with events")
    ap.add_argument("--long-reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-decode", action="store_true", help="skip scripts/bench_decode.run_decode_bench")
    ap.add_argument("--decode-densities", type=float, nargs="+", default=None)
    ap.add_argument("--out", default="bench_attention.json")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    # an eager fallback after Dynamo's recompile limit would time (and compute) something else
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "argv": sys.argv,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(info), flush=True)
    rows, notes = run_prefill(args, dev)
    decode_rows: list[dict] = []
    if args.no_decode:
        print("decode: skipped (--no-decode)")
    else:
        try:
            from scripts.bench_decode import run_decode_bench
        except ImportError as exc:
            print(f"decode: scripts.bench_decode not available ({exc}); no decode rows")
        else:
            # bench_decode writes its own JSON beside ours (x.json -> x.decode.json)
            ns = argparse.Namespace(seq_lens=args.seq_lens, densities=args.decode_densities, modes=None, dtype="bf16", out=args.out)
            decode_rows = run_decode_bench(ns)
    print_table(rows)
    print(f"spot checks failed: {notes.get('spot_bad', 0)}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "prefill": rows, "notes": notes, "decode": decode_rows}, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
