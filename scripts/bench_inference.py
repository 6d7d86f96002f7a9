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

Decode split (every row unless --no-split): the step at T as its own CUDA graph and the same step with
engine.skip_attention (indexer, block selection and attention kernels skipped; projections, norms, RoPE,
cache writes, MoE kept) as another; attention = step - rest; launches per layer from torch.profiler (CUDA
kernels of one eager step, minus the same step with no layers, over the layers). When the engine runs the
fused decode kernels (kernels/fused_decode.py, kernels/moe_decode.py: the default on CUDA, --fused) the same
is done with the model's modules ("modules" columns) for comparison. --decode-only (= --fill random) runs
just this part: 2 models x 3 lengths in a minute or two on an H100.

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
  python scripts/bench_inference.py --decode-only --out d.json   # decode only: attention vs rest, fused vs modules
  python scripts/bench_inference.py --out bench_inference.json   # the benchmark (H100: several minutes)
  python scripts/bench_inference.py --smoke --out /tmp/s.json    # CPU, tiny shapes, seconds

--indexer-fp8: the RTPurbo engine caches its indexer keys in float8_e4m3fn (InferenceEngine(indexer_cache_dtype=
"float8_e4m3fn"), docs/inference.md "fp8 indexer keys"); the dense model is unchanged. The header, every
rtpurbo row ("indexer_cache_dtype") and the JSON meta say so. With --check it adds, per RTPurbo model, an fp8
engine next to the bf16 one: its prefilled indexer keys vs the bf16 keys cast to fp8, its graph decode vs the
eager reference on the same fp8 keys (PASS/FAIL), and, for information, greedy-token agreement and kept density
vs the bf16 graph decode over the same teacher-forced steps.
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
from models.inference.kv_cache import indexer_store_cast  # noqa: E402
from models.inference.prefill import dense_causal, local_window, one_shot_prefill  # noqa: E402
from models.qwen3.args import Qwen3ModelArgs, get_flavor  # noqa: E402
from models.qwen3.model import Qwen3Model  # noqa: E402

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
GIB = 2**30
MARGIN = 1 * GIB
FUSED_OPT = {"auto": None, "on": True, "off": False}
FULL_MODEL_LAYERS = 48  # Qwen3-30B-A3B
FP8 = "float8_e4m3fn"


def indexer_opt(args, kind: str) -> str | None:
    """InferenceEngine(indexer_cache_dtype=...) for a model kind: fp8 for the RTPurbo model with --indexer-fp8."""
    return FP8 if getattr(args, "indexer_fp8", False) and kind == "rtpurbo" else None


def indexer_torch_dtype(args, kind: str):
    opt = indexer_opt(args, kind)
    return getattr(torch, opt) if opt is not None else None


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
# The prefill is the engine's one-shot path (models/inference/prefill.py): dense_causal (cuDNN, then flash,
# efficient, math SDPA; a refusal is logged), local_window (FlexAttention window + sinks) and the per-layer
# function are the engine's; only the sparse retrieval prefill over a planted selection and the per-layer
# timing live here.


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
    """Prefill a [B, T] prompt through every layer at once with the fast kernels (the engine's one-shot prefill,
    models/inference/prefill.one_shot_prefill: projections in --proj-chunk, FFN / MoE in --moe-chunk token
    chunks), writing the engine's cache. --retrieval-prefill sparse: the retrieval heads through
    sparse_retrieval (indexer selection + block-sparse attention over `planted`). Per-layer times: a Timer mark
    before and after each layer, synchronised after it (CUDA events). Returns (last-token logits [B, V],
    per-layer ms list)."""
    B, T = tokens.shape
    timer = Timer(tokens.device)
    layer_ms: list[float] = []
    t0 = [None]

    def mark(li):
        if t0[0] is not None:
            t1 = timer.start()
            layer_ms.append(timer.ms(t0[0], t1))
        t0[0] = timer.start() if li < len(eng.layers) else None

    retrieval = None
    if args.retrieval_prefill == "sparse":
        def retrieval(li, p, q_r, k_g, v_g, qi, ki):
            o, sel = sparse_retrieval(q_r, k_g, v_g, qi, ki, p, args, planted)
            if stats is not None:
                stats.setdefault("prefill_selection_density", []).append(float(sel.density.mean()))
            return o

    logits = one_shot_prefill(eng, tokens, [T] * B, proj_chunk=args.proj_chunk, ffn_chunk=args.moe_chunk,
                              retrieval_attention=retrieval, on_layer=mark)
    return logits, layer_ms


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
            cache.ki[li][0, h, :T] = indexer_store_cast(s[:, None] * u[h][None, :], cache.ki[li].dtype)


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
    step_ms, per = _time_runner_runs(run, args, dev)
    return dict(decode_step_ms=step_ms, decode_step_ms_runs=per,
                decode_timed_by="cuda graph replay" if g is not None else "eager static step",
                n_graphs=len(eng._graphs.graphs) if eng._graphs is not None else 0)


