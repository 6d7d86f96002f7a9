"""One-shot (layer-at-once) prefill for InferenceEngine, its attention kernels, its memory estimate and the
choice between it and the engine's exact chunked prefill (models/inference/engine.py, docs/inference.md).

One-shot prefill: every layer runs over the whole prompt before the next one starts.
  * projections (attention_norm, wq / wk / wv, QK-norm, RoPE, the indexer's keys) in chunks of `proj_chunk`
    tokens, written into per-layer buffers [B, Hq, T, D] (queries) and [B, Hkv, T, D] (keys / values: the
    cache itself for dense layers, a temporary for RTPurbo layers);
  * attention per KV group over the whole prompt: dense causal for dense layers and retrieval heads (the
    paper's prefill), window + sinks for local heads. CUDA: `dense_causal` = SDPA with is_causal, backends
    tried in the order cuDNN, flash, memory-efficient, math (a refusal is logged once per shape kind and the
    working backend remembered); `local_window` = kernels.masks.local_attention (FlexAttention). CPU: plain
    SDPA, with the dense window + sinks mask for local heads (models.rtpurbo.attention.local_attention);
  * output projection + FFN / MoE in chunks of `ffn_chunk` tokens, the residual updated in place;
  * the engine's role-aware cache written exactly as the chunked path writes it: full KV heads and indexer
    keys at positions < T (fp8 indexer-key caches through the same saturating cast), sinks (positions < sinks)
    and the ring (the last `window` tokens of each sequence, slot = position % window) for local-only KV heads;
    a padded sequence of a batch writes only its own tokens into sinks and ring (padding never evicts).
Memory: the residual [B, T, dim] and the queries [B, Hq, T, D] are held per layer (plus [B, Hkv, T, D] K and V
in RTPurbo layers), i.e. O(T) activations, not O(chunk) as in the chunked path; `one_shot_activation_bytes`
estimates the peak, and the engine checks it against the free device memory before choosing the mode.
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MODES = ("auto", "chunked", "one_shot")
SDPA_ORDER = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
WORKSPACE_BYTES = 256 * 2**20  # one-shot estimate: kernel workspaces (cuDNN / FlexAttention), fragmentation
SAFETY = 1.10  # one-shot estimate: x 1.1 (calibration: docs/inference.md, "Prefill modes")


class PrefillMemoryError(RuntimeError):
    """The prompt does not fit: the one-shot prefill was required (or neither mode fits) and its estimated
    activation memory exceeds the free device memory."""


# ------------------------------------------------------------------------------------------- kernels
_SDPA_START: dict = {}  # shape kind -> index in SDPA_ORDER of the first backend that ran it


def _sdpa_key(q, k) -> tuple:
    return (str(q.device), q.dtype, q.shape[1], k.shape[1], q.shape[-1], q.is_contiguous(), k.is_contiguous())


def sdpa_backends() -> dict[str, str]:
    """The SDPA backend each kind of causal prefill call ran with so far (CUDA), for reports."""
    return {str(k): SDPA_ORDER[i] for k, i in _SDPA_START.items()}


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal (GQA) attention of q [B, Hq, T, D] over k / v [B, Hkv, T, D]. CUDA: SDPA restricted to one
    backend at a time, cuDNN first, then flash, memory-efficient, math; a refusal is logged (WARNING, with
    torch's reason) once per kind of call (device, dtype, heads, head_dim, contiguity), and later calls of that
    kind start at the backend that ran. CPU: plain SDPA."""
    gqa = q.shape[1] != k.shape[1]
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    key = _sdpa_key(q, k)
    start = _SDPA_START.get(key, 0)
    errors = []
    for i in range(start, len(SDPA_ORDER)):
        name = SDPA_ORDER[i]
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with sdpa_kernel([getattr(SDPBackend, name)]):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            why = "; ".join(str(w.message) for w in caught) or str(e)
            errors.append(f"{name}: {why}"[:400])
            nxt = SDPA_ORDER[i + 1] if i + 1 < len(SDPA_ORDER) else "nothing left"
            log.warning("prefill SDPA: %s refused the causal prefill (q %s, k %s, %s): %s; trying %s", name,
                        tuple(q.shape), tuple(k.shape), q.dtype, why[:300], nxt)
            continue
        if _SDPA_START.get(key) != i:
            _SDPA_START[key] = i
            log.info("prefill SDPA: causal prefill runs on %s (q %s, k %s, %s)", name, tuple(q.shape),
                     tuple(k.shape), q.dtype)
        return out
    raise RuntimeError(f"no SDPA backend ran the causal prefill (q {tuple(q.shape)}, k {tuple(k.shape)}, "
                       f"{q.dtype}): {errors}")


