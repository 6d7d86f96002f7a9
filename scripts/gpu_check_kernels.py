"""Check every prefill kernel and the decode kernels against their references on the GPU
(bf16 and fp32 inputs).

Each check prints OK/BAD with the relative error ||out - ref|| / ||ref|| (reference in fp32 from
the same inputs; for block masks: the number of rows that break the selection rule), with random
inputs drawn fresh per check; outputs are checked for NaN. The last line is PASS or FAIL.
Run:  python scripts/gpu_check_kernels.py --out results/gpu_check.json
      python scripts/gpu_check_kernels.py --only decode      (the decode checks alone, ~1 min)
On CPU (--device cpu) it runs the same checks at small sizes through eager flex / the
torch fallbacks (decode: the Triton interpreter when TRITON_INTERPRET=1 was set before triton's
first import, else reference vs reference), which is how the script itself is tested off the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.block_select import (  # noqa: E402
    indexer_block_mass,
    indexer_block_mass_pooled_reference,
    indexer_block_mass_reference,
    select_blocks,
    select_blocks_reference,
    selection_to_dense,
    topp_keep_reference,
    topp_keep_threshold,
)
from kernels.masks import (  # noqa: E402
    block_mask_to_dense,
    causal_attention,
    local_attention,
    local_attention_reference,
    local_mask_dense,
    window_sink_block_mask,
)
from kernels.sparse_prefill import block_sparse_attention, block_sparse_attention_reference  # noqa: E402

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


class Checker:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, name: str, err: float, tol: float, **extra):
        ok = err == err and err <= tol  # NaN fails
        self.rows.append({"check": name, "rel_err": err, "tol": tol, "ok": ok, **extra})
        print(f"{'OK ' if ok else 'BAD'} {name:<58} rel_err={err:.3e} (tol {tol:.0e}) {extra if extra else ''}", flush=True)

    def fail(self, name: str, exc: BaseException):
        self.rows.append({"check": name, "ok": False, "error": repr(exc)[:500]})
        print(f"ERR {name}: {exc!r}", flush=True)
        traceback.print_exc()


def docs_for(B: int, T: int, device) -> torch.Tensor:
    """Packed documents: row 0 split unevenly in 3 (one tiny), other rows one document."""
    d = torch.zeros(B, T, dtype=torch.long, device=device)
    d[0, T // 3 :] = 1
    d[0, T // 3 + 5 :] = 2
    return d


def check_local(ck: Checker, dev, dtype, T: int, D: int):
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    B, Hq, Hkv, window, sinks = 2, 8, 2, T // 4, 4
    # every variant is a separate compile: fp32 checks only the plain case
    for use_doc in ((False, True) if dtype == torch.bfloat16 else (False,)):
        doc = docs_for(B, T, dev) if use_doc else None
        q = torch.randn(B, Hq, T, D, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(B, Hkv, T, D, device=dev, dtype=dtype, requires_grad=True)
        out = local_attention(q, k, v, window=window, sinks=sinks, doc_ids=doc)
        ref = local_attention_reference(q.float(), k.float(), v.float(), window=window, sinks=sinks, doc_ids=doc)
        ck.add(f"local_attention fwd {dtype} T={T} doc={use_doc}", rel_err(out, ref), tol)
        go = torch.randn_like(out)
        g = torch.autograd.grad(out, (q, k, v), go)
        gr = torch.autograd.grad(ref, (q, k, v), go.float())
        for name, a, b in zip("qkv", g, gr):
            ck.add(f"local_attention grad_{name} {dtype} T={T} doc={use_doc}", rel_err(a, b), tol * 2)
        with torch.no_grad():
            out = causal_attention(q, k, v, doc_ids=doc)
            ref = local_attention_reference(q.float(), k.float(), v.float(), window=T, sinks=0, doc_ids=doc)
        ck.add(f"causal_attention fwd {dtype} T={T} doc={use_doc}", rel_err(out, ref), tol)


def check_masks(ck: Checker, dev, T: int):
    for use_doc in (False, True):
        doc = docs_for(2, T, dev) if use_doc else None
        bm = window_sink_block_mask(T, T // 5, 4, block_size=128, device=dev, doc_ids=doc)
        dense = block_mask_to_dense(bm)[:, 0]
        ref = local_mask_dense(T, T // 5, 4, device=dev, doc_ids=doc)
        ck.add(f"window_sink_block_mask == dense mask T={T} doc={use_doc}", float((dense != ref).float().mean()), 0.0)


def check_block_mass(ck: Checker, dev, T: int):
    B, H, r = 2, 4, 16
    for dtype in (torch.float32, torch.bfloat16):
        qi = (torch.randn(B, H, T, r, device=dev) * 0.5).to(dtype)
        ki = torch.randn(B, H, T, r, device=dev).to(dtype)
        for use_doc in (False, True):
            doc = docs_for(B, T, dev) if use_doc else None
            for mode, ref_fn in (("mean", indexer_block_mass_reference), ("pooled", indexer_block_mass_pooled_reference)):
                ref = ref_fn(qi, ki, block_size=64, q_block_size=128, doc_ids=doc)
                out = indexer_block_mass(qi, ki, block_size=64, q_block_size=128, mode=mode, doc_ids=doc)
                tol = 1e-2 if dtype == torch.float32 else 1e-3  # fp32 goes through tf32
                ck.add(f"block mass {mode} {dtype} T={T} doc={use_doc}", rel_err(out, ref), tol)


def check_selection(ck: Checker, dev, T: int):
    B, H, r = 1, 4, 16
    qi = (torch.randn(B, H, T, r, device=dev) * 0.5).bfloat16()
    ki = torch.randn(B, H, T, r, device=dev).bfloat16()
    for mode in ("mean", "pooled"):
        ref = select_blocks_reference(qi, ki, top_p=0.9, window=T // 8, sinks=4, mode=mode)
        for thr in (("triton",) if dev.type == "cuda" else ()) + ("bisect", "radix", "sort"):
            sel = select_blocks(qi, ki, top_p=0.9, window=T // 8, sinks=4, mode=mode, threshold=thr)
            diff = float((selection_to_dense(sel) != ref).float().sum() / ref.float().sum())
            # the kernel's fp32 sums differ from the reference's in the last bits: a block
            # sitting exactly at the top-p boundary may flip
            ck.add(f"select_blocks {mode}/{thr} vs reference T={T}", diff, 1e-3, density=[round(x, 4) for x in sel.density.tolist()])
    g = torch.Generator(device=dev).manual_seed(0)
    mass = torch.softmax(torch.randn(512, 2048, device=dev, generator=g) * 2, -1)
    target = torch.rand(512, device=dev, generator=g)
    ref = topp_keep_reference(mass, target)
    for thr in ("bisect", "radix"):
        diff = float((topp_keep_threshold(mass, target, method=thr) != ref).float().sum())
        ck.add(f"topp_keep_threshold {thr} vs sort (mismatches)", diff, 0.0)


def check_block_sparse(ck: Checker, dev, dtype, T: int, D: int):
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    B, Hr = 2, 8
    qi = torch.randn(B, Hr, T, 16, device=dev) * 0.5
    ki = torch.randn(B, Hr, T, 16, device=dev)
    # (documents, kv heads): a whole KV group (1 kv head) or kv gathered per retrieval head
    cases = ((False, 1), (False, Hr), (True, 1)) if dtype == torch.bfloat16 else ((False, 1),)
    for use_doc, hkv in cases:
        doc = docs_for(B, T, dev) if use_doc else None
        for top_p in (0.5, 1.0):
            sel = select_blocks(qi, ki, top_p=top_p, window=T // 8, sinks=4, doc_ids=doc)
            q = torch.randn(B, Hr, T, D, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(B, hkv, T, D, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(B, hkv, T, D, device=dev, dtype=dtype, requires_grad=True)
            ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), sel, window=T // 8, sinks=4)
            tag = f"{dtype} T={T} Hkv={hkv} doc={use_doc} top_p={top_p}"
            with torch.no_grad():  # fine layout (forward only)
                out = block_sparse_attention(q, k, v, sel, window=T // 8, sinks=4)
            ck.add(f"block_sparse fwd(fine) {tag}", rel_err(out, ref), tol, density=round(float(sel.density.mean()), 4))
            out = block_sparse_attention(q, k, v, sel, window=T // 8, sinks=4)  # coarse, differentiable
            ck.add(f"block_sparse fwd(coarse) {tag}", rel_err(out, ref), tol)
            go = torch.randn_like(out)
            g = torch.autograd.grad(out, (q, k, v), go)
            gr = torch.autograd.grad(ref, (q, k, v), go.float())
            for name, a, b in zip("qkv", g, gr):
                ck.add(f"block_sparse grad_{name} {tag}", rel_err(a, b), tol * 2)
            if top_p == 1.0 and not use_doc:
                with torch.no_grad():
                    dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
                ck.add(f"block_sparse top_p=1 == dense causal {tag}", rel_err(out, dense), tol)


def _decode_forced_by_tokens(L: int, nb: int, block_size: int, window: int, sinks: int) -> torch.Tensor:
    t = torch.arange(L)
    forced = torch.zeros(nb, dtype=torch.bool)
    forced[t[(t < sinks) | (t >= L - window)] // block_size] = True
    return forced


def decode_mask_bad_rows(got, ref, mass, lens, top_p, block_size, window, sinks) -> int:
    """Rows of a decode block mask that break the selection rule (the prefill rule for the query
    at L - 1): a row differing from the reference is accepted only if it is another valid choice
    at a float-rounding tie (forced blocks kept, mass reaches top_p, minimal, a top set of the free
    blocks, within one block of the reference). top_p <= 0 or >= 1: exact equality."""
    got, ref, mass = got.cpu(), ref.cpu(), mass.cpu().double()
    bad = 0
    for b, h in (got != ref).any(-1).nonzero().tolist():
        if top_p <= 0.0 or top_p >= 1.0:
            bad += 1
            continue
        L = int(lens[b])
        nb = -(-L // block_size)
        forced = _decode_forced_by_tokens(L, nb, block_size, window, sinks)
        m, sel = mass[b, h, :nb], got[b, h, :nb]
        extra = sel & ~forced
        ok = bool(not got[b, h, nb:].any() and sel[forced].all() and m[sel].sum() >= top_p - 1e-4)
        if ok and extra.any():
            ok = bool(m[sel].sum() - m[extra].min() < top_p + 1e-4)
            if ok and (~sel).any():
                ok = bool(m[~sel].max() <= m[extra].min() + 1e-6)
        ok = ok and abs(int(sel.sum()) - int(ref[b, h].sum())) <= 1
        bad += not ok
    return bad


def check_decode(ck: Checker, dev):
    """Decode kernels (kernels/triton_decode.py) vs the references of kernels/sparse_decode.py:
    block selection (the prefill rule: forced sink/window blocks count toward top_p), retrieval,
    local and whole-layer decode. Batch 3 with different lengths (not block multiples, one below
    the window), irregular GQA maps, fp32 and bf16, the select variants; both retrieval kernels
    (per query head, GQA union: retrieval_union) vs the reference and vs each other."""
    from kernels import sparse_decode as sd

    cuda = dev.type == "cuda"
    BS = 64 if cuda else 16
    lens_l = [5000, 3001, 777] if cuda else [300, 263, 41]
    L, D, r = max(lens_l), (128 if cuda else 32), 16
    lens = torch.tensor(lens_l, device=dev, dtype=torch.int32)
    B = len(lens_l)
    impl = "triton" if sd.triton_unavailable_reason(lens) is None else "torch"
    if impl == "torch":
        print("decode: Triton cannot run here, checking the references against themselves", flush=True)
    from kernels import triton_decode as td  # noqa: F401  (imported by sd when Triton runs)

    C = td.TritonDecodeConfig
    variants = {"default": C(), "fused_select_k16": C(fused_select=True, search_arity=16),
                # views longer than the select tile: the split select (a candidate pass, then the search in
                # registers, or its streaming fallback when the candidates overflow the tile) and the
                # one-program streaming select
                "tiled_k1": C(search_arity=1, select_wide_tile=16),
                "split_c32": C(select_cand_tile=32, select_split_tile=4),
                "split_c32_stream16": C(select_cand_tile=32, select_wide_tile=16, select_split_tile=4),
                "tiled_k4_stream": C(select_wide_tile=16, select_split=False)}
    if not cuda:  # the CPU interpreter is slow: two variants test the script
        variants.pop("fused_select_k16")
        variants.pop("tiled_k4_stream")
    g = torch.Generator(device=dev).manual_seed(0)
    Hr = 4
    qi = torch.randn(B, Hr, r, device=dev, generator=g)
    ki = torch.randn(B, Hr, L, r, device=dev, generator=g) * (3.0 / r ** 0.5)
    mass = sd.indexer_block_mass_reference(qi.double(), ki.double(), lens, block_size=BS)
    # (window, sinks): not block aligned; sinks over two blocks; no forced block; window over all
    w0 = 1000 if cuda else 40
    for window, sinks in ((w0, 4), (w0 // 2 + 3, BS + 6), (0, 0), (L + 100, 4)):
        for top_p in (0.5, 0.9, 1.0, 0.0):
            kw = dict(top_p=top_p, block_size=BS, window=window, sinks=sinks)
            ref = sd.select_decode_blocks_reference(qi, ki, lens, **kw)
            for name, cfg in variants.items():
                got = sd.select_decode_blocks(qi, ki, lens, **kw, impl=impl, config=cfg)
                bad = decode_mask_bad_rows(got, ref, mass, lens, top_p, BS, window, sinks)
                chosen, free = sd.decode_block_density(got, lens, block_size=BS, window=window, sinks=sinks)
                n_free = float(free.sum()) * Hr  # density: chosen / free blocks (1.0 if none is free)
                dens = float(chosen.sum()) / n_free if n_free else 1.0
                ck.add(f"decode select {impl} {name} w={window} s={sinks} p={top_p} (bad rows)", float(bad), 0.0,
                       rows_differing=int((got != ref).any(-1).sum()), density=round(dens, 4))
    # whole layer, per-query-head roles on 8 query / 2 KV heads, irregular maps; both retrieval
    # kernels (the one that is not the default is added; on CUDA also the union kernel with 3
    # splits and the last-program merge)
    layer_variants = dict(variants)
    extra = {"union": C(retrieval_union=True, union_max_blocks=0, union_lists="kernel"), "per_head": C(retrieval_union=False),
             # union visit lists from the select kernel's packed mask bits (no _union_kernel launch)
             "union_fastlists": C(retrieval_union=True, union_max_blocks=0, union_lists="fused")}
    if cuda:
        extra["union_fused_ns3"] = C(retrieval_union=True, fused_reduction=True, union_num_splits=3,
                                     union_max_blocks=0, union_lists="kernel")
        # fused lists with 1-word tiles / 1-word expansion: the multi-tile paths of the list build
        extra["union_fastlists_ns3_w1"] = C(retrieval_union=True, fused_reduction=True, union_num_splits=3,
                                            union_max_blocks=0, union_lists="fused", union_word_tile=1,
                                            union_expand_words=1)
    for name, cfg in extra.items():
        if cfg not in layer_variants.values():
            layer_variants[name] = cfg
    roles = [False, True, False, False, True, True, False, True]
    retr = [h for h in range(8) if roles[h]]
    local = [h for h in range(8) if not roles[h]]
    W, S, window, sinks = (1024, 8, 1000, 4) if cuda else (48, 4, 40, 4)
    for dt in ((torch.bfloat16, torch.float32) if cuda else (torch.float32,)):
        q = torch.randn(B, 8, D, device=dev, generator=g).to(dt)
        k = torch.randn(B, 2, L, D, device=dev, generator=g).to(dt)
        v = torch.randn(B, 2, L, D, device=dev, generator=g).to(dt)
        ring_k = torch.full((B, 2, W, D), float("nan"), device=dev, dtype=dt)
        ring_v = ring_k.clone()
        for b, n in enumerate(lens_l):
            t = torch.arange(max(0, n - W), n, device=dev)
            ring_k[b, :, t % W] = k[b, :, t]
            ring_v[b, :, t % W] = v[b, :, t]
        layer = dict(q=q, cache_lens=lens, is_retrieval=roles, top_p=0.9, block_size=BS, window=window,
                     sinks=sinks, sink_k=k[:, :, :S], sink_v=v[:, :, :S], ring_k=ring_k, ring_v=ring_v,
                     kv_head_of_l=[1, 0, 0, 1], k_cache=k, v_cache=v, kv_head_of_r=[0, 1, 1, 0],
                     qi=qi.to(dt), ki_cache=ki.to(dt))
        up = {key: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x)
              for key, x in layer.items()}
        ref = sd.rtpurbo_decode_reference(**up)
        m_dt = sd.indexer_block_mass_reference(up["qi"].double(), up["ki_cache"].double(), lens, block_size=BS)
        tol = 2e-2 if dt == torch.bfloat16 else 1e-4
        alone = {}
        for name, cfg in layer_variants.items():
            tag = f"{impl} {name} {dt}"
            got = sd.rtpurbo_decode(**layer, impl=impl, config=cfg)
            bad = decode_mask_bad_rows(got.block_mask, ref.block_mask, m_dt, lens, 0.9, BS, window, sinks)
            ck.add(f"decode layer mask {tag} (bad rows)", float(bad), 0.0)
            want = sd.retrieval_decode_reference(up["q"][:, retr], up["k_cache"], up["v_cache"], [0, 1, 1, 0],
                                                 got.block_mask, lens, window=window, sinks=sinks, block_size=BS)
            ck.add(f"decode layer retrieval out {tag}", rel_err(got.out[:, retr], want), tol)
            ck.add(f"decode layer local out {tag}", rel_err(got.out[:, local], ref.out[:, local]), tol)
            att = sd.retrieval_decode(layer["q"][:, retr], k, v, [0, 1, 1, 0], ref.block_mask, lens,
                                      window=window, sinks=sinks, block_size=BS, impl=impl, config=cfg)
            want = sd.retrieval_decode_reference(up["q"][:, retr], up["k_cache"], up["v_cache"], [0, 1, 1, 0],
                                                 ref.block_mask, lens, window=window, sinks=sinks, block_size=BS)
            ck.add(f"decode retrieval_decode alone {tag}", rel_err(att, want), tol)
            if cfg.union_lists == "kernel" or not cfg.retrieval_union:
                alone[cfg.retrieval_union] = att
            elif "fast" not in alone:  # the first fused-lists union config (the default one)
                alone["fast"] = att
        if True in alone and False in alone:  # the GQA-union kernel == the per-head kernel on the same mask
            ck.add(f"decode retrieval union vs per-head {impl} {dt}", rel_err(alone[True], alone[False]), tol)
        if "fast" in alone and True in alone and impl == "triton":
            # same blocks, same order, same splits: bit for bit under the interpreter; compiled, the two
            # kernels' float ops are scheduled differently (H100, triton 3.6: 4.5e-7 in fp32, 2.6e-3 in bf16,
            # where p is rounded to bf16 for the P @ V dot): the same tolerance as union vs per-head
            ck.add(f"decode retrieval union fastlists vs union kernel lists {impl} {dt}",
                   rel_err(alone["fast"], alone[True]), 0.0 if not cuda else tol)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 2085 on CUDA (not a block multiple), 333 on CPU")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--only", nargs="+", default=None,
                    help="run only the steps whose name starts with one of these words "
                         "(masks, local, block, selection, decode)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    # never let Dynamo fall back to eager silently: eager flex ignores the block lists
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    T = args.seq_len or (2085 if dev.type == "cuda" else 333)
    D = 128 if dev.type == "cuda" else 32
    torch.manual_seed(0)
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "seq_len": T,
        "head_dim": D,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    print(json.dumps(info), flush=True)
    ck = Checker()
    dtypes = (torch.bfloat16, torch.float32) if dev.type == "cuda" else (torch.float32,)
    steps = [("masks", lambda: check_masks(ck, dev, T))]
    for dt in dtypes:
        steps.append((f"local {dt}", lambda dt=dt: check_local(ck, dev, dt, T, D)))
    steps.append(("block mass", lambda: check_block_mass(ck, dev, T)))
    steps.append(("selection", lambda: check_selection(ck, dev, 4096 if dev.type == "cuda" else 1024)))
    for dt in dtypes:
        steps.append((f"block sparse {dt}", lambda dt=dt: check_block_sparse(ck, dev, dt, T, D)))
    steps.append(("decode", lambda: check_decode(ck, dev)))
    if args.only:
        steps = [(n, f) for n, f in steps if any(n.startswith(w) for w in args.only)]
    for name, fn in steps:
        t0 = time.time()
        try:
            fn()
        except Exception as exc:  # keep going: one run should report every check
            ck.fail(name, exc)
        print(f"--- {name}: {time.time() - t0:.1f}s", flush=True)
    n_bad = sum(not r["ok"] for r in ck.rows)
    print(f"\n{len(ck.rows) - n_bad}/{len(ck.rows)} checks passed", flush=True)
    print("PASS" if n_bad == 0 and ck.rows else "FAIL", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"info": info, "checks": ck.rows}, indent=1))
    return 1 if n_bad else 0


if __name__ == "__main__":
    sys.exit(main())
