"""Decode benchmark: one attention layer, one new token, dense SDPA vs RTPurbo decode kernels.

Shape: Qwen3-30B-A3B attention (32 query heads, 4 KV heads, head_dim 128), batch 1, bf16.
Layers timed at each cache length L:
  dense      SDPA over the full cache; every backend that runs (flash / efficient / cuDNN, with
             enable_gqa or with the 8 query heads of a group folded into the query length), the
             fastest is the baseline
  rtp_1of4   1 of 4 KV groups retrieval (8 retrieval query heads on KV head 0, top-p over 64-token
             blocks of a 16-d indexer) + 24 local heads (window 8192 + 4 sinks, ring buffer);
             indexer keys built so that a `density` fraction of the blocks holds ~97% of the mass
  rtp_0of4   all 32 heads local
and the RTPurbo parts alone (selection variants, retrieval attention, local attention).

Before timing, each RTPurbo configuration is checked against the pure-torch references (fp32 on
upcast inputs) and rerun to check that the kernels are deterministic (a race would show).
Times: triton.testing.do_bench median, L2 flushed before every run; "eager" launches from Python,
"graph" replays a CUDA graph of the same step (what a served decode step uses).
GB/s counts the bytes each variant must read (caches, indexer keys, kept blocks per query head),
against a device-to-device copy rate of ~3.0 TB/s on the H100 (see shared/anchors.md).

  python scripts/bench_decode.py --seq-lens 32768 131072 1048576 --out decode.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import sparse_decode as sd  # noqa: E402

HQ, HKV, D = 32, 4, 128
WINDOW, SINKS, BLOCK, R = 8192, 4, 64, 16
TOP_P = 0.9
COPY_TBPS = 3.0  # measured device-to-device copy rate on the lent H100 (anchors.md)


def _dtype(x) -> torch.dtype:
    if isinstance(x, torch.dtype):
        return x
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
            "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[str(x)]


# ------------------------------------------------------------------------------ inputs


def make_layer(L: int, n_retrieval_groups: int, density: float, dtype, device, seed=0) -> dict:
    """Keyword arguments of rtpurbo_decode for one layer at cache length L."""
    g = torch.Generator(device=device).manual_seed(seed)
    G = HQ // HKV
    roles = [h // G < n_retrieval_groups for h in range(HQ)]
    n_r = sum(roles)
    n_lkv = HKV - n_retrieval_groups
    lens = torch.tensor([L], device=device, dtype=torch.int32)
    q = torch.randn(1, HQ, D, device=device, generator=g).to(dtype)
    args = dict(q=q, cache_lens=lens, is_retrieval=roles, top_p=TOP_P, block_size=BLOCK,
                window=WINDOW, sinks=SINKS)
    if n_lkv:
        W = WINDOW
        mk = lambda *s: torch.randn(*s, device=device, generator=g).to(dtype)  # noqa: E731
        args.update(sink_k=mk(1, n_lkv, SINKS, D), sink_v=mk(1, n_lkv, SINKS, D),
                    ring_k=mk(1, n_lkv, W, D), ring_v=mk(1, n_lkv, W, D),
                    kv_head_of_l=[h // G - n_retrieval_groups for h in range(HQ) if not roles[h]])
    if n_r:
        k = torch.randn(1, n_retrieval_groups, L, D, device=device, generator=g).to(dtype)
        v = torch.randn(1, n_retrieval_groups, L, D, device=device, generator=g).to(dtype)
        qi = torch.randn(1, n_r, R, device=device, generator=g)
        # per head: a random `density` share of the blocks ("hot") gets a score gap delta so that
        # it holds ~97% of the indexer mass; noise of std 0.3 on every score
        nb = -(-L // BLOCK)
        n_hot = max(1, round(density * nb))
        delta = math.log(0.97 * (1 - density) / (0.03 * density))
        unit = qi / qi.norm(dim=-1, keepdim=True)
        noise = torch.randn(1, n_r, L, R, device=device, generator=g) * (0.3 / math.sqrt(R))
        hot = torch.zeros(1, n_r, nb, device=device)
        for h in range(n_r):
            hot[0, h, torch.randperm(nb, device=device, generator=g)[:n_hot]] = 1.0
        hot_tok = hot.repeat_interleave(BLOCK, dim=-1)[..., :L]
        ki = noise + (delta * hot_tok)[..., None] * unit[:, :, None, :] / qi.norm(
            dim=-1, keepdim=True)[:, :, None, :]
        args.update(k_cache=k, v_cache=v, kv_head_of_r=[h // G for h in range(HQ) if roles[h]],
                    qi=qi.to(dtype), ki_cache=ki.to(dtype))
    return args


# ------------------------------------------------------------------------------ bytes


def bytes_dense(L: int, esize: int) -> int:
    return 2 * HKV * L * D * esize


def bytes_rtpurbo(args, block_mask, esize: int) -> dict:
    """Bytes the RTPurbo step must read: indexer keys, kept tokens per retrieval head, local;
    plus the retrieval heads' kept density (chosen / free blocks), selected block fraction
    (sel_frac) and kept token fraction (kept_frac, tokens of the selected blocks / L)."""
    L = int(args["cache_lens"][0])
    out = dict(indexer=0, retrieval=0, local=0, kept_frac=None, density=None, sel_frac=None)
    if block_mask is not None:
        n_r = block_mask.shape[1]
        kept = sd.kept_tokens_per_head(block_mask, args["cache_lens"], window=WINDOW,
                                       sinks=SINKS, block_size=BLOCK)
        out["indexer"] = n_r * L * R * args["ki_cache"].element_size()
        out["retrieval"] = int(kept.sum()) * 2 * D * esize
        out["kept_frac"] = float(kept.float().mean()) / L
        # density: chosen free blocks / free blocks (beyond the forced sink + window blocks), the
        # prefill definition; sel_frac: every selected block (forced included) / valid blocks
        chosen, free = sd.decode_block_density(block_mask, args["cache_lens"], block_size=BLOCK,
                                               window=WINDOW, sinks=SINKS)
        n_free = float(free.sum()) * n_r
        out["density"] = float(chosen.sum()) / n_free if n_free else 1.0
        out["sel_frac"] = float(block_mask.float().mean())
    if "ring_k" in args:
        n_tok = min(L, SINKS) + max(0, L - max(L - WINDOW, min(L, SINKS)))
        out["local"] = args["ring_k"].shape[1] * n_tok * 2 * D * esize
    out["total"] = out["indexer"] + out["retrieval"] + out["local"]
    return out


def kv_bytes_per_token(n_retrieval_groups: int, esize: int) -> dict:
    """KV cache bytes per layer: per token (grows with L) and constant (ring + sinks)."""
    G = HQ // HKV
    per_tok = n_retrieval_groups * 2 * D * esize + n_retrieval_groups * G * R * esize
    const = (HKV - n_retrieval_groups) * (WINDOW + SINKS) * 2 * D * esize
    return dict(dense_per_token=2 * HKV * D * esize, rtpurbo_per_token=per_tok,
                rtpurbo_constant=const)


# ------------------------------------------------------------------------------ timing


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def graph_of(fn):
    """CUDA graph of fn (warmed up on a side stream first, as torch requires)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------ dense