def local_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """Window + sinks attention (key n visible from query m iff n <= m and (m - n < window or n < sinks)), GQA.
    CUDA: kernels.masks.local_attention (FlexAttention); CPU: SDPA with the dense boolean mask."""
    if q.is_cuda:
        from kernels.masks import local_attention

        return local_attention(q, k, v, window=window, sinks=sinks)
    from models.rtpurbo.attention import local_attention

    return local_attention(q, k, v, window=window, sinks=sinks)


def _moe_prefill(moe, h: torch.Tensor) -> torch.Tensor:
    """MoE of h [B, C, dim] for the prefill: the engine's graph-safe `_moe_static` where it runs grouped matmuls
    (CUDA bf16 sm90+: deterministic, no host sync; what the benchmark measured), else the model's own MoE (one
    matmul per expert; `_moe_static`'s fallback gathers each token's expert weights, fine for decode only)."""
    from models.inference.engine import _moe_static
    from models.qwen3.moe import _can_grouped_mm

    if _can_grouped_mm(h):
        return _moe_static(moe, h.reshape(-1, h.shape[-1])).view_as(h)
    return moe(h)[0]


# ---------------------------------------------------------------------------------------- one layer
RetrievalFn = Callable[..., torch.Tensor]


def _write_local_cache(cache, li: int, p, k_all, v_all, lens: Sequence[int]) -> None:
    """Sinks (positions < sinks) and ring (the last W tokens, slot = position % W) of the local-only KV heads,
    from k_all / v_all [B, Hkv, T, D]; each sequence writes only its own lens[b] tokens."""
    B, _, T, _ = k_all.shape
    W = cache.ring_k[li].shape[2]
    dev = k_all.device
    groups = [(slice(None), T)] if all(n == T for n in lens) else [(slice(b, b + 1), lens[b]) for b in range(B)]
    for bs, n in groups:
        ns = min(p.sinks, n)
        lo = max(0, n - W)
        slots = torch.remainder(torch.arange(lo, n, device=dev), W)
        for j, kv in enumerate(p.ring_kv):
            if ns:
                cache.sink_k[li][bs, j, :ns] = k_all[bs, kv, :ns]
                cache.sink_v[li][bs, j, :ns] = v_all[bs, kv, :ns]
            cache.ring_k[li][bs, j, slots] = k_all[bs, kv, lo:n]
            cache.ring_v[li][bs, j, slots] = v_all[bs, kv, lo:n]


