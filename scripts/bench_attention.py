"""Prefill benchmark of one decoder layer's attention: dense cuDNN SDPA vs RTPurbo.

Shape: Qwen3-30B-A3B attention (32 query heads, 4 KV heads, head_dim 128), batch 1, bf16.
Parts (--only, comma separated; default all; "local" implies "dense", "select" times the sparse
attention at the density it selects):
  dense       cuDNN SDPA, causal; GQA through enable_gqa or by expanding k/v (both timed at
              the first T and checked against each other, the faster one is the baseline).
              At T > --dense-full-max (default 128K) only one KV group (8 q heads, 1 kv head)
              is timed and the layer time is 4x that (per-head cost is what scales).
  local       window 8192 + 4 sinks, 24 heads (3 KV groups): FlexAttention (kernels/masks.py, impl
              "flex") with every kernel_options candidate of LOCAL_KERNEL_OPTION_CANDIDATES, and the
              chunked causal-SDPA path (kernels/window_sdpa.py) as candidates "cudnn_chunked" /
              "flash_chunked" (LOCAL_CHUNKED_CANDIDATES) (--local-configs), TFLOP/s and % of cuDNN's
              TFLOP/s at the same T; 32 heads (4 groups) with the flex default and with the fastest
              24-head variant that passed its checks.
  select      indexer block mass + top-p selection for the 8 retrieval heads of one KV group,
              pooled mode: the parts (two-pass block mass / one-pass log-mass kernels alone, the
              bisection and "hist" selection kernels alone on the same input, their outputs
              compared) and select_blocks end to end per threshold (--select-thresholds:
              "triton" = mass + bisection, "triton_hist" = log-mass + hist, torch "sort" /
              "bisect"); mean mode for T <= --mean-max; then block_sparse_attention at the
              selected density and the ratio selection / sparse attention (goal <= 25%).
              Indexer inputs are synthetic "clustered" data (make_clustered_indexer), not a
              trained indexer: the density they give is a property of that data.
  density     block_sparse_attention over synthetic random selections of given densities.
  decode      scripts/bench_decode.run_decode_bench (also skipped by --no-decode).
  layers      (when dense, local and select ran) rtp_1of4 = local(24) + selection + sparse(8);
              rtp_0of4 = local(32); rtp_weighted = 0.6 * rtp_1of4 + 0.4 * rtp_0of4. Two variants:
              "flex" (flex default kernel_options, pooled select with the default threshold) and
              "best[local=NAME]" (the fastest local variant that passed its checks, NAME, and the
              fastest select).
Checks first (--no-checks skips them), each printed PASS/FAIL: selection (every Triton path,
incl. small HistConfigs that force the multi-round / gather / restart paths) vs
select_blocks_reference at T = --check-seq-lens (pooled, mean, documents, batch 2, T not a
multiple of the block, top_p = 1), the selection kernels vs the sort reference on the same
masses, the log-mass vs the fp32 reference mass; every local kernel_options candidate vs fp32
attention on sampled rows at T = --check-local-t (a candidate that fails to compile or run is
reported INVALID and not timed). Every timed output is also spot-checked at the timed shape.
Times: triton.testing.do_bench median (L2 flushed) for calls under --long-ms; longer calls
are timed with CUDA events, median of --long-reps runs after one warm-up.
TFLOP/s "useful" counts 4 * D FLOPs per visible (query, key) pair of what each variant computes.
--budget-s: optional work (further local candidates, select variants, density sweep) is skipped
once the run has used this many seconds; the JSON is rewritten after every sequence length.

  python scripts/bench_attention.py --seq-lens 32768 131072 1048576 --only select,local \
      --no-decode --out bench_prefill.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.block_select import (  # noqa: E402
    BlockSelection,
    forced_and_candidate_blocks,
    indexer_block_mass,
    indexer_block_mass_pooled_reference,
    indexer_block_mass_reference,
    random_selection,
    select_blocks,
    select_blocks_reference,
    selection_to_dense,
    topp_keep_reference,
)
from kernels.masks import document_segments, local_attention, window_sink_block_mask, window_sink_block_ranges  # noqa: E402
from kernels.sparse_prefill import block_sparse_attention, selection_block_mask  # noqa: E402
from kernels.window_sdpa import window_attention_sdpa, window_sdpa_unavailable_reason  # noqa: E402

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


# ----------------------------------------------------------------------------- config

PARTS = ("dense", "local", "select", "density", "decode")

# FlexAttention kernel_options for the local heads: name -> kernel_options (None = torch's
# choice, on the H100 BLOCK_M 128 / BLOCK_N 64 / 8 warps / 3 stages for bf16, D = 128).
# IS_DIVISIBLE: the 2nd and later sequence lengths run a dynamic-shape graph, where Inductor
# cannot prove T % 128 == 0 and adds bounds checks; the bench's T are multiples of 128.
# BLOCK_M / BLOCK_N must divide the mask's 128-token blocks. Values that do not compile (e.g.
# too much shared memory) are reported INVALID by the checks and skipped.
LOCAL_KERNEL_OPTION_CANDIDATES: dict[str, dict | None] = {
    "default": None,
    "div": {"IS_DIVISIBLE": True},
    "div_safe_prescale": {"IS_DIVISIBLE": True, "ROWS_GUARANTEED_SAFE": True, "PRESCALE_QK": True},
    "m128n128w8s2_div": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2, "IS_DIVISIBLE": True},
    "m128n128w8s3_div": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3, "IS_DIVISIBLE": True},
    "m128n64w4s3_div": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "IS_DIVISIBLE": True},
    "m64n128w4s3_div": {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3, "IS_DIVISIBLE": True},
    "div_tma": {"IS_DIVISIBLE": True, "USE_TMA": True},  # not in the default list (--local-configs)
}
# variants that call flex once per KV group (int32 indexing where the whole call would need int64);
# timed only where the one-call tensors exceed 2^31 elements
LOCAL_SPLIT_CANDIDATES: dict[str, str] = {"default_per_group": "default", "div_per_group": "div"}
# the window band as batched square causal SDPA calls + LSE merge (kernels/window_sdpa.py): name -> backend
LOCAL_CHUNKED_CANDIDATES: dict[str, str] = {"cudnn_chunked": "cudnn", "flash_chunked": "flash"}
INT32_MAX = 2**31 - 1
DEFAULT_LOCAL_CONFIGS = ([n for n in LOCAL_KERNEL_OPTION_CANDIDATES if n != "div_tma"] + list(LOCAL_SPLIT_CANDIDATES)
                         + list(LOCAL_CHUNKED_CANDIDATES))


def _hist_variants() -> dict:
    from kernels.triton_block_select import HistConfig

    return {
        "tile2048_w8": HistConfig(tile=2048, num_warps=8),
        "tile512_w4": HistConfig(tile=512, num_warps=4),
        "cand1024": HistConfig(cand=1024),
        "thr16": HistConfig(thresholds=16),
    }


HIST_VARIANTS = _hist_variants()  # HistConfig variants of the selection kernel (default = HistConfig())
LOGMASS_VARIANTS = {  # indexer_block_logmass_triton launch variants (default: block_m 64, chunk 32, 4 warps, tf32x3)
    "m128_w8": dict(block_m=128, num_warps=8),
    "chunk64": dict(chunk_blocks=64),
    "tf32": dict(dot_precision="tf32"),
}


def local_config(name: str) -> tuple[dict | None, int | None]:
    """(kernel_options, heads_per_call) of a flex sweep entry (heads_per_call None = one call);
    (None, None) for the chunked SDPA candidates."""
    if name in LOCAL_CHUNKED_CANDIDATES:
        return None, None
    if name in LOCAL_SPLIT_CANDIDATES:
        opts = LOCAL_KERNEL_OPTION_CANDIDATES[LOCAL_SPLIT_CANDIDATES[name]]
        return (dict(opts) if opts else None), 1  # rounded up to one KV group by local_attention
    opts = LOCAL_KERNEL_OPTION_CANDIDATES[name]
    return (dict(opts) if opts else None), None


def local_fn(name: str, q, k, v, window: int, sinks: int):
    """A no-argument callable running local candidate `name` on q/k/v (flex candidates pin
    impl="flex", so kernels.masks.LOCAL_PREFILL_IMPL does not change what they time)."""
    if name in LOCAL_CHUNKED_CANDIDATES:
        backend = LOCAL_CHUNKED_CANDIDATES[name]
        return lambda: window_attention_sdpa(q, k, v, window=window, sinks=sinks, backend=backend)
    opts, split = local_config(name)
    return lambda: local_attention(q, k, v, window=window, sinks=sinks, kernel_options=opts, heads_per_call=split,
                                   impl="flex")


def local_unavailable(name: str, q) -> str | None:
    """Why a chunked candidate cannot run here (None: it can, or it is a flex candidate)."""
    if name not in LOCAL_CHUNKED_CANDIDATES:
        return None
    return window_sdpa_unavailable_reason(q, backend=LOCAL_CHUNKED_CANDIDATES[name])


class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.time()
        self.seconds = seconds

    def left(self) -> bool:
        return self.seconds <= 0 or time.time() - self.t0 < self.seconds

    def elapsed(self) -> float:
        return time.time() - self.t0


def _err_str(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300].replace("\n", " ")


# ----------------------------------------------------------------------------- checks


def _random_docs(B: int, T: int, g: torch.Generator, device) -> torch.Tensor:
    """doc ids [B, T]: row 0 has 4 documents incl. a 3-token one, other rows 1-3 documents."""
    rows = []
    for b in range(B):
        n_cut = 3 if b == 0 else int(torch.randint(0, 3, (), generator=g))
        cuts = sorted(int(c) for c in torch.randint(1, T - 4, (n_cut,), generator=g))
        if b == 0:
            cuts = sorted(set(cuts + [cuts[0] + 3]))
        ids = torch.zeros(T, dtype=torch.long)
        for c in cuts:
            ids[c:] += 1
        rows.append(ids)
    return torch.stack(rows).to(device)


def _indexer_inputs(kind: str, B: int, H: int, T: int, dev, seed: int):
    if kind == "clustered":
        pairs = [make_clustered_indexer(H, T, 16, dev, seed=seed + b) for b in range(B)]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    g = torch.Generator(device=dev).manual_seed(seed)
    qi = (torch.randn(B, H, T, 16, device=dev, generator=g) * 0.5).bfloat16()
    ki = torch.randn(B, H, T, 16, device=dev, generator=g).bfloat16()
    return qi, ki


def _lists_ok(sel: BlockSelection) -> bool:
    idx, num = sel.kv_indices.long(), sel.kv_num_blocks.long()
    valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    asc = bool((idx[..., 1:] > idx[..., :-1])[valid[..., 1:]].all())
    return asc and bool((idx[~valid] == 0).all())


def selection_from_mass_reference(mass, T, window, sinks, bk, qb, doc_ids, top_p):
    """Dense selection [B, H, nQB, nKB] of the top-p rule applied to the given masses (sort)."""
    forced, cand = forced_and_candidate_blocks(T, block_size=bk, q_block_size=qb, window=window, sinks=sinks,
                                               doc_ids=doc_ids, device=mass.device)
    free = cand & ~forced
    if top_p >= 1.0:
        return cand.expand_as(mass).clone()
    target = top_p - torch.where(forced, mass, 0.0).sum(-1)
    extra = topp_keep_reference(torch.where(free, mass, 0.0), target) & free
    return forced | extra


def lists_to_dense(idx: torch.Tensor, num: torch.Tensor, n_kb: int) -> torch.Tensor:
    valid = torch.arange(idx.shape[-1], device=idx.device) < num[..., None]
    out = torch.zeros(*num.shape, n_kb + 1, dtype=torch.bool, device=idx.device)
    out.scatter_(-1, torch.where(valid, idx.long(), n_kb), True)
    return out[..., :n_kb]


SELECT_TOL = 1e-3  # differing blocks / reference blocks, same masses in (summation-order flips only)
MASS_TOL = 2e-3  # absolute mass slack of a valid top-p selection under a tf32-scored mass


def invalid_rows(sel, ref, mass, forced, cand, top_p, tol=MASS_TOL):
    """(rows where sel != ref, rows where sel is not a valid top-p selection of `mass` within tol).
    Valid: forced blocks kept, nothing outside the causal range, the kept extra blocks are the
    heaviest free ones (up to 2% relative), their mass with the forced one reaches top_p - tol
    (or every free block with mass is kept), and without the lightest kept one it stays under
    top_p + tol. A kernel whose masses differ from the reference by rounding (tf32 scores) may
    differ exactly at the boundary and still be valid."""
    differ = (sel != ref).any(-1)
    n_diff = int(differ.sum())
    if n_diff == 0:
        return 0, 0
    forced, cand = forced.expand_as(sel), cand.expand_as(sel)
    free = cand & ~forced
    structural = (forced & ~sel).any(-1) | (sel & ~cand).any(-1)
    if top_p >= 1.0:
        return n_diff, int((differ | structural).sum())
    extra = sel & free
    m = mass.float()
    kept = torch.where(extra | forced, m, 0.0).sum(-1)
    has_extra = extra.any(-1)
    smallest = torch.where(extra, m, float("inf")).amin(-1)
    largest_out = torch.where(free & ~extra, m, 0.0).amax(-1)
    all_kept = ~(free & ~extra & (m > 0)).any(-1)
    ok = (kept >= top_p - tol) | all_kept
    ok &= ~has_extra | ((kept - smallest < top_p + tol) & (largest_out <= smallest * 1.02 + 1e-7))
    ok &= ~structural
    return n_diff, int((differ & ~ok).sum())


def selection_checks(args, dev) -> list[dict]:
    from kernels import triton_block_select as tbs

    HC = tbs.HistConfig
    variants = [  # (label, threshold, hist_config)
        ("triton(bisect)", "triton", None),
        ("triton_hist", "triton_hist", None),
        ("triton_hist small-tiles", "triton_hist", HC(tile=128, cand=16, thresholds=8, search_arity=4)),
        ("triton_hist restart", "triton_hist", HC(tile=256, cand=32, thresholds=4, search_arity=2, bound_scale=8.0)),
    ]
    T1, T2 = args.check_seq_lens[0], args.check_seq_lens[-1]
    cases = [  # name, T, B, H, mode, data, docs, top_p
        ("pooled clustered", T1, 1, 8, "pooled", "clustered", False, 0.9),
        ("pooled clustered", T2, 1, 8, "pooled", "clustered", False, 0.9),
        ("pooled random", T2, 1, 4, "pooled", "random", False, 0.9),
        ("pooled random docs B2 T%64!=0", T1 + 77, 2, 4, "pooled", "random", True, 0.8),
        ("mean clustered", T1, 1, 2, "mean", "clustered", False, 0.9),
        ("mean random docs B2 T%64!=0", T1 // 2 + 33, 2, 2, "mean", "random", True, 0.7),
        ("pooled top_p=1", T1, 1, 2, "pooled", "clustered", False, 1.0),
    ]
    results = []

    def report(name, ok, detail):
        results.append({"check": name, "pass": bool(ok), **detail})
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: " + ", ".join(f"{k}={v}" for k, v in detail.items()), flush=True)

    g = torch.Generator().manual_seed(123)
    for ci, (name, T, B, H, mode, data, use_doc, top_p) in enumerate(cases):
        label = f"select {name} T={T} B={B} H={H} top_p={top_p}"
        try:
            qi, ki = _indexer_inputs(data, B, H, T, dev, seed=1000 + ci)
            doc = _random_docs(B, T, g, dev) if use_doc else None
            kw = dict(top_p=top_p, block_size=64, q_block_size=128, window=T // 8, sinks=4, mode=mode, doc_ids=doc)
            ref = select_blocks_reference(qi, ki, **kw)
            n_ref = int(ref.sum())
            ref_fn = indexer_block_mass_pooled_reference if mode == "pooled" else indexer_block_mass_reference
            mref = ref_fn(qi, ki, block_size=64, q_block_size=128, doc_ids=doc)
            forced, cand = forced_and_candidate_blocks(T, block_size=64, q_block_size=128, window=T // 8, sinks=4,
                                                       doc_ids=doc, device=dev)
            for vname, thr, cfg in variants:
                t0 = time.perf_counter()
                sel = select_blocks(qi, ki, threshold=thr, hist_config=cfg, **kw)
                _sync(dev)
                dense = selection_to_dense(sel)
                diff = int((dense != ref).sum())
                n_rows, n_bad = invalid_rows(dense, ref, mref, forced, cand, top_p)
                ok = n_bad == 0 and _lists_ok(sel)
                report(f"{label} {vname} vs reference", ok,
                       {"diff_blocks": diff, "diff_rows": n_rows, "invalid_rows": n_bad, "ref_blocks": n_ref,
                        "density": round(float(sel.density.mean()), 4), "s": round(time.perf_counter() - t0, 2)})
            if top_p < 1.0 and mode == "pooled":
                # log-mass kernel vs the fp32 reference mass; both selection kernels on the SAME masses
                L = tbs.indexer_block_logmass_triton(qi, ki, block_size=64, q_block_size=128, doc_ids=doc, fill=True)
                m = tbs.mass_from_log2(L, cand)
                err = float((m - mref).norm() / mref.norm())
                report(f"{label} log-mass vs reference mass", err <= 1e-4 and bool(torch.isfinite(m).all()),
                       {"rel_err": f"{err:.2e}", "precision": tbs.LOGMASS_DOT_PRECISION[0]})
                want = selection_from_mass_reference(mref, T, T // 8, 4, 64, 128, doc, top_p)
                n_qb = mref.shape[2]
                rng = window_sink_block_ranges(T, T // 8, 4, q_block_size=128, kv_block_size=64, device=dev,
                                               doc_start=None if doc is None else document_segments(doc)[1])
                ranges = torch.stack([rng[k] for k in ("win_lo", "win_hi", "sink_lo", "sink_hi", "causal_lo")], -1)
                idx, num, _, _ = tbs.topp_select_rows_triton(mref, ranges, batch=B, heads=H, n_kb=mref.shape[-1], top_p=top_p)
                d_bis = int((lists_to_dense(idx, num, mref.shape[-1]) != want).sum())
                doc0 = tbs.doc_start_per_q_block(doc, T, 128, dev)
                for cfg_name, cfg in (("default", None), ("small-tiles", variants[2][2])):
                    idx, num, _, _ = tbs.topp_select_rows_hist_triton(
                        mref, log_input=False, batch=B, heads=H, n_rows=n_qb, seq_len=T, window=T // 8, sinks=4,
                        block_size=64, q_block_size=128, q_block_start=0, top_p=top_p, doc0=doc0, config=cfg)
                    d_hist = int((lists_to_dense(tbs.trim_selection_lists(idx, num), num, mref.shape[-1]) != want).sum())
                    report(f"{label} kernels on the reference mass ({cfg_name})", d_hist <= 1e-4 * n_ref + 2,
                           {"hist_diff_blocks": d_hist, "bisect_diff_blocks": d_bis, "ref_blocks": int(want.sum())})
            del qi, ki, ref, mref
        except Exception as exc:  # a crash is a failed check, not the end of the run
            traceback.print_exc()
            report(f"{label} (crashed)", False, {"error": _err_str(exc)})
    return results


def local_checks(args, dev, names: list[str]) -> tuple[list[dict], list[str]]:
    """Each local candidate at T = --check-local-t vs fp32 attention on sampled rows. Returns
    (results, names that passed)."""
    T, HQ, HKV, D, W, S = args.check_local_t, args.hq, args.hkv, args.head_dim, args.window, args.sinks
    G = HQ // HKV
    hq, hkv = HQ - G, HKV - 1
    g = torch.Generator(device=dev).manual_seed(7)
    q = torch.randn(1, hq, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, hkv, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, hkv, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    rows = sorted({0, (T // 2) // 128 * 128, (T - 1) // 128 * 128})
    # SDPA with the dense window+sink mask (memory-efficient kernel on CUDA, k/v expanded: no GQA
    # with a mask there); None if this torch has no such kernel
    sdpa_ref = None
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from kernels.masks import local_mask_dense

        mask = local_mask_dense(T, W, S, device=dev)[None]
        with torch.no_grad(), sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION if dev.type == "cuda" else SDPBackend.MATH):
            sdpa_ref = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask)
        del mask
    except Exception as exc:
        print(f"  (no SDPA reference for the local checks: {_err_str(exc)})", flush=True)
    results, good = [], []
    for name in names:
        opts, split = local_config(name)
        t0 = time.perf_counter()
        why = local_unavailable(name, q)
        if why is not None:
            if dev.type == "cuda":  # expected to run there: a failed check, with the probe's reason
                results.append({"check": f"local {name} T={T}", "pass": False, "UNAVAILABLE": why})
                print(f"  [FAIL] local {name} T={T}: UNAVAILABLE: {why}", flush=True)
            else:
                print(f"  [SKIP] local {name}: not available on {dev.type} ({why})", flush=True)
            continue
        try:
            with torch.no_grad():
                out = local_fn(name, q, k, v, W, S)()
            _sync(dev)
            err = spot_check(out, q, k, v, local_allowed(T, W, S, dev), sorted({0, min(G, hq - 1), hq - 1}), rows)
            err_sdpa = float((out.float() - sdpa_ref.float()).norm() / sdpa_ref.float().norm()) if sdpa_ref is not None else 0.0
            ok = err <= SPOT_TOL and err_sdpa <= SPOT_TOL
            detail = {"rel_err_fp32_rows": f"{err:.2e}", "rel_err_vs_sdpa": f"{err_sdpa:.2e}" if sdpa_ref is not None else "n/a",
                      "compile_s": round(time.perf_counter() - t0, 1), "kernel_options": opts, "heads_per_call": split}
            if name in LOCAL_CHUNKED_CANDIDATES:
                detail["backend"] = LOCAL_CHUNKED_CANDIDATES[name]
        except Exception as exc:
            ok = False
            detail = {"INVALID": _err_str(exc), "kernel_options": opts}
        results.append({"check": f"local {name} T={T}", "pass": ok, **detail})
        print(f"  [{'PASS' if ok else 'FAIL'}] local {name} T={T} vs fp32 rows: "
              + ", ".join(f"{k_}={v_}" for k_, v_ in detail.items()), flush=True)
        if ok:
            good.append(name)
    del q, k, v, sdpa_ref
    return results, good


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


def run_prefill(args, dev, parts: set[str], local_names: list[str], budget: Budget, save) -> tuple[list[dict], dict]:
    from kernels import triton_block_select as tbs

    HQ, HKV, D = args.hq, args.hkv, args.head_dim
    G = HQ // HKV
    W, S, BK, BQ, R = args.window, args.sinks, 64, 128, 16
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows: list[dict] = []
    notes: dict = {"selection_agreement": [], "mask_bytes": {}, "errors": [], "skipped": [], "goals": []}
    timing = dict(long_ms=args.long_ms, long_reps=args.long_reps)
    dense_choice = None

    def add(name, T, res, pairs=None, **extra):
        row = {"name": name, "T": T, **res, **extra}
        if pairs is not None:
            row["pairs"] = pairs
            row["tflops_useful"] = tflops(pairs, D, res["ms"])
        rows.append(row)
        tf = f"{row['tflops_useful']:7.1f} TF/s" if pairs is not None else ""
        print(f"  {name:<56} {res['ms']:10.3f} ms {tf}  [{res.get('method')}]", flush=True)
        return row

    def report_spot(r):
        bad = not (r["spot_rel_err"] <= SPOT_TOL)
        notes.setdefault("spot_bad", 0)
        notes["spot_bad"] += int(bad)
        print(f"    spot check rows vs fp32 reference: rel_err {r['spot_rel_err']:.2e} {'BAD' if bad else 'ok'}", flush=True)

    def fail(where, exc):
        traceback.print_exc()
        notes["errors"].append(f"{where}: {_err_str(exc)}")
        print(f"  !! {where} failed: {_err_str(exc)}", flush=True)

    def skip(what):
        notes["skipped"].append(what)
        print(f"  (skipped, --budget-s spent: {what})", flush=True)

    for T in args.seq_lens:
        print(f"=== T = {T}  (elapsed {budget.elapsed():.0f} s)", flush=True)
        spot_rows = sorted({(T // 2) // 128 * 128, (T - 1) // 128 * 128})
        t_start = time.time()
        g = torch.Generator(device=dev).manual_seed(T)
        layer: dict = {}
        dense_tf = None
        # ---- dense baseline
        if "dense" in parts:
            try:
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
                    dense_ms = add(f"dense {dense_choice} ({hq_d}h)", T, time_ms(fns[dense_choice], dev, **timing),
                                   causal_pairs(T) * hq_d)["ms"]
                layer["dense"] = dense_ms * (HQ // hq_d)
                dense_tf = tflops(causal_pairs(T) * hq_d, D, dense_ms)
                del q, k, v, fns
            except Exception as exc:
                fail(f"dense T={T}", exc)
        # ---- local heads: kernel_options sweep (24 heads), default config for 32 heads
        if "local" in parts:
            try:
                t0 = time.perf_counter()
                bm = window_sink_block_mask(T, W, S, block_size=128, device=dev, compute_q_blocks=False)
                _sync(dev)
                notes["mask_bytes"][T] = {
                    "build_ms_first_call": (time.perf_counter() - t0) * 1e3,
                    "bytes": int(sum(t.numel() * t.element_size() for t in (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices))),
                    "kv_indices_shape": list(bm.kv_indices.shape), "full_kv_indices_shape": list(bm.full_kv_indices.shape),
                }
                hq, hkv = HQ - G, HKV - 1
                q = torch.randn(1, hq, T, D, device=dev, dtype=dt, generator=g)
                k = torch.randn(1, hkv, T, D, device=dev, dtype=dt, generator=g)
                v = torch.randn(1, hkv, T, D, device=dev, dtype=dt, generator=g)
                pairs = local_pairs(T, W, S) * hq
                one_call_big = max(q.numel(), k.numel()) > INT32_MAX
                sweep = {}
                for name in local_names:
                    opts, split = local_config(name)
                    if split is not None and not one_call_big:
                        continue
                    if name != "default" and name not in LOCAL_CHUNKED_CANDIDATES and not budget.left():
                        skip(f"local {name} T={T}")
                        continue
                    why = local_unavailable(name, q)
                    if why is not None and dev.type != "cuda":
                        print(f"  (local {name}: not available on {dev.type}: {why})", flush=True)
                        continue
                    try:
                        if why is not None:
                            raise RuntimeError(f"unavailable: {why}")
                        fn = local_fn(name, q, k, v, W, S)
                        with torch.no_grad():
                            r = add(f"local {name} ({hq}h)", T, time_ms(fn, dev, **timing), pairs, kernel_options=opts,
                                    heads_per_call=split, local_config=name)
                            r["spot_rel_err"] = spot_check(fn(), q, k, v, local_allowed(T, W, S, dev), [0, hq - 1], spot_rows)
                        report_spot(r)
                        if dense_tf:
                            r["pct_of_cudnn_tflops"] = 100.0 * r["tflops_useful"] / dense_tf
                            print(f"    {r['pct_of_cudnn_tflops']:.1f}% of cuDNN's {dense_tf:.0f} TF/s", flush=True)
                        if r["spot_rel_err"] <= SPOT_TOL:
                            sweep[name] = r
                    except Exception as exc:
                        fail(f"local {name} T={T}", exc)
                if "default" in sweep:
                    layer["local24"] = sweep["default"]["ms"]
                best = None
                if sweep:
                    best = min(sweep, key=lambda n: sweep[n]["ms"])
                    layer["local24_best"] = sweep[best]["ms"]
                    layer["local_best_name"] = best
                    notes.setdefault("local_choice", {})[T] = best
                    print(f"  fastest local variant that passed its checks at T={T}: {best} "
                          f"({sweep[best]['ms']:.3f} ms)", flush=True)
                    notes.setdefault("local_sweep", {})[T] = {
                        n: {"ms": r["ms"], "tflops": r["tflops_useful"], "pct_cudnn": r.get("pct_of_cudnn_tflops")}
                        for n, r in sweep.items()}
                    if dense_tf:
                        notes["goals"].append({"goal": "local >= 70% of cuDNN TFLOP/s", "T": T,
                                               "default_pct": sweep["default"].get("pct_of_cudnn_tflops") if "default" in sweep else None,
                                               "best": best, "best_pct": sweep[best].get("pct_of_cudnn_tflops")})
                del q, k, v
                q = torch.randn(1, HQ, T, D, device=dev, dtype=dt, generator=g)
                k = torch.randn(1, HKV, T, D, device=dev, dtype=dt, generator=g)
                v = torch.randn(1, HKV, T, D, device=dev, dtype=dt, generator=g)
                fn = lambda: local_attention(q, k, v, window=W, sinks=S, impl="flex")  # noqa: E731
                with torch.no_grad():
                    r = add(f"local default ({HQ}h)", T, time_ms(fn, dev, **timing), local_pairs(T, W, S) * HQ)
                    r["spot_rel_err"] = spot_check(fn(), q, k, v, local_allowed(T, W, S, dev), [0, HQ - 1], spot_rows)
                report_spot(r)
                layer["local32"] = r["ms"]
                if best is not None and best != "default":
                    try:
                        fn = local_fn(best, q, k, v, W, S)
                        with torch.no_grad():
                            r = add(f"local {best} ({HQ}h)", T, time_ms(fn, dev, **timing), local_pairs(T, W, S) * HQ,
                                    local_config=best)
                            r["spot_rel_err"] = spot_check(fn(), q, k, v, local_allowed(T, W, S, dev), [0, HQ - 1], spot_rows)
                        report_spot(r)
                        if r["spot_rel_err"] <= SPOT_TOL:
                            layer["local32_best"] = r["ms"]
                    except Exception as exc:
                        fail(f"local {best} 32h T={T}", exc)
                del q, k, v
            except Exception as exc:
                fail(f"local T={T}", exc)
        # ---- selection for one retrieval KV group (G query heads), then its sparse attention
        sel_main = None
        if "select" in parts:
            try:
                qi, ki = make_clustered_indexer(G, T, R, dev, seed=T)
                sel_main, sel_times = bench_selection(args, dev, T, qi, ki, add, notes, budget, skip, fail)
                layer.update(sel_times)
                del qi, ki
            except Exception as exc:
                fail(f"select T={T}", exc)
        qg = kg = vg = None
        if sel_main is not None or "density" in parts:
            qg = torch.randn(1, G, T, D, device=dev, dtype=dt, generator=g)
            kg = torch.randn(1, 1, T, D, device=dev, dtype=dt, generator=g)
            vg = torch.randn(1, 1, T, D, device=dev, dtype=dt, generator=g)
        if sel_main is not None:
            try:
                sel = sel_main
                fn = lambda: selection_block_mask(sel, coarse=False, compute_q_blocks=False)  # noqa: E731
                add(f"block_sparse mask build only ({G}h)", T, time_ms(fn, dev, **timing))
                with torch.no_grad():
                    fn = lambda: block_sparse_attention(qg, kg, vg, sel, window=W, sinks=S, block_size=BK)  # noqa: E731
                    r = add(f"block_sparse top_p={args.top_p} pooled ({G}h)", T, time_ms(fn, dev, **timing), selection_pairs(sel),
                            density=float(sel.density.mean()))
                    r["spot_rel_err"] = spot_check(fn(), qg, kg, vg, selection_allowed(sel), [0, G - 1], spot_rows)
                    report_spot(r)
                layer["sparse"] = r["ms"]
                layer["density"] = float(sel.density.mean())
                for key in [k_ for k_ in layer if k_.startswith("select:")]:
                    ratio = layer[key] / layer["sparse"]
                    rows.append({"name": f"RATIO {key[7:]} / sparse attention", "T": T, "ms": layer[key], "ratio": ratio,
                                 "method": "ratio (goal <= 0.25)"})
                    notes["goals"].append({"goal": "indexer + selection <= 25% of sparse attention", "T": T,
                                           "variant": key[7:], "select_ms": layer[key], "sparse_ms": layer["sparse"],
                                           "ratio": ratio})
                    print(f"  ratio {key[7:]:<40} {100 * ratio:6.1f}% of the sparse attention (goal <= 25%)", flush=True)
            except Exception as exc:
                fail(f"sparse T={T}", exc)
        # ---- synthetic density sweep
        sweep_d = {}
        if "density" in parts:
            for d in args.densities:
                if T > args.dense_full_max and d > args.sweep_max_density_long:
                    continue
                if not budget.left():
                    skip(f"density {d} T={T}")
                    continue
                try:
                    rs = random_selection(1, G, T, d, block_size=BK, q_block_size=BQ, window=W, sinks=S, device=dev, generator=g)
                    with torch.no_grad():
                        fn = lambda: block_sparse_attention(qg, kg, vg, rs, window=W, sinks=S, block_size=BK)  # noqa: E731
                        r = add(f"block_sparse synthetic density {d} ({G}h)", T, time_ms(fn, dev, **timing), selection_pairs(rs),
                                density=float(rs.density.mean()))
                        r["spot_rel_err"] = spot_check(fn(), qg, kg, vg, selection_allowed(rs), [G - 1], spot_rows)
                        report_spot(r)
                        sweep_d[d] = r["ms"]
                    del rs
                except Exception as exc:
                    fail(f"density {d} T={T}", exc)
        del qg, kg, vg, sel_main
        # ---- layer totals
        if all(k_ in layer for k_ in ("dense", "local24", "local32", "sparse", "select")):
            add_layer_rows(rows, T, layer, sweep_d, args, HQ, HKV)
        print(f"--- T={T} done in {time.time() - t_start:.0f}s (elapsed {budget.elapsed():.0f} s)", flush=True)
        if dev.type == "cuda":
            notes.setdefault("max_memory_gib", {})[T] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.empty_cache()
        save(rows, notes)
    return rows, notes


def bench_selection(args, dev, T, qi, ki, add, notes, budget, skip, fail):
    """Selection parts and end-to-end select_blocks for one KV group. Returns (selection used for
    the sparse attention, {"select": default ms, "select:<variant>": ms, ...})."""
    from kernels import triton_block_select as tbs

    G = qi.shape[1]
    W, S, BK, BQ = args.window, args.sinks, 64, 128
    timing = dict(long_ms=args.long_ms, long_reps=args.long_reps)
    kw = dict(top_p=args.top_p, block_size=BK, q_block_size=BQ, window=W, sinks=S)
    n_qb, n_kb = -(-T // BQ), -(-T // BK)
    out: dict = {}
    # -- parts on the whole sequence (one launch each; at 1M the mass is [8, 8192, 16384] fp32 = 4 GiB)
    try:
        mass = indexer_block_mass(qi, ki, block_size=BK, q_block_size=BQ, mode="pooled")
        add(f"part mass pooled two-pass kernel ({G}h, all q blocks)", T,
            time_ms(lambda: indexer_block_mass(qi, ki, block_size=BK, q_block_size=BQ, mode="pooled"), dev, **timing))
        qbar = tbs.pooled_queries_log2(qi, BQ)
        add(f"part pooled queries (torch, {G}h)", T, time_ms(lambda: tbs.pooled_queries_log2(qi, BQ), dev, **timing))
        logm = tbs.indexer_block_logmass_triton(qi, ki, block_size=BK, q_block_size=BQ, qbar_log2=qbar)
        add(f"part log-mass one-pass kernel ({G}h, all q blocks)", T,
            time_ms(lambda: tbs.indexer_block_logmass_triton(qi, ki, block_size=BK, q_block_size=BQ, qbar_log2=qbar), dev, **timing),
            dot_precision=tbs.LOGMASS_DOT_PRECISION[0])
        rng = window_sink_block_ranges(T, W, S, q_block_size=BQ, kv_block_size=BK, device=dev)
        ranges = torch.stack([rng[k] for k in ("win_lo", "win_hi", "sink_lo", "sink_hi", "causal_lo")], dim=-1)
        bis = lambda: tbs.topp_select_rows_triton(mass, ranges, batch=1, heads=G, n_kb=n_kb, top_p=args.top_p)  # noqa: E731
        hkw = dict(batch=1, heads=G, n_rows=n_qb, seq_len=T, window=W, sinks=S, block_size=BK, q_block_size=BQ,
                   q_block_start=0, top_p=args.top_p)
        hist = lambda: tbs.topp_select_rows_hist_triton(mass, log_input=False, **hkw)  # noqa: E731
        histl = lambda: tbs.topp_select_rows_hist_triton(logm, log_input=True, **hkw)  # noqa: E731
        # trim each [1, G, nQB, nKB] list to its widest row first (at 1M the full lists are 4 GiB)
        i_b, n_b, _, _ = bis()
        i_b = tbs.trim_selection_lists(i_b, n_b)
        i_h, n_h, _, _ = hist()
        i_h = tbs.trim_selection_lists(i_h, n_h)
        i_l, n_l, _, _ = histl()
        i_l = tbs.trim_selection_lists(i_l, n_l)
        d_b = lists_to_dense(i_b, n_b, n_kb)
        d_h = lists_to_dense(i_h, n_h, n_kb)
        d_l = lists_to_dense(i_l, n_l, n_kb)
        same = {"hist_vs_bisect_same_mass_diff_blocks": int((d_b != d_h).sum()),
                "hist_logmass_vs_bisect_diff_blocks": int((d_b != d_l).sum()), "blocks": int(d_b.sum())}
        ok = same["hist_vs_bisect_same_mass_diff_blocks"] <= SELECT_TOL * same["blocks"]
        print(f"  [{'PASS' if ok else 'FAIL'}] selection kernels at the timed shape: {same}", flush=True)
        notes.setdefault("timed_shape_checks", []).append({"T": T, "pass": ok, **same})
        del i_b, n_b, i_h, n_h, i_l, n_l, d_b, d_h, d_l
        add(f"part threshold bisect kernel (old, on mass, {G}h)", T, time_ms(bis, dev, **timing))
        add(f"part threshold hist kernel (on mass, {G}h)", T, time_ms(hist, dev, **timing))
        add(f"part threshold hist kernel (on log-mass, {G}h)", T, time_ms(histl, dev, **timing))
        del mass
        # launch-parameter variants of the two new kernels (tuning data; outputs checked equal)
        ref_lists = tbs.trim_selection_lists(*histl()[:2])
        for name, cfg in HIST_VARIANTS.items():
            if not budget.left():
                skip(f"hist variant {name} T={T}")
                continue
            try:
                fn = lambda: tbs.topp_select_rows_hist_triton(logm, log_input=True, config=cfg, **hkw)  # noqa: E731
                i_v, n_v, _, _ = fn()
                same = torch.equal(tbs.trim_selection_lists(i_v, n_v), ref_lists)
                add(f"part hist variant {name} (on log-mass, {G}h)", T, time_ms(fn, dev, **timing), same_output=same,
                    hist_config=str(cfg))
                if not same:
                    print("  !! hist variant output differs from the default's", flush=True)
                del i_v, n_v
            except Exception as exc:
                fail(f"hist variant {name} T={T}", exc)
        del ref_lists
        for name, lkw in LOGMASS_VARIANTS.items():
            if not budget.left():
                skip(f"log-mass variant {name} T={T}")
                continue
            try:
                fn = lambda: tbs.indexer_block_logmass_triton(qi, ki, block_size=BK, q_block_size=BQ, qbar_log2=qbar, **lkw)  # noqa: E731
                out_v = fn()
                _, cand = forced_and_candidate_blocks(T, block_size=BK, q_block_size=BQ, window=W, sinks=S, doc_ids=None,
                                                      device=dev, q_block_end=min(n_qb, 64))
                a_, b_ = out_v[:, :, :64][cand.expand(1, G, -1, -1)], logm[:, :, :64][cand.expand(1, G, -1, -1)]
                dmax = float((a_ - b_).abs().max())
                add(f"part log-mass variant {name} ({G}h)", T, time_ms(fn, dev, **timing), max_abs_diff_vs_default=dmax)
                del out_v
            except Exception as exc:
                fail(f"log-mass variant {name} T={T}", exc)
        del logm, qbar
    except Exception as exc:
        fail(f"select parts T={T}", exc)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    # -- end to end
    sels = {}
    for mode in ("pooled", "mean"):
        if mode == "mean" and T > args.mean_max:
            continue
        for thr in args.select_thresholds:
            if mode == "mean" and thr not in ("triton", "triton_hist"):
                continue
            if thr not in ("triton", "triton_hist") and not budget.left():
                skip(f"select {mode}/{thr} T={T}")
                continue
            try:
                fn = lambda: select_blocks(qi, ki, mode=mode, threshold=thr, **kw)  # noqa: E731
                res = time_ms(fn, dev, **timing)
                sel = select_blocks(qi, ki, mode=mode, threshold=thr, **kw)
                sels[(mode, thr)] = sel
                r = add(f"select_blocks {mode}/{thr} ({G}h)", T, res, density=float(sel.density.mean()),
                        keys_per_query=float(sel.mean_keys_per_query().mean()))
                if mode == "pooled":
                    out[f"select:{mode}/{thr}"] = r["ms"]
            except Exception as exc:
                fail(f"select_blocks {mode}/{thr} T={T}", exc)
        if (mode, "triton") in sels and (mode, "triton_hist") in sels:
            a, b = selection_to_dense(sels[(mode, "triton")]), selection_to_dense(sels[(mode, "triton_hist")])
            diff = int((a != b).sum())
            # informational: the two pipelines score with tf32 vs tf32x3, so boundary blocks may differ
            print(f"  [INFO] select_blocks {mode} triton vs triton_hist at the timed shape: "
                  f"{diff} of {int(a.sum())} blocks differ ({int((a != b).any(-1).sum())} rows)", flush=True)
            notes.setdefault("timed_shape_checks", []).append(
                {"T": T, "pass": None, "what": f"select_blocks {mode} triton vs triton_hist (info: different mass precision)",
                 "diff_blocks": diff, "diff_rows": int((a != b).any(-1).sum()), "blocks": int(a.sum())})
            del a, b
    if ("mean", "triton") in sels and ("pooled", "triton") in sels:
        a = selection_to_dense(sels[("mean", "triton")])
        b = selection_to_dense(sels[("pooled", "triton")])
        mass = indexer_block_mass(qi, ki, block_size=BK, q_block_size=BQ, mode="mean")
        agree = {
            "T": T,
            "jaccard_pooled_vs_mean": float((a & b).sum() / (a | b).sum()),
            "mean_mass_kept_by_mean_sel": float(torch.where(a, mass, 0).sum(-1).mean()),
            "mean_mass_kept_by_pooled_sel": float(torch.where(b, mass, 0).sum(-1).mean()),
            "density_mean": float(sels[("mean", "triton")].density.mean()),
            "density_pooled": float(sels[("pooled", "triton")].density.mean()),
        }
        notes["selection_agreement"].append(agree)
        print(f"  selection agreement: {agree}", flush=True)
        del mass, a, b
    for thr in ("triton",) + tuple(args.select_thresholds):  # the layer's "select": the current default
        if f"select:pooled/{thr}" in out:
            out["select"] = out[f"select:pooled/{thr}"]
            break
    sel_main = sels.get(("pooled", "triton_hist")) or sels.get(("pooled", "triton"))
    return sel_main, out


def add_layer_rows(rows, T, layer, sweep_d, args, HQ, HKV):
    dense = layer["dense"]
    local_best = layer.get("local24_best", layer["local24"])
    best_name = layer.get("local_best_name", "default")
    select_best = min(v for k_, v in layer.items() if k_.startswith("select:"))
    # 32 local heads with the best variant: timed when it passed at 32 heads, else scaled from 24 heads
    best32 = layer.get("local32_best") if best_name != "default" else layer["local32"]
    best_tag = f"best[local={best_name}]" + ("" if best32 is not None else "[32h scaled]")
    if best32 is None:
        best32 = layer["local32"] * local_best / layer["local24"]
    variants = [
        ("flex", layer["local24"], layer["select"], layer["local32"]),
        (best_tag, local_best, select_best, best32),
    ]
    for tag, loc24, sel_ms, loc32 in variants:
        one = loc24 + sel_ms + layer["sparse"]
        weighted = LAYER_MIX_1OF4 * one + (1 - LAYER_MIX_1OF4) * loc32
        paper_route = loc24 + dense / HKV
        for name, ms, extra in (
            ("LAYER dense cuDNN", dense, {}),
            (f"LAYER rtp_1of4 {tag} (density {layer['density']:.3f})", one, {"density": layer["density"]}),
            (f"LAYER rtp_0of4 {tag}", loc32, {}),
            (f"LAYER rtp_weighted {tag}", weighted, {"density": layer["density"]}),
            (f"LAYER paper route weighted {tag}", LAYER_MIX_1OF4 * paper_route + (1 - LAYER_MIX_1OF4) * loc32, {}),
        ):
            if name == "LAYER dense cuDNN" and tag != "flex":
                continue
            rows.append({"name": name, "T": T, "ms": ms, "speedup_vs_dense": dense / ms, "method": "sum of parts",
                         "local_variant": best_name if tag != "flex" else "default", **extra})
            print(f"  {name:<72} {ms:10.3f} ms  x{dense / ms:6.2f}", flush=True)
        for d, sp in sweep_d.items():
            one_d = loc24 + sel_ms + sp
            w_d = LAYER_MIX_1OF4 * one_d + (1 - LAYER_MIX_1OF4) * loc32
            rows.append({"name": f"LAYER sweep density {d}: weighted {tag}", "T": T, "ms": w_d,
                         "speedup_vs_dense": dense / w_d, "density": d, "method": "sum of parts (synthetic selection)"})


def print_table(rows: list[dict]) -> None:
    print(f"\n{'T':>8}  {'what':<64} {'ms':>10} {'x dense':>8} {'TF/s':>7} {'%cuDNN':>7}")
    for r in rows:
        sp = f"{r['speedup_vs_dense']:8.2f}" if r.get("speedup_vs_dense") else " " * 8
        tf = f"{r['tflops_useful']:7.1f}" if r.get("tflops_useful") else " " * 7
        pc = f"{r['pct_of_cudnn_tflops']:7.1f}" if r.get("pct_of_cudnn_tflops") else (f"{100 * r['ratio']:6.1f}%" if "ratio" in r else " " * 7)
        print(f"{r['T']:>8}  {r['name'][:64]:<64} {r['ms']:10.3f} {sp} {tf} {pc}")


def print_summary(checks: list[dict], notes: dict) -> None:
    timed = notes.get("timed_shape_checks", [])
    n_fail = sum(not c["pass"] for c in checks) + sum(c["pass"] is False for c in timed)
    n_pass = sum(bool(c["pass"]) for c in checks) + sum(c["pass"] is True for c in timed)
    print(f"\n==== checks: {n_pass} PASS, {n_fail} FAIL (details above and in the JSON)")
    for c in checks:
        if not c["pass"]:
            extra = {k: v for k, v in c.items() if k not in ("check", "pass", "kernel_options")}
            print(f"  [FAIL] {c['check']}  {extra}"[:300])
    for c in timed:
        print(f"  [{'INFO' if c['pass'] is None else ('PASS' if c['pass'] else 'FAIL')}] timed shape T={c['T']}: "
              + ", ".join(f"{k}={v}" for k, v in c.items() if k not in ('T', 'pass')))
    print("==== goals")
    for gl in notes.get("goals", []):
        if "ratio" in gl:
            print(f"  T={gl['T']:>8} selection {gl['variant']:<24} {gl['select_ms']:9.2f} ms = "
                  f"{100 * gl['ratio']:5.1f}% of sparse {gl['sparse_ms']:.2f} ms  {'MET' if gl['ratio'] <= 0.25 else 'not met'} (<= 25%)")
        else:
            dp = gl.get("default_pct")
            print(f"  T={gl['T']:>8} local default {dp if dp is None else round(dp, 1)}% of cuDNN TF/s; best "
                  f"{gl['best']}: {gl['best_pct'] if gl['best_pct'] is None else round(gl['best_pct'], 1)}%  "
                  f"{'MET' if (gl['best_pct'] or 0) >= 70 else 'not met'} (>= 70%)")
    for T_, name in notes.get("local_choice", {}).items():
        print(f"  T={T_:>8} LAYER rows 'best[...]' use local variant {name} (fastest that passed its checks)")
    if notes.get("skipped"):
        print(f"  skipped for the budget: {notes['skipped']}")
    if notes.get("errors"):
        print(f"  errors: {len(notes['errors'])}: " + " | ".join(notes["errors"])[:1500])
    print(f"spot checks failed: {notes.get('spot_bad', 0)}; checks failed: {n_fail}; "
          f"{'ALL CHECKS PASS' if n_fail == 0 and not notes.get('spot_bad') else 'SOME CHECKS FAILED'}")


def _parse_only(only: str | None) -> set[str]:
    if not only:
        return set(PARTS)
    parts = {p.strip() for p in only.split(",") if p.strip()}
    bad = parts - set(PARTS)
    if bad:
        raise SystemExit(f"--only: unknown parts {sorted(bad)}; choose from {PARTS}")
    if "local" in parts:
        parts.add("dense")  # % of cuDNN
    return parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 131072, 1048576])
    ap.add_argument("--only", default=None, help=f"comma-separated parts of {PARTS} (default all)")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.5])
    ap.add_argument("--sweep-max-density-long", type=float, default=0.2, help="density sweep cap above --dense-full-max")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--window", type=int, default=8192)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dense-full-max", type=int, default=131072, help="above this T time one KV group of dense and x4")
    ap.add_argument("--mean-max", type=int, default=131072, help="largest T for the (expensive) mean-mode selection")
    ap.add_argument("--select-thresholds", nargs="+", default=["triton", "triton_hist", "sort", "bisect"])
    ap.add_argument("--local-configs", nargs="+", default=DEFAULT_LOCAL_CONFIGS,
                    help="local candidates to check and time (names in LOCAL_KERNEL_OPTION_CANDIDATES / LOCAL_SPLIT_CANDIDATES "
                         "/ LOCAL_CHUNKED_CANDIDATES)")
    ap.add_argument("--no-checks", action="store_true", help="skip the correctness checks before timing")
    ap.add_argument("--check-seq-lens", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--check-local-t", type=int, default=16384)
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip optional work after this many seconds (0: never)")
    ap.add_argument("--long-ms", type=float, default=200.0, help="calls longer than this are timed with events")
    ap.add_argument("--long-reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-decode", action="store_true", help="skip scripts/bench_decode.run_decode_bench")
    ap.add_argument("--decode-densities", type=float, nargs="+", default=None)
    ap.add_argument("--out", default="bench_attention.json")
    args = ap.parse_args(argv)
    parts = _parse_only(args.only)
    unknown = [n for n in args.local_configs
               if n not in LOCAL_KERNEL_OPTION_CANDIDATES and n not in LOCAL_SPLIT_CANDIDATES and n not in LOCAL_CHUNKED_CANDIDATES]
    if unknown:
        raise SystemExit(f"--local-configs: unknown {unknown}")
    if "default" not in args.local_configs:
        args.local_configs = ["default"] + args.local_configs
    dev = torch.device(args.device)
    budget = Budget(args.budget_s)
    # an eager fallback after Dynamo's recompile limit would time (and compute) something else
    if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
        torch._dynamo.config.fail_on_recompile_limit_hit = True
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "argv": sys.argv, "parts": sorted(parts),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(info), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checks: list[dict] = []
    decode_rows: list[dict] = []

    def save(rows, notes):
        out.write_text(json.dumps({"info": info, "checks": checks, "prefill": rows, "notes": notes, "decode": decode_rows},
                                  indent=1, default=str))

    local_names = list(args.local_configs)
    if not args.no_checks:
        print("==== checks", flush=True)
        if "select" in parts:
            checks += selection_checks(args, dev)
        if "local" in parts:
            res, local_names = local_checks(args, dev, local_names)
            checks += res
        print(f"==== checks done (elapsed {budget.elapsed():.0f} s)", flush=True)
        save([], {})
    rows, notes = run_prefill(args, dev, parts, local_names, budget, save)
    if "decode" not in parts or args.no_decode:
        print("decode: skipped")
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
    save(rows, notes)
    print_summary(checks, notes)
    print(f"wrote {out} (elapsed {budget.elapsed():.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