def time_decode_wall(eng: InferenceEngine, tok: torch.Tensor, args, dev) -> dict:
    """Wall time of real decode_step() calls (advancing positions T, T+1, ...; host work included). Run last:
    the steps write the local heads' ring slots of positions T+1, ..., which resetting the length to T does
    not undo (those slots held window tokens of position T), so any step timed at T afterwards would read a
    window mixed with later tokens (seen on the H100: the planted selection of later layers went flat)."""
    T = eng.lens[0]
    n = args.wall_steps
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        eng.decode_step(tok)
    sync(dev)
    wall_ms = (time.perf_counter() - t0) * 1e3 / n
    eng.lens = [T]
    return dict(decode_wall_ms=wall_ms)


# ------------------------------------------------------------------ decode split: attention vs the rest
VIEW_OPS = {"view", "_unsafe_view", "reshape", "transpose", "unsqueeze", "squeeze", "expand", "slice", "select", "t",
            "alias", "permute", "as_strided", "detach", "split", "chunk", "unbind", "_reshape_alias", "lift_fresh",
            "empty", "empty_like", "new_empty", "empty_strided"}


def _time_runner_runs(run, args, dev) -> tuple[float, list[float]]:
    """(median, runs): each run is the mean of --decode-iters calls (ms), --repeats runs after
    --decode-warmup calls."""
    timer = Timer(dev)
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
    return statistics.median(per), per


def _time_runner(run, args, dev) -> float:
    return _time_runner_runs(run, args, dev)[0]


KERNEL_TABLE = [0]  # rows of the per-kernel profiler table printed by count_step_ops (--kernel-table)


@torch.no_grad()
def count_step_ops(eng: InferenceEngine, Lv: int, dev) -> dict:
    """Launches of one static step: CUDA kernels (incl. memset / memcpy) under torch.profiler on CUDA, aten ops
    (views excluded) under a dispatch mode on CPU. `fixed` = the same step with no layers (embedding, RoPE
    tables, final norm, head), per_layer = (per_step - fixed) / layers."""
    def count() -> int:
        if dev.type == "cuda":
            from torch.autograd import DeviceType
            from torch.profiler import ProfilerActivity, profile

            sync(dev)
            if KERNEL_TABLE[0]:  # also: which path the split top-p select took per head (syncs: eager only)
                from kernels import triton_decode as tdm

                def show(st):
                    fits = (st["n_cand"] <= st["cand_tile"]) & (st["cand_mass"] >= st["top_p"] - st["forced_mass"])
                    print(f"  split select: {st['n_blocks']} blocks, candidates per head "
                          f"{st['n_cand'].int().tolist()} (register tile {st['cand_tile']}), candidate mass "
                          f"{[round(x, 3) for x in st['cand_mass'].tolist()]}, forced mass "
                          f"{[round(x, 3) for x in st['forced_mass'].tolist()]}, in registers: "
                          f"{int(fits.sum())} of {fits.numel()}", flush=True)
                tdm.SPLIT_STATS_HOOK = show
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                eng._decode_core(Lv)
                sync(dev)
            if KERNEL_TABLE[0]:  # --kernel-table: where the step's GPU time goes, kernel by kernel
                tdm.SPLIT_STATS_HOOK = None
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=KERNEL_TABLE[0]),
                      flush=True)
            return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
        from torch.utils._python_dispatch import TorchDispatchMode

        n = [0]
        inside = [0]  # > 0 while Triton's CPU interpreter runs a kernel (its own torch ops are not launches)

        class _Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not inside[0] and func.overloadpacket.__name__ not in VIEW_OPS:
                    n[0] += 1
                return func(*args, **(kwargs or {}))

        patched = None
        if "triton" in sys.modules:  # interpreted Triton kernels: one launch each
            try:
                from triton.runtime.interpreter import InterpretedFunction

                patched = (InterpretedFunction, InterpretedFunction.run)

                def run(self, *a, **kw):
                    n[0] += 1
                    inside[0] += 1
                    try:
                        return patched[1](self, *a, **kw)
                    finally:
                        inside[0] -= 1

                InterpretedFunction.run = run
            except ImportError:
                patched = None
        try:
            with _Count():
                eng._decode_core(Lv)
        finally:
            if patched is not None:
                patched[0].run = patched[1]
        return n[0]

    per_step = count()
    layers = eng.layers
    try:
        eng.layers = []
        fixed = count()
    finally:
        eng.layers = layers
    return dict(what="cuda kernels" if dev.type == "cuda" else "aten ops + Triton launches (cpu)",
                per_step=per_step, fixed=fixed,
                per_layer=(per_step - fixed) / max(len(layers), 1))