def dense_variants(q, k, v):
    """(name, fn) for every SDPA backend x GQA form that runs and matches the reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B = q.shape[0]
    q4 = q[:, :, None, :]  # [B, 32, 1, D]
    qf = q.view(B, HKV, HQ // HKV, D)  # decode has no causal mask: a group's heads = 8 queries
    ref = sd.dense_decode_reference(q.float(), k.float(), v.float(),
                                    torch.full((B,), k.shape[2], device=q.device))
    out = []
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
               SDPBackend.EFFICIENT_ATTENTION):
        for form in ("gqa", "fold"):
            def fn(be=be, form=form):
                with sdpa_kernel([be]):
                    if form == "gqa":
                        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)[:, :, 0]
                    return F.scaled_dot_product_attention(qf, k, v).reshape(B, HQ, D)
            name = f"dense_sdpa_{be.name.lower().replace('_attention', '')}_{form}"
            try:
                err = rel_err(fn(), ref)
                torch.cuda.synchronize()
            except Exception as e:  # a backend that does not support this shape / GQA
                print(f"  {name}: not available ({type(e).__name__}: {str(e)[:80]})")
                continue
            if err > 2e-2:
                print(f"  {name}: WRONG (rel err {err:.2e}), skipped")
                continue
            out.append((name, fn, err))
    return out


# ------------------------------------------------------------------------------ checks


def check_layer(args, configs) -> dict:
    """Kernel vs reference for one layer; returns error figures (raises on a wrong result)."""
    up = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in args.items()}
    res = {}
    outs = []
    for cname, cfg in configs.items():
        got = sd.rtpurbo_decode(**args, impl="triton", config=cfg)
        again = sd.rtpurbo_decode(**args, impl="triton", config=cfg)
        assert torch.equal(got.out, again.out), f"{cname}: two runs differ (race?)"
        if got.block_mask is not None:
            assert torch.equal(got.block_mask, again.block_mask), f"{cname}: masks differ"
        assert torch.isfinite(got.out).all(), f"{cname}: non-finite output"
        outs.append((cname, got))
    cname, got = outs[0]
    for other, o in outs[1:]:  # every config must select the same blocks
        if got.block_mask is not None:
            assert torch.equal(got.block_mask, o.block_mask), f"{other} mask != {cname} mask"
        res[f"out_diff_{other}_vs_{cname}"] = rel_err(o.out, got.out)
    roles = args["is_retrieval"]
    retr = [h for h in range(HQ) if roles[h]]
    local = [h for h in range(HQ) if not roles[h]]
    if retr:
        ref_mask = sd.select_decode_blocks_reference(up["qi"], up["ki_cache"], args["cache_lens"],
                                                     top_p=TOP_P, block_size=BLOCK, window=WINDOW,
                                                     sinks=SINKS)
        mass = sd.indexer_block_mass_reference(up["qi"], up["ki_cache"], args["cache_lens"],
                                               block_size=BLOCK)
        diff = got.block_mask != ref_mask
        res["mask_rows_differing"] = int(diff.any(-1).sum())
        res["mask_blocks_differing"] = int(diff.sum())
        sel_mass = (mass * got.block_mask).sum(-1)
        res["kernel_selected_mass_min"] = float(sel_mass.min())
        assert float(sel_mass.min()) >= TOP_P - 1e-4, "kernel selection misses the top-p mass"
        assert res["mask_blocks_differing"] <= 2 * got.block_mask.shape[1], "masks far apart"
        want = sd.retrieval_decode_reference(up["q"][:, retr], up["k_cache"], up["v_cache"],
                                             args["kv_head_of_r"], got.block_mask,
                                             args["cache_lens"], window=WINDOW, sinks=SINKS,
                                             block_size=BLOCK)
        res["retrieval_rel_err"] = rel_err(got.out[:, retr], want)
        assert res["retrieval_rel_err"] < 2e-2
    if local:
        want = sd.local_decode_reference(up["q"][:, local], up["sink_k"], up["sink_v"],
                                         up["ring_k"], up["ring_v"], args["cache_lens"],
                                         window=WINDOW, sinks=SINKS,
                                         kv_head_of_l=args["kv_head_of_l"])
        res["local_rel_err"] = rel_err(got.out[:, local], want)
        assert res["local_rel_err"] < 2e-2
    return res


def edge_checks(device="cuda") -> dict:
    """Small GPU cases mirroring tests/test_kernels_decode.py (which run on the CPU interpreter):
    batch 3 with different lengths (not block multiples, below the window), GQA with irregular
    head maps, fp32 / bf16, every select and reduction variant. Returns {case: error or 'ok'}."""
    from kernels import triton_decode as td

    C = td.TritonDecodeConfig
    variants = {"default": C(),
                "fused_k16": C(fused_select=True, fused_reduction=True, search_arity=16),
                "fsel_k1": C(fused_select=True, search_arity=1),
                "ssel_k4_tile64": C(select_wide_tile=64),
                "ssel_k4_tile128": C(select_wide_tile=128),
                "ssel_k16_1d": C(search_arity=16, select_max_2d=256),
                "no_overlap_ns3": C(overlap_local=False, num_splits=3, local_num_splits=3),
                "fused_ns64": C(fused_reduction=True, num_splits=64, local_num_splits=64)}
    res = {}
    g = torch.Generator(device=device).manual_seed(0)
    BSz, Wn, Sk, L, Dh = 16, 200, 4, 3000, 64
    lens = torch.tensor([3000, 1777, 150], device=device, dtype=torch.int32)
    B = 3
    for dt in (torch.float32, torch.bfloat16):
        roles = [False, True, False, False, True, True, False, False]
        retr = [h for h in range(8) if roles[h]]
        local = [h for h in range(8) if not roles[h]]
        q = torch.randn(B, 8, Dh, device=device, generator=g).to(dt)
        k = torch.randn(B, 2, L, Dh, device=device, generator=g).to(dt)
        v = torch.randn(B, 2, L, Dh, device=device, generator=g).to(dt)
        qi = torch.randn(B, 3, R, device=device, generator=g)
        ki = (torch.randn(B, 3, L, R, device=device, generator=g) * 0.8).to(dt)
        ring_k = torch.full((B, 2, Wn, Dh), float("nan"), device=device, dtype=dt)
        ring_v = ring_k.clone()
        for b, n in enumerate(lens.tolist()):
            t = torch.arange(max(0, n - Wn), n, device=device)
            ring_k[b, :, t % Wn] = k[b, :, t]
            ring_v[b, :, t % Wn] = v[b, :, t]
        layer = dict(q=q, cache_lens=lens, is_retrieval=roles, top_p=0.9, block_size=BSz,
                     window=Wn, sinks=Sk, sink_k=k[:, :, :Sk], sink_v=v[:, :, :Sk], ring_k=ring_k,
                     ring_v=ring_v, kv_head_of_l=[1, 0, 0, 1, 1], k_cache=k, v_cache=v,
                     kv_head_of_r=[1, 0, 1], qi=qi.to(dt), ki_cache=ki)
        up = {key: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
              for key, x in layer.items()}
        ref = sd.rtpurbo_decode_reference(**up)
        tol = 1e-4 if dt == torch.float32 else 2e-2
        for name, cfg in variants.items():
            case = f"{name}_{str(dt).split('.')[-1]}"
            try:
                got = sd.rtpurbo_decode(**layer, impl="triton", config=cfg)
                ndiff = int((got.block_mask != ref.block_mask).sum())
                assert ndiff <= 2, f"{ndiff} mask blocks differ from the reference"
                want_r = sd.retrieval_decode_reference(
                    up["q"][:, retr], up["k_cache"], up["v_cache"], [1, 0, 1], got.block_mask,
                    lens, window=Wn, sinks=Sk, block_size=BSz)
                e_r = rel_err(got.out[:, retr], want_r)
                e_l = rel_err(got.out[:, local], ref.out[:, local])
                assert e_r < tol and e_l < tol, f"rel err retrieval {e_r:.2e} local {e_l:.2e}"
                for p in (0.0, 1.0):
                    m = td.select_decode_blocks_triton(
                        up["qi"], up["ki_cache"], lens, top_p=p, block_size=BSz, window=Wn,
                        sinks=Sk, config=cfg).block_mask
                    mr = sd.select_decode_blocks_reference(up["qi"], up["ki_cache"], lens, top_p=p,
                                                           block_size=BSz, window=Wn, sinks=Sk)
                    assert torch.equal(m, mr), f"top_p={p} mask differs"
                res[case] = f"ok (mask diff {ndiff}, err r {e_r:.1e} l {e_l:.1e})"
            except Exception as e:  # record and go on: one broken variant must not hide others
                res[case] = f"FAILED: {type(e).__name__}: {str(e)[:200]}"
            print(f"  edge {case}: {res[case]}", flush=True)
    return res


# ------------------------------------------------------------------------------ main loop


def _json_path(args) -> Optional[Path]:
    """Where the JSON goes: args.decode_out if set (this script's --out), else next to a caller's
    `out` (a directory gets bench_decode.json, a file x.json gets x.decode.json): a caller's own
    result file is never overwritten."""
    if getattr(args, "decode_out", None):
        return Path(args.decode_out)
    out = getattr(args, "out", None)
    if not out:
        return None
    out = Path(out)
    if out.is_dir() or not out.suffix:
        return out / "bench_decode.json"
    return out.with_name(out.stem + ".decode.json")


def run_decode_bench(args) -> list[dict]:
    """Rows: name, T, ms, speedup_vs_dense, gbps (+ mode, bytes, density, sel_frac, kept_frac, ...;
    density = chosen free blocks / free blocks beyond the forced sink + window blocks).

    args: seq_lens, dtype, out (see _json_path); optional densities, modes, edge_checks,
    time_budget (seconds; later layers are skipped, and listed in meta.errors, once it is spent)."""
    if not torch.cuda.is_available():
        print("bench_decode: no CUDA device, nothing timed")
        return []
    from kernels import triton_decode as td

    dtype = _dtype(getattr(args, "dtype", "bf16"))
    densities = list(getattr(args, "densities", None) or [0.01, 0.05, 0.2])
    modes = list(getattr(args, "modes", None) or ["eager", "graph"])
    dev = torch.device("cuda")
    esize = torch.empty((), dtype=dtype).element_size()
    C = td.TritonDecodeConfig
    base = C()  # the defaults: separate select (arity 4), 2-launch merges, local on a side stream
    configs = {  # whole-layer variants
        "default": base,
        "no_overlap": C(overlap_local=False),
        "fused_all": C(fused_select=True, fused_reduction=True),
    }
    # part variants (CUDA-graph timed): scoring pass alone, the select search variants,
    # split counts of the two attention kernels
    score_configs = {"score_bpc8_w4": C(), "score_bpc4_w4": C(score_blocks_per_cta=4),
                     "score_bpc16_w8": C(score_blocks_per_cta=16, score_num_warps=8)}
    select_configs = {"ssel_k4": C(), "ssel_k16": C(search_arity=16),
                      "ssel_k1": C(search_arity=1), "fsel_k4": C(fused_select=True)}
    retr_configs = {"ns_auto": C(), "ns32": C(num_splits=32),
                    "ns128": C(num_splits=128, max_splits=128)}
    local_configs = {"ns_auto": C(), "ns16": C(local_num_splits=16),
                     "ns32": C(local_num_splits=32),
                     "ns128_t32": C(local_num_splits=128, local_tile=32, max_splits=128),
                     "fused_merge": C(fused_reduction=True)}
    rows: list[dict] = []
    checks: dict = {}
    t_start = time.time()
    budget = float(getattr(args, "time_budget", None) or 1e9)
    meta = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=__import__("triton").__version__,
                dtype=str(dtype), window=WINDOW, sinks=SINKS, block=BLOCK, top_p=TOP_P,
                copy_tbps=COPY_TBPS, checks=checks, errors=[])

    def save():
        out = _json_path(args)
        if out:
            for r in rows:
                r["frac_of_copy_rate"] = (r["gbps"] / (COPY_TBPS * 1e3)) if r["gbps"] else None
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))

    def add(name, L, ms, dense_ms, nbytes, mode, **extra):
        row = dict(name=name, T=L, ms=ms, speedup_vs_dense=dense_ms / ms if dense_ms else None,
                   gbps=nbytes / (ms * 1e-3) / 1e9 if nbytes else None, mode=mode,
                   bytes=nbytes, **extra)
        rows.append(row)
        print(f"  {name:<40} {mode:<5} {ms * 1e3:9.1f} us  x{row['speedup_vs_dense'] or 0:6.2f}"
              f"  {row['gbps'] or 0:7.0f} GB/s", flush=True)

    def timed(fn, mode):
        return bench_ms(fn) if mode == "eager" else bench_ms(graph_of(fn).replay)

    def bench_dense(L):
        q = torch.randn(1, HQ, D, device=dev, dtype=dtype)
        k = torch.randn(1, HKV, L, D, device=dev, dtype=dtype)
        v = torch.randn(1, HKV, L, D, device=dev, dtype=dtype)
        best = {}
        for name, fn, err in dense_variants(q, k, v):
            for mode in modes:
                ms = timed(fn, mode)
                add(name, L, ms, None, bytes_dense(L, esize), mode, rel_err=err)
                if mode not in best or ms < best[mode][1]:
                    best[mode] = (name, ms)
        for mode, (name, ms) in best.items():
            print(f"  dense baseline ({mode}): {name} {ms * 1e3:.1f} us", flush=True)
        return {mode: ms for mode, (name, ms) in best.items()}, {m: n for m, (n, _) in best.items()}

    def bench_layer(lname, n_groups, dens, L, dense_ms):
        largs = make_layer(L, n_groups, dens or 0.05, dtype, dev, seed=int(1e3 * (dens or 0)))
        key = f"{lname}_d{dens}_L{L}"
        try:
            checks[key] = check_layer(largs, configs)
        except AssertionError as e:
            checks[key] = dict(failed=str(e))
            print(f"  CHECK FAILED {key}: {e}", flush=True)
        mask = sd.rtpurbo_decode(**largs, impl="triton", config=base).block_mask
        nbytes = bytes_rtpurbo(largs, mask, esize)
        suffix = f"_d{dens:g}" if dens is not None else ""
        extra = dict(density_target=dens, density=nbytes["density"], sel_frac=nbytes["sel_frac"],
                     kept_frac=nbytes["kept_frac"],
                     bytes_detail=nbytes, kv_bytes=kv_bytes_per_token(n_groups, esize),
                     check_ok="failed" not in checks[key])
        g_ms = dense_ms.get("graph", dense_ms.get("eager"))
        for cname in (list(configs) if n_groups else ["default", "fused_all"]):
            step = lambda cfg=configs[cname]: sd.rtpurbo_decode(  # noqa: E731
                **largs, impl="triton", config=cfg)
            for mode in modes:
                add(f"{lname}{suffix}_{cname}", L, timed(step, mode), dense_ms[mode],
                    nbytes["total"], mode, config=cname, **extra)
        # parts, timed as CUDA graphs: kernel time without Python launch overhead
        if n_groups:
            sel_args = (largs["qi"], largs["ki_cache"], largs["cache_lens"])
            sel_kw = dict(top_p=TOP_P, block_size=BLOCK, window=WINDOW, sinks=SINKS)
            for cname, cfg in score_configs.items():
                sc = lambda cfg=cfg: td.select_decode_blocks_triton(  # noqa: E731
                    *sel_args, **sel_kw, config=cfg, _scores_only=True)
                add(f"part_score{suffix}_{cname}", L, timed(sc, "graph"), g_ms,
                    nbytes["indexer"], "graph", config=cname)
            for cname, cfg in select_configs.items():
                got = td.select_decode_blocks_triton(*sel_args, **sel_kw, config=cfg).block_mask
                checks[f"{key}_select_{cname}_same_mask"] = bool(torch.equal(got, mask))
                sel = lambda cfg=cfg: td.select_decode_blocks_triton(  # noqa: E731
                    *sel_args, **sel_kw, config=cfg)
                add(f"part_select{suffix}_{cname}", L, timed(sel, "graph"), g_ms,
                    nbytes["indexer"], "graph", config=cname)
            s = td.select_decode_blocks_triton(*sel_args, **sel_kw)
            retr = [h for h in range(HQ) if largs["is_retrieval"][h]]
            for cname, cfg in retr_configs.items():
                att = lambda cfg=cfg: td.retrieval_decode_triton(  # noqa: E731
                    largs["q"], largs["k_cache"], largs["v_cache"], largs["kv_head_of_r"],
                    s.block_mask, largs["cache_lens"], window=WINDOW, sinks=SINKS,
                    block_size=BLOCK, config=cfg, kept=(s.kept_idx, s.kept_count), q_heads=retr)
                add(f"part_retrieval_attn{suffix}_{cname}", L, timed(att, "graph"), g_ms,
                    nbytes["retrieval"], "graph", config=cname)
        if "ring_k" in largs and dens in (None, densities[0]):
            local = [h for h in range(HQ) if not largs["is_retrieval"][h]]
            for cname, cfg in local_configs.items():
                loc = lambda cfg=cfg: td.local_decode_triton(  # noqa: E731
                    largs["q"], largs["sink_k"], largs["sink_v"], largs["ring_k"],
                    largs["ring_v"], largs["cache_lens"], window=WINDOW, sinks=SINKS,
                    kv_head_of_l=largs["kv_head_of_l"], config=cfg, q_heads=local)
                add(f"part_local_{lname}_{cname}", L, timed(loc, "graph"), g_ms,
                    nbytes["local"], "graph", config=cname)

    if getattr(args, "edge_checks", False):
        checks["edge"] = edge_checks()
        save()
    for L in args.seq_lens:
        t0 = time.time()
        print(f"=== L = {L}", flush=True)
        try:
            dense_ms, dense_names = bench_dense(L)
            meta.setdefault("dense_baseline", {})[str(L)] = dense_names
        except Exception as e:
            meta["errors"].append(f"dense L={L}: {type(e).__name__}: {e}")
            print(f"  ERROR dense: {type(e).__name__}: {e}", flush=True)
            continue
        torch.cuda.empty_cache()
        layers = [("rtp_1of4", 1, d) for d in densities] + [("rtp_0of4", 0, None)]
        for lname, n_groups, dens in layers:
            if time.time() - t_start > budget:
                meta["errors"].append(f"time budget hit: skipped {lname} d={dens} L={L}")
                print(f"  time budget hit: skipping {lname} d={dens}", flush=True)
                continue
            try:
                bench_layer(lname, n_groups, dens, L, dense_ms)
            except Exception as e:  # record, keep going: the other sizes still get measured
                meta["errors"].append(f"{lname} d={dens} L={L}: {type(e).__name__}: {e}")
                print(f"  ERROR {lname} d={dens}: {type(e).__name__}: {e}", flush=True)
            torch.cuda.empty_cache()
            save()
        print(f"  ({time.time() - t0:.0f} s for L={L})", flush=True)
    save()
    return rows


def print_table(rows) -> None:
    print(f"\n{'name':<44}{'mode':<6}{'T':>9}{'us':>10}{'x dense':>9}{'GB/s':>8}{'dens':>7}"
          f"{'kept':>7}")
    for r in rows:
        if r["name"].startswith("part_"):
            continue
        print(f"{r['name']:<44}{r['mode']:<6}{r['T']:>9}{r['ms'] * 1e3:>10.1f}"
              f"{(r['speedup_vs_dense'] or float('nan')):>9.2f}{(r['gbps'] or 0):>8.0f}"
              f"{(r.get('density') or float('nan')):>7.3f}"
              f"{(r.get('kept_frac') or float('nan')):>7.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072, 1048576])
    p.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    p.add_argument("--modes", nargs="+", default=["eager", "graph"])
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--out", default="bench_decode.json")
    p.add_argument("--edge-checks", action="store_true",
                   help="first run small GPU kernel-vs-reference cases (every kernel variant)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; layers not started by then are skipped (listed in the JSON)")
    args = p.parse_args(argv)
    args.decode_out = args.out
    rows = run_decode_bench(args)
    print_table(rows)


if __name__ == "__main__":
    main()
