"""Decode-step GEMV / MoE benchmark: the non-attention kernels of one decode step at batch 1, Qwen3-30B-A3B
shapes (dim 2048, 32 q / 4 KV heads x 128, 128 experts top-8, expert hidden 768, bf16), tile / warp variants
of the engine's Triton kernels against cuBLAS (F.linear) in the same run.

Rows (each variant is checked against its pure-torch reference before it is timed; a failed check is
printed and the row is dropped):
  gemv_<shape>_cublas       F.linear(x, W) alone (no norm, no residual): the bytes-bound baseline
  gemv_<shape>_torch_chain  the module chain the fused kernel replaces (RMSNorm + F.linear [+ residual])
  gemv_<shape>_<BN>x<BK>w<warps>   kernels.fused_decode.norm_linear with tiles (1, BN, BK), num_warps
  moe_<variant>             kernels.moe_decode.moe_decode with a MoEDecodeConfig variant (8 distinct experts)
shapes: qkv (attention_norm + fused wq/wk/wv: 5120 x 2048), o (wo + residual: 2048 x 4096), router
(ffn_norm + gate: 128 x 2048). Times: CUDA-graph replays, triton.testing.do_bench median (L2 flushed);
GB/s = the bytes the call must move (weights once + vectors) / time, against ~3.0 TB/s (anchors.md).

  python scripts/bench_decode_gemv.py --out gemv.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import fused_decode as fd  # noqa: E402
from kernels import moe_decode as md  # noqa: E402
from scripts.bench_decode import bench_ms, graph_of, rel_err  # noqa: E402

DIM, HQ, HKV, HD = 2048, 32, 4, 128
EXPERTS, TOPK, HIDDEN = 128, 8, 768
COPY_TBPS = 3.0
SHAPES = {"qkv": dict(N=(HQ + 2 * HKV) * HD, K=DIM, norm=True, res=False),
          "o": dict(N=DIM, K=HQ * HD, norm=False, res=True),
          "router": dict(N=EXPERTS, K=DIM, norm=True, res=False)}
# (BN, BK, num_warps) of norm_linear at one row; the engine's rule (linear_tiles) is timed as "auto"
GEMV_TILES = [(1, 2048, 2), (2, 2048, 4), (4, 2048, 4), (4, 2048, 8), (4, 1024, 4), (8, 1024, 4), (8, 2048, 8),
              (16, 512, 4), (16, 1024, 8), (32, 512, 8), (64, 256, 8)]
MOE_VARIANTS = {"default": {}, "up_h8": dict(block_h=8), "up_h32": dict(block_h=32),
                "up_k512": dict(block_k=512), "up_h8_k512": dict(block_h=8, block_k=512),
                "up_w8_h32_k512": dict(block_h=32, block_k=512, warps_up=8),
                "down_d1": dict(block_d=1), "down_d4": dict(block_d=4),
                "down_t16k": dict(tile_down=16384), "down_t4k": dict(tile_down=4096),
                "down_w8_t16k": dict(tile_down=16384, warps_down=8), "down_w2": dict(warps_down=2)}


def timed(fn, dev) -> float:
    if dev.type != "cuda":  # dry run (tests): one call
        fn()
        return float("nan")
    return bench_ms(graph_of(fn).replay)


def run(args) -> list[dict]:
    dev = torch.device(args.device)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, device=dev, generator=g) * scale).to(dt)  # noqa: E731
    rows: list[dict] = []
    esize = torch.finfo(dt).bits // 8

    def add(name, fn, nbytes, err, **extra):
        ms = timed(fn, dev)
        row = dict(name=name, us=ms * 1e3, gbps=nbytes / (ms * 1e-3) / 1e9 if ms == ms else None,
                   bytes=nbytes, rel_err=err, **extra)
        rows.append(row)
        print(f"  {name:<36} {row['us']:8.2f} us {row['gbps'] or 0:7.0f} GB/s  err {err:.1e}", flush=True)

    def add_checked(name, fn, ref, nbytes, **extra):
        """Time a variant only if it runs and matches its reference (else print why and skip it)."""
        try:
            err = rel_err(fn(), ref)
        except Exception as e:  # a tile / config that does not compile
            print(f"  {name}: ERROR {type(e).__name__}: {str(e)[:160]}", flush=True)
            return
        if not err < 2e-2:
            print(f"  {name}: CHECK FAILED rel err {err:.2e}", flush=True)
            return
        add(name, fn, nbytes, err, **extra)

    scale = args.shape_scale
    for sname, sh in SHAPES.items():
        N, K = max(1, sh["N"] // scale), max(16, sh["K"] // scale)
        x = rnd(1, K)
        w = rnd(N, K, scale=K ** -0.5)
        nw = (1.0 + 0.1 * rnd(K)).to(dt) if sh["norm"] else None
        res = rnd(1, N) if sh["res"] else None
        kw = dict(norm_weight=nw, residual=res, eps=1e-6)
        ref = fd.norm_linear_reference(x.float(), w.float(), norm_weight=None if nw is None else nw.float(),
                                       residual=None if res is None else res.float(), eps=1e-6)
        nbytes = fd.gemv_bytes(1, N, K, esize)
        print(f"{sname}: N {N}, K {K}, {nbytes / 1e6:.1f} MB", flush=True)
        add(f"gemv_{sname}_cublas", lambda: F.linear(x, w), nbytes, rel_err(F.linear(x, w), x.float() @ w.float().T),
            shape=sname)
        chain = lambda: fd.norm_linear_reference(x, w, **kw)  # noqa: E731
        add(f"gemv_{sname}_torch_chain", chain, nbytes, rel_err(chain(), ref), shape=sname)
        variants = [("auto", None, 4)] + [(f"{bn}x{bk}w{nwp}", (1, bn, bk), nwp) for bn, bk, nwp in GEMV_TILES]
        for tag, tiles, warps in variants:
            fn = lambda tiles=tiles, warps=warps: fd.norm_linear(x, w, tiles=tiles, num_warps=warps, **kw)  # noqa: E731
            add_checked(f"gemv_{sname}_{tag}", fn, ref, nbytes, shape=sname,
                        tiles=list(tiles or fd.linear_tiles(1, N, K, dev)), num_warps=warps)

    E, H, D = EXPERTS, max(16, HIDDEN // scale), max(16, DIM // scale)
    x = rnd(1, D)
    w1, w3 = rnd(E, H, D, scale=D ** -0.5), rnd(E, H, D, scale=D ** -0.5)
    w2 = rnd(E, D, H, scale=H ** -0.5)
    nw = (1.0 + 0.1 * rnd(D)).to(dt)
    res = rnd(1, D)
    ids = torch.randperm(E, device=dev, generator=g)[:TOPK].to(torch.int32)[None]
    wts = torch.softmax(torch.randn(1, TOPK, device=dev, generator=g), -1).to(dt)
    ref = md.moe_decode_reference(x.float(), ids, wts.float(), w1.float(), w3.float(), w2.float(),
                                  norm_weight=nw.float(), residual=res.float())
    nbytes = md.moe_decode_bytes(1, TOPK, D, H, esize, distinct_experts=TOPK)
    print(f"moe: E {E}, top {TOPK}, D {D}, H {H}, {nbytes / 1e6:.1f} MB", flush=True)
    for tag, kw in MOE_VARIANTS.items():
        c = replace(md.DEFAULT_CONFIG, **kw)
        fn = lambda c=c: md.moe_decode(x, ids, wts, w1, w3, w2, norm_weight=nw, residual=res, config=c)  # noqa: E731
        add_checked(f"moe_{tag}", fn, ref, nbytes, config=asdict(c))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench_decode_gemv.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape-scale", type=int, default=1, help="divide every size by this (CPU dry runs)")
    args = p.parse_args(argv)
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                device=torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                copy_tbps=COPY_TBPS, shape_scale=args.shape_scale)
    rows = run(args)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\n{'name':<36}{'us':>9}{'GB/s':>8}{'% of copy':>10}")
    for r in rows:
        pct = 100 * (r["gbps"] or 0) / (COPY_TBPS * 1e3)
        print(f"{r['name']:<36}{r['us']:>9.2f}{(r['gbps'] or 0):>8.0f}{pct:>9.0f}%")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