@torch.no_grad()
def prefill_layer(eng, li: int, x: torch.Tensor, lens: Sequence[int], *, proj_chunk: int, ffn_chunk: int,
                  retrieval_attention: RetrievalFn | None = None) -> None:
    """Layer li of the one-shot prefill over x [B, T, dim] (the residual stream, updated in place), writing the
    engine's cache (eng.cache, allocated for batch B). lens: each sequence's prompt length (<= T; positions
    past it are padding, whose cache entries are harmless except in sinks / ring, which they never touch).
    retrieval_attention(li, plan, q_r, k_g, v_g, qi, ki) -> out replaces the dense causal attention of the
    retrieval heads of one KV group (benchmarks: sparse prefill); q_r [B, h, T, D], k_g / v_g [B, 1, T, D], qi /
    ki [B, h, T, r] their indexer queries and keys (ki as cached: with an fp8 indexer cache the stored keys,
    upcast to the model dtype)."""
    cache = eng.cache
    layer = eng.layers[li]
    attn = layer.attention
    p = cache.plans[li]
    B, T, _ = x.shape
    Hq, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    G = Hq // Hkv
    dev, dt = x.device, x.dtype
    qo = torch.empty(B, Hq, T, D, device=dev, dtype=dt)  # queries, then (in place) attention outputs
    if not p.rtpurbo:  # dense layers: K/V straight into the cache
        k_all, v_all = cache.k[li][:, :, :T], cache.v[li][:, :, :T]
    else:
        k_all = torch.empty(B, Hkv, T, D, device=dev, dtype=dt)
        v_all = torch.empty_like(k_all)
    retr = list(p.retrieval)
    ki_all = cache.ki[li][:, :, :T] if retr else None  # (the cache's dtype: fp8 with indexer_cache_dtype)
    qi_all = None
    if retr and retrieval_attention is not None:
        qi_all = torch.empty(B, len(retr), T, p.indexer_dim, device=dev, dtype=dt)
    for c0 in range(0, T, proj_chunk):
        c1 = min(c0 + proj_chunk, T)
        h = layer.attention_norm(x[:, c0:c1])
        pos = torch.arange(c0, c1, device=dev).expand(B, c1 - c0)
        q, k, v, q_pre, k_pre = eng._qkv(attn, h, pos)
        qo[:, :, c0:c1], k_all[:, :, c0:c1], v_all[:, :, c0:c1] = q, k, v
        if retr:
            qi, ki = attn.inner_attention.indexer(q_pre, k_pre, positions=pos)
            cache.store_indexer_keys(li, (slice(None), slice(None), slice(c0, c1)), ki)  # fp8: saturating cast
            if qi_all is not None:
                qi_all[:, :, c0:c1] = qi
        del q, k, v, q_pre, k_pre, h
    if p.rtpurbo:  # cache: full KV heads, then sinks + ring of the local-only KV heads
        for j, kv in enumerate(p.full_kv):
            cache.k[li][:, j, :T] = k_all[:, kv]
            cache.v[li][:, j, :T] = v_all[:, kv]
        if p.ring_kv:
            _write_local_cache(cache, li, p, k_all, v_all, lens)
    rset = set(retr)
    for g in range(Hkv):  # attention per KV group, outputs written over the group's queries
        kg, vg = k_all[:, g:g + 1], v_all[:, g:g + 1]
        hs = list(range(g * G, (g + 1) * G))
        if not p.rtpurbo:
            qo[:, g * G:(g + 1) * G] = dense_causal(qo[:, g * G:(g + 1) * G], kg, vg)
            continue
        r_hs = [h for h in hs if h in rset]
        l_hs = [h for h in hs if h not in rset]
        if r_hs:
            qr = qo[:, r_hs]
            if retrieval_attention is not None:
                ridx = [retr.index(h) for h in r_hs]
                ki_r = ki_all[:, ridx]
                if ki_r.dtype != qi_all.dtype:  # fp8 cache: the hook gets the stored keys, upcast
                    ki_r = ki_r.to(qi_all.dtype)
                o = retrieval_attention(li, p, qr, kg, vg, qi_all[:, ridx], ki_r)
            else:
                o = dense_causal(qr, kg, vg)
            qo[:, r_hs] = o
            del qr, o
        if l_hs:
            if l_hs == hs:
                qo[:, g * G:(g + 1) * G] = local_window(qo[:, g * G:(g + 1) * G], kg, vg, p.window, p.sinks)
            else:
                qo[:, l_hs] = local_window(qo[:, l_hs], kg, vg, p.window, p.sinks)
    del k_all, v_all, qi_all
    for c0 in range(0, T, ffn_chunk):  # output projection + FFN / MoE, in chunks, residual in place
        c1 = min(c0 + ffn_chunk, T)
        a = qo[:, :, c0:c1].transpose(1, 2).reshape(B, c1 - c0, Hq * D)
        xc = x[:, c0:c1] + attn.wo(a)
        hf = layer.ffn_norm(xc)
        f = _moe_prefill(layer.moe, hf) if layer.moe_enabled else layer.feed_forward(hf)
        x[:, c0:c1] = xc + f
        del a, xc, hf, f
    del qo


