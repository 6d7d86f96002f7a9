"""Fused decode-step kernels (Triton) for the non-attention part of a layer, with pure-torch references.

A decode step has 1..16 tokens (rows). Each fast function below is one Triton launch and has a
`*_reference` twin with the same signature, written with the model's own torch ops (tests and the GPU
self-check compare the two). Used by models/inference/engine.py (`fused_decode`), which runs them only on
CUDA (or under TRITON_INTERPRET=1 in the CPU tests).

  norm_linear   out = [residual +] [RMSNorm](x) @ W^T [+ bias]. RMSNorm (HF-exact: normalise in fp32, cast,
                then scale) is computed in the prologue of every program (x is a few rows: re-reading it
                is free); the residual add is the epilogue. The engine uses it for the fused QKV projection
                (attention_norm + one matmul over the concatenated wq/wk/wv), the output projection + residual,
                the router logits (ffn_norm + gate) and the output head (final norm + head).
  qk_norm_rope  per (head, token): QK-RMSNorm, rotate-half RoPE with the step's cos/sin, and the KV-cache
                writes at the token's position (full cache heads at `pos`, ring heads at `pos % W`, sinks
                while pos < sinks), from the fused projection's output row. It does not touch the RTPurbo
                indexer keys: the engine projects them from k_pre and writes them (with the saturating fp8
                cast when indexer_cache_dtype="float8_e4m3fn") in torch, after this kernel.
  router_topk   softmax over the router logits (fp32), top-k (ties: lower expert id first), optional
                renormalisation of the k weights.

Numerics: products are accumulated in fp32; every place where the torch module chain rounds to the model
dtype (a matmul output, a norm's cast, RoPE's products) is rounded the same way (round to nearest even,
done on the fp32 bits so that Triton's CPU interpreter, which truncates on a cast, rounds like the GPU).
So the kernels differ from the modules only by the fp32 summation order.

GEMV shape: programs own BN output features of BM (= next power of two of the rows, <= 16) rows and loop
over K in BK chunks; the product is a [BM, BN, BK] broadcast + sum (no tl.dot: the rows are too few, and
the CPU interpreter's bf16 tl.dot is wrong). BN shrinks until there are ~2 programs per SM.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.triton_decode import _num_sms as num_sms  # SM count per device (4 off CUDA), one cache

MAX_ROWS = 16  # tokens per decode step the GEMV kernels are written for (one row block of BM <= 16)
_TILE = 8192  # fp32 elements of a program's [BM, BN, BK] product tile
_TILE_INTERP = 1 << 16  # the same off CUDA (interpreter: fewer, larger programs)


# ------------------------------------------------------------------------------------------ helpers
@triton.jit
def _rnd(x, RND: tl.constexpr):
    """Round fp32 x to the model dtype and back (RND 1: bf16, 2: fp16, 0: fp32 = identity). bf16 is
    round-to-nearest-even on the bits (the interpreter truncates on .to(bf16); the GPU rounds: this agrees
    with both and with torch)."""
    y = x
    if RND == 1:
        b = x.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        b = (b >> 16) << 16
        y = b.to(tl.float32, bitcast=True)
    if RND == 2:
        y = x.to(tl.float16).to(tl.float32)
    return y


def rnd_mode(dtype: torch.dtype) -> int:
    if dtype == torch.bfloat16:
        return 1
    if dtype == torch.float16:
        return 2
    if dtype == torch.float32:
        return 0
    raise ValueError(f"fused decode kernels support float32 / bfloat16 / float16, not {dtype}")


def _interpreting() -> bool:
    return not isinstance(_norm_linear_kernel, triton.runtime.JITFunction)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _rows_ok(x: torch.Tensor, what: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{what}: x must be [rows, features], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"{what}: x must have unit stride in its last dim")


# -------------------------------------------------------------------------------------- norm_linear
@triton.jit
def _norm_linear_kernel(x_ptr, nw_ptr, w_ptr, b_ptr, r_ptr, o_ptr, M, N, K, s_xm, s_wn, s_rm, s_om, eps,
                        HAS_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                        RND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm = rm < M
    nm = rn < N
    rk0 = tl.arange(0, BK)
    xrow = x_ptr + rm.to(tl.int64)[:, None] * s_xm
    wrow = w_ptr + rn.to(tl.int64)[:, None] * s_wn
    if HAS_NORM:
        ss = tl.zeros([BM], tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + rk0
            xv = tl.load(xrow + rk[None, :], mask=mm[:, None] & (rk[None, :] < K), other=0.0).to(tl.float32)
            ss += tl.sum(xv * xv, 1)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + rk0
        km = rk < K
        xv = tl.load(xrow + rk[None, :], mask=mm[:, None] & km[None, :], other=0.0).to(tl.float32)
        if HAS_NORM:
            g = tl.load(nw_ptr + rk, mask=km, other=0.0).to(tl.float32)
            xv = _rnd(g[None, :] * _rnd(xv * rstd[:, None], RND), RND)
        wv = tl.load(wrow + rk[None, :], mask=nm[:, None] & km[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xv[:, None, :] * wv[None, :, :], 2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    out = _rnd(acc, RND)
    om = mm[:, None] & nm[None, :]
    if HAS_RES:
        r = tl.load(r_ptr + rm.to(tl.int64)[:, None] * s_rm + rn[None, :], mask=om, other=0.0).to(tl.float32)
        out = _rnd(r + out, RND)
    tl.store(o_ptr + rm.to(tl.int64)[:, None] * s_om + rn[None, :], out.to(o_ptr.dtype.element_ty), mask=om)


def linear_tiles(M: int, N: int, K: int, device: torch.device) -> tuple[int, int, int]:
    """(BM, BN, BK) of norm_linear: BM = rows rounded up to a power of two (<= 16); BN from 4 (one row) or 16
    down to 2 until there are >= 2 programs per SM; BK fills a tile of _TILE fp32 products (<= K rounded up).
    Off CUDA (Triton's CPU interpreter, which pays per program, not per element) a few large tiles."""
    BM = min(_pow2(M), MAX_ROWS)
    if device.type != "cuda":
        BN = min(_pow2(N), 256)
        return BM, BN, max(16, min(_pow2(K), _TILE_INTERP // (BM * BN)))
    # one row (one sequence): start at BN 4 -> BK 2048, the fastest tile measured for the fused QKV GEMV on the
    # H100 (16.5 us vs 20.0 us for BN 16 / BK 512; docs/logs/inference_h100/check*.txt, two runs); batches
    # keep the wider start (not measured)
    BN = 4 if BM == 1 else 16
    target = 2 * num_sms(device)
    while BN > 2 and triton.cdiv(N, BN) * triton.cdiv(M, BM) < target:
        BN //= 2
    BK = max(16, min(_pow2(K), _TILE // (BM * BN)))
    return BM, BN, BK


def norm_linear(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: Optional[torch.Tensor] = None,
                eps: float = 1e-6, bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None, tiles: Optional[tuple[int, int, int]] = None,
                num_warps: int = 4) -> torch.Tensor:
    """x [M, K], weight [N, K] (nn.Linear layout) -> [M, N] in x.dtype:
    residual + (RMSNorm(x) * norm_weight if norm_weight is given else x) @ weight^T + bias."""
    _rows_ok(x, "norm_linear")
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K or weight.stride(1) != 1:
        raise ValueError(f"norm_linear: weight must be [N, {K}] with unit last stride, got {tuple(weight.shape)}")
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if residual is not None and (residual.shape != (M, N) or residual.stride(1) != 1):
        raise ValueError(f"norm_linear: residual must be [{M}, {N}] with unit last stride")
    BM, BN, BK = tiles or linear_tiles(M, N, K, x.device)
    dummy = x
    grid = (triton.cdiv(N, BN), triton.cdiv(M, BM))
    _norm_linear_kernel[grid](
        x, norm_weight if norm_weight is not None else dummy, weight, bias if bias is not None else dummy,
        residual if residual is not None else dummy, out, M, N, K, x.stride(0), weight.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0), float(eps),
        HAS_NORM=norm_weight is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        RND=rnd_mode(x.dtype), BM=BM, BN=BN, BK=BK, num_warps=num_warps)
    return out


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """models.qwen3.model.RMSNorm.forward."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def norm_linear_reference(x, weight, *, norm_weight=None, eps=1e-6, bias=None, residual=None, out=None,
                          tiles=None, num_warps=4):
    h = rms_norm_reference(x, norm_weight, eps) if norm_weight is not None else x
    y = torch.nn.functional.linear(h, weight, bias)
    if residual is not None:
        y = residual + y
    if out is not None:
        out.copy_(y)
        return out
    return y


# ------------------------------------------------------------------------------------- qk_norm_rope
@triton.jit
def _qk_rope_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, qp_ptr, kp_ptr,
                    kc_ptr, vc_ptr, full_ptr, rk_ptr, rv_ptr, sk_ptr, sv_ptr, ring_ptr,
                    Hq, Hkv, D, s_qkv, s_cos, s_sin, eps, W, sinks,
                    s_kc_b, s_kc_h, s_kc_l, s_vc_b, s_vc_h, s_vc_l,
                    s_rk_b, s_rk_h, s_rk_l, s_rv_b, s_rv_h, s_rv_l,
                    s_sk_b, s_sk_h, s_sk_l, s_sv_b, s_sv_h, s_sv_l,
                    HAS_QK_NORM: tl.constexpr, WRITE_PRE: tl.constexpr, WRITE_KV: tl.constexpr,
                    HAS_FULL: tl.constexpr, HAS_RING: tl.constexpr, RND: tl.constexpr, HB: tl.constexpr,
                    D_PAD: tl.constexpr):
    """Program (head block, token): HB heads of the Hq query heads followed by the Hkv key heads."""
    b = tl.program_id(1)
    b64 = b.to(tl.int64)
    j = tl.program_id(0) * HB + tl.arange(0, HB)  # [HB] head index: < Hq query, else key head j - Hq
    d = tl.arange(0, D_PAD)
    dm = d < D
    half = D // 2
    dr = tl.where(d < half, d + half, d - half)  # rotate-half partner
    jm = j < Hq + Hkv
    isq = j < Hq
    isk = jm & (j >= Hq)
    m2 = jm[:, None] & dm[None, :]
    row = qkv_ptr + b64 * s_qkv + j[:, None] * D
    x = tl.load(row + d[None, :], mask=m2, other=0.0).to(tl.float32)
    xr = tl.load(row + dr[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_QK_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)  # [HB]
        gq = tl.load(qw_ptr + d, mask=dm, other=0.0).to(tl.float32)
        gk = tl.load(kw_ptr + d, mask=dm, other=0.0).to(tl.float32)
        gqr = tl.load(qw_ptr + dr, mask=dm, other=0.0).to(tl.float32)
        gkr = tl.load(kw_ptr + dr, mask=dm, other=0.0).to(tl.float32)
        g = tl.where(isq[:, None], gq[None, :], gk[None, :])
        gr = tl.where(isq[:, None], gqr[None, :], gkr[None, :])
        x = _rnd(g * _rnd(x * rstd[:, None], RND), RND)
        xr = _rnd(gr * _rnd(xr * rstd[:, None], RND), RND)
    c = tl.load(cos_ptr + b64 * s_cos + d, mask=dm, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + b64 * s_sin + d, mask=dm, other=0.0).to(tl.float32)
    rot = tl.where((d < half)[None, :], -xr, xr)
    y = _rnd(_rnd(x * c[None, :], RND) + _rnd(rot * s[None, :], RND), RND)
    qm = isq[:, None] & dm[None, :]
    km = isk[:, None] & dm[None, :]
    qo = (b64 * Hq + j[:, None]) * D + d[None, :]
    h = tl.where(isk, j - Hq, 0)  # key head (0 on query rows: masked off)
    ko = (b64 * Hkv + h[:, None]) * D + d[None, :]
    tl.store(q_ptr + qo, y.to(q_ptr.dtype.element_ty), mask=qm)
    if WRITE_PRE:
        tl.store(qp_ptr + qo, x.to(qp_ptr.dtype.element_ty), mask=qm)
        tl.store(kp_ptr + ko, x.to(kp_ptr.dtype.element_ty), mask=km)
    vv = tl.load(row + Hkv * D + d[None, :], mask=km, other=0.0)  # v head h sits Hkv heads after key head h
    if WRITE_KV:
        tl.store(k_ptr + ko, y.to(k_ptr.dtype.element_ty), mask=km)
        tl.store(v_ptr + ko, vv.to(v_ptr.dtype.element_ty), mask=km)
    p = tl.load(pos_ptr + b).to(tl.int64)
    if HAS_FULL:
        fs = tl.load(full_ptr + h, mask=isk, other=-1)  # cache head of key head h, -1: not kept in full
        fm = km & (fs >= 0)[:, None]
        fh = tl.maximum(fs, 0).to(tl.int64)[:, None]
        tl.store(kc_ptr + b64 * s_kc_b + fh * s_kc_h + p * s_kc_l + d[None, :], y.to(kc_ptr.dtype.element_ty),
                 mask=fm)
        tl.store(vc_ptr + b64 * s_vc_b + fh * s_vc_h + p * s_vc_l + d[None, :], vv.to(vc_ptr.dtype.element_ty),
                 mask=fm)
    if HAS_RING:
        rs = tl.load(ring_ptr + h, mask=isk, other=-1)  # ring head of key head h, -1: none
        rmask = km & (rs >= 0)[:, None]
        rh = tl.maximum(rs, 0).to(tl.int64)[:, None]
        slot = p % W
        tl.store(rk_ptr + b64 * s_rk_b + rh * s_rk_h + slot * s_rk_l + d[None, :], y.to(rk_ptr.dtype.element_ty),
                 mask=rmask)
        tl.store(rv_ptr + b64 * s_rv_b + rh * s_rv_h + slot * s_rv_l + d[None, :],
                 vv.to(rv_ptr.dtype.element_ty), mask=rmask)
        smask = rmask & ((d * 0 + p) < sinks)[None, :]  # (a vector: the interpreter mistypes scalar & tensor)
        ps = tl.minimum(p, sinks)  # masked off when p >= sinks; keeps the address in range
        tl.store(sk_ptr + b64 * s_sk_b + rh * s_sk_h + ps * s_sk_l + d[None, :], y.to(sk_ptr.dtype.element_ty),
                 mask=smask)
        tl.store(sv_ptr + b64 * s_sv_b + rh * s_sv_h + ps * s_sv_l + d[None, :],
                 vv.to(sv_ptr.dtype.element_ty), mask=smask)


def _check_cache(t: Optional[torch.Tensor], name: str, B: int, D: int) -> None:
    if t is None:
        return
    if t.dim() != 4 or t.shape[0] != B or t.shape[3] != D or t.stride(3) != 1:
        raise ValueError(f"qk_norm_rope: {name} must be [B={B}, H, L, D={D}] with unit last stride, "
                         f"got {tuple(t.shape)}")


def qk_norm_rope(qkv: torch.Tensor, *, n_heads: int, n_kv_heads: int, head_dim: int,
                 q_norm_weight: Optional[torch.Tensor], k_norm_weight: Optional[torch.Tensor], eps: float,
                 cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                 k_cache: Optional[torch.Tensor] = None, v_cache: Optional[torch.Tensor] = None,
                 full_slot: Optional[torch.Tensor] = None,
                 ring_k: Optional[torch.Tensor] = None, ring_v: Optional[torch.Tensor] = None,
                 sink_k: Optional[torch.Tensor] = None, sink_v: Optional[torch.Tensor] = None,
                 ring_slot: Optional[torch.Tensor] = None, sinks: int = 0,
                 want_pre: bool = False, want_kv: bool = False, heads_per_program: Optional[int] = None):
    """qkv [B, (Hq + 2 Hkv) * D] (q heads, then k heads, then v heads: the fused projection's row) ->
    (q [B, Hq, D] after QK-norm + RoPE, k, v [B, Hkv, D] (want_kv, else None), q_pre [B, Hq, D],
    k_pre [B, Hkv, D] (QK-normed, before RoPE; want_pre, else None)).
    cos / sin [B, D]: the step's rope_cos_sin rows; pos [B]: the new token's position.
    Cache writes (each optional): KV head h with full_slot[h] >= 0 goes to k/v_cache[b, full_slot[h], pos[b]];
    with ring_slot[h] >= 0 to ring_k/v[b, ring_slot[h], pos[b] % W] and, while pos[b] < sinks, to
    sink_k/v[b, ring_slot[h], pos[b]]. full_slot / ring_slot: int32 [Hkv] device tensors.
    heads_per_program: a power of two (default: 1 on CUDA, all heads off CUDA)."""
    _rows_ok(qkv, "qk_norm_rope")
    B = qkv.shape[0]
    Hq, Hkv, D = int(n_heads), int(n_kv_heads), int(head_dim)
    if qkv.shape[1] != (Hq + 2 * Hkv) * D:
        raise ValueError(f"qk_norm_rope: qkv has {qkv.shape[1]} features, expected {(Hq + 2 * Hkv) * D}")
    if D % 2:
        raise ValueError("qk_norm_rope: head_dim must be even (rotate-half RoPE)")
    if cos.shape != (B, D) or sin.shape != (B, D) or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError(f"qk_norm_rope: cos / sin must be [{B}, {D}] with unit last stride")
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("qk_norm_rope: q_norm_weight and k_norm_weight go together")
    has_full = k_cache is not None
    has_ring = ring_k is not None
    if has_full and (v_cache is None or full_slot is None):
        raise ValueError("qk_norm_rope: k_cache needs v_cache and full_slot")
    if has_ring and (ring_v is None or ring_slot is None or sink_k is None or sink_v is None):
        raise ValueError("qk_norm_rope: ring_k needs ring_v, sink_k, sink_v and ring_slot")
    if has_ring and sinks > sink_k.shape[2]:
        raise ValueError(f"qk_norm_rope: sinks {sinks} > sink slots {sink_k.shape[2]}")
    for t, n in ((k_cache, "k_cache"), (v_cache, "v_cache"), (ring_k, "ring_k"), (ring_v, "ring_v"),
                 (sink_k, "sink_k"), (sink_v, "sink_v")):
        _check_cache(t, n, B, D)
    dev, dt = qkv.device, qkv.dtype
    q = torch.empty((B, Hq, D), dtype=dt, device=dev)
    k = torch.empty((B, Hkv, D), dtype=dt, device=dev) if want_kv else None
    v = torch.empty((B, Hkv, D), dtype=dt, device=dev) if want_kv else None
    qp = torch.empty((B, Hq, D), dtype=dt, device=dev) if want_pre else None
    kp = torch.empty((B, Hkv, D), dtype=dt, device=dev) if want_pre else None
    dmy = q

    def st(t):
        return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)

    has_norm = q_norm_weight is not None
    W = ring_k.shape[2] if has_ring else 1
    # CUDA: one program per head (latency: 40 tiny programs beat one that walks 40 heads); interpreter: one
    # program per token (it pays per program)
    HB = heads_per_program or (1 if qkv.device.type == "cuda" else _pow2(Hq + Hkv))
    if HB & (HB - 1):
        raise ValueError(f"qk_norm_rope: heads_per_program must be a power of two, got {HB}")
    _qk_rope_kernel[(triton.cdiv(Hq + Hkv, HB), B)](
        qkv, q_norm_weight if has_norm else dmy, k_norm_weight if has_norm else dmy, cos, sin, pos, q,
        k if want_kv else dmy, v if want_kv else dmy, qp if want_pre else dmy, kp if want_pre else dmy,
        k_cache if has_full else dmy, v_cache if has_full else dmy, full_slot if has_full else pos,
        ring_k if has_ring else dmy, ring_v if has_ring else dmy, sink_k if has_ring else dmy,
        sink_v if has_ring else dmy, ring_slot if has_ring else pos,
        Hq, Hkv, D, qkv.stride(0), cos.stride(0), sin.stride(0), float(eps), int(W), int(sinks),
        *st(k_cache), *st(v_cache), *st(ring_k), *st(ring_v), *st(sink_k), *st(sink_v),
        HAS_QK_NORM=has_norm, WRITE_PRE=bool(want_pre), WRITE_KV=bool(want_kv), HAS_FULL=has_full,
        HAS_RING=has_ring, RND=rnd_mode(dt), HB=HB, D_PAD=_pow2(D), num_warps=1 if HB * D <= 256 else 4)
    return q, k, v, qp, kp


def qk_norm_rope_reference(qkv, *, n_heads, n_kv_heads, head_dim, q_norm_weight, k_norm_weight, eps, cos, sin,
                           pos, k_cache=None, v_cache=None, full_slot=None, ring_k=None, ring_v=None, sink_k=None,
                           sink_v=None, ring_slot=None, sinks=0, want_pre=False, want_kv=False,
                           heads_per_program=None):
    """The engine's torch chain (view, q_norm / k_norm, apply_rope, index writes) with the same contract."""
    from models.qwen3.rope import apply_rope

    B = qkv.shape[0]
    Hq, Hkv, D = n_heads, n_kv_heads, head_dim
    q = qkv[:, : Hq * D].view(B, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hkv) * D].view(B, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].reshape(B, Hkv, D)
    if q_norm_weight is not None:
        q, k = rms_norm_reference(q, q_norm_weight, eps), rms_norm_reference(k, k_norm_weight, eps)
    c, s = cos[:, None], sin[:, None]  # [B, 1, D] = rope_cos_sin's [B, T=1, D]
    qr = apply_rope(q[:, :, None], c, s)[:, :, 0]
    kr = apply_rope(k[:, :, None], c, s)[:, :, 0]
    ar = torch.arange(B, device=qkv.device)
    if k_cache is not None:
        for h, slot in enumerate(full_slot.tolist()):
            if slot >= 0:
                k_cache[ar, slot, pos] = kr[:, h]
                v_cache[ar, slot, pos] = v[:, h]
    if ring_k is not None:
        W = ring_k.shape[2]
        for h, slot in enumerate(ring_slot.tolist()):
            if slot >= 0:
                ring_k[ar, slot, pos % W] = kr[:, h]
                ring_v[ar, slot, pos % W] = v[:, h]
                for b in range(B):
                    p = int(pos[b])
                    if p < sinks:
                        sink_k[b, slot, p] = kr[b, h]
                        sink_v[b, slot, p] = v[b, h]
    return (qr, kr.contiguous() if want_kv else None, v.contiguous() if want_kv else None,
            q.contiguous() if want_pre else None, k.contiguous() if want_pre else None)


# -------------------------------------------------------------------------------------- router_topk
@triton.jit
def _router_topk_kernel(l_ptr, w_ptr, id_ptr, E, s_l, TOPK: tl.constexpr, K_PAD: tl.constexpr,
                        E_PAD: tl.constexpr, NORM: tl.constexpr, RND: tl.constexpr):
    t = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    em = e < E
    lg = tl.load(l_ptr + t.to(tl.int64) * s_l + e, mask=em, other=float("-inf")).to(tl.float32)
    mx = tl.max(lg, 0)
    p = tl.where(em, tl.exp(lg - mx), 0.0)
    p = p / tl.sum(p, 0)
    work = tl.where(em, p, -1.0)  # probabilities are >= 0: -1 is below every one of them
    kk = tl.arange(0, K_PAD)
    wv = tl.zeros([K_PAD], tl.float32)
    iv = tl.zeros([K_PAD], tl.int32)
    for i in tl.static_range(TOPK):
        m = tl.max(work, 0)
        idx = tl.min(tl.where(work == m, e, E_PAD), 0)  # ties: the lower expert id
        wv = tl.where(kk == i, m, wv)
        iv = tl.where(kk == i, idx, iv)
        work = tl.where(e == idx, -1.0, work)
    if NORM:
        wv = wv / tl.sum(wv, 0)
    km = kk < TOPK
    tl.store(w_ptr + t * TOPK + kk, _rnd(wv, RND).to(w_ptr.dtype.element_ty), mask=km)
    tl.store(id_ptr + t * TOPK + kk, iv, mask=km)


def router_topk(logits: torch.Tensor, top_k: int, norm_topk_prob: bool, *, dtype: Optional[torch.dtype] = None):
    """logits [N, E] -> (weights [N, k] in `dtype` (default logits.dtype), expert ids [N, k] int32), as
    models.qwen3.moe.Router after its gate: softmax in fp32, top-k (descending), optional renormalisation."""
    _rows_ok(logits, "router_topk")
    N, E = logits.shape
    k = int(top_k)
    if not 1 <= k <= E:
        raise ValueError(f"router_topk: top_k {k} not in [1, {E}]")
    dt = dtype or logits.dtype
    w = torch.empty((N, k), dtype=dt, device=logits.device)
    ids = torch.empty((N, k), dtype=torch.int32, device=logits.device)
    _router_topk_kernel[(N,)](logits, w, ids, E, logits.stride(0), TOPK=k, K_PAD=_pow2(k), E_PAD=_pow2(E),
                              NORM=bool(norm_topk_prob), RND=rnd_mode(dt), num_warps=1 if E <= 256 else 4)
    return w, ids


def router_topk_reference(logits, top_k, norm_topk_prob, *, dtype=None):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, ids = torch.topk(probs, int(top_k), dim=-1)
    if norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return w.to(dtype or logits.dtype), ids.to(torch.int32)


def gemv_bytes(M: int, N: int, K: int, esize: int) -> int:
    """Bytes a [M, K] x [N, K]^T product must move at least (weights once, x once, output once)."""
    return (N * K + M * K + M * N) * esize


__all__ = ["norm_linear", "norm_linear_reference", "qk_norm_rope", "qk_norm_rope_reference", "router_topk",
           "router_topk_reference", "rms_norm_reference", "linear_tiles", "rnd_mode", "num_sms", "gemv_bytes",
           "MAX_ROWS"]
