"""Model-level inference benchmark (a benchmark, never a test): a stack of N real-shape Qwen3-30B-A3B decoder
layers, dense vs RTPurbo, prefill (time to first token) and decode (time per token), per layer.

Model: --flavor (default 30B-A3B: dim 2048, 32 q heads, 4 KV heads, head_dim 128, MoE 128 experts top-8,
moe hidden 768) with --layers N decoder layers, random weights (the model's own init), bf16. The embedding
and output head use --vocab tokens (default 4096, not 151936) so that the head does not dominate a step of a
few layers; "per layer" numbers divide the whole step (embedding + N layers + norm + head) by N.

RTPurbo: every layer converted (models/rtpurbo/convert.py); round(--retrieval-layer-frac * N) layers, spread
evenly, make one KV group (--retrieval-group, 8 query heads of 32) retrieval heads with a 16-d random
indexer; every other head is local (window 8192, 4 sinks). With the default 0.6 that is 0.6 * 8/32 = 15% of
query heads (the paper's ratio) while retrieval heads stay whole KV groups, so the KV cache keeps one KV
head in full in a retrieval layer and none in the others.

Prefill (time to first token): the whole prompt at once, layer by layer, with the fast kernels: projections
in --proj-chunk token chunks, cuDNN SDPA (causal, GQA) per KV group for dense layers and retrieval groups
(the paper's dense prefill; --retrieval-prefill sparse: the indexer's block selection + block-sparse
FlexAttention over a planted random selection of --prefill-density, see below), FlexAttention window + sinks
(kernels/masks.py) for local groups, MoE in --moe-chunk token chunks (the engine's graph-safe MoE: grouped
matmuls). K/V, indexer keys, sinks and ring buffers go straight into the engine's role-aware KV cache, which
the decode then reads. The prefill's last-token logits are checked against the engine's own chunked prefill
in --check. Times: CUDA events around each layer, one warm-up prefill (a shorter prompt compiles the kernels
first), median of --repeats (1 above --long-prefill tokens: a dense 1M prefill takes seconds per layer).

Decode (time per token): the engine's decode step (models/inference/engine.py) captured in a CUDA graph
after the prefill, replayed at cache length T (every replay rewrites the same position: idempotent), CUDA
events around --decode-iters replays, median of --repeats; the wall time of real decode_step() calls
(host work included) is reported too. The step's density statistic is off while timing (it adds work that
scales with the cache) and measured in one eager step instead.

Kept density at decode is controlled by planting (the random indexer alone gives a diffuse, meaningless
selection): for each retrieval layer in order, one eager step records the indexer query qi of the decode
token, then the cached indexer keys of positions < T are set to ki[n] = (delta * hot(n) + 0.3 z_n) qi/|qi|^2
so that qi . ki[n] = delta * hot(n) + 0.3 z_n, with hot(n) = 1 on a random --density share of the 64-token
blocks and delta = ln(0.97 (1 - d) / (0.03 d)): the hot blocks hold ~97% of the indexer mass, top-p 0.9
keeps ~0.9/0.97 of them (the measured density is reported). --density 0 keeps the random indexer keys.

--fill random skips the prefill and writes random K/V, indexer keys, sinks and rings into the cache (decode
only); --fill auto (default) prefills and falls back to a random fill when the prefill runs out of memory.
Either is said in the table and the JSON ("fill").

Longest context (per model, for the N-layer stack as built and for the full 48-layer model with the same
layer mix and the real vocabulary): the largest T with
    weights + fixed_kv + T * (kv_bytes_per_token + act_bytes_per_token) + margin <= free
free = torch.cuda.mem_get_info() at start (before anything is allocated; CUDA context excluded), weights = the
model's parameter bytes, kv_bytes_per_token / fixed_kv = RoleKVCache.estimate (full K/V of full KV heads +
indexer keys per token; sinks + rings fixed), act_bytes_per_token = the prefill's peak activation memory
per prompt token as measured here (peak allocated during the prefill minus weights and cache, at the
longest prefilled T; the one-shot prefill holds [T, dim] residuals, [Hq, T, D] queries/outputs and, for
RTPurbo, the [Hkv, T, D] K/V of the ring heads; layers run one at a time, so it does not grow with the
layer count), margin = 1 GiB (graphs, workspaces, fragmentation). "decode-only" drops the activation term
(a chunked prefill bounds activations by the chunk, not T).

  python scripts/bench_inference.py --check                      # GPU correctness first (PASS/FAIL)
  python scripts/bench_inference.py --out bench_inference.json   # the benchmark (H100: several minutes)
  python scripts/bench_inference.py --smoke --out /tmp/s.json    # CPU, tiny shapes, seconds
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import sparse_decode as sd  # noqa: E402
from models.inference import InferenceEngine, RoleKVCache  # noqa: E402
from models.inference.engine import _moe_static  # noqa: E402
from models.qwen3.args import Qwen3ModelArgs, get_flavor  # noqa: E402
from models.qwen3.model import Qwen3Model  # noqa: E402

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
GIB = 2**30
MARGIN = 1 * GIB
FULL_MODEL_LAYERS = 48  # Qwen3-30B-A3B


# ----------------------------------------------------------------------------------------------- model
def model_args(args, moe: bool = True) -> Qwen3ModelArgs:
    """moe=False: the same attention with a dense SwiGLU FFN (hidden_dim of the flavour), for --check."""
    if args.smoke:
        a = Qwen3ModelArgs(vocab_size=256, dim=64, n_layers=args.layers, n_heads=8, n_kv_heads=4, head_dim=16,
                           hidden_dim=128, num_experts=8, num_experts_per_tok=2, moe_hidden_dim=32,
                           rope_theta=1e6, max_seq_len=1 << 20, hf_model_type="qwen3_moe")
    else:
        a = get_flavor(args.flavor).replace(n_layers=args.layers, vocab_size=args.vocab)
    return a if moe else a.replace(num_experts=0)


def retrieval_layers(n_layers: int, frac: float) -> list[int]:
    """round(frac * n) layers spread evenly (layer i holds one iff floor((i+1) frac) > floor(i frac))."""
    return [i for i in range(n_layers) if math.floor((i + 1) * frac + 1e-9) > math.floor(i * frac + 1e-9)]


def build_stack(args, kind: str, device, dtype, moe: bool = True) -> Qwen3Model:
    from models.rtpurbo.convert import apply_rtpurbo
    from models.rtpurbo.roles import HeadRoles
    from torchtitan_rtpurbo.config.job_config import RTPurbo

    margs = model_args(args, moe)
    torch.manual_seed(args.seed)
    with torch.device("meta"):
        model = Qwen3Model(margs)
    model.to_empty(device=device)
    model.to(dtype)
    model.init_weights(buffer_device=torch.device(device))
    if kind == "rtpurbo":
        G = margs.n_heads // margs.n_kv_heads
        rl = set(retrieval_layers(margs.n_layers, args.retrieval_layer_frac))
        grp = range(args.retrieval_group * G, (args.retrieval_group + 1) * G)
        flags = [[(i in rl) and (h in grp) for h in range(margs.n_heads)] for i in range(margs.n_layers)]
        roles = HeadRoles(scores=[[float(x) for x in row] for row in flags], retrieval=flags, window=args.window,
                          sinks=args.sinks, granularity="kv_head")
        cfg = RTPurbo(window=args.window, sinks=args.sinks, top_p=args.top_p, block_size=args.block,
                      indexer_dim=args.indexer_dim, indexer_init="random")
        torch.manual_seed(args.seed + 1)
        apply_rtpurbo(model, roles, cfg, check=False)
    return model.eval()


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def layer_kinds(eng) -> list[str]:
    out = []
    for p in plans(eng):
        if not p.rtpurbo:
            out.append("dense")
        else:
            out.append(f"rtp_{len(p.full_kv) if p.retrieval else 0}of{p.n_kv_heads}")
    return out


def plans(eng):
    from models.inference.kv_cache import plan_layers

    return eng.cache.plans if eng.cache is not None else plan_layers(eng.model, eng.max_len)


# --------------------------------------------------------------------------------------------- timing
def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class Timer:
    """CUDA events on CUDA, perf_counter elsewhere; elapsed in ms."""

    def __init__(self, dev):
        self.dev = dev

    def start(self):
        if self.dev.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.dev.type == "cuda":
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1e3


# -------------------------------------------------------------------------------------------- prefill
_SDPA_NOTE: dict = {}


def dense_causal(q, k, v):
    """Causal GQA attention: cuDNN SDPA on CUDA (flash if cuDNN refuses, said once), math on CPU."""
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    start = _SDPA_NOTE.get("backend_index", 0)
    for i in range(start, len(order)):
        try:
            with sdpa_kernel([order[i]]):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
            if i != start or "backend" not in _SDPA_NOTE:
                _SDPA_NOTE.update(backend_index=i, backend=order[i].name)
                if i:
                    print(f"  note: cuDNN SDPA refused the prefill shape; using {order[i].name}", flush=True)
            return out
        except RuntimeError as e:
            _SDPA_NOTE.setdefault("errors", []).append(f"{order[i].name}: {e}"[:300])
    raise RuntimeError(f"no SDPA backend ran the causal prefill: {_SDPA_NOTE.get('errors')}")


def local_window(q, k, v, window, sinks):
    if q.is_cuda:
        from kernels.masks import local_attention

        return local_attention(q, k, v, window=window, sinks=sinks)
    from kernels.masks import local_mask_dense

    mask = local_mask_dense(q.shape[2], window, sinks, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def sparse_retrieval(q_r, k_r, v_r, qi, ki, p, args, planted):
    """Indexer block selection (timed; its density is reported) + block-sparse attention over `planted`
    (a random selection of --prefill-density; the random indexer's own selection would be meaningless)."""
    from kernels.block_select import select_blocks
    from kernels.sparse_prefill import block_sparse_attention, block_sparse_attention_reference

    sel = select_blocks(qi, ki, top_p=p.top_p, block_size=p.block_size, q_block_size=128, window=p.window,
                        sinks=p.sinks, mode=args.select_mode)
    use = planted if planted is not None else sel
    fn = block_sparse_attention if q_r.is_cuda else block_sparse_attention_reference
    return fn(q_r, k_r, v_r, use, window=p.window, sinks=p.sinks, block_size=p.block_size), sel


@torch.no_grad()
def fast_prefill(eng: InferenceEngine, tokens: torch.Tensor, args, *, planted=None, stats=None):
    """Prefill a [1, T] prompt through every layer at once with the fast kernels, writing the engine's cache.
    Returns (last-token logits [1, V], per-layer ms list)."""
    model = eng.model
    B, T = tokens.shape
    cache = eng.new_cache(B)
    dev = tokens.device
    timer = Timer(dev)
    layer_ms = []
    x = model.tok_embeddings(tokens)
    for li, layer in enumerate(eng.layers):
        t0 = timer.start()
        _prefill_layer(eng, cache, li, layer, x, args, planted, stats)
        t1 = timer.start()
        layer_ms.append(timer.ms(t0, t1))
    eng.lens = [T] * B
    logits = model.output(model.norm(x[:, -1:]))[:, 0]
    return logits, layer_ms


def _prefill_layer(eng, cache, li, layer, x, args, planted, stats):
    attn = layer.attention
    p = cache.plans[li]
    B, T, _ = x.shape
    Hq, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    G = Hq // Hkv
    dev, dt = x.device, x.dtype
    qo = torch.empty(B, Hq, T, D, device=dev, dtype=dt)  # queries, then (in place) attention outputs
    if not p.rtpurbo:
        k_all, v_all = cache.k[li][:, :, :T], cache.v[li][:, :, :T]
    else:
        k_all = torch.empty(B, Hkv, T, D, device=dev, dtype=dt)
        v_all = torch.empty_like(k_all)
    retr = list(p.retrieval)
    qi_all = None
    if retr:
        ki_all = cache.ki[li][:, :, :T]
        if args.retrieval_prefill == "sparse":
            qi_all = torch.empty(B, len(retr), T, p.indexer_dim, device=dev, dtype=cache.ki[li].dtype)
    for c0 in range(0, T, args.proj_chunk):
        c1 = min(c0 + args.proj_chunk, T)
        h = layer.attention_norm(x[:, c0:c1])
        pos = torch.arange(c0, c1, device=dev).expand(B, c1 - c0)
        q, k, v, q_pre, k_pre = eng._qkv(attn, h, pos)
        qo[:, :, c0:c1], k_all[:, :, c0:c1], v_all[:, :, c0:c1] = q, k, v
        if retr:
            qi, ki = attn.inner_attention.indexer(q_pre, k_pre)
            ki_all[:, :, c0:c1] = ki
            if qi_all is not None:
                qi_all[:, :, c0:c1] = qi
        del q, k, v, q_pre, k_pre, h
    if p.rtpurbo:  # cache: full KV heads, then sinks + ring of the local-only KV heads
        for j, kv in enumerate(p.full_kv):
            cache.k[li][:, j, :T] = k_all[:, kv]
            cache.v[li][:, j, :T] = v_all[:, kv]
        if p.ring_kv:
            W = cache.ring_k[li].shape[2]
            ns = min(p.sinks, T)
            lo = max(0, T - W)
            slots = torch.remainder(torch.arange(lo, T, device=dev), W)
            for j, kv in enumerate(p.ring_kv):
                cache.sink_k[li][:, j, :ns] = k_all[:, kv, :ns]
                cache.sink_v[li][:, j, :ns] = v_all[:, kv, :ns]
                cache.ring_k[li][:, j, slots] = k_all[:, kv, lo:T]
                cache.ring_v[li][:, j, slots] = v_all[:, kv, lo:T]
    rset = set(retr)
    for g in range(Hkv):  # attention per KV group, outputs written over the group's queries
        kg, vg = k_all[:, g:g + 1], v_all[:, g:g + 1]
        hs = list(range(g * G, (g + 1) * G))
        r_hs = [h for h in hs if h in rset]
        l_hs = [h for h in hs if h not in rset]
        if not p.rtpurbo:
            qo[:, g * G:(g + 1) * G] = dense_causal(qo[:, g * G:(g + 1) * G], kg, vg)
            continue
        if r_hs:
            qr = qo[:, r_hs]
            if args.retrieval_prefill == "sparse":
                ridx = [retr.index(h) for h in r_hs]
                o, sel = sparse_retrieval(qr, kg, vg, qi_all[:, ridx], ki_all[:, ridx], p, args, planted)
                if stats is not None:
                    stats.setdefault("prefill_selection_density", []).append(float(sel.density.mean()))
            else:
                o = dense_causal(qr, kg, vg)
            qo[:, r_hs] = o
        if l_hs:
            if l_hs == hs:
                qo[:, g * G:(g + 1) * G] = local_window(qo[:, g * G:(g + 1) * G], kg, vg, p.window, p.sinks)
            else:
                qo[:, l_hs] = local_window(qo[:, l_hs], kg, vg, p.window, p.sinks)
    del k_all, v_all, qi_all
    for c0 in range(0, T, args.moe_chunk):  # output projection + FFN / MoE, in chunks, residual in place
        c1 = min(c0 + args.moe_chunk, T)
        a = qo[:, :, c0:c1].transpose(1, 2).reshape(B, c1 - c0, Hq * D)
        xc = x[:, c0:c1] + attn.wo(a)
        hf = layer.ffn_norm(xc)
        if layer.moe_enabled:
            f = _moe_static(layer.moe, hf.reshape(-1, hf.shape[-1])).view_as(hf)
        else:
            f = layer.feed_forward(hf)
        x[:, c0:c1] = xc + f
    del qo


@torch.no_grad()
def warm_attention(eng: InferenceEngine, T: int, args, planted=None) -> None:
    """Run each prefill attention kernel once at length T on one KV group of zeros: FlexAttention compiles
    per shape and cuDNN builds a plan per shape, which must not land in a timed prefill."""
    m = eng.model.args
    G, D = m.n_heads // m.n_kv_heads, m.head_dim
    dt = eng.model.tok_embeddings.weight.dtype
    dev = eng.device
    ps = plans(eng)
    # views with the strides of the real calls (slices of [1, Hq, T, D] / [1, Hkv, T, D]): Dynamo guards on
    # strides, so contiguous [1, G, T, D] tensors would compile a kernel the prefill does not use
    qb = torch.zeros(1, m.n_heads, T, D, device=dev, dtype=dt)
    kb = torch.zeros(1, m.n_kv_heads, T, D, device=dev, dtype=dt)
    q, k = qb[:, G:2 * G] if m.n_kv_heads > 1 else qb, kb[:, 1:2] if m.n_kv_heads > 1 else kb
    cache = eng.new_cache(1)
    dense_layers = [li for li, p in enumerate(ps) if not p.rtpurbo]
    if dense_layers:  # dense layers read K/V straight from the cache (its strides)
        kc = cache.k[dense_layers[0]][:, :1, :T]
        dense_causal(q, kc, kc)
    if any(p.retrieval for p in ps) and args.retrieval_prefill == "dense":  # retrieval: gathered q, fresh K/V
        dense_causal(q.contiguous(), k, k)
    loc = [p for p in ps if p.rtpurbo and p.local_ring + p.local_full]
    if loc:
        local_window(q, k, k, loc[0].window, loc[0].sinks)
    rp = [p for p in ps if p.retrieval]
    if rp and args.retrieval_prefill == "sparse":
        p = rp[0]
        hr = len(p.retrieval)
        qr = torch.zeros(1, hr, T, D, device=dev, dtype=dt)
        qi = torch.zeros(1, hr, T, p.indexer_dim, device=dev, dtype=dt)
        sparse_retrieval(qr, k, k, qi, qi, p, args, planted)
        del qr, qi
    del q, k, qb, kb
    sync(dev)


@torch.no_grad()
def random_fill(eng: InferenceEngine, T: int, seed: int = 0) -> None:
    """Random K/V, indexer keys, sinks and rings for positions < T (decode without a prefill)."""
    cache = eng.new_cache(1)
    g = torch.Generator(device=cache.device).manual_seed(seed)

    def fill(t, n=None):
        if t is None:
            return
        view = t if n is None else t[:, :, :n]
        for j in range(view.shape[1]):  # per head: no [H, T, D] fp32 temporary
            view[:, j].copy_(torch.randn(view[:, j].shape, device=t.device, generator=g, dtype=torch.float32))

    for li in range(len(cache.plans)):
        fill(cache.k[li], T), fill(cache.v[li], T), fill(cache.ki[li], T)
        for t in (cache.sink_k[li], cache.sink_v[li], cache.ring_k[li], cache.ring_v[li]):
            fill(t)
    eng.lens = [T]


@torch.no_grad()
def plant_density(eng: InferenceEngine, tok: torch.Tensor, density: float, seed: int = 0) -> None:
    """Set the cached indexer keys (positions < T) of every retrieval layer so that a `density` share of the
    64-token blocks holds ~97% of the decode token's indexer mass (see the module doc). One eager static
    step per retrieval layer records the query it will see (later layers' queries depend on the earlier
    layers' selections, hence the order)."""
    cache = eng.cache
    T = eng.lens[0]
    Lv = eng.view_length(T + 1)
    st = eng._static_state()
    gen = torch.Generator(device=cache.device).manual_seed(seed)
    for li, p in enumerate(cache.plans):
        if not p.retrieval:
            continue
        st.tok.copy_(tok.reshape(1))
        st.pos.fill_(T)
        eng.record_indexer_queries = {}
        eng._decode_core(Lv)  # rewrites position T only (idempotent)
        qi = eng.record_indexer_queries[li][0].float()  # [Hr, r]
        eng.record_indexer_queries = None
        Hr, bs = qi.shape[0], p.block_size
        nb = -(-T // bs)
        n_hot = max(1, round(density * nb))
        delta = math.log(0.97 * (1 - density) / (0.03 * density))
        u = qi / qi.pow(2).sum(-1, keepdim=True).clamp_min(1e-20)  # qi . u = 1
        for h in range(Hr):
            hot = torch.zeros(nb, device=cache.device)
            hot[torch.randperm(nb, device=cache.device, generator=gen)[:n_hot]] = 1.0
            s = delta * hot.repeat_interleave(bs)[:T] + 0.3 * torch.randn(T, device=cache.device, generator=gen)
            cache.ki[li][0, h, :T] = (s[:, None] * u[h][None, :]).to(cache.ki[li].dtype)


@torch.no_grad()
def step_density(eng: InferenceEngine, tok: torch.Tensor) -> float | None:
    """Mean kept density of the retrieval heads in one eager static step at position T."""
    n = sum(1 for p in eng.cache.plans if p.retrieval)
    if not n:
        return None
    st = eng._static_state()
    T = eng.lens[0]
    st.tok.copy_(tok.reshape(1))
    st.pos.fill_(T)
    st.dens.zero_()
    old, eng.track_density = eng.track_density, True
    try:
        eng._decode_core(eng.view_length(T + 1))
    finally:
        eng.track_density = old
    d = float(st.dens) / n
    st.dens.zero_()
    return d


# --------------------------------------------------------------------------------------------- decode
@torch.no_grad()
def time_decode(eng: InferenceEngine, tok: torch.Tensor, args, dev) -> dict:
    """Decode-step time at cache length T: CUDA-graph replays (CUDA) / static steps (CPU), plus the wall
    time of real decode_step() calls."""
    timer = Timer(dev)
    T = eng.lens[0]
    eng.decode_step(tok)  # CUDA: captures the graph of this bucket, replays it once
    eng.lens = [T]
    g = eng.last_graph
    if g is not None:
        run = g.replay
    else:
        st = eng._static_state()
        st.tok.copy_(tok.reshape(1))
        st.pos.fill_(T)
        Lv = eng.view_length(T + 1)
        run = lambda: eng._decode_core(Lv)  # noqa: E731
    for _ in range(args.decode_warmup):
        run()
    sync(dev)
    per = []
    for _ in range(args.repeats):
        a = timer.start()
        for _ in range(args.decode_iters):
            run()
        b = timer.start()
        per.append(timer.ms(a, b) / args.decode_iters)
    step_ms = statistics.median(per)
    # wall time of real decode steps (advancing positions T, T+1, ...; host work included)
    n = args.wall_steps
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        eng.decode_step(tok)
    sync(dev)
    wall_ms = (time.perf_counter() - t0) * 1e3 / n
    eng.lens = [T]
    return dict(decode_step_ms=step_ms, decode_step_ms_runs=per, decode_wall_ms=wall_ms,
                decode_timed_by="cuda graph replay" if g is not None else "eager static step",
                n_graphs=len(eng._graphs.graphs) if eng._graphs is not None else 0)


# ----------------------------------------------------------------------------------------- one length
def run_one(model, kind, T, args, dev, free0, stats_acc) -> dict:
    N = len(model.layers)
    eng = InferenceEngine(model, max_len=T + args.decode_margin, cuda_graph=(True if dev.type == "cuda" else None),
                          static_decode=True, track_density=False, graph_min_bucket=args.graph_min_bucket)
    row = dict(model=kind, seq_len=T, layers=N, graph_status=eng.graph_status, decode_path=eng.decode_path)
    est = RoleKVCache.estimate(model, 1, T + args.decode_margin)
    row.update(kv_cache_bytes=est["total_bytes"], kv_bytes_per_token=est["bytes_per_token"],
               kv_fixed_bytes=est["fixed_bytes_per_sequence"], kv_ratio_vs_dense=est["ratio_vs_dense"])
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    tokens = torch.randint(0, model.args.vocab_size, (1, T), device=dev, generator=gen)
    fill = args.fill
    planted = None
    if kind == "rtpurbo" and args.retrieval_prefill == "sparse" and args.prefill_density > 0:
        from kernels.block_select import random_selection

        hr = len(next((p.retrieval for p in plans(eng) if p.retrieval), [])) or 1
        planted = random_selection(1, hr, T, args.prefill_density, block_size=args.block, q_block_size=128,
                                   window=args.window, sinks=args.sinks, device=dev, generator=gen)
    if fill in ("auto", "prefill"):
        reps = args.repeats if T <= args.long_prefill else 1
        try:
            warm_attention(eng, T, args, planted)
            totals, per_layer = [], []
            stats: dict = {}
            for r in range(reps):
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                    # weights + the cache (allocated by warm_attention; else it is about to be)
                    base = torch.cuda.memory_allocated(dev) + (0 if eng.cache is not None else est["total_bytes"])
                t0 = time.perf_counter()
                _, lms = fast_prefill(eng, tokens, args, planted=planted, stats=stats if r == 0 else None)
                sync(dev)
                wall = (time.perf_counter() - t0) * 1e3
                totals.append(wall if dev.type != "cuda" else sum(lms))
                per_layer.append(lms)
                if dev.type == "cuda" and r == 0:
                    act = max(0, torch.cuda.max_memory_allocated(dev) - base)
                    row["prefill_peak_act_bytes"] = act
                    row["act_bytes_per_token"] = act / T
                    stats_acc.setdefault(kind, []).append((T, act / T))
            row["fill"] = "prefill"
            row["prefill_repeats"] = reps
            row["prefill_ms"] = statistics.median(totals)
            lm = [statistics.median(x) for x in zip(*per_layer)]
            row["prefill_ms_per_layer"] = row["prefill_ms"] / N
            row["prefill_ms_by_layer"] = lm
            kinds = layer_kinds(eng)
            by: dict = {}
            for k_, ms in zip(kinds, lm):
                by.setdefault(k_, []).append(ms)
            row["prefill_ms_by_layer_kind"] = {k_: statistics.mean(v) for k_, v in by.items()}
            if stats.get("prefill_selection_density"):
                row["prefill_indexer_selection_density"] = statistics.mean(stats["prefill_selection_density"])
                row["prefill_attended_density"] = args.prefill_density if planted is not None else None
        except torch.cuda.OutOfMemoryError as e:
            if fill == "prefill":
                raise
            print(f"  {kind} T={T}: prefill out of memory ({str(e)[:120]}); decode on a random fill", flush=True)
            eng.reset()
            gc.collect()
            torch.cuda.empty_cache()
            fill = "random"
    if fill == "random":
        random_fill(eng, T, args.seed)
        row["fill"] = "random (no prefill: K/V, indexer keys, sinks and rings written at random)"
    tok = torch.tensor([1], device=dev)
    if kind == "rtpurbo" and args.density > 0:
        plant_density(eng, tok, args.density, args.seed)
        row["planted_density"] = args.density
    row["decode_density"] = step_density(eng, tok)
    row.update(time_decode(eng, tok, args, dev))
    row["decode_ms_per_layer"] = row["decode_step_ms"] / N
    eng.reset()
    del eng
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------- longest context
def max_context(models_info: dict, free0: int, act_per_token: dict, full_args: Qwen3ModelArgs, N: int,
                esize: int) -> dict:
    """See the module doc. full_args: the whole model (48 layers, its real vocabulary)."""
    out = {}
    full_weights = full_args.num_params() * esize
    for kind, info in models_info.items():
        per_tok_stack, fixed_stack = info["kv_bytes_per_token"], info["kv_fixed_bytes"]
        act = act_per_token.get(kind)
        scale = FULL_MODEL_LAYERS / N
        rows = {}
        for name, w, kv, fx in (("stack", info["weights_bytes"], per_tok_stack, fixed_stack),
                                (f"full_{FULL_MODEL_LAYERS}_layers", full_weights, per_tok_stack * scale,
                                 fixed_stack * scale)):
            room = free0 - w - fx - MARGIN
            r = dict(weights_bytes=int(w), kv_bytes_per_token=kv, kv_fixed_bytes=int(fx), free_bytes=int(free0),
                     margin_bytes=MARGIN, act_bytes_per_token=act)
            r["max_tokens_decode_only"] = int(room // kv) if room > 0 and kv > 0 else (0 if room <= 0 else None)
            r["max_tokens_one_shot_prefill"] = (int(room // (kv + act)) if (act is not None and room > 0) else
                                                (0 if room <= 0 else None))
            rows[name] = r
        out[kind] = rows
    return out


# ------------------------------------------------------------------------------------------------ table
def fmt_tokens(n):
    if n is None:
        return "n/a"
    return f"{n / 2**20:.2f}M" if n >= 2**20 else f"{n / 1024:.0f}K"


def print_table(res: dict) -> None:
    print("\n| model | T | fill | prefill ms (all layers) | prefill ms / layer | by layer kind | decode us / step | "
          "decode us / layer | step wall us | kept density | KV cache |")
    print("|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in res["results"]:
        byk = ", ".join(f"{k} {v:.2f}" for k, v in (r.get("prefill_ms_by_layer_kind") or {}).items())
        pf = f"{r['prefill_ms']:.2f}" if "prefill_ms" in r else "-"
        pl = f"{r['prefill_ms_per_layer']:.2f}" if "prefill_ms_per_layer" in r else "-"
        dens = "-" if r.get("decode_density") is None else f"{r['decode_density']:.3f}"
        print(f"| {r['model']} | {r['seq_len']} | {r['fill'].split(' ')[0]} | {pf} | {pl} | {byk or '-'} | "
              f"{r['decode_step_ms'] * 1e3:.1f} | {r['decode_ms_per_layer'] * 1e3:.1f} | "
              f"{r['decode_wall_ms'] * 1e3:.1f} | {dens} | {r['kv_cache_bytes'] / GIB:.3f} GiB |")
    sp = res.get("speedups") or []
    if sp:
        print("\n| T | prefill x (dense / rtpurbo) | decode x (dense / rtpurbo) |")
        print("|---:|---:|---:|")
        for s in sp:
            a = "-" if s.get("prefill_x") is None else f"{s['prefill_x']:.2f}"
            print(f"| {s['seq_len']} | {a} | {s['decode_x']:.2f} |")
    print("\nLongest context (weights + fixed KV + T * (KV + activation bytes per token) + 1 GiB <= free memory):")
    print("| model | what | weights GiB | KV B/token | act B/token | max T (one-shot prefill) | max T (decode only) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for kind, rows in res["max_context"].items():
        for name, r in rows.items():
            act = "n/a" if r["act_bytes_per_token"] is None else f"{r['act_bytes_per_token']:.0f}"
            print(f"| {kind} | {name} | {r['weights_bytes'] / GIB:.2f} | {r['kv_bytes_per_token']:.0f} | {act} | "
                  f"{fmt_tokens(r['max_tokens_one_shot_prefill'])} | {fmt_tokens(r['max_tokens_decode_only'])} |")
    for n in res.get("notes", []):
        print(f"note: {n}")


# ------------------------------------------------------------------------------------------------ check
def graph_of(fn):
    """CUDA graph of fn (warmed up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        g.out = fn()  # the static output
    torch.cuda.synchronize()
    return g


def rel_max(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@torch.no_grad()
def run_check(args, dev, dtype) -> int:
    """GPU self-check at a small T: graph decode vs the eager reference path, graph vs the same step run
    eagerly, the fast dense decode kernel vs its reference, the bench prefill vs the engine's prefill."""
    results = []
    if dev.type == "cuda":
        import triton

        print(f"device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}")

    def report(name, value, tol, extra=""):
        ok = value == value and value <= tol
        results.append((name, ok))
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {value:.3e} (tol {tol:.0e}){extra}", flush=True)

    # 1. the dense decode kernel, real head shapes, batch 2 of different lengths, NaN beyond, a view
    g = torch.Generator(device=dev).manual_seed(0)
    margs = model_args(args)
    Hq, Hkv, D = margs.n_heads, margs.n_kv_heads, margs.head_dim
    L = 2 * args.check_len
    q = torch.randn(2, Hq, D, device=dev, generator=g).to(dtype)
    k = torch.randn(2, Hkv, L, D, device=dev, generator=g).to(dtype)
    v = torch.randn(2, Hkv, L, D, device=dev, generator=g).to(dtype)
    lens = torch.tensor([L, args.check_len // 3], device=dev, dtype=torch.int32)
    k[1, :, args.check_len // 3:] = float("nan")
    v[1, :, args.check_len // 3:] = float("nan")
    print(f"dense decode kernel (B 2, Hq {Hq}, Hkv {Hkv}, D {D}, L {L}, lens {lens.tolist()}):")
    ref = sd.dense_decode_reference(q.float(), k.float(), v.float(), lens)
    got = sd.dense_decode(q, k, v, lens, impl="triton" if dev.type == "cuda" else "auto")
    report("dense_decode vs reference, rel max err", rel_max(got, ref), 2e-2)
    Lv = args.check_len
    lv = torch.tensor([Lv, 7], device=dev, dtype=torch.int32)
    got = sd.dense_decode(q, k[:, :, :Lv], v[:, :, :Lv], lv, impl="triton" if dev.type == "cuda" else "auto")
    ref = sd.dense_decode_reference(q.float(), k[:, :, :Lv].float(), v[:, :, :Lv].float(), lv)
    report("dense_decode on a cache view, rel max err", rel_max(got, ref), 2e-2)

    if dev.type == "cuda":  # information only: the fast dense decode vs cuDNN SDPA over the exact length
        import triton.testing
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for Lt in args.check_time_lens:
            qt = torch.randn(1, Hq, D, device=dev, generator=g).to(dtype)
            kt = torch.randn(1, Hkv, Lt, D, device=dev, generator=g).to(dtype)
            vt = torch.randn(1, Hkv, Lt, D, device=dev, generator=g).to(dtype)
            lt = torch.tensor([Lt], device=dev, dtype=torch.int32)
            def cudnn():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    return F.scaled_dot_product_attention(qt[:, :, None], kt, vt, enable_gqa=True)  # noqa: B023

            times = []
            for fn in (lambda: sd.dense_decode(qt, kt, vt, lt, impl="triton"), cudnn):  # noqa: B023
                try:
                    gr = graph_of(fn)
                    times.append(triton.testing.do_bench(gr.replay, warmup=25, rep=100, return_mode="median"))
                except RuntimeError as e:
                    times.append(float("nan"))
                    print(f"  (did not run: {str(e)[:100]})")
            tri, cud = times
            gb = 2 * Hkv * Lt * D * kt.element_size() / 1e9
            print(f"  info (CUDA-graph replays): dense decode L={Lt}: Triton {tri * 1e3:.1f} us ({gb / tri:.2f} TB/s), "
                  f"cuDNN SDPA over the exact length {cud * 1e3:.1f} us ({gb / cud:.2f} TB/s)", flush=True)
            del kt, vt

    # 2. the graph-safe MoE (grouped matmuls, deterministic combine) vs the model's MoE module, same input
    try:
        torch.manual_seed(args.seed)
        one = build_stack(argparse.Namespace(**{**vars(args), "layers": 1}), "dense", dev, dtype)
        moe = one.layers["0"].moe
        xm = torch.randn(args.check_len, margs.dim, device=dev, generator=g).to(dtype)
        ref_m, _ = moe(xm[None])
        report("MoE: graph-safe _moe_static vs the model's MoE, 4K tokens, rel max err",
               rel_max(_moe_static(moe, xm), ref_m[0]), 2e-2)
        if dev.type == "cuda":
            xb = xm[:2].clone()
            gm = graph_of(lambda: _moe_static(moe, xb))
            xb.copy_(xm[5:7])
            gm.replay()
            report("MoE: CUDA graph of _moe_static (2 tokens, new input) vs eager, rel max err",
                   rel_max(gm.out, _moe_static(moe, xm[5:7])), 1e-6)
        del one, moe
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        results.append(("MoE checks ran without an exception", False))
        print(f"  FAIL  MoE: {type(e).__name__}: {e}", flush=True)

    # 3. engine: graph decode vs eager reference decode, graph vs static eager; bench prefill vs engine prefill
    T0 = args.check_len - 3  # decode crosses the bucket boundary at check_len (two graphs)
    steps = args.check_steps
    max_len = 2 * args.check_len + 64
    for moe in (False, True):
        for kind in args.models:
            try:
                _check_model(args, kind, dev, dtype, g, T0, steps, max_len, report, results, moe)
            except Exception as e:  # noqa: BLE001 - a crash is a failed check, with its traceback
                import traceback

                traceback.print_exc()
                results.append((f"{kind}: ran without an exception", False))
                print(f"  FAIL  {kind}: {type(e).__name__}: {e}", flush=True)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    n_fail = sum(1 for _, ok in results if not ok)
    print(f"\n{'PASS' if not n_fail else 'FAIL'}: {len(results) - n_fail}/{len(results)} checks passed")
    return 0 if not n_fail else 1


def _copy_cache(src: InferenceEngine, dst: InferenceEngine) -> None:
    dst.new_cache(src.cache.B)
    for name in ("k", "v", "ki", "sink_k", "sink_v", "ring_k", "ring_v"):
        for a, b in zip(getattr(src.cache, name), getattr(dst.cache, name)):
            if a is not None:
                b.copy_(a)
    dst.lens = list(src.lens)


def _check_model(args, kind, dev, dtype, g, T0, steps, max_len, report, results, moe):
    """moe=False: FFN layers (end-to-end comparisons with the reference path are meaningful: no router whose
    top-8 flips on bf16 rounding); moe=True (the benchmark's layers): graph vs the same step run eagerly from
    the same cache (exact up to kernel nondeterminism), the reference comparison printed as information."""
    model = build_stack(args, kind, dev, dtype, moe=moe)
    tag = f"{kind}/{'moe' if moe else 'ffn'}"
    print(f"\n{tag}: {len(model.layers)} layers, prompt {T0}, {steps} decode steps, window {args.window}:")
    tokens = torch.randint(0, model.args.vocab_size, (1, T0), device=dev, generator=g)
    mk = lambda **kw: InferenceEngine(model, max_len=max_len, chunk_size=512,  # noqa: E731
                                      graph_min_bucket=args.check_len, **kw)
    e_ref = mk(cuda_graph=False, impl="torch")  # eager step, pure-torch references, model MoE
    e_gr = mk(cuda_graph=True if dev.type == "cuda" else None, static_decode=True)
    e_st = mk(cuda_graph=False, static_decode=True)  # the graph-safe step, eagerly
    l_ref = e_ref.prefill(tokens, [T0])
    l_gr, _ = fast_prefill(e_gr, tokens, args)
    _copy_cache(e_gr, e_st)
    print(f"  layer kinds: {layer_kinds(e_gr)}; graphs: {e_gr.graph_status}")
    worst = 0.0  # caches written by the two prefills
    for li, p in enumerate(e_gr.cache.plans):
        for name in ("k", "v", "ki"):
            a, b = getattr(e_gr.cache, name)[li], getattr(e_ref.cache, name)[li]
            if a is not None:
                worst = max(worst, rel_max(a[:, :, :T0], b[:, :, :T0]))
        for name in ("sink_k", "ring_k", "ring_v"):
            a, b = getattr(e_gr.cache, name)[li], getattr(e_ref.cache, name)[li]
            if a is not None:
                worst = max(worst, rel_max(a, b))
    e_pf, e_pc = rel_max(l_gr, l_ref), worst
    tok_seq = torch.randint(0, model.args.vocab_size, (steps,), device=dev, generator=g)
    for e in (e_ref, e_gr, e_st):
        e.track_density = True
    errs_ref, errs_st, agree = [], [], 0
    for s in range(steps):
        t = tok_seq[s:s + 1]
        a, b, c = e_gr.decode_step(t), e_ref.decode_step(t), e_st.decode_step(t)
        errs_ref.append(rel_max(a, b))
        errs_st.append(rel_max(a, c))
        agree += int(a.argmax() == b.argmax())
    ng = len(e_gr._graphs.graphs) if e_gr._graphs is not None else 0
    dr, dg = e_ref.mean_density(), e_gr.mean_density()
    print(f"  decode path {e_gr.decode_path}, graphs captured: {ng}; greedy token agreement with the "
          f"reference: {agree}/{steps}; kept density graph {dg} vs reference {dr}")
    if dev.type == "cuda":
        ok = e_gr.decode_path == "graph" and ng == 2
        results.append((f"{tag}: decode ran as CUDA graphs (2 buckets)", ok))
        print(f"  {'PASS' if ok else 'FAIL'}  {tag}: decode ran as CUDA graphs over 2 buckets ({ng} captured)")
    report(f"{tag}: graph decode vs the same step run eagerly (same cache), logits rel max err (worst step)",
           max(errs_st), 1e-2)
    if not moe:
        report(f"{tag}: bench prefill vs engine prefill, last-token logits rel max err", e_pf, 3e-2)
        report(f"{tag}: bench prefill vs engine prefill, cache contents rel max err", e_pc, 3e-2)
        report(f"{tag}: graph decode vs eager reference decode, logits rel max err (worst step)", max(errs_ref), 3e-2)
        if dr is not None:
            report(f"{tag}: kept density graph vs reference, abs diff", abs(dg - dr), 2e-2)
    else:
        print(f"  info (MoE routing flips on bf16 rounding, so no tolerance): bench prefill vs engine prefill "
              f"logits {e_pf:.2e}, cache {e_pc:.2e}; graph decode vs reference decode {max(errs_ref):.2e}")
    for e in (e_ref, e_gr, e_st):
        e.reset()


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, a few seconds (tests)")
    ap.add_argument("--check", action="store_true", help="GPU correctness checks at a small T, PASS/FAIL")
    ap.add_argument("--flavor", default="30B-A3B")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers in the stack (default 5; smoke 2)")
    ap.add_argument("--vocab", type=int, default=4096, help="embedding / output head size")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=None,
                    help="default 32768 131072 1048576 (smoke: 256 512; check: --check-len)")
    ap.add_argument("--models", nargs="+", default=["dense", "rtpurbo"], choices=["dense", "rtpurbo"])
    ap.add_argument("--retrieval-layer-frac", type=float, default=0.6)
    ap.add_argument("--retrieval-group", type=int, default=0, help="KV group whose query heads retrieve")
    ap.add_argument("--window", type=int, default=None, help="default 8192 (smoke 64, check 1024)")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--indexer-dim", type=int, default=16)
    ap.add_argument("--density", type=float, default=0.05, help="planted decode density (0: random indexer)")
    ap.add_argument("--retrieval-prefill", choices=["dense", "sparse"], default="dense")
    ap.add_argument("--prefill-density", type=float, default=0.05, help="sparse prefill: planted selection")
    ap.add_argument("--select-mode", choices=["mean", "pooled"], default="pooled")
    ap.add_argument("--fill", choices=["auto", "prefill", "random"], default="auto")
    ap.add_argument("--proj-chunk", type=int, default=65536)
    ap.add_argument("--moe-chunk", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long-prefill", type=int, default=131072, help="above this T: one prefill, no repeats")
    ap.add_argument("--decode-iters", type=int, default=50)
    ap.add_argument("--decode-warmup", type=int, default=10)
    ap.add_argument("--wall-steps", type=int, default=20)
    ap.add_argument("--decode-margin", type=int, default=64, help="cache slots beyond T")
    ap.add_argument("--graph-min-bucket", type=int, default=2048)
    ap.add_argument("--check-len", type=int, default=4096)
    ap.add_argument("--check-steps", type=int, default=8)
    ap.add_argument("--check-time-lens", type=int, nargs="*", default=[32768, 131072, 1048576],
                    help="--check: also time the dense decode kernel vs cuDNN at these lengths (info)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    if args.layers is None:
        args.layers = 2 if (args.smoke or args.check) else 5
    if args.window is None:
        args.window = 64 if args.smoke else (1024 if args.check else 8192)
    if args.seq_lens is None:
        args.seq_lens = [256, 512] if args.smoke else [32768, 131072, 1048576]
    if args.smoke:
        args.block = min(args.block, 16)
        args.indexer_dim = min(args.indexer_dim, 8)
        args.proj_chunk = min(args.proj_chunk, 128)
        args.moe_chunk = min(args.moe_chunk, 96)
        args.repeats = min(args.repeats, 1)
        args.decode_iters = min(args.decode_iters, 2)
        args.decode_warmup = min(args.decode_warmup, 1)
        args.wall_steps = min(args.wall_steps, 2)
        args.graph_min_bucket = min(args.graph_min_bucket, 128)
        args.check_len = min(args.check_len, 256)
        args.check_steps = min(args.check_steps, 4)
    return args


def free_memory(dev) -> tuple[int, int]:
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return int(free), int(total)
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    return int(page * os.sysconf("SC_AVPHYS_PAGES")), int(page * os.sysconf("SC_PHYS_PAGES"))


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device or ("cpu" if args.smoke else ("cuda" if torch.cuda.is_available() else "cpu")))
    if not args.smoke and dev.type != "cuda":  # (--smoke --check runs the check code on CPU at toy size)
        print("error: the benchmark and --check need a CUDA device (use --smoke on CPU)", file=sys.stderr)
        return 2
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    if dev.type == "cpu":  # toy matrices: one intra-op thread is the fastest on a shared CPU
        torch.set_num_threads(1)
    try:
        torch._dynamo.config.fail_on_recompile_limit_hit = True  # a silent eager flex fallback is an error
    except Exception:  # noqa: BLE001
        pass
    if args.check:
        return run_check(args, dev, dtype)
    free0, total = free_memory(dev)
    if dev.type == "cuda":
        free0 += torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    margs = model_args(args)
    res = dict(meta=dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", torch=torch.__version__,
        dtype=str(dtype).replace("torch.", ""), smoke=args.smoke, free_bytes_at_start=free0, total_bytes=total,
        model=dict(flavor="smoke" if args.smoke else args.flavor, layers=args.layers, dim=margs.dim,
                   n_heads=margs.n_heads, n_kv_heads=margs.n_kv_heads, head_dim=margs.head_dim,
                   num_experts=margs.num_experts, top_k=margs.num_experts_per_tok, moe_hidden=margs.moe_hidden_dim,
                   vocab=margs.vocab_size),
        rtpurbo=dict(retrieval_layers=retrieval_layers(args.layers, args.retrieval_layer_frac),
                     retrieval_group=args.retrieval_group, window=args.window, sinks=args.sinks, block=args.block,
                     top_p=args.top_p, indexer_dim=args.indexer_dim, planted_decode_density=args.density,
                     retrieval_prefill=args.retrieval_prefill),
        args=vars(args)), results=[], notes=[])
    try:
        import triton

        res["meta"]["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        res["meta"]["triton"] = None
    # warm-up: compile every kernel (flex, Triton decode, cuDNN plans) on a short prompt first
    warm_T = min(args.seq_lens) if args.smoke else min(4096, min(args.seq_lens))
    models_info: dict = {}
    act_acc: dict = {}
    for kind in args.models:
        model = build_stack(args, kind, dev, dtype)
        est = RoleKVCache.estimate(model, 1, max(args.seq_lens) + args.decode_margin)  # (rings need max_len)
        models_info[kind] = dict(weights_bytes=param_bytes(model), kv_bytes_per_token=est["bytes_per_token"],
                                 kv_fixed_bytes=est["fixed_bytes_per_sequence"])
        from models.inference.kv_cache import plan_layers

        kinds = [("dense" if not p.rtpurbo else f"rtp_{len(p.full_kv) if p.retrieval else 0}of{p.n_kv_heads}")
                 for p in plan_layers(model, max(args.seq_lens) + args.decode_margin)]
        print(f"{kind}: {args.layers} layers ({kinds}), "
              f"{param_bytes(model) / GIB:.2f} GiB of weights; warm-up at T={warm_T}", flush=True)
        run_one(model, kind, warm_T, args, dev, free0, {})
        for T in args.seq_lens:
            t0 = time.perf_counter()
            row = run_one(model, kind, T, args, dev, free0, act_acc)
            res["results"].append(row)
            pf = f"{row['prefill_ms']:.1f} ms" if "prefill_ms" in row else "no prefill"
            print(f"  {kind} T={T}: prefill {pf}, decode {row['decode_step_ms'] * 1e3:.1f} us/step "
                  f"({row['decode_ms_per_layer'] * 1e3:.1f} us/layer), density {row.get('decode_density')}, "
                  f"fill {row['fill'].split(' ')[0]} [{time.perf_counter() - t0:.1f} s]", flush=True)
        del model
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    # activation bytes per token: at the longest prefilled T (CUDA: measured; CPU: not measurable -> None)
    act = {k: max(v)[1] for k, v in act_acc.items() if v}
    full_args = (margs.replace(n_layers=FULL_MODEL_LAYERS) if args.smoke
                 else get_flavor(args.flavor).replace(n_layers=FULL_MODEL_LAYERS))
    res["max_context"] = max_context(models_info, free0, act, full_args, args.layers,
                                     torch.empty((), dtype=dtype).element_size())
    by = {(r["model"], r["seq_len"]): r for r in res["results"]}
    for T in args.seq_lens:
        d, r = by.get(("dense", T)), by.get(("rtpurbo", T))
        if d and r:
            px = (d["prefill_ms"] / r["prefill_ms"]) if ("prefill_ms" in d and "prefill_ms" in r) else None
            res.setdefault("speedups", []).append(dict(seq_len=T, prefill_x=px,
                                                       decode_x=d["decode_step_ms"] / r["decode_step_ms"]))
    res["notes"].append("per layer = whole step / layers (embedding, final norm and a small head included)")
    res["notes"].append("decode: CUDA graph replays at cache length T (CUDA events); wall = real decode_step calls")
    if any(r["fill"] != "prefill" for r in res["results"]):
        res["notes"].append("rows with fill=random decoded from a randomly filled cache (no prefill)")
    if args.smoke:
        res["notes"].append("smoke run: tiny CPU shapes, timings meaningless")
    print_table(res)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
