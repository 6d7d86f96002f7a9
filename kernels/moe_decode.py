"""MoE experts for a decode step (a few tokens) in two Triton launches, reading each selected expert's
weights in place by expert index (no gather copy of the k experts' weights), with a pure-torch reference.

    moe_decode(x [N, D], topk_ids [N, k], topk_weights [N, k], w1 [E, H, D], w3 [E, H, D], w2 [E, D, H],
               *, norm_weight=None, eps=1e-6, residual=None) -> [N, D]
    out[t] = residual[t] + sum_j topk_weights[t, j] * w2[e] @ (silu(w1[e] @ xn[t]) * (w3[e] @ xn[t])),
    e = topk_ids[t, j], xn = RMSNorm(x) * norm_weight when norm_weight is given (HF-exact), else x.

Layouts are models/qwen3/moe.py's GroupedExperts (w1 / w3 [E, hidden, dim] = gate / up, w2 [E, dim, hidden]
= down); a dense SwiGLU FFN is the case E = 1, k = 1 (w1.weight[None], ...), which the engine uses too.

  _moe_up_kernel    grid (cdiv(H, BH), N*k): program (h-tile, slot p = t*k + j) reads w1[e] and w3[e] rows of
                    its tile straight from the expert tensors (e loaded from topk_ids[p]), forms
                    silu(gate) * up for token t and writes it to h [N*k, H] (model dtype; 12 KB at k 8, H 768).
                    With norm_weight each program normalises its token's row itself (a few KB from L2).
  _moe_down_kernel  grid (cdiv(D, BD), N): program (d-tile, token t) reads the BD rows of w2[e] of all k slots
                    as one [k, BD, BKH] tile per step over H, scales each slot by its routing weight and sums
                    the k slots in registers (deterministic: no atomics, no second reduction launch), then
                    adds the residual.

Numerics: fp32 accumulation; rounded to the model dtype where the torch chain rounds (each matmul output,
silu, the product, the weighted slot, the sum, the residual add), as in kernels/fused_decode.py.

Cost model at Qwen3-30B-A3B (D 2048, H 768, k 8, bf16), one token: 8 experts x 3 x 768 x 2048 x 2 B = 75.5 MB,
~25 us at 3 TB/s. With several tokens an expert chosen by more than one of them is read once per token
(from L2 after the first: the kernels do not group tokens by expert), so the bytes grow with N * k at most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.fused_decode import _pow2, _rnd, num_sms, rms_norm_reference, rnd_mode


@dataclass(frozen=True)
class MoEDecodeConfig:
    block_h: int = 16  # up kernel: hidden rows per program
    block_k: int = 256  # up kernel: dim chunk per step
    warps_up: int = 4
    # down kernel: output features per program (all k slots); 2 measured fastest on the H100 (45.4 vs 48.1 us
    # for 4, one token, two runs: docs/logs/inference_h100/check*.txt)
    block_d: int = 2
    tile_down: int = 8192  # down kernel: k x BD x BKH elements per step (BKH = tile / (k * BD), <= H)
    warps_down: int = 4


DEFAULT_CONFIG = MoEDecodeConfig()
INTERPRETER_CONFIG = MoEDecodeConfig(block_h=128, block_k=256, block_d=64, tile_down=1 << 16)


@triton.jit
def _moe_up_kernel(x_ptr, nw_ptr, ids_ptr, w1_ptr, w3_ptr, h_ptr, D, H, s_xm, s_1e, s_1h, s_3e, s_3h, s_hp, eps,
                   TOPK: tl.constexpr, HAS_NORM: tl.constexpr, RND: tl.constexpr, BH: tl.constexpr,
                   BK: tl.constexpr):
    pid_h = tl.program_id(0)
    p = tl.program_id(1)
    t = p // TOPK
    e = tl.load(ids_ptr + p).to(tl.int64)
    rh = pid_h * BH + tl.arange(0, BH)
    hm = rh < H
    rk0 = tl.arange(0, BK)
    xrow = x_ptr + t.to(tl.int64) * s_xm
    if HAS_NORM:
        ss = tl.zeros([BK], tl.float32)
        for k0 in range(0, D, BK):
            rk = k0 + rk0
            xv = tl.load(xrow + rk, mask=rk < D, other=0.0).to(tl.float32)
            ss += xv * xv
        rstd = 1.0 / tl.sqrt(tl.sum(ss, 0) / D + eps)
    w1b = w1_ptr + e * s_1e + rh.to(tl.int64)[:, None] * s_1h
    w3b = w3_ptr + e * s_3e + rh.to(tl.int64)[:, None] * s_3h
    a1 = tl.zeros([BH], tl.float32)
    a3 = tl.zeros([BH], tl.float32)
    for k0 in range(0, D, BK):
        rk = k0 + rk0
        km = rk < D
        xv = tl.load(xrow + rk, mask=km, other=0.0).to(tl.float32)
        if HAS_NORM:
            g = tl.load(nw_ptr + rk, mask=km, other=0.0).to(tl.float32)
            xv = _rnd(g * _rnd(xv * rstd, RND), RND)
        wm = hm[:, None] & km[None, :]
        g1 = tl.load(w1b + rk[None, :], mask=wm, other=0.0).to(tl.float32)
        u3 = tl.load(w3b + rk[None, :], mask=wm, other=0.0).to(tl.float32)
        a1 += tl.sum(g1 * xv[None, :], 1)
        a3 += tl.sum(u3 * xv[None, :], 1)
    a1 = _rnd(a1, RND)
    a3 = _rnd(a3, RND)
    hv = _rnd(_rnd(a1 / (1.0 + tl.exp(-a1)), RND) * a3, RND)
    tl.store(h_ptr + p.to(tl.int64) * s_hp + rh, hv.to(h_ptr.dtype.element_ty), mask=hm)


@triton.jit
def _moe_down_kernel(h_ptr, ids_ptr, wt_ptr, w2_ptr, r_ptr, o_ptr, D, H, s_hp, s_2e, s_2d, s_rm, s_om,
                     TOPK: tl.constexpr, K_PAD: tl.constexpr, HAS_RES: tl.constexpr, RND: tl.constexpr,
                     BD: tl.constexpr, BKH: tl.constexpr):
    pid_d = tl.program_id(0)
    t = tl.program_id(1)
    j = tl.arange(0, K_PAD)
    jm = j < TOPK
    p = t * TOPK + j
    e = tl.load(ids_ptr + p, mask=jm, other=0).to(tl.int64)
    wt = tl.load(wt_ptr + p, mask=jm, other=0.0).to(tl.float32)
    rd = pid_d * BD + tl.arange(0, BD)
    dm = rd < D
    wrow = w2_ptr + e[:, None] * s_2e + rd.to(tl.int64)[None, :] * s_2d  # [K_PAD, BD]
    hrow = h_ptr + p.to(tl.int64) * s_hp  # [K_PAD]
    rowm = jm[:, None] & dm[None, :]
    rk0 = tl.arange(0, BKH)
    acc = tl.zeros([K_PAD, BD], tl.float32)
    for k0 in range(0, H, BKH):
        rk = k0 + rk0
        km = rk < H
        hv = tl.load(hrow[:, None] + rk[None, :], mask=jm[:, None] & km[None, :], other=0.0).to(tl.float32)
        wv = tl.load(wrow[:, :, None] + rk[None, None, :], mask=rowm[:, :, None] & km[None, None, :],
                     other=0.0).to(tl.float32)
        acc += tl.sum(wv * hv[:, None, :], 2)
    y = _rnd(_rnd(acc, RND) * wt[:, None], RND)  # each slot's weighted output (masked slots: 0)
    out = _rnd(tl.sum(y, 0), RND)
    if HAS_RES:
        r = tl.load(r_ptr + t.to(tl.int64) * s_rm + rd, mask=dm, other=0.0).to(tl.float32)
        out = _rnd(r + out, RND)
    tl.store(o_ptr + t.to(tl.int64) * s_om + rd, out.to(o_ptr.dtype.element_ty), mask=dm)


def _check(x, topk_ids, topk_weights, w1, w3, w2, residual, out):
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"moe_decode: x must be [N, D] with unit last stride, got {tuple(x.shape)}")
    N, D = x.shape
    if w1.dim() != 3 or w1.shape[2] != D or w3.shape != w1.shape:
        raise ValueError(f"moe_decode: w1 / w3 must be [E, H, {D}], got {tuple(w1.shape)} / {tuple(w3.shape)}")
    E, H, _ = w1.shape
    if w2.shape != (E, D, H):
        raise ValueError(f"moe_decode: w2 must be [{E}, {D}, {H}], got {tuple(w2.shape)}")
    for w, n in ((w1, "w1"), (w3, "w3"), (w2, "w2")):
        if w.stride(2) != 1:
            raise ValueError(f"moe_decode: {n} must have unit last stride")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != N or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"moe_decode: topk_ids / topk_weights must be [{N}, k], got {tuple(topk_ids.shape)} / "
                         f"{tuple(topk_weights.shape)}")
    if not (topk_ids.is_contiguous() and topk_weights.is_contiguous()):
        raise ValueError("moe_decode: topk_ids / topk_weights must be contiguous")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"moe_decode: topk_ids must be int32 / int64, got {topk_ids.dtype}")
    if residual is not None and (residual.shape != (N, D) or residual.stride(1) != 1):
        raise ValueError(f"moe_decode: residual must be [{N}, {D}] with unit last stride")
    if out is not None and (out.shape != (N, D) or out.stride(1) != 1):
        raise ValueError(f"moe_decode: out must be [{N}, {D}] with unit last stride")
    return N, D, E, H, topk_ids.shape[1]


def moe_decode(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: torch.Tensor,
               w3: torch.Tensor, w2: torch.Tensor, *, norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
               residual: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
               config: Optional[MoEDecodeConfig] = None) -> torch.Tensor:
    """See the module doc. Expert ids must be in [0, E) (not checked on the device: no host sync)."""
    N, D, E, H, k = _check(x, topk_ids, topk_weights, w1, w3, w2, residual, out)
    cfg = config or DEFAULT_CONFIG
    dev, dt = x.device, x.dtype
    if out is None:
        out = torch.empty((N, D), dtype=dt, device=dev)
    if N == 0:
        return out
    h = torch.empty((N * k, H), dtype=dt, device=dev)
    rnd = rnd_mode(dt)
    if config is None and dev.type != "cuda":  # CPU interpreter: it pays per program, so a few large tiles
        cfg = INTERPRETER_CONFIG
    BH = min(cfg.block_h, _pow2(H))
    BK = min(cfg.block_k, _pow2(D))
    _moe_up_kernel[(triton.cdiv(H, BH), N * k)](
        x, norm_weight if norm_weight is not None else x, topk_ids, w1, w3, h, D, H, x.stride(0), w1.stride(0),
        w1.stride(1), w3.stride(0), w3.stride(1), h.stride(0), float(eps), TOPK=k,
        HAS_NORM=norm_weight is not None, RND=rnd, BH=BH, BK=BK, num_warps=cfg.warps_up)
    K_PAD = _pow2(k)
    BD = min(cfg.block_d, _pow2(D))
    while dev.type == "cuda" and BD > 1 and triton.cdiv(D, BD) * N < 2 * num_sms(dev):
        BD //= 2
    BKH = max(16, min(_pow2(H), cfg.tile_down // (K_PAD * BD)))
    _moe_down_kernel[(triton.cdiv(D, BD), N)](
        h, topk_ids, topk_weights, w2, residual if residual is not None else x, out, D, H, h.stride(0),
        w2.stride(0), w2.stride(1), residual.stride(0) if residual is not None else 0, out.stride(0), TOPK=k,
        K_PAD=K_PAD, HAS_RES=residual is not None, RND=rnd, BD=BD, BKH=BKH, num_warps=cfg.warps_down)
    return out


def moe_decode_reference(x, topk_ids, topk_weights, w1, w3, w2, *, norm_weight=None, eps=1e-6, residual=None,
                         out=None, config=None):
    """Same contract in pure torch: per (token, slot) a gather of its expert's weights and a bmm (the
    engine's graph-safe MoE off the grouped-matmul path runs exactly these ops)."""
    if norm_weight is not None:
        x = rms_norm_reference(x, norm_weight, eps)
    N, k = topk_ids.shape
    D = x.shape[1]
    flat_e = topk_ids.reshape(-1).long()
    xs = x.repeat_interleave(k, dim=0)[:, :, None]  # [N*k, D, 1]
    h = torch.nn.functional.silu(torch.bmm(w1[flat_e], xs)) * torch.bmm(w3[flat_e], xs)  # [N*k, H, 1]
    y = torch.bmm(w2[flat_e], h)[:, :, 0].view(N, k, D)
    y = (y * topk_weights[:, :, None]).sum(1)
    if residual is not None:
        y = residual + y
    if out is not None:
        out.copy_(y)
        return out
    return y


def moe_decode_bytes(N: int, k: int, D: int, H: int, esize: int, distinct_experts: Optional[int] = None) -> int:
    """Fewest bytes one call must move: the distinct selected experts' weights once, x, h and the output."""
    ne = distinct_experts if distinct_experts is not None else N * k
    return (ne * 3 * H * D + 2 * N * D + 2 * N * k * H) * esize


__all__ = ["MoEDecodeConfig", "DEFAULT_CONFIG", "moe_decode", "moe_decode_reference", "moe_decode_bytes"]
