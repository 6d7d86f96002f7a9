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
Retrieval attention runs in one of two kernels (TritonDecodeConfig.retrieval_union): per query head
(each of a group's 8 heads reads its own kept blocks) or GQA-union (each block of the union of the
group's kept blocks is read once for all 8 heads); both are timed in the same run, whichever is
the default, with their own byte counts. --head-overlap x makes a fraction x of each head's hot
blocks common to its KV group (default 0: independent heads, the union is largest).
Union visit lists (TritonDecodeConfig.union_lists): "kernel" (a separate _union_kernel launch)
or "fused" (packed mask bits written by the select kernel, each union program builds its own
slice of the list): layer config union_fastlists, retrieval variants union_fastlists_ns_auto /
union_fastlists_ns256 / union_fastlists_cw256, select variant ssel_k4_bits, and the list build
alone both ways (part_union_lists = kernel, part_union_lists_fused = the union kernel's list
prologue alone).
--indexer-fp8 also runs the selection on float8_e4m3fn indexer keys: selection differences vs the
bf16 keys, the kept (bf16-key) mass, and the scoring / selection times.

Before timing, each RTPurbo configuration is checked against the pure-torch references (fp32 on
upcast inputs) and rerun to check that the kernels are deterministic (a race would show).
Times: triton.testing.do_bench median, L2 flushed before every run; "eager" launches from Python,
"graph" replays a CUDA graph of the same step (what a served decode step uses).
GB/s counts the bytes each variant must read (caches, indexer keys, kept blocks per query head),
against a device-to-device copy rate of ~3.0 TB/s on the H100 (see shared/anchors.md).

  python scripts/bench_decode.py --seq-lens 32768 131072 1048576 --out decode.json
  python scripts/bench_decode.py --densities 0.05 --modes graph --layers 1of4 \
      --layer-configs default union --parts retrieval --head-overlap 0 0.8 --out union.json
  python scripts/bench_decode.py --densities 0.05 --modes graph --layers 1of4 \
      --layer-configs union union_fastlists --parts select retrieval \
      --retrieval-variants ns_auto union_ns_auto union_fastlists_ns_auto --out fastlists.json
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
PARTS = ("score", "select", "retrieval", "local")  # part timings (--parts)


def _dtype(x) -> torch.dtype:
    if isinstance(x, torch.dtype):
        return x
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
            "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[str(x)]


# ------------------------------------------------------------------------------ inputs


def make_layer(L: int, n_retrieval_groups: int, density: float, dtype, device, seed=0,
               head_overlap: float = 0.0) -> dict:
    """Keyword arguments of rtpurbo_decode for one layer at cache length L. head_overlap in
    [0, 1]: that fraction of each head's hot blocks is drawn once per KV group and shared by the
    group's heads, the rest per head among the other blocks (0: every head independent, the draws
    of the original builder)."""
    if not 0.0 <= head_overlap <= 1.0:
        raise ValueError(f"head_overlap must be in [0, 1], got {head_overlap}")
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
        kv_of_r = [h // G for h in range(HQ) if roles[h]]
        if head_overlap == 0.0:
            for h in range(n_r):
                hot[0, h, torch.randperm(nb, device=device, generator=g)[:n_hot]] = 1.0
        else:
            n_sh = round(head_overlap * n_hot)
            for grp in sorted(set(kv_of_r)):
                perm = torch.randperm(nb, device=device, generator=g)
                rest = perm[n_sh:]
                for h in (h for h in range(n_r) if kv_of_r[h] == grp):
                    hot[0, h, perm[:n_sh]] = 1.0
                    pick = torch.randperm(rest.numel(), device=device, generator=g)[:n_hot - n_sh]
                    hot[0, h, rest[pick]] = 1.0
        hot_tok = hot.repeat_interleave(BLOCK, dim=-1)[..., :L]
        ki = noise + (delta * hot_tok)[..., None] * unit[:, :, None, :] / qi.norm(
            dim=-1, keepdim=True)[:, :, None, :]
        args.update(k_cache=k, v_cache=v, kv_head_of_r=kv_of_r, qi=qi.to(dtype),
                    ki_cache=ki.to(dtype))
    return args


# ------------------------------------------------------------------------------ bytes


def bytes_dense(L: int, esize: int) -> int:
    return 2 * HKV * L * D * esize


def union_kept_tokens(block_mask, cache_lens, kv_head_of_r) -> tuple[int, int]:
    """(tokens, blocks) the GQA-union retrieval kernel reads, summed over batch and retrieval KV
    heads: valid tokens of the blocks that a head of the group selected or that hold a sink /
    window token (its visit list, see triton_decode.union_visit_lists)."""
    B, _, nb = block_mask.shape
    forced, valid = sd.decode_forced_blocks(cache_lens, nb, block_size=BLOCK, window=WINDOW,
                                            sinks=SINKS)
    start = torch.arange(nb, device=block_mask.device) * BLOCK
    n_tok = (cache_lens.to(torch.long)[:, None] - start[None, :]).clamp(0, BLOCK)  # [B, nb]
    tokens = blocks = 0
    for kv in sorted(set(kv_head_of_r)):
        heads = [h for h in range(len(kv_head_of_r)) if kv_head_of_r[h] == kv]
        union = (block_mask[:, heads].any(1) | forced) & valid
        tokens += int((n_tok * union).sum())
        blocks += int(union.sum())
    return tokens, blocks


def bytes_rtpurbo(args, block_mask, esize: int) -> dict:
    """Bytes the RTPurbo step must read: indexer keys, kept tokens per retrieval head, local;
    plus the retrieval heads' kept density (chosen / free blocks), selected block fraction
    (sel_frac) and kept token fraction (kept_frac, tokens of the selected blocks / L).
    GQA-union kernel: retrieval_union (tokens of the union of each group's kept blocks, read
    once), total_union; per_head_blocks / union_blocks count the block reads of each kernel."""
    L = int(args["cache_lens"][0])
    out = dict(indexer=0, retrieval=0, retrieval_union=0, local=0, kept_frac=None, density=None,
               sel_frac=None, per_head_blocks=0, union_blocks=0)
    if block_mask is not None:
        n_r = block_mask.shape[1]
        kept = sd.kept_tokens_per_head(block_mask, args["cache_lens"], window=WINDOW,
                                       sinks=SINKS, block_size=BLOCK)
        out["indexer"] = n_r * L * R * args["ki_cache"].element_size()
        out["retrieval"] = int(kept.sum()) * 2 * D * esize
        u_tok, u_blk = union_kept_tokens(block_mask, args["cache_lens"], args["kv_head_of_r"])
        out["retrieval_union"] = u_tok * 2 * D * esize
        out["union_blocks"] = u_blk
        out["per_head_blocks"] = int(block_mask.sum())
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
    out["total_union"] = out["indexer"] + out["retrieval_union"] + out["local"]
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


# union_fastlists_<tag> retrieval variants: TritonDecodeConfig fields over the default fused-list union kernel
UNION_TUNING = {"w8": dict(union_num_warps=8), "s1": dict(union_num_stages=1), "s2": dict(union_num_stages=2),
                "s4": dict(union_num_stages=4),
                "ns256_s2": dict(union_num_stages=2, union_num_splits=256, union_max_splits=256)}
# dense_triton_<tag> rows (--dense-triton): TritonDecodeConfig fields over DENSE_CONFIG for the engine's dense
# decode kernel (kernels.triton_decode.dense_decode_triton: the local kernel over the whole cache)
DENSE_TRITON_TUNING = {"default": {}, "stages_triton": dict(local_num_stages=None), "s2": dict(local_num_stages=2),
                       "t32": dict(local_tile=32), "t128": dict(local_tile=128), "w8": dict(num_warps=8),
                       "ns256": dict(max_splits=256, local_num_splits=256)}


def dense_triton_variants(q, k, v, ref, tags=None):
    """(name, fn, rel err) of the engine's dense decode kernel under DENSE_TRITON_TUNING configs."""
    import dataclasses

    from kernels import triton_decode as td

    lens = torch.full((q.shape[0],), k.shape[2], device=q.device, dtype=torch.int32)
    out = []
    for tag, kw in DENSE_TRITON_TUNING.items():
        if tags and tag not in tags:
            continue
        c = dataclasses.replace(td.DENSE_CONFIG, **kw)
        fn = lambda c=c: td.dense_decode_triton(q, k, v, lens, config=c)  # noqa: E731
        name = f"dense_triton_{tag}"
        try:
            err = rel_err(fn(), ref)
        except Exception as e:  # a config that does not compile (registers / shared memory)
            print(f"  {name}: ERROR {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        if err > 2e-2:
            print(f"  {name}: WRONG (rel err {err:.2e}), skipped", flush=True)
            continue
        out.append((name, fn, err))
    return out


def dense_variants(q, k, v):
    """(name, fn) for every SDPA backend x GQA form that runs and matches the reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B = q.shape[0]
    q4 = q[:, :, None, :]  # [B, 32, 1, D]
    qf = q.view(B, HKV, HQ // HKV, D)  # decode has no causal mask: a group's heads = 8 queries
    ref = sd.dense_decode_reference(q.float(), k.float(), v.float(),
                                    torch.full((B,), k.shape[2], device=q.device))
    out = []
    backends = ((SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION) if q.is_cuda else (SDPBackend.MATH,))
    for be in backends:
        for form in ("gqa", "fold"):
            def fn(be=be, form=form):
                with sdpa_kernel([be]):
                    if form == "gqa":
                        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)[:, :, 0]
                    return F.scaled_dot_product_attention(qf, k, v).reshape(B, HQ, D)
            name = f"dense_sdpa_{be.name.lower().replace('_attention', '')}_{form}"
            try:
                err = rel_err(fn(), ref)
                if q.is_cuda:
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
        for other, o in outs[1:]:  # every config (the union kernel among them) vs the reference
            e = rel_err(o.out[:, retr], want)
            res[f"retrieval_rel_err_{other}"] = e
            assert e < 2e-2, f"{other}: retrieval rel err {e:.2e}"
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
                "fused_ns64": C(fused_reduction=True, num_splits=64, local_num_splits=64),
                "union": C(retrieval_union=True, union_max_blocks=0, union_lists="kernel"),
                "union_fused_ns3": C(retrieval_union=True, fused_reduction=True, union_max_blocks=0,
                                     union_num_splits=3, union_lists="kernel"),
                "union_fastlists": C(retrieval_union=True, union_max_blocks=0, union_lists="fused"),
                "per_head": C(retrieval_union=False)}
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
    time_budget (seconds; later layers are skipped, and listed in meta.errors, once it is spent),
    head_overlap (list of fractions, default [0]), layers ("1of4", "0of4"), layer_configs
    (whole-layer configs besides default), parts (PARTS), retrieval_variants (names of the
    part_retrieval_attn variants), indexer_fp8; device "cpu" (tests
    only: a dry run of every code path under TRITON_INTERPRET=1 at toy sizes, each "time" one
    wall-clock call, no CUDA graphs)."""
    dev = torch.device(getattr(args, "device", None) or "cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench_decode: no CUDA device, nothing timed")
        return []
    from kernels import triton_decode as td

    dtype = _dtype(getattr(args, "dtype", "bf16"))
    densities = list(getattr(args, "densities", None) or [0.01, 0.05, 0.2])
    modes = list(getattr(args, "modes", None) or ["eager", "graph"])
    esize = torch.empty((), dtype=dtype).element_size()
    C = td.TritonDecodeConfig
    base = C()  # the defaults: separate select (arity 4), 2-launch merges, local on a side stream
    configs = {  # whole-layer variants; the retrieval kernel that is not the default is added
        "default": base,
        "per_head": C(retrieval_union=False),
        "union": C(retrieval_union=True, union_max_blocks=0, union_lists="kernel"),
        # the union kernel with its visit lists built in the select + union kernels (no extra launch)
        "union_fastlists": C(retrieval_union=True, union_max_blocks=0, union_lists="fused"),
        "stream_select": C(select_split=False),  # one program per head streams the select passes
        "no_overlap": C(overlap_local=False),
        "fused_all": C(fused_select=True, fused_reduction=True),
    }
    # tuning variants of the default layer: timed only when named in --layer-configs
    tuning = {f"union_{tag}": C(**kw) for tag, kw in UNION_TUNING.items()}  # a tuned union kernel
    tuning["noflat"] = C(select_flat_tile=0)  # flat heads' select streamed (before session 13)
    tuning["local_s2"] = C(local_num_stages=2)  # window heads' kernel with 2 pipelining stages
    tuning["local_s3"] = C(local_num_stages=None)  # ... with Triton's default (3), the default until session 13
    keep_cfg = getattr(args, "layer_configs", None)
    if keep_cfg:
        configs = {k: v for k, v in {**configs, **tuning}.items() if k == "default" or k in keep_cfg}
    parts = set(getattr(args, "parts", None) or PARTS)
    layer_kinds = set(getattr(args, "layers", None) or ["1of4", "0of4"])
    overlaps = [float(x) for x in (getattr(args, "head_overlap", None) or [0.0])]
    fp8 = bool(getattr(args, "indexer_fp8", False))
    # part variants (CUDA-graph timed): scoring pass alone, the select search variants,
    # split counts of the two attention kernels
    score_configs = {"score_bpc8_w4": C(score_blocks_per_cta=8), "score_bpc4_w4": C(score_blocks_per_cta=4),
                     "score_bpc16_w8": C(score_blocks_per_cta=16, score_num_warps=8)}
    select_configs = {"ssel_k4": C(), "ssel_k4_stream": C(select_split=False),
                      # split select: candidate tile and warps of the register search
                      "ssel_k4_c1024_w16": C(select_cand_tile=1024),
                      "ssel_k4_c1024_w8": C(select_cand_tile=1024, select_cand_warps=8),
                      "ssel_k4_c2048_w8": C(select_cand_warps=8),
                      "ssel_k4_c4096_w16": C(select_cand_tile=4096),
                      "ssel_k4_c2048_w2": C(select_cand_warps=2),
                      # the wide program's blocks resident in registers up to 16K blocks (1M tokens): the
                      # fallback when the candidates do not fit (flat distributions), and the old one-program way
                      "ssel_k4_wide16k": C(select_wide_tile=16384),
                      # fallback heads always streamed (the default before session 13's flat-head rule)
                      "ssel_k4_noflat": C(select_flat_tile=0),
                      "ssel_k4_stream_wide16k": C(select_split=False, select_wide_tile=16384),
                      "ssel_k4_c4096_wide16k": C(select_cand_tile=4096, select_wide_tile=16384),
                      "ssel_k16": C(search_arity=16),
                      "ssel_k1": C(search_arity=1), "fsel_k4": C(fused_select=True),
                      # also writes the packed mask bits (union_lists="fused")
                      "ssel_k4_bits": C(retrieval_union=True, union_max_blocks=0,
                                        union_lists="fused")}
    retr_configs = {"ns_auto": C(retrieval_union=False),  # per query head
                    "ns32": C(retrieval_union=False, num_splits=32),
                    "ns128": C(retrieval_union=False, num_splits=128, max_splits=128),
                    # GQA union: each block once per KV group (auto = min(4 x SMs / groups, 128))
                    "union_ns_auto": C(retrieval_union=True, union_max_blocks=0, union_lists="kernel"),
                    "union_ns64": C(retrieval_union=True, union_num_splits=64, union_max_blocks=0,
                                    union_lists="kernel"),
                    "union_ns256": C(retrieval_union=True, union_num_splits=256, union_max_blocks=0,
                                     union_max_splits=256, union_lists="kernel"),
                    "union_w8": C(retrieval_union=True, union_num_warps=8, union_max_blocks=0,
                                  union_lists="kernel"),
                    # union kernel, visit lists from the select kernel's mask bits (no list launch)
                    "union_fastlists_ns_auto": C(retrieval_union=True, union_max_blocks=0,
                                                 union_lists="fused"),
                    "union_fastlists_ns256": C(retrieval_union=True, union_num_splits=256,
                                               union_max_blocks=0, union_max_splits=256,
                                               union_lists="fused"),
                    # the union count in 2 tiles of 256 words at 1M tokens (default: 1 of 512)
                    "union_fastlists_cw256": C(retrieval_union=True, union_max_blocks=0,
                                               union_lists="fused", union_word_tile=256)}
    # tuning of the default union kernel (fused lists): warps, pipelining stages, splits
    fl = dict(retrieval_union=True, union_max_blocks=0, union_lists="fused")
    for tag, kw in UNION_TUNING.items():
        retr_configs[f"union_fastlists_{tag}"] = C(**fl, **kw)
    keep_retr = getattr(args, "retrieval_variants", None)
    if keep_retr:
        unknown = set(keep_retr) - set(retr_configs)
        if unknown:
            raise ValueError(f"unknown retrieval variants {sorted(unknown)}; "
                             f"known: {list(retr_configs)}")
        retr_configs = {k: v for k, v in retr_configs.items() if k in keep_retr}
    local_configs = {"ns_auto": C(), "ns16": C(local_num_splits=16),
                     "ns32": C(local_num_splits=32),
                     "ns128_t32": C(local_num_splits=128, local_tile=32, max_splits=128),
                     "fused_merge": C(fused_reduction=True)}
    rows: list[dict] = []
    checks: dict = {}
    t_start = time.time()
    budget = float(getattr(args, "time_budget", None) or 1e9)
    meta = dict(date=datetime.date.today().isoformat(),
                device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)",
                torch=torch.__version__, triton=__import__("triton").__version__,
                dtype=str(dtype), window=WINDOW, sinks=SINKS, block=BLOCK, top_p=TOP_P,
                copy_tbps=COPY_TBPS, checks=checks, errors=[],
                default_retrieval_kernel=(f"union up to {base.union_max_blocks} blocks, else per_head"
                                          if base.retrieval_union and base.union_max_blocks > 0
                                          else "union" if base.retrieval_union else "per_head"),
                head_overlaps=overlaps, parts=sorted(parts), indexer_fp8=fp8)

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

    def add_part(name, L, fn, dense_ms, nbytes, **extra):
        """A graph-timed part; a failing variant is recorded in meta.errors, the others go on."""
        try:
            add(name, L, timed(fn, "graph"), dense_ms, nbytes, "graph", **extra)
        except Exception as e:
            meta["errors"].append(f"{name} L={L}: {type(e).__name__}: {str(e)[:300]}")
            print(f"  ERROR {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)

    def timed(fn, mode):
        if dev.type != "cuda":  # dry run
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
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
        if getattr(args, "dense_triton", None) is not None and dev.type == "cuda":
            ref = sd.dense_decode_reference(q.float(), k.float(), v.float(),
                                            torch.full((1,), L, device=dev))
            for name, fn, err in dense_triton_variants(q, k, v, ref, args.dense_triton):
                for mode in modes:
                    add(name, L, timed(fn, mode), best[mode][1], bytes_dense(L, esize), mode, rel_err=err)
        return {mode: ms for mode, (name, ms) in best.items()}, {m: n for m, (n, _) in best.items()}

    def bench_layer(lname, n_groups, dens, L, dense_ms, overlap=0.0):
        largs = make_layer(L, n_groups, dens or 0.05, dtype, dev, seed=int(1e3 * (dens or 0)),
                           head_overlap=overlap if n_groups else 0.0)
        ov = f"_ov{overlap:g}" if n_groups and overlap else ""
        key = f"{lname}_d{dens}{ov}_L{L}"
        layer_cfgs = dict(configs)
        for cname in [c for c in configs if c != "default"]:  # drop configs that do not compile here
            try:
                sd.rtpurbo_decode(**largs, impl="triton", config=configs[cname])
            except Exception as e:  # e.g. out of shared memory for a large tile x stages
                meta["errors"].append(f"layer config {cname} {key}: {type(e).__name__}: {str(e)[:200]}")
                print(f"  ERROR layer config {cname}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                del layer_cfgs[cname]
        try:
            checks[key] = check_layer(largs, layer_cfgs)
        except AssertionError as e:
            checks[key] = dict(failed=str(e))
            print(f"  CHECK FAILED {key}: {e}", flush=True)
        mask = sd.rtpurbo_decode(**largs, impl="triton", config=base).block_mask
        nbytes = bytes_rtpurbo(largs, mask, esize)
        suffix = (f"_d{dens:g}" if dens is not None else "") + ov
        extra = dict(density_target=dens, density=nbytes["density"], sel_frac=nbytes["sel_frac"],
                     kept_frac=nbytes["kept_frac"], head_overlap=overlap if n_groups else None,
                     bytes_detail=nbytes, kv_bytes=kv_bytes_per_token(n_groups, esize),
                     check_ok="failed" not in checks[key])
        if n_groups:
            print(f"  {key}: block reads per head {nbytes['per_head_blocks']} vs union "
                  f"{nbytes['union_blocks']}; retrieval MB per head "
                  f"{nbytes['retrieval'] / 1e6:.1f} vs union {nbytes['retrieval_union'] / 1e6:.1f}",
                  flush=True)
        g_ms = dense_ms.get("graph", dense_ms.get("eager"))
        for cname in (list(layer_cfgs) if n_groups else ["default", "fused_all", "local_s2", "local_s3"]):
            if cname not in layer_cfgs:
                continue
            cfg = layer_cfgs[cname]
            step = lambda cfg=cfg: sd.rtpurbo_decode(  # noqa: E731
                **largs, impl="triton", config=cfg)
            u = td.uses_union(cfg, -(-L // BLOCK))
            nb_total = nbytes["total_union"] if u else nbytes["total"]
            for mode in modes:
                add(f"{lname}{suffix}_{cname}", L, timed(step, mode), dense_ms[mode],
                    nb_total, mode, config=cname,
                    retrieval_kernel="union" if u else "per_head", **extra)
        # parts, timed as CUDA graphs: kernel time without Python launch overhead
        if n_groups:
            sel_args = (largs["qi"], largs["ki_cache"], largs["cache_lens"])
            sel_kw = dict(top_p=TOP_P, block_size=BLOCK, window=WINDOW, sinks=SINKS)
            if "score" in parts:
                for cname, cfg in score_configs.items():
                    sc = lambda cfg=cfg: td.select_decode_blocks_triton(  # noqa: E731
                        *sel_args, **sel_kw, config=cfg, _scores_only=True)
                    add(f"part_score{suffix}_{cname}", L, timed(sc, "graph"), g_ms,
                        nbytes["indexer"], "graph", config=cname)
            if "select" in parts:
                for cname, cfg in select_configs.items():
                    got = td.select_decode_blocks_triton(*sel_args, **sel_kw,
                                                         config=cfg).block_mask
                    checks[f"{key}_select_{cname}_same_mask"] = bool(torch.equal(got, mask))
                    sel = lambda cfg=cfg: td.select_decode_blocks_triton(  # noqa: E731
                        *sel_args, **sel_kw, config=cfg)
                    add(f"part_select{suffix}_{cname}", L, timed(sel, "graph"), g_ms,
                        nbytes["indexer"], "graph", config=cname)
            if fp8:
                bench_fp8(largs, mask, key, suffix, L, g_ms, nbytes, sel_kw)
            s = td.select_decode_blocks_triton(*sel_args, **sel_kw)
            retr = [h for h in range(HQ) if largs["is_retrieval"][h]]
            fl_cfg = C(retrieval_union=True, union_max_blocks=0, union_lists="fused")
            if "retrieval" in parts:
                # the packed mask bits that the select kernel writes for union_lists="fused"
                sb = td.select_decode_blocks_triton(*sel_args, **sel_kw, config=fl_cfg)
                same = torch.equal(sb.block_mask, s.block_mask)
                bits = sb.block_bits if same else td.pack_mask_bits(s.block_mask)
                bits_eq = torch.equal(sb.block_bits, td.pack_mask_bits(sb.block_mask))
                ok = same and bits_eq
                checks[f"{key}_select_bits"] = "ok" if ok else dict(
                    failed=f"masks equal {same}, select bits == packed mask {bits_eq}")
                if not ok:
                    print(f"  CHECK FAILED {key}: select bits {checks[f'{key}_select_bits']}",
                          flush=True)
                # every variant's output vs the per-head kernel's (itself checked against the
                # reference in check_layer: the whole layer's default / per_head config)
                ref_out = td.retrieval_decode_triton(
                    largs["q"], largs["k_cache"], largs["v_cache"], largs["kv_head_of_r"],
                    s.block_mask, largs["cache_lens"], window=WINDOW, sinks=SINKS,
                    block_size=BLOCK, config=C(retrieval_union=False),
                    kept=(s.kept_idx, s.kept_count), q_heads=retr)[:, retr]
                for cname, cfg in retr_configs.items():
                    att = lambda cfg=cfg: td.retrieval_decode_triton(  # noqa: E731
                        largs["q"], largs["k_cache"], largs["v_cache"], largs["kv_head_of_r"],
                        s.block_mask, largs["cache_lens"], window=WINDOW, sinks=SINKS,
                        block_size=BLOCK, config=cfg, kept=(s.kept_idx, s.kept_count),
                        q_heads=retr, mask_bits=bits if cfg.union_lists == "fused" else None)
                    try:
                        err = rel_err(att()[:, retr], ref_out)
                    except Exception as e:  # e.g. a split count that does not compile
                        meta["errors"].append(f"retrieval {cname} {key}: {type(e).__name__}: "
                                              f"{str(e)[:300]}")
                        print(f"  ERROR retrieval {cname}: {type(e).__name__}: {str(e)[:300]}",
                              flush=True)
                        continue
                    checks[f"{key}_retrieval_{cname}_rel_err_vs_per_head"] = err
                    if not err < 2e-2:
                        checks[f"{key}_retrieval_{cname}"] = dict(failed=f"rel err {err:.2e}")
                        print(f"  CHECK FAILED {key} retrieval {cname}: rel err {err:.2e} vs "
                              "the per-head kernel", flush=True)
                    u = td.uses_union(cfg, -(-L // BLOCK))
                    nb_r = nbytes["retrieval_union"] if u else nbytes["retrieval"]
                    add_part(f"part_retrieval_attn{suffix}_{cname}", L, att, g_ms, nb_r,
                             config=cname, rel_err_vs_per_head=err,
                             retrieval_kernel="union" if u else "per_head",
                             head_overlap=overlap, block_reads=nbytes["union_blocks"]
                             if u else nbytes["per_head_blocks"])
                # the union kernel's visit-list build alone, both ways: the _union_kernel launch
                # (part of union_ns_auto above) and the fused lists' prologue of the union kernel
                # alone (LISTS_ONLY launch, same splits as union_fastlists_ns_auto; the select
                # kernel's bit writing is ssel_k4_bits vs ssel_k4)
                lkw = dict(window=WINDOW, sinks=SINKS, block_size=BLOCK)
                ul = lambda: td.union_visit_lists(  # noqa: E731
                    s.block_mask, largs["cache_lens"], largs["kv_head_of_r"], **lkw,
                    config=C(union_lists="kernel"))
                ulf = lambda: td.union_visit_lists(  # noqa: E731
                    s.block_mask, largs["cache_lens"], largs["kv_head_of_r"], **lkw,
                    config=fl_cfg, mask_bits=bits)
                a_idx, a_cnt = ul()
                b_idx, b_cnt = ulf()
                ok = torch.equal(a_cnt, b_cnt) and all(
                    torch.equal(a_idx[i, :n], b_idx[i, :n]) for i, n in enumerate(a_cnt.tolist()))
                checks[f"{key}_union_lists_fused_vs_kernel"] = "equal" if ok else dict(
                    failed="fused union lists != _union_kernel lists")
                if not ok:
                    print(f"  CHECK FAILED {key}: fused union lists != _union_kernel lists", flush=True)
                add_part(f"part_union_lists{suffix}", L, ul, g_ms, s.block_mask.numel(),
                         config="union_lists_kernel")
                add_part(f"part_union_lists_fused{suffix}", L, ulf, g_ms, bits.numel() * 4,
                         config="union_lists_fused")
        if "ring_k" in largs and "local" in parts and dens in (None, densities[0]) and not ov:
            local = [h for h in range(HQ) if not largs["is_retrieval"][h]]
            for cname, cfg in local_configs.items():
                loc = lambda cfg=cfg: td.local_decode_triton(  # noqa: E731
                    largs["q"], largs["sink_k"], largs["sink_v"], largs["ring_k"],
                    largs["ring_v"], largs["cache_lens"], window=WINDOW, sinks=SINKS,
                    kv_head_of_l=largs["kv_head_of_l"], config=cfg, q_heads=local)
                add(f"part_local_{lname}_{cname}", L, timed(loc, "graph"), g_ms,
                    nbytes["local"], "graph", config=cname)

    def bench_fp8(largs, mask, key, suffix, L, g_ms, nbytes, sel_kw):
        """float8_e4m3fn indexer keys (the scoring kernel upcasts): selection vs the bf16 keys'
        selection, the bf16-key mass the fp8 selection keeps, scoring / select times."""
        ki8 = largs["ki_cache"].to(torch.float8_e4m3fn)
        args8 = (largs["qi"], ki8, largs["cache_lens"])
        m8 = td.select_decode_blocks_triton(*args8, **sel_kw).block_mask
        mass = sd.indexer_block_mass_reference(largs["qi"].float(), largs["ki_cache"].float(),
                                               largs["cache_lens"], block_size=BLOCK)
        kept8, kept = (mass * m8).sum(-1), (mass * mask).sum(-1)
        checks[f"{key}_indexer_fp8"] = dict(
            blocks_differing=int((m8 != mask).sum()),
            rows_differing=int((m8 != mask).any(-1).sum()),
            blocks_selected_bf16=int(mask.sum()), blocks_selected_fp8=int(m8.sum()),
            kept_mass_fp8_min=float(kept8.min()), kept_mass_fp8_mean=float(kept8.mean()),
            kept_mass_bf16_min=float(kept.min()), kept_mass_bf16_mean=float(kept.mean()))
        print(f"  {key} fp8 indexer keys: {checks[f'{key}_indexer_fp8']}", flush=True)
        sc = lambda: td.select_decode_blocks_triton(*args8, **sel_kw,  # noqa: E731
                                                    _scores_only=True)
        add_part(f"part_score{suffix}_fp8", L, sc, g_ms, nbytes["indexer"] // 2, config="fp8")
        for bpc, nw in ((16, 4), (16, 8), (32, 8)):  # fp8 keys are half the bytes: bigger programs
            c8 = C(score_blocks_per_cta=bpc, score_num_warps=nw)
            sc = lambda c8=c8: td.select_decode_blocks_triton(  # noqa: E731
                *args8, **sel_kw, config=c8, _scores_only=True)
            add_part(f"part_score{suffix}_fp8_bpc{bpc}_w{nw}", L, sc, g_ms, nbytes["indexer"] // 2,
                     config=f"fp8_bpc{bpc}_w{nw}")
        sel = lambda: td.select_decode_blocks_triton(*args8, **sel_kw)  # noqa: E731
        add_part(f"part_select{suffix}_fp8", L, sel, g_ms, nbytes["indexer"] // 2, config="fp8")
        # the whole layer (default config) on fp8 keys; bytes: the bf16 count less half the keys
        layer8 = dict(largs, ki_cache=ki8)
        step8 = lambda: sd.rtpurbo_decode(**layer8, impl="triton", config=base)  # noqa: E731
        u = td.uses_union(base, -(-L // BLOCK))
        nb8 = (nbytes["total_union"] if u else nbytes["total"]) - nbytes["indexer"] // 2
        add_part(f"{key.rsplit('_L', 1)[0]}_default_fp8", L, step8, g_ms, nb8, config="default_fp8",
                 retrieval_kernel="union" if u else "per_head")

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
        layers = ([("rtp_1of4", 1, d, ov) for ov in overlaps for d in densities]
                  if "1of4" in layer_kinds else [])
        layers += [("rtp_0of4", 0, None, 0.0)] if "0of4" in layer_kinds else []
        for lname, n_groups, dens, ov in layers:
            if time.time() - t_start > budget:
                meta["errors"].append(f"time budget hit: skipped {lname} d={dens} ov={ov} L={L}")
                print(f"  time budget hit: skipping {lname} d={dens} ov={ov}", flush=True)
                continue
            try:
                bench_layer(lname, n_groups, dens, L, dense_ms, ov)
            except Exception as e:  # record, keep going: the other sizes still get measured
                meta["errors"].append(f"{lname} d={dens} ov={ov} L={L}: {type(e).__name__}: {e}")
                print(f"  ERROR {lname} d={dens} ov={ov}: {type(e).__name__}: {e}", flush=True)
            torch.cuda.empty_cache()
            save()
        print(f"  ({time.time() - t0:.0f} s for L={L})", flush=True)
    save()
    return rows


def print_table(rows, head_overlaps=None) -> None:
    """Whole layers (dense and RTPurbo), then the retrieval-attention parts (per-head vs union
    kernel). ov = head_overlap of the synthetic indexer (0: independent heads)."""
    ovs = sorted({r["head_overlap"] for r in rows if r.get("head_overlap") is not None}
                 | set(head_overlaps or []))
    print(f"\nsynthetic hot blocks: head_overlap = {', '.join(f'{x:g}' for x in ovs) or '-'} "
          "(fraction of a head's hot blocks shared by its KV group; 0 = independent heads)")
    print(f"{'name':<48}{'mode':<6}{'T':>9}{'us':>10}{'x dense':>9}{'GB/s':>8}{'dens':>7}"
          f"{'kept':>7}{'ov':>5}")
    for r in rows:
        if r["name"].startswith("part_"):
            continue
        ov = r.get("head_overlap")
        print(f"{r['name']:<48}{r['mode']:<6}{r['T']:>9}{r['ms'] * 1e3:>10.1f}"
              f"{(r['speedup_vs_dense'] or float('nan')):>9.2f}{(r['gbps'] or 0):>8.0f}"
              f"{(r.get('density') or float('nan')):>7.3f}"
              f"{(r.get('kept_frac') or float('nan')):>7.3f}"
              f"{'-' if ov is None else f'{ov:g}':>5}")
    parts = [r for r in rows if r["name"].startswith(("part_retrieval_attn", "part_union_lists",
                                                      "part_score", "part_select"))]
    if parts:
        print(f"\n{'part (graph)':<48}{'T':>9}{'us':>10}{'GB/s':>8}{'blocks':>8}{'ov':>5}")
        for r in parts:
            ov = r.get("head_overlap")
            print(f"{r['name']:<48}{r['T']:>9}{r['ms'] * 1e3:>10.1f}{(r['gbps'] or 0):>8.0f}"
                  f"{r.get('block_reads') or '':>8}{'' if ov is None else f'{ov:g}':>5}")


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
    p.add_argument("--head-overlap", type=float, nargs="+", default=[0.0],
                   help="fraction in [0, 1] of each retrieval head's hot blocks shared by its KV "
                        "group (several values: one layer each); default 0 = independent heads")
    p.add_argument("--layers", nargs="+", default=["1of4", "0of4"], choices=["1of4", "0of4"])
    p.add_argument("--layer-configs", nargs="+", default=None,
                   help="whole-layer configs to time besides 'default' (union / per_head, "
                        "union_fastlists, no_overlap, fused_all; default: these; tuning variants only when "
                        "named: union_<tag> for the tags of UNION_TUNING, noflat, local_s2, local_s3)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS),
                   help="part timings to run (default: all)")
    p.add_argument("--retrieval-variants", nargs="+", default=None,
                   help="part_retrieval_attn variants to time (ns_auto ns32 ns128 union_ns_auto "
                        "union_ns64 union_ns256 union_w8 union_fastlists_ns_auto "
                        "union_fastlists_ns256 union_fastlists_cw256, union_fastlists_<tag> for "
                        "the tags of UNION_TUNING; default: all)")
    p.add_argument("--dense-triton", nargs="*", default=None,
                   help="also time the engine's Triton dense decode kernel under these tuning tags ("
                        + " ".join(DENSE_TRITON_TUNING) + "; no tag: all), speedups vs the best SDPA")
    p.add_argument("--indexer-fp8", action="store_true",
                   help="also select on float8_e4m3fn indexer keys: blocks differing from the "
                        "bf16 selection, kept mass, scoring / select times")
    args = p.parse_args(argv)
    for x in args.head_overlap:
        if not 0.0 <= x <= 1.0:
            p.error(f"--head-overlap must be in [0, 1], got {x}")
    args.decode_out = args.out
    rows = run_decode_bench(args)
    print_table(rows, args.head_overlap)


if __name__ == "__main__":
    main()