@torch.no_grad()
def decode_split(eng: InferenceEngine, tok: torch.Tensor, args, dev) -> dict:
    """The step at cache length T timed as a whole and without its attention (engine.skip_attention: the
    indexer, block selection and attention kernels skipped, projections / norms / RoPE / cache writes / FFN
    kept), each as its own CUDA graph (CUDA) or eager static step (CPU); attention = whole - rest. For the
    engine's path ("fused": the fused Triton kernels; "modules": the model's torch modules) and, when the
    engine runs the fused kernels, for the modules too. With launch counts (count_step_ops)."""
    T = eng.lens[0]
    Lv = eng.view_length(T + 1)
    st = eng._static_state()
    st.tok.copy_(tok.reshape(1))
    st.pos.fill_(T)
    N = len(eng.layers)
    paths = [(True, "fused"), (False, "modules")] if eng.fused else [(False, "modules")]
    fused0, dens0 = eng.fused, eng.track_density
    eng.track_density = False
    out = {}
    try:
        for fused, name in paths:
            eng.fused = fused
            r = {}
            for skip, key in ((False, "step_ms"), (True, "no_attention_ms")):
                eng.skip_attention = skip
                if dev.type == "cuda":
                    g = graph_of(lambda: eng._decode_core(Lv))
                    r[key] = _time_runner(g.replay, args, dev)
                    del g
                else:
                    r[key] = _time_runner(lambda: eng._decode_core(Lv), args, dev)
            eng.skip_attention = False
            r["attention_ms"] = r["step_ms"] - r["no_attention_ms"]
            for k_ in ("step_ms", "no_attention_ms", "attention_ms"):
                r[k_.replace("_ms", "_ms_per_layer")] = r[k_] / N
            try:
                r["launches"] = count_step_ops(eng, Lv, dev)
            except Exception as e:  # noqa: BLE001 - a profiler problem must not stop the timing run
                print(f"  note: launch count failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
                r["launches"] = dict(what=f"not counted ({type(e).__name__})", per_step=float("nan"),
                                     fixed=float("nan"), per_layer=float("nan"))
            out[name] = r
    finally:
        eng.fused, eng.skip_attention, eng.track_density = fused0, False, dens0
    return out


# ----------------------------------------------------------------------------------------- one length
def run_one(model, kind, T, args, dev, free0, stats_acc) -> dict:
    N = len(model.layers)
    eng = InferenceEngine(model, max_len=T + args.decode_margin, cuda_graph=(True if dev.type == "cuda" else None),
                          static_decode=True, track_density=False, graph_min_bucket=args.graph_min_bucket,
                          fused_decode=FUSED_OPT[args.fused], indexer_cache_dtype=indexer_opt(args, kind))
    row = dict(model=kind, seq_len=T, layers=N, graph_status=eng.graph_status, decode_path=eng.decode_path,
               decode_layers=eng.fused_status, indexer_cache_dtype=eng.indexer_cache_dtype)
    est = RoleKVCache.estimate(model, 1, T + args.decode_margin, indexer_dtype=indexer_torch_dtype(args, kind))
    row.update(kv_cache_bytes=est["total_bytes"], kv_bytes_per_token=est["bytes_per_token"],
               kv_indexer_bytes_per_token=est["indexer_bytes_per_token"],
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
    if args.split:
        sp = decode_split(eng, tok, args, dev)
        row["decode_split"] = sp
        main_path = "fused" if eng.fused else "modules"
        row["decode_attention_ms_per_layer"] = sp[main_path]["attention_ms_per_layer"]
        row["decode_rest_ms_per_layer"] = sp[main_path]["no_attention_ms_per_layer"]
        row["launches_per_layer"] = sp[main_path]["launches"]["per_layer"]
        if "fused" in sp:
            row["decode_modules_ms_per_layer"] = sp["modules"]["step_ms_per_layer"]
            row["decode_modules_rest_ms_per_layer"] = sp["modules"]["no_attention_ms_per_layer"]
            row["launches_per_layer_modules"] = sp["modules"]["launches"]["per_layer"]
    row.update(time_decode_wall(eng, tok, args, dev))  # last: it overwrites ring slots of the window at T
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


def _us(r, key):
    return "-" if r.get(key) is None else f"{r[key] * 1e3:.1f}"


def print_table(res: dict) -> None:
    print(f"\nindexer keys of the rtpurbo model cached in {res['meta']['rtpurbo'].get('indexer_cache_dtype')}")
    print("| model | T | fill | prefill ms (all layers) | prefill ms / layer | by layer kind | decode us / step | "
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
    if any("decode_split" in r for r in res["results"]):
        print("\nDecode per layer, split (own graphs: the step, and the step without attention = 'rest'; "
              "attention = step - rest). 'modules' = the same step through the model's torch modules:")
        print("| model | T | decode us / layer | attention us / layer | rest us / layer | launches / layer | "
              "modules: decode us / layer | modules: rest us / layer | modules: launches / layer |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in res["results"]:
            if "decode_split" not in r:
                continue
            sp = r["decode_split"]
            main_ = sp.get("fused") or sp["modules"]
            mod = sp["modules"] if "fused" in sp else None
            lm = "-" if mod is None else f"{mod['launches']['per_layer']:.1f}"
            print(f"| {r['model']} | {r['seq_len']} | {main_['step_ms_per_layer'] * 1e3:.1f} | "
                  f"{main_['attention_ms_per_layer'] * 1e3:.1f} | {main_['no_attention_ms_per_layer'] * 1e3:.1f} | "
                  f"{main_['launches']['per_layer']:.1f} | "
                  f"{'-' if mod is None else format(mod['step_ms_per_layer'] * 1e3, '.1f')} | "
                  f"{'-' if mod is None else format(mod['no_attention_ms_per_layer'] * 1e3, '.1f')} | {lm} |")
        r0 = next(r for r in res["results"] if "decode_split" in r)
        print(f"(decode layers: {r0.get('decode_layers')}; launches counted as "
              f"{next(iter(r0['decode_split'].values()))['launches']['what']})")
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
        if dev.type == "cuda":
            check_fused(one, args, dev, dtype, g, report)
        else:
            print("  fused decode kernels: not checked here (they need CUDA; tests/test_kernels_moe_decode.py "
                  "checks them in Triton's CPU interpreter)")
        del one, moe
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        results.append(("MoE / fused kernel checks ran without an exception", False))
        print(f"  FAIL  MoE / fused kernels: {type(e).__name__}: {e}", flush=True)

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


def rel_norm(a, b) -> float:
    """||a - b|| / ||b|| in float64 (NaN anywhere -> NaN: fails every tolerance)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _compact_experts(ids, *ws):
    """(ids remapped to 0..n-1, the n selected experts of each weight in float32): an fp32 reference of the
    experts without upcasting all 128 of them."""
    uniq, inv = torch.unique(ids.long(), return_inverse=True)
    return (inv.view_as(ids),) + tuple(w[uniq].float() for w in ws)


@torch.no_grad()
def check_fused(one, args, dev, dtype, g, report) -> None:
    """The fused decode kernels at the real shapes vs fp32 references (PASS/FAIL), a CUDA graph of them, and
    their timings next to what they replace (information)."""
    import triton.testing

    from kernels import fused_decode as fd
    from kernels import moe_decode as md

    layer = one.layers["0"]
    attn, moe = layer.attention, layer.moe
    ex, an, fn = moe.experts, layer.attention_norm, layer.ffn_norm
    D, k, E = one.args.dim, moe.top_k, moe.num_experts
    Hq, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    wqkv = torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight], 0).contiguous()
    print(f"fused decode kernels (dim {D}, {Hq} q / {Hkv} KV heads x {hd}, {E} experts top-{k}, moe hidden "
          f"{ex.w1.shape[1]}, {dtype}):")
    for B in (1, 3, 16):
        x = torch.randn(B, D, device=dev, generator=g).to(dtype)
        # fused QKV: attention_norm + one matmul over cat(wq, wk, wv), vs fp32 of the same, and the modules
        got = fd.norm_linear(x, wqkv, norm_weight=an.weight, eps=an.eps,
                             out=torch.full((B, wqkv.shape[0]), float("nan"), device=dev, dtype=dtype))
        h32 = fd.rms_norm_reference(x.float(), an.weight.float(), an.eps)
        h = an(x)
        mods = torch.cat([attn.wq(h), attn.wk(h), attn.wv(h)], -1)
        report(f"fused QKV (norm + 1 matmul over cat(wq,wk,wv)) B={B} vs fp32, rel err", rel_norm(got, h32 @ wqkv.float().T),
               1e-2, f"  (vs the bf16 modules {rel_norm(got, mods):.1e})")
        # MoE experts read in place (norm + residual fused), routing from the model's router
        w, ids = moe.router(fn(x))[:2]
        if B > 1:  # several tokens on the same experts: draw each token's k experts from a pool of k + 4
            pool = torch.randperm(E, device=dev, generator=g)[: k + 4]
            ids = torch.stack([pool[torch.randperm(k + 4, device=dev, generator=g)[:k]] for _ in range(B)])
        out = torch.full((B, D), float("nan"), device=dev, dtype=dtype)
        got = md.moe_decode(x, ids, w, ex.w1, ex.w3, ex.w2, norm_weight=fn.weight, eps=fn.eps, residual=x, out=out)
        cid, w1c, w3c, w2c = _compact_experts(ids, ex.w1, ex.w3, ex.w2)
        ref32 = md.moe_decode_reference(x.float(), cid, w.float(), w1c, w3c, w2c, norm_weight=fn.weight.float(),
                                        eps=fn.eps, residual=x.float())
        ref16 = md.moe_decode_reference(x, ids, w, ex.w1, ex.w3, ex.w2, norm_weight=fn.weight, eps=fn.eps, residual=x)
        shared = B * k - len(set(ids.flatten().tolist()))
        report(f"moe_decode B={B} top-{k} ({shared} slots on shared experts) vs fp32, rel err", rel_norm(got, ref32),
               1e-2, f"  (vs the bf16 reference {rel_norm(got, ref16):.1e}, ref vs fp32 {rel_norm(ref16, ref32):.1e})")
        # router: norm + gate logits, then softmax top-k, vs the model's router on the same logits
        lg = fd.norm_linear(x, moe.router.gate.weight, norm_weight=fn.weight, eps=fn.eps)
        lg_ref = moe.router.gate(fn(x))
        wt, it = fd.router_topk(lg_ref, k, moe.router.norm_topk_prob)
        wr, ir = fd.router_topk_reference(lg_ref, k, moe.router.norm_topk_prob)
        pr = torch.softmax(lg_ref.float(), -1)
        same = bool(torch.equal(pr.gather(1, it.long()), pr.gather(1, ir.long())))  # ties: any order is top-k
        report(f"router: norm + gate logits B={B} vs fp32, rel err",
               rel_norm(lg, fd.rms_norm_reference(x.float(), fn.weight.float(), fn.eps) @ moe.router.gate.weight.float().T),
               1e-2)
        report(f"router_topk B={B}: top-{k} probabilities == torch.topk's (0 = yes) + weight rel err",
               (0.0 if same else 1.0) + rel_norm(wt, wr), 1e-2)
    # QK-norm + RoPE + cache writes (full heads 0 and 2, ring heads 1 and 3, a sink position) vs the torch chain
    B, L, W, S = 2, 64, 16, 4
    qkv = torch.randn(B, (Hq + 2 * Hkv) * hd, device=dev, generator=g).to(dtype)
    pos = torch.tensor([2, 45], device=dev)
    inv = one.rope_inv_freq
    from models.qwen3.rope import rope_cos_sin

    cos, sin = (t[:, 0] for t in rope_cos_sin(pos[:, None], inv, one.rope_mscale, dtype))
    nh = Hkv // 2
    full = torch.tensor([i // 2 if i % 2 == 0 else -1 for i in range(Hkv)], dtype=torch.int32, device=dev)
    ring = torch.tensor([i // 2 if i % 2 == 1 else -1 for i in range(Hkv)], dtype=torch.int32, device=dev)
    init = [torch.randn(B, max(nh, 1), n, hd, device=dev, generator=g).to(dtype) for n in (L, L, W, W, S, S)]
    names = ("k_cache", "v_cache", "ring_k", "ring_v", "sink_k", "sink_v")
    kw = dict(n_heads=Hq, n_kv_heads=Hkv, head_dim=hd, q_norm_weight=attn.q_norm.weight,
              k_norm_weight=attn.k_norm.weight, eps=attn.q_norm.eps, cos=cos, sin=sin, pos=pos, full_slot=full,
              ring_slot=ring, sinks=S, want_pre=True, want_kv=True)
    cg, cr = [t.clone() for t in init], [t.clone() for t in init]
    a = fd.qk_norm_rope(qkv, **kw, **dict(zip(names, cg)))
    b = fd.qk_norm_rope_reference(qkv, **kw, **dict(zip(names, cr)))
    err = max([rel_max(x_, y_) for x_, y_ in zip(a, b)] + [rel_max(x_, y_) for x_, y_ in zip(cg, cr)])
    report("qk_norm_rope (QK-norm + RoPE + full / ring / sink cache writes) vs the torch chain, rel max err", err, 2e-2)
    # CUDA graph of router + experts fed a new token vs eager (same kernels: exact)
    xb = torch.randn(1, D, device=dev, generator=g).to(dtype)

    def fused_moe():
        lg_ = fd.norm_linear(xb, moe.router.gate.weight, norm_weight=fn.weight, eps=fn.eps)
        w_, i_ = fd.router_topk(lg_, k, moe.router.norm_topk_prob)
        return md.moe_decode(xb, i_, w_, ex.w1, ex.w3, ex.w2, norm_weight=fn.weight, eps=fn.eps, residual=xb)

    gm = graph_of(fused_moe)
    new = torch.randn(1, D, device=dev, generator=g).to(dtype)
    xb.copy_(new)
    gm.replay()
    eager = fused_moe()
    report("CUDA graph of the fused router + MoE (new token) vs eager, rel max err", rel_max(gm.out, eager), 1e-6)
    # the fused MoE vs the model's router + experts on the same token (top-8 may flip on a rounding: info)
    ref_m = new + _moe_static(moe, fn(new))
    print(f"  info: fused router + MoE vs the modules' router + _moe_static on one token: rel err "
          f"{rel_norm(eager, ref_m):.2e} (a routing flip on bf16 rounding would show as ~1e-1)")

    # ---- timings (information): CUDA-graph replays, median
    def t_us(fn_):
        gr = graph_of(fn_)
        return triton.testing.do_bench(gr.replay, warmup=25, rep=100, return_mode="median") * 1e3

    es = torch.empty((), dtype=dtype).element_size()
    x1 = torch.randn(1, D, device=dev, generator=g).to(dtype)
    w1_, i1 = moe.router(fn(x1))[:2]
    i1 = i1.contiguous()
    H = ex.w1.shape[1]
    nbytes = md.moe_decode_bytes(1, k, D, H, es)
    print(f"  timings, one token (CUDA-graph replays; bytes = the fewest the op must move; at 3 TB/s "
          f"{nbytes / 3e12 * 1e6:.1f} us for the experts):")
    cfgs = [("default", md.DEFAULT_CONFIG), ("up BK 512", md.MoEDecodeConfig(block_k=512)),
            ("up BH 32 / 8 warps", md.MoEDecodeConfig(block_h=32, warps_up=8)),
            ("down BD 8", md.MoEDecodeConfig(block_d=8)), ("down BD 4", md.MoEDecodeConfig(block_d=4)),
            ("down tile 16K / 8 warps", md.MoEDecodeConfig(tile_down=16384, warps_down=8))]
    for name, cfg in cfgs:
        us = t_us(lambda cfg=cfg: md.moe_decode(x1, i1, w1_, ex.w1, ex.w3, ex.w2, norm_weight=fn.weight, eps=fn.eps,
                                                residual=x1, config=cfg))
        print(f"    moe_decode [{name}]: {us:.1f} us ({nbytes / us / 1e6:.2f} TB/s)", flush=True)
    xb.copy_(x1)
    us_old = t_us(lambda: x1 + _moe_static(moe, fn(x1)))
    us_new = t_us(fused_moe)
    print(f"    ffn_norm + router + experts + residual: modules (_moe_static, grouped mm) {us_old:.1f} us, "
          f"fused (4 launches) {us_new:.1f} us")
    hq = an(x1)
    qb = fd.gemv_bytes(1, wqkv.shape[0], D, es)
    us_nl = t_us(lambda: fd.norm_linear(x1, wqkv, norm_weight=an.weight, eps=an.eps))
    us_cb = t_us(lambda: F.linear(hq, wqkv))
    us_mod = t_us(lambda: (lambda h_: (attn.wq(h_), attn.wk(h_), attn.wv(h_)))(an(x1)))
    print(f"    QKV: fused norm_linear {us_nl:.1f} us ({qb / us_nl / 1e6:.2f} TB/s); cuBLAS F.linear on cat(wq,wk,wv) "
          f"without the norm {us_cb:.1f} us; modules (norm + 3 linears) {us_mod:.1f} us")
    for BN, BK in ((16, 512), (8, 1024), (4, 2048), (32, 256)):
        us = t_us(lambda BN=BN, BK=BK: fd.norm_linear(x1, wqkv, norm_weight=an.weight, eps=an.eps, tiles=(1, BN, BK)))
        print(f"    QKV norm_linear tiles BN {BN} BK {BK}: {us:.1f} us ({qb / us / 1e6:.2f} TB/s)")
    a1 = torch.randn(1, Hq * hd, device=dev, generator=g).to(dtype)
    ob = fd.gemv_bytes(1, D, Hq * hd, es)
    us_o = t_us(lambda: fd.norm_linear(a1, attn.wo.weight, residual=x1))
    us_oc = t_us(lambda: x1 + attn.wo(a1))
    print(f"    wo + residual: fused {us_o:.1f} us ({ob / us_o / 1e6:.2f} TB/s); modules {us_oc:.1f} us")


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
    e_mod = mk(cuda_graph=False, static_decode=True, fused_decode=False)  # the same step on the model's modules
    l_ref = e_ref.prefill(tokens, [T0], mode="chunked")  # the exact chunked path (auto is one-shot on CUDA)
    l_gr, _ = fast_prefill(e_gr, tokens, args)
    _copy_cache(e_gr, e_st)
    _copy_cache(e_gr, e_mod)
    print(f"  layer kinds: {layer_kinds(e_gr)}; graphs: {e_gr.graph_status}; decode layers: {e_gr.fused_status}")
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
    for e in (e_ref, e_gr, e_st, e_mod):
        e.track_density = True
    errs_ref, errs_st, errs_mod, agree = [], [], [], 0
    gr_logits = []
    for s in range(steps):
        t = tok_seq[s:s + 1]
        a, b, c, d = e_gr.decode_step(t), e_ref.decode_step(t), e_st.decode_step(t), e_mod.decode_step(t)
        gr_logits.append(a.clone())
        errs_ref.append(rel_max(a, b))
        errs_st.append(rel_max(a, c))
        errs_mod.append(rel_max(a, d))
        agree += int(a.argmax() == b.argmax())
    ng = len(e_gr._graphs.graphs) if e_gr._graphs is not None else 0
    dr, dg = e_ref.mean_density(), e_gr.mean_density()
    print(f"  decode path {e_gr.decode_path}, graphs captured: {ng}; greedy token agreement with the "
          f"reference: {agree}/{steps}; kept density graph {dg} vs reference {dr}")
    if dev.type == "cuda":
        ok = e_gr.decode_path == "graph" and ng == 2
        results.append((f"{tag}: decode ran as CUDA graphs (2 buckets)", ok))
        print(f"  {'PASS' if ok else 'FAIL'}  {tag}: decode ran as CUDA graphs over 2 buckets ({ng} captured)")
        ok = bool(e_gr.fused) and not e_mod.fused
        results.append((f"{tag}: decode layers ran the fused kernels", ok))
        print(f"  {'PASS' if ok else 'FAIL'}  {tag}: the graph step used the fused kernels ({e_gr.fused_status})")
    report(f"{tag}: graph decode vs the same step run eagerly (same cache), logits rel max err (worst step)",
           max(errs_st), 1e-2)
    if not moe:
        report(f"{tag}: bench prefill vs engine prefill, last-token logits rel max err", e_pf, 3e-2)
        report(f"{tag}: bench prefill vs engine prefill, cache contents rel max err", e_pc, 3e-2)
        report(f"{tag}: graph decode vs eager reference decode, logits rel max err (worst step)", max(errs_ref), 3e-2)
        if e_gr.fused:
            report(f"{tag}: graph decode (fused kernels) vs the static step on the model's modules, logits rel max "
                   f"err (worst step)", max(errs_mod), 3e-2)
        if dr is not None:
            report(f"{tag}: kept density graph vs reference, abs diff", abs(dg - dr), 2e-2)
    else:
        print(f"  info (MoE routing flips on bf16 rounding, so no tolerance): bench prefill vs engine prefill "
              f"logits {e_pf:.2e}, cache {e_pc:.2e}; graph decode vs reference decode {max(errs_ref):.2e}; vs the "
              f"modules' static step {max(errs_mod):.2e} (per step: {', '.join(f'{x:.1e}' for x in errs_mod)})")
    if indexer_opt(args, kind) is not None and any(p.retrieval for p in e_gr.cache.plans):
        ki16 = [None if t is None else t[:, :, :T0].clone() for t in e_gr.cache.ki]
        for e in (e_ref, e_st, e_mod):
            e.reset()
        _check_fp8(args, tag, dev, mk, tokens, tok_seq, T0, steps, ki16, gr_logits, dg, report, results, moe)
    for e in (e_ref, e_gr, e_st, e_mod):
        e.reset()


def _check_fp8(args, tag, dev, mk, tokens, tok_seq, T0, steps, ki16, gr_logits, dens16, report, results, moe):
    """--check --indexer-fp8: an engine with fp8 indexer keys, prefilled by the bench prefill, vs (a) the bf16
    engine's prefilled keys cast to fp8, (b) the eager reference path on the same fp8 keys (pure-torch selection
    on the upcast keys), and for information (c) the bf16 graph decode: greedy-token agreement, logits and kept
    density over the same teacher-forced steps."""
    e8 = mk(cuda_graph=True if dev.type == "cuda" else None, static_decode=True, indexer_cache_dtype=FP8)
    e8r = mk(cuda_graph=False, impl="torch", indexer_cache_dtype=FP8)
    fast_prefill(e8, tokens, args)
    _copy_cache(e8, e8r)
    n_bad = n_all = 0
    nan, dt_ok = False, True
    for a, b in zip(e8.cache.ki, ki16):
        if a is None:
            continue
        dt_ok = dt_ok and a.dtype == torch.float8_e4m3fn
        ref = indexer_store_cast(b, a.dtype).view(torch.uint8)
        got = a[:, :, :T0].view(torch.uint8)
        n_bad += int((got != ref).sum())
        n_all += got.numel()
        nan = nan or bool(a[:, :, :T0].float().isnan().any())
    ib = e8.cache.memory_report()["indexer_bytes_per_token"]
    t16 = next(t for t in ki16 if t is not None)
    print(f"  fp8 indexer keys: {e8.indexer_cache_dtype}, {ib} B/token ({str(t16.dtype).replace('torch.', '')}: "
          f"{ib * t16.element_size()}); prefilled keys differing "
          f"from the bf16 keys cast to fp8: {n_bad}/{n_all}; NaN: {nan}")
    report(f"{tag} fp8: prefilled fp8 indexer keys != bf16 keys cast to fp8 (fraction)",
           n_bad / max(n_all, 1), 1e-3)
    for name, ok in ((f"{tag} fp8: the indexer caches are float8_e4m3fn", dt_ok),
                     (f"{tag} fp8: no NaN in the fp8 indexer keys", not nan)):
        results.append((name, ok))
        print(f"  {'PASS' if ok else 'FAIL'}  {name}", flush=True)
    for e in (e8, e8r):
        e.track_density = True
    errs_ref, errs_16, agree_ref, agree_16 = [], [], 0, 0
    for s in range(steps):
        t = tok_seq[s:s + 1]
        a, b = e8.decode_step(t), e8r.decode_step(t)
        errs_ref.append(rel_max(a, b))
        errs_16.append(rel_max(a, gr_logits[s]))
        agree_ref += int(a.argmax() == b.argmax())
        agree_16 += int(a.argmax() == gr_logits[s].argmax())
    d8, d8r = e8.mean_density(), e8r.mean_density()
    ng = len(e8._graphs.graphs) if e8._graphs is not None else 0
    print(f"  fp8: decode path {e8.decode_path} ({ng} graphs); greedy token agreement fp8 graph vs bf16 graph "
          f"{agree_16}/{steps} (info), vs the fp8 eager reference {agree_ref}/{steps}; kept density fp8 {d8} vs "
          f"bf16 {dens16} (info) vs fp8 reference {d8r}; logits fp8 vs bf16 rel max err (worst step) "
          f"{max(errs_16):.2e} (info)")
    if dev.type == "cuda":
        ok = e8.decode_path == "graph" and ng == 2
        results.append((f"{tag} fp8: decode ran as CUDA graphs (2 buckets)", ok))
        print(f"  {'PASS' if ok else 'FAIL'}  {tag} fp8: decode ran as CUDA graphs over 2 buckets ({ng} captured)")
    if not moe:
        report(f"{tag} fp8: graph decode vs eager reference decode on the same fp8 keys, logits rel max err "
               f"(worst step)", max(errs_ref), 3e-2)
        if d8 is not None and d8r is not None:
            report(f"{tag} fp8: kept density graph vs reference, abs diff", abs(d8 - d8r), 2e-2)
    else:
        print(f"  info (MoE routing flips on bf16 rounding): fp8 graph vs fp8 eager reference logits "
              f"{max(errs_ref):.2e}")
    for e in (e8, e8r):
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
    ap.add_argument("--decode-only", action="store_true",
                    help="decode only (implies --fill random: no prefill, no activation measurement): the step time, "
                         "its attention / rest split and launch counts, fused kernels vs the model's modules")
    ap.add_argument("--fused", choices=["auto", "on", "off"], default="auto",
                    help="the engine's fused_decode (auto: the fused Triton kernels on CUDA)")
    ap.add_argument("--no-split", dest="split", action="store_false",
                    help="skip the attention / rest split and the modules comparison of the decode step")
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
    ap.add_argument("--indexer-fp8", action="store_true",
                    help="rtpurbo model: indexer keys cached in float8_e4m3fn (engine indexer_cache_dtype); with "
                         "--check: fp8 vs bf16 decode checks")
    ap.add_argument("--kernel-table", type=int, default=0,
                    help="print this many rows of a per-kernel CUDA-time table of one eager decode step")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    KERNEL_TABLE[0] = int(args.kernel_table)
    if args.decode_only:
        args.fill = "random"
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


def fallback_without_fused(args, err: Exception, res: dict):
    """The fused decode kernels raised: say so loudly (traceback, JSON meta, rows) and go on without them."""
    import traceback

    traceback.print_exc()
    msg = f"{type(err).__name__}: {err}"[:1000]
    print(f"  ERROR: the run with the fused decode kernels failed ({msg}); going on with --fused off",
          flush=True)
    res["meta"]["fused_error"] = msg
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return argparse.Namespace(**{**vars(args), "fused": "off"})


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
                     retrieval_prefill=args.retrieval_prefill,
                     indexer_cache_dtype=FP8 if args.indexer_fp8 else f"{str(dtype).replace('torch.', '')} (model)"),
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
        est = RoleKVCache.estimate(model, 1, max(args.seq_lens) + args.decode_margin,  # (rings need max_len)
                                   indexer_dtype=indexer_torch_dtype(args, kind))
        models_info[kind] = dict(weights_bytes=param_bytes(model), kv_bytes_per_token=est["bytes_per_token"],
                                 kv_fixed_bytes=est["fixed_bytes_per_sequence"])
        from models.inference.kv_cache import plan_layers

        kinds = [("dense" if not p.rtpurbo else f"rtp_{len(p.full_kv) if p.retrieval else 0}of{p.n_kv_heads}")
                 for p in plan_layers(model, max(args.seq_lens) + args.decode_margin)]
        ix = f", indexer keys {FP8} ({est['indexer_bytes_per_token']} B/token)" if indexer_opt(args, kind) else ""
        print(f"{kind}: {args.layers} layers ({kinds}), "
              f"{param_bytes(model) / GIB:.2f} GiB of weights{ix}; warm-up at T={warm_T}", flush=True)
        run_args = args
        try:
            run_one(model, kind, warm_T, args, dev, free0, {})
        except Exception as e:  # noqa: BLE001 - a fused-kernel failure must not cost the whole run
            if args.fused == "off":
                raise
            run_args = fallback_without_fused(args, e, res)
            run_one(model, kind, warm_T, run_args, dev, free0, {})
        for T in args.seq_lens:
            t0 = time.perf_counter()
            try:
                row = run_one(model, kind, T, run_args, dev, free0, act_acc)
            except Exception as e:  # noqa: BLE001
                if run_args.fused == "off":
                    raise
                run_args = fallback_without_fused(args, e, res)
                row = run_one(model, kind, T, run_args, dev, free0, act_acc)
            if run_args is not args:
                row["fused_error"] = res["meta"]["fused_error"]
            res["results"].append(row)
            pf = f"{row['prefill_ms']:.1f} ms" if "prefill_ms" in row else "no prefill"
            split = ""
            if "decode_attention_ms_per_layer" in row:
                split = (f" = attention {row['decode_attention_ms_per_layer'] * 1e3:.1f} + rest "
                         f"{row['decode_rest_ms_per_layer'] * 1e3:.1f}, {row['launches_per_layer']:.1f} launches/layer")
                if "decode_modules_ms_per_layer" in row:
                    split += (f"; modules {row['decode_modules_ms_per_layer'] * 1e3:.1f} us/layer (rest "
                              f"{row['decode_modules_rest_ms_per_layer'] * 1e3:.1f}, "
                              f"{row['launches_per_layer_modules']:.1f} launches/layer)")
            print(f"  {kind} T={T}: prefill {pf}, decode {row['decode_step_ms'] * 1e3:.1f} us/step "
                  f"({row['decode_ms_per_layer'] * 1e3:.1f} us/layer{split}), density {row.get('decode_density')}, "
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
    if args.split:
        res["notes"].append("decode split: the step and the step without attention (indexer, selection, attention "
                            "kernels skipped) as separate graphs; attention = step - rest")
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