@torch.no_grad()
def one_shot_prefill(eng, tokens: torch.Tensor, lens: Sequence[int], *, all_logits: bool = False,
                     proj_chunk: int, ffn_chunk: int, retrieval_attention: RetrievalFn | None = None,
                     on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
    """tokens [B, T] (T = max(lens), left-aligned) through every layer at once (prefill_layer), into
    eng.new_cache(B); sets eng.lens. Returns the last prompt token's logits [B, V] or, with all_logits, every
    position's [B, T, V] (the output head in chunks of ffn_chunk tokens). on_layer(li) is called before layer
    li and once more with li = n_layers after the last one (benchmarks: per-layer timing)."""
    model = eng.model
    B, T = tokens.shape
    lens = [int(n) for n in lens]
    if len(lens) != B or min(lens) < 1 or max(lens) > T or T > eng.max_len:
        raise ValueError(f"one_shot_prefill: tokens {tuple(tokens.shape)}, lens {lens}, max_len {eng.max_len}")
    eng.new_cache(B)
    x = model.tok_embeddings(tokens)
    for li in range(len(eng.layers)):
        if on_layer is not None:
            on_layer(li)
        prefill_layer(eng, li, x, lens, proj_chunk=proj_chunk, ffn_chunk=ffn_chunk,
                      retrieval_attention=retrieval_attention)
    if on_layer is not None:
        on_layer(len(eng.layers))
    eng.lens = list(lens)
    if all_logits:
        return torch.cat([model.output(model.norm(x[:, c0:c0 + ffn_chunk])) for c0 in range(0, T, ffn_chunk)], 1)
    idx = torch.tensor([n - 1 for n in lens], device=x.device)
    last = x[torch.arange(B, device=x.device), idx][:, None]
    return model.output(model.norm(last))[:, 0]


# -------------------------------------------------------------------------------------------- memory
def one_shot_activation_bytes(eng, B: int, T: int, *, all_logits: bool = False,
                              proj_chunk: int | None = None, ffn_chunk: int | None = None) -> int:
    """Estimated peak memory of one_shot_prefill beyond the weights and the KV cache, in bytes.
    Held over a layer: the residual [B, T, dim], the queries / outputs [B, Hq, T, D] and, in RTPurbo layers,
    K and V of every KV head [B, Hkv, T, D] each. On top, the largest of: one KV group's attention (its output
    [B, G, T, D], and a gathered copy of its queries in RTPurbo layers; on CPU also the [T, T] boolean mask),
    one projection chunk (norm, q / k / v, QK-norm, RoPE temporaries), one FFN chunk (attention output rows,
    wo, norm, and the MoE's routed copies and expert hiddens or the dense FFN's hidden). Plus the logits, then
    x SAFETY + WORKSPACE_BYTES. Calibrated on the peaks scripts/bench_inference.py measured at 1M tokens on
    the H100 (docs/benchmarks.md; tests/test_inference_prefill.py checks the estimate is 0-25% above them)."""
    a = eng.args
    proj_chunk = eng.proj_chunk if proj_chunk is None else proj_chunk
    ffn_chunk = eng.ffn_chunk if ffn_chunk is None else ffn_chunk
    elem = eng.model.tok_embeddings.weight.element_size()
    dim, Hq, Hkv, D, V = a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.vocab_size
    G = Hq // Hkv
    from models.inference.kv_cache import plan_layers

    plans = eng.cache.plans if eng.cache is not None else plan_layers(eng.model, eng.max_len)
    rtp = any(p.rtpurbo for p in plans)
    hold = B * T * (dim + Hq * D + (2 * Hkv * D if rtp else 0)) * elem
    # one KV group: its output, (RTPurbo) the gathered retrieval queries and the kernels' copies / GQA expansions;
    # group counts fitted to the measured peaks (docs/benchmarks.md: 15240 / 20577 B per token at 1M)
    attn = int(B * T * G * D * elem * (3 if rtp else 1.5)) + B * T * G * 4  # + logsumexp (fp32)
    if eng.device.type != "cuda":
        attn += T * T  # dense boolean masks (CPU path)
    cp = min(proj_chunk, T)
    r = max((len(p.retrieval) * p.indexer_dim for p in plans), default=0)
    proj = B * cp * (2 * dim + 5 * (Hq + 2 * Hkv) * D + 2 * r) * elem
    cf = min(ffn_chunk, T)
    N = B * cf
    ffn = N * (Hq * D + 4 * dim) * elem
    moe = [layer.moe for layer in eng.layers if layer.moe_enabled]
    if moe:
        m = moe[0]
        H = m.experts.w1.shape[1]
        ffn += N * (2 * m.num_experts * 4 + m.top_k * ((3 * dim + 3 * H) * elem + 3 * 8))
    if any(not layer.moe_enabled for layer in eng.layers):
        ffn = max(ffn, N * (Hq * D + 4 * dim + 3 * a.hidden_dim) * elem)
    logits = B * (T if all_logits else 1) * V * elem
    return int((hold + max(attn, proj, ffn) + logits) * SAFETY) + WORKSPACE_BYTES


def chunked_activation_bytes(eng, B: int, T: int, *, all_logits: bool = False) -> int:
    """A lower bound of the chunked prefill's peak beyond weights and cache: one chunk's activations and its
    boolean masks [heads, C, T] (the attention itself may need more: math SDPA materialises the scores)."""
    a = eng.args
    elem = eng.model.tok_embeddings.weight.element_size()
    C = min(eng.chunk_size, T)
    dim, Hq, Hkv, D, V = a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.vocab_size
    acts = B * C * (4 * dim + 4 * Hq * D + 6 * Hkv * D) * elem + C * T * Hq
    return int(acts + B * (T if all_logits else 1) * V * elem)


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device (what PyTorch's caching allocator holds unused counts as free); None
    elsewhere (no check on CPU)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _fmt(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def choose_mode(mode: str, *, B: int, lens: Sequence[int], device_type: str, need_one_shot: int,
                need_chunked: int, free: int | None, chunk_size: int = 0) -> tuple[str, str]:
    """(mode to run, why). mode: "auto" | "chunked" | "one_shot".
    auto = one_shot iff the model is on CUDA, the batch has one sequence or equal prompt lengths, the prompt is
    longer than one chunk (chunk_size; a prompt of one chunk is one pass either way, and the chunked pass needs
    no kernel compilation) and the one-shot estimate fits in the free memory; else chunked. Raises
    PrefillMemoryError when one_shot is required and does not fit, or (auto) when even the chunked lower bound
    does not fit."""
    if mode not in MODES:
        raise ValueError(f"prefill mode must be one of {MODES}, got {mode!r}")
    T = max(lens)
    need = f"~{_fmt(need_one_shot)} of one-shot activations"
    if mode == "chunked":
        return "chunked", "requested (mode='chunked')"
    if mode == "one_shot":
        if free is not None and need_one_shot > free:
            raise PrefillMemoryError(
                f"one-shot prefill of {B} x {T} tokens needs {need_one_shot} bytes ({need}) but only {free} "
                f"bytes ({_fmt(free)}) are free on {device_type} after the KV cache; use the chunked prefill "
                f"(mode='chunked', --prefill chunked), a shorter prompt or a smaller batch")
        return "one_shot", "requested (mode='one_shot')"
    if device_type != "cuda":
        return "chunked", (f"auto: the model is on {device_type}, not CUDA (the one-shot path's fast kernels "
                           f"are cuDNN / FlexAttention)")
    if B > 1 and len(set(lens)) > 1:
        return "chunked", f"auto: the {B} prompt lengths differ ({min(lens)}..{T})"
    if T <= chunk_size:
        return "chunked", f"auto: the prompt ({T} tokens) fits in one chunk of {chunk_size}"
    if free is not None and need_one_shot > free:
        if need_chunked > free:
            raise PrefillMemoryError(
                f"prefill of {B} x {T} tokens does not fit: one-shot needs {need_one_shot} bytes ({need}), "
                f"the chunked path at least {need_chunked} bytes ({_fmt(need_chunked)}), but only {free} bytes "
                f"({_fmt(free)}) are free after the KV cache; use a shorter prompt or a smaller batch")
        return "chunked", f"auto: {need} would not fit in the {_fmt(free)} free after the KV cache"
    fit = "" if free is None else f"; {need}, {_fmt(free)} free"
    return "one_shot", f"auto: CUDA, {'one sequence' if B == 1 else f'{B} prompts of equal length'}{fit}"
