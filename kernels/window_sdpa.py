"""Window (+ sink) attention of local heads, forward only, through square causal SDPA kernels.

Why: on the H100 cuDNN's causal SDPA is the fastest dense attention kernel we have (~614 TF/s
at 32K, bf16, D 128), FlexAttention with the window BlockMask reaches ~441 TF/s (70%) with the
best kernel_options (docs/kernels.md). A window band is expressible with plain causal squares,
so the band can run on cuDNN's kernel, merged exactly by log-sum-exp.

Mask (kernels/masks.py, no documents): key n is visible from query m iff
n <= m and (m - n < window or n < sinks).

Decomposition. C = window; the sequence is cut into n = ceil(T / C) chunks of C tokens (the
tail zero-padded to n * C; padded queries are dropped, padded keys lie after every real query).
Query m = j*C + a (chunk j, offset a) sees the window keys [m - C + 1, m], which are
  * "diagonal": keys j*C + b of its own chunk with b <= a: a plain causal square. All chunks in
    one call, chunks folded into the batch dimension: [B * n, H, C, D].
  * "previous chunk" (j >= 1): keys (j-1)*C + b with b >= a + 1 (strict upper triangle of the
    square). Reversing both orders, a' = C - 2 - a (a in [0, C-2]) and c = C - 1 - b (b in
    [1, C-1]), turns b >= a + 1 into c <= a': an inclusive causal square over
    flip(Q_j[0 : C-1]) and flip(K_{j-1}[1 : C]), padded by one dummy row at the end of both
    (the dummy query Q_j[C-1] sees every key of the flipped chunk and is dropped; the dummy key
    K_{j-1}[0] sits last, so only the dummy query sees it). As index maps: queries
    Q_j[[C-2, ..., 0, C-1]] (an involution, also used to read the result back), keys
    K_{j-1}[[C-1, ..., 0]] = flip(K_{j-1}). Query a = C - 1 gets nothing from chunk j-1
    (its window starts at j*C). One call over j = 1 .. n-1: [B * (n-1), H, C, D].
  * "sinks": keys n < sinks with n <= m - C (only those outside the window, so a sink inside
    the window is never counted twice), a [.., T, sinks] score matrix computed directly.
  merge: out = sum_i exp(lse_i - M) o_i / sum_i exp(lse_i - M) in fp32 (M = max lse_i); the
  diagonal always holds the query itself, so the denominator is >= 1 term.
T <= window is one causal call (no padding); window = 1 has no previous-chunk term.
The computed pairs equal the band's pairs when C divides T (plus one dummy row per chunk);
a tail chunk costs up to one padded chunk of extra work.

The causal-with-LSE primitive is injectable (`backend`):
  "cudnn": torch.ops.aten._scaled_dot_product_cudnn_attention(..., compute_log_sumexp=True,
           is_causal=True)
  "flash": torch.ops.aten._scaled_dot_product_flash_attention(..., is_causal=True)
  callable(q, k, v, scale) -> (out [N, Hq, L, D], lse [N, Hq, L] natural log, fp32/fp64), causal
           top-left, q [N, Hq, L, D], k/v [N, Hkv, L, D] (Hq % Hkv == 0, GQA as in masks.py);
           `causal_attention_with_lse_reference` is one (the CPU tests use it).
The aten ops' LSE layout, base and GQA support are not documented contracts, so each string
backend is probed once per (device, dtype, head_dim) on tiny inputs against fp32 math
(`backend_info`): LSE shape [N,H,L] / [N,H,L,1] / [N,L,H] / padded, natural or base-2, native
GQA or K/V expanded per group, strided (chunk-folded) inputs or .contiguous(); then a tiny
end-to-end window attention against the masked reference. Anything that fails makes the
backend unavailable: `window_attention_sdpa` raises WindowSDPAUnavailable with the reason and
kernels/masks.local_attention logs it once and runs FlexAttention.

Memory: query heads are processed in calls of whole KV groups (or parts of one group), sized so
a call's q is at most MAX_CALL_ELEMENTS elements (heads_per_call overrides); a call holds the
diagonal and previous-chunk outputs (2 x its q), the flipped q copy (freed before the merge) and
flipped K/V of its KV heads; the result is written into one preallocated output. The merge (+
sinks) is one Triton kernel on CUDA (reads o_diag, o_prev at the flipped row, q for the sinks;
writes the output rows in place), a slab-wise torch merge elsewhere (MERGE_SLAB_ELEMENTS).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # the merge kernel; CPU-only installs without triton use the torch merge
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = tl = None
    _HAVE_TRITON = False

__all__ = [
    "WindowSDPAUnavailable",
    "BackendInfo",
    "window_attention_sdpa",
    "causal_attention_with_lse_reference",
    "window_sdpa_unavailable_reason",
    "backend_info",
    "plan_head_calls",
    "BACKENDS",
]

log = logging.getLogger(__name__)

BACKENDS = ("cudnn", "flash")
_OPS = {"cudnn": "_scaled_dot_product_cudnn_attention", "flash": "_scaled_dot_product_flash_attention"}
# Largest q slice (elements) per group of SDPA calls when heads_per_call is None: 2^28 = 512 MiB of
# bf16 (at T = 1M, D = 128: 2 query heads per call; at 32K: every head in one call).
MAX_CALL_ELEMENTS = 2**28
# torch merge: fp32 temporaries per slab of chunks (elements of one [B, chunks, H, C, D] tensor).
MERGE_SLAB_ELEMENTS = 2**25
# merge implementation: "auto" = Triton on CUDA (torch if triton is missing, logged), torch elsewhere
MERGE_IMPL = "auto"
_MERGE_BLOCK_M = 32
_MERGE_WARPS = 4


class WindowSDPAUnavailable(RuntimeError):
    """The requested SDPA backend cannot run (or gave wrong results) for these inputs."""


# ------------------------------------------------------------------------------ reference


def causal_attention_with_lse_reference(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Causal (top-left, Lq == Lk) attention with its log-sum-exp, pure torch (L x L scores).

    q [N, Hq, L, D], k/v [N, Hkv, L, D], query head h reads kv head h // (Hq // Hkv).
    Math in float64 for float64 inputs, float32 otherwise. Returns (out in q.dtype,
    lse [N, Hq, L] natural log of sum_n exp(scale * q.k_n) over visible n, compute dtype)."""
    N, Hq, L, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"q heads {Hq} must be a multiple of k heads {Hkv}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    G = Hq // Hkv
    kf = k.to(cdt).repeat_interleave(G, dim=1)
    vf = v.to(cdt).repeat_interleave(G, dim=1)
    s = torch.einsum("nhld,nhmd->nhlm", q.to(cdt), kf) * scale
    hidden = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
    s = s.masked_fill(hidden, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.einsum("nhlm,nhmd->nhld", p, vf).to(q.dtype), lse


# ------------------------------------------------------------------------ argument checks


def _check_inputs(q, k, v, window, sinks) -> tuple[int, int, int, int, int]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, T, D]; got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    B, Hq, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Hkv, T={T}, D={D}]; got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}; got {tuple(v.shape)}")
    Hkv = k.shape[1]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if T < 1:
        raise ValueError(f"q must have at least one token (T = {T})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 (a query always sees itself); got {window!r}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0; got {sinks!r}")
    return B, Hq, Hkv, T, D


def plan_head_calls(Hq: int, Hkv: int, heads_per_call: int | None, per_head_elements: int) -> list[tuple[int, int, int, int]]:
    """Head ranges processed together: [(h0, h1, kv0, kv1)], query heads [h0, h1) reading kv
    heads [kv0, kv1). heads_per_call >= Hq // Hkv: whole KV groups (rounded down); smaller: parts
    of one group. None: as many heads as keep the call's q under MAX_CALL_ELEMENTS."""
    G = Hq // Hkv
    if heads_per_call is None:
        heads_per_call = max(1, MAX_CALL_ELEMENTS // max(1, per_head_elements))
    if isinstance(heads_per_call, bool) or not isinstance(heads_per_call, int) or heads_per_call < 1:
        raise ValueError(f"heads_per_call must be None or an int >= 1; got {heads_per_call!r}")
    calls = []
    if heads_per_call >= G:
        gpc = heads_per_call // G
        for g0 in range(0, Hkv, gpc):
            g1 = min(g0 + gpc, Hkv)
            calls.append((g0 * G, g1 * G, g0, g1))
    else:
        for g in range(Hkv):
            for h0 in range(g * G, (g + 1) * G, heads_per_call):
                calls.append((h0, min(h0 + heads_per_call, (g + 1) * G), g, g + 1))
    return calls


# ------------------------------------------------------------------- aten backends + probe


@dataclass
class BackendInfo:
    """What the first-use probe found out about an aten SDPA op (per device, dtype, head_dim)."""

    backend: str
    ok: bool = False
    reason: str | None = None
    gqa_native: bool = False  # the op accepted Hq != Hkv and gave right results
    contiguous_inputs: bool = False  # strided (chunk-folded) inputs gave wrong results or errors
    lse_layout: str = ""  # "NHL", "NHL1", "NLH", "NLH1", "NHLpad" (raw output -> [N, H, L])
    lse_scale: float = 1.0  # natural-log lse = raw * lse_scale (1: natural, ln 2: base 2)
    raw_lse_shape: tuple = ()
    raw_lse_dtype: str = ""
    attempts: list = field(default_factory=list)  # what was tried, with errors
    end_to_end_rel_err: float | None = None
    merge: str = ""


_PROBES: dict[tuple, BackendInfo] = {}
_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        log.warning(msg)


def _raw_op(backend: str, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    op = getattr(torch.ops.aten, _OPS[backend])
    if backend == "cudnn":
        res = op(q, k, v, attn_bias=None, compute_log_sumexp=True, dropout_p=0.0, is_causal=True,
                 return_debug_mask=False, scale=scale)
    else:
        res = op(q, k, v, dropout_p=0.0, is_causal=True, return_debug_mask=False, scale=scale)
    return res[0], res[1]


def _lse_view(raw: Tensor, layout: str, N: int, H: int, L: int) -> Tensor:
    if layout == "NHL":
        return raw
    if layout == "NHL1":
        return raw[..., 0]
    if layout == "NLH":
        return raw.transpose(1, 2)
    if layout == "NLH1":
        return raw[..., 0].transpose(1, 2)
    if layout == "NHLpad":
        return raw[..., :L]
    raise AssertionError(layout)


def _lse_layout_candidates(raw: Tensor, N: int, H: int, L: int) -> list[str]:
    s = tuple(raw.shape)
    out = []
    if s == (N, H, L):
        out.append("NHL")
    if s == (N, H, L, 1):
        out.append("NHL1")
    if s == (N, L, H):
        out.append("NLH")
    if s == (N, L, H, 1):
        out.append("NLH1")
    if raw.dim() == 3 and s[:2] == (N, H) and s[2] > L:
        out.append("NHLpad")
    return out


def _fold(x: Tensor, n: int, C: int) -> Tensor:
    """[B, H, n*C, D] -> [B*n, H, C, D] (chunks into the batch dim; a view when B == 1)."""
    B, H, _, D = x.shape
    return x.unflatten(2, (n, C)).transpose(1, 2).reshape(B * n, H, C, D)


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.float(), b.float()
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    return err if err == err else float("inf")


_PROBE_TOL = 2e-2  # bf16/fp16 inputs vs fp32 math on the same (rounded) values
_PROBE_LSE_TOL = 5e-2


def _make_op_fn(backend: str, info: BackendInfo) -> Callable:
    def fn(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        N, H, L, _ = q.shape
        if not info.gqa_native and k.shape[1] != H:
            G = H // k.shape[1]
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        if info.contiguous_inputs:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, raw = _raw_op(backend, q, k, v, scale)
        lse = _lse_view(raw, info.lse_layout, N, H, L)
        if info.lse_scale != 1.0:
            lse = lse * info.lse_scale
        return o, lse

    return fn


def _probe(backend: str, device: torch.device, dtype: torch.dtype, D: int) -> BackendInfo:
    info = BackendInfo(backend=backend)
    if not hasattr(torch.ops.aten, _OPS[backend]):
        info.reason = f"torch {torch.__version__} has no torch.ops.aten.{_OPS[backend]}"
        return info
    g = torch.Generator(device=device).manual_seed(1234)
    N, Hq, Hkv, L = 2, 4, 2, 200
    scale = 0.7 / math.sqrt(D)

    def rnd(h):  # [1, h, N*L, D] folded into [N, h, L, D]: the strides the chunked calls use
        return _fold(torch.randn(1, h, N * L, D, device=device, generator=g).to(dtype), N, L)

    q, k, v = rnd(Hq), rnd(Hkv), rnd(Hkv)
    ref_o, ref_lse = causal_attention_with_lse_reference(q.float(), k.float(), v.float(), scale)
    found = False
    for gqa in (True, False):
        for contig in (False, True):
            kk, vv = (k, v) if gqa else (k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1))
            qq = q
            if contig:
                qq, kk, vv = q.contiguous(), kk.contiguous(), vv.contiguous()
            tag = f"gqa={'native' if gqa else 'expanded'} inputs={'contiguous' if contig else 'strided'}"
            try:
                o, raw = _raw_op(backend, qq, kk, vv, scale)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as exc:  # refused shape / layout / dtype: try the next form
                info.attempts.append(f"{tag}: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            info.raw_lse_shape, info.raw_lse_dtype = tuple(raw.shape), str(raw.dtype)
            err_o = _rel(o, ref_o)
            if tuple(o.shape) != (N, Hq, L, D) or not err_o <= _PROBE_TOL:
                info.attempts.append(f"{tag}: output shape {tuple(o.shape)} rel err {err_o:.2e}")
                continue
            match = None
            for layout in _lse_layout_candidates(raw, N, Hq, L):
                lse = _lse_view(raw, layout, N, Hq, L).float()
                for sc in (1.0, math.log(2.0)):
                    err = float((lse * sc - ref_lse).abs().max())
                    if err <= _PROBE_LSE_TOL:
                        match = (layout, sc, err)
                        break
                if match:
                    break
            if match is None:
                info.attempts.append(f"{tag}: output ok (rel err {err_o:.2e}) but lse of shape {tuple(raw.shape)} "
                                     f"matches no known layout/base of the fp32 reference")
                continue
            info.gqa_native, info.contiguous_inputs = gqa, contig
            info.lse_layout, info.lse_scale = match[0], match[1]
            info.attempts.append(f"{tag}: ok (out rel err {err_o:.2e}, lse layout {match[0]}, "
                                 f"{'natural' if match[1] == 1.0 else 'base-2'} log, max abs err {match[2]:.2e})")
            found = True
            break
        if found:
            break
    if not found:
        info.reason = (f"aten.{_OPS[backend]} failed the first-use probe on {device} {dtype} D={D}: "
                       + " | ".join(info.attempts))
        return info
    # end to end: tiny window attention (3.6 chunks, sinks) vs the masked fp32 reference
    try:
        from kernels.masks import local_attention_reference

        T, W, S = 3 * 64 + 37, 64, 3
        qt = torch.randn(1, Hq, T, D, device=device, generator=g).to(dtype)
        kt = torch.randn(1, Hkv, T, D, device=device, generator=g).to(dtype)
        vt = torch.randn(1, Hkv, T, D, device=device, generator=g).to(dtype)
        merge = _resolve_merge(MERGE_IMPL, qt)
        info.merge = merge
        out = _window_attention(qt, kt, vt, W, S, scale, _make_op_fn(backend, info), None, merge)
        ref = local_attention_reference(qt.float(), kt.float(), vt.float(), window=W, sinks=S, scale=scale)
        info.end_to_end_rel_err = _rel(out, ref)
        if not info.end_to_end_rel_err <= _PROBE_TOL:
            info.reason = (f"window attention through aten.{_OPS[backend]} (merge {merge}) differs from the "
                           f"reference: rel err {info.end_to_end_rel_err:.2e} on {device} {dtype} D={D}")
            return info
    except Exception as exc:
        info.reason = f"window attention through aten.{_OPS[backend]} crashed in the probe: {type(exc).__name__}: {str(exc)[:300]}"
        return info
    info.ok = True
    log.info("window_sdpa: %s probe on %s %s D=%d: %s; end-to-end rel err %.2e", backend, device, dtype, D,
             info.attempts[-1], info.end_to_end_rel_err)
    return info


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def backend_info(backend: str, device, dtype: torch.dtype, head_dim: int) -> BackendInfo:
    """The (cached) first-use probe of an aten backend on this device/dtype/head_dim."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or a callable; got {backend!r}")
    device = torch.device(device)
    key = (backend, _device_key(device), dtype, int(head_dim))
    info = _PROBES.get(key)
    if info is None:
        try:
            info = _probe(backend, device, dtype, int(head_dim))
        except Exception as exc:  # e.g. CUDA errors inside the probe itself
            info = BackendInfo(backend=backend, reason=f"probe of {backend} crashed: {type(exc).__name__}: {str(exc)[:300]}")
        _PROBES[key] = info
    return info


def window_sdpa_unavailable_reason(q: Tensor, k: Tensor | None = None, v: Tensor | None = None, *,
                                   backend: str | Callable = "cudnn") -> str | None:
    """None when window_attention_sdpa can run these inputs with `backend`, else why not (one
    line). A string backend needs CUDA, bf16/fp16 and an op that passes the first-use probe."""
    if callable(backend):
        return None
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or a callable; got {backend!r}")
    if q.device.type != "cuda":
        return f"q is on {q.device.type}; the {backend} backend needs CUDA tensors"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"q has dtype {q.dtype}; the {backend} backend runs bf16/fp16 only"
    info = backend_info(backend, q.device, q.dtype, q.shape[-1])
    return None if info.ok else info.reason


def _resolve_backend(backend, q: Tensor) -> Callable:
    if callable(backend):
        return backend
    reason = window_sdpa_unavailable_reason(q, backend=backend)
    if reason is not None:
        raise WindowSDPAUnavailable(reason)
    return _make_op_fn(backend, backend_info(backend, q.device, q.dtype, q.shape[-1]))


def _resolve_merge(merge: str, q: Tensor) -> str:
    if merge not in ("auto", "torch", "triton"):
        raise ValueError(f"merge must be 'auto', 'torch' or 'triton'; got {merge!r}")
    if merge == "auto":
        if q.device.type != "cuda":
            return "torch"
        if not _HAVE_TRITON:
            _warn_once("window_sdpa: triton is not importable; merging with torch ops (slower)")
            return "torch"
        return "triton"
    if merge == "triton" and not _HAVE_TRITON:
        raise WindowSDPAUnavailable("merge='triton' but triton cannot be imported")
    return merge


# ---------------------------------------------------------------------------- main entry


def window_attention_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    sinks: int,
    scale: float | None = None,
    backend: str | Callable = "cudnn",
    heads_per_call: int | None = None,
    merge: str | None = None,
) -> Tensor:
    """Window + sink attention (no documents), forward only, from causal SDPA calls + LSE merge.

    q [B, Hq, T, D], k/v [B, Hkv, T, D] (GQA: query head h reads kv head h // (Hq // Hkv)).
    Key n is visible from query m iff n <= m and (m - n < window or n < sinks).
    backend: "cudnn", "flash" (aten ops, probed at first use; WindowSDPAUnavailable if they
    cannot run) or a callable(q, k, v, scale) -> (out, lse) as described in the module doc.
    heads_per_call: query heads per group of calls (None: sized by MAX_CALL_ELEMENTS).
    merge: "auto" (MERGE_IMPL: Triton on CUDA), "triton" or "torch". Returns [B, Hq, T, D] in q's
    dtype. Gradients are not supported (the aten calls are not differentiable here)."""
    B, Hq, Hkv, T, D = _check_inputs(q, k, v, window, sinks)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ValueError("window_attention_sdpa is forward-only: q/k/v require grad (use torch.no_grad() "
                         "or kernels.masks.local_attention, which runs FlexAttention then)")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    attn = _resolve_backend(backend, q)
    merge_impl = _resolve_merge(MERGE_IMPL if merge is None else merge, q)
    with torch.no_grad():
        return _window_attention(q, k, v, window, sinks, scale, attn, heads_per_call, merge_impl)


def _window_attention(q, k, v, window, sinks, scale, attn, heads_per_call, merge_impl) -> Tensor:
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    C = window
    n = -(-T // C) if T > C else 1
    Tp = n * C if n > 1 else T
    out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    for h0, h1, g0, g1 in plan_head_calls(Hq, Hkv, heads_per_call, B * Tp * D):
        qc, kc, vc, oc = q[:, h0:h1], k[:, g0:g1], v[:, g0:g1], out[:, h0:h1]
        if n == 1:  # T <= window: plain causal
            o, _ = _call(attn, qc, kc, vc, scale)
            oc.copy_(o)
            continue
        _window_call(qc, kc, vc, oc, C, n, sinks, scale, attn, merge_impl)
    return out


def _call(attn: Callable, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """attn(q, k, v, scale) with its result checked; lse [N, H, L, 1] is accepted as [N, H, L]."""
    o, lse = attn(q, k, v, scale)
    N, H, L, D = q.shape
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse[..., 0]
    if tuple(o.shape) != (N, H, L, D):
        raise RuntimeError(f"attention backend returned out {tuple(o.shape)} for q {tuple(q.shape)}")
    if tuple(lse.shape) != (N, H, L):
        raise RuntimeError(f"attention backend returned lse {tuple(lse.shape)}; expected {(N, H, L)} (or {(N, H, L, 1)})")
    if not lse.is_floating_point():
        raise RuntimeError(f"attention backend returned lse of dtype {lse.dtype}")
    return o, lse


_INDEX_CACHE: dict[tuple, Tensor] = {}


def _prev_query_index(C: int, device) -> Tensor:
    """[C-2, C-3, ..., 0, C-1]: the flipped query order of the previous-chunk call (an involution:
    row a' of that call is query a = idx[a'], and query a's row is idx[a])."""
    key = (C, str(device))
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        idx = torch.cat([torch.arange(C - 2, -1, -1), torch.tensor([C - 1])]).to(device)
        if len(_INDEX_CACHE) > 16:
            _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = idx
    return idx


def _window_call(qc, kc, vc, oc, C, n, sinks, scale, attn, merge_impl) -> None:
    B, Hc, T, D = qc.shape
    Tp = n * C
    if Tp != T:  # zero tail: padded keys follow every real query, padded queries are dropped
        pad = (0, 0, 0, Tp - T)
        qp, kp, vp = F.pad(qc, pad), F.pad(kc, pad), F.pad(vc, pad)
    else:
        qp, kp, vp = qc, kc, vc
    Qf, Kf, Vf = _fold(qp, n, C), _fold(kp, n, C), _fold(vp, n, C)
    o_d, lse_d = _call(attn, Qf, Kf, Vf, scale)
    o_p = lse_p = None
    if C > 1:
        idx = _prev_query_index(C, qc.device)
        Qp = Qf.unflatten(0, (B, n))[:, 1:].index_select(3, idx).flatten(0, 1)
        Kp = Kf.unflatten(0, (B, n))[:, :-1].flip(3).flatten(0, 1)
        Vp = Vf.unflatten(0, (B, n))[:, :-1].flip(3).flatten(0, 1)
        o_p, lse_p = _call(attn, Qp, Kp, Vp, scale)
        del Qp, Kp, Vp
    del Qf, Kf, Vf
    S = min(sinks, T)
    ks = kc[:, :, :S] if S > 0 else None
    vs = vc[:, :, :S] if S > 0 else None
    if merge_impl == "triton":
        _merge_triton(oc, qc, o_d, lse_d, o_p, lse_p, ks, vs, C=C, n=n, scale=scale)
    else:
        _merge_torch(oc, qp, o_d, lse_d, o_p, lse_p, ks, vs, C=C, n=n, scale=scale)


# ----------------------------------------------------------------------------- merge: torch


def _sink_term(qr: Tensor, ks: Tensor, vs: Tensor, m0: int, C: int, scale: float, cdt) -> tuple[Tensor, Tensor]:
    """Sink keys n < S with n <= m - C for the query rows m = m0 .. m0 + R - 1 of qr [B, Hc, R, D].
    Returns (o [B, Hc, R, D], lse [B, Hc, R]) in cdt (lse -inf where no sink is visible)."""
    B, Hc, R, D = qr.shape
    Hk, S = ks.shape[1], ks.shape[2]
    qg = qr.to(cdt).unflatten(1, (Hk, Hc // Hk))
    s = torch.einsum("bkgrd,bksd->bkgrs", qg, ks.to(cdt)) * scale
    m = torch.arange(m0, m0 + R, device=qr.device)
    vis = torch.arange(S, device=qr.device)[None, :] <= (m[:, None] - C)
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    o = torch.einsum("bkgrs,bksd->bkgrd", p, vs.to(cdt))
    return o.flatten(1, 2), lse.flatten(1, 2)


def _merge_torch(oc, qp, o_d, lse_d, o_p, lse_p, ks, vs, *, C, n, scale) -> None:
    """out rows = LSE merge of diagonal, previous-chunk and sink terms, slab by slab of chunks.
    qp: the call's q padded to n*C rows (for the sink scores)."""
    B, Hc, T, D = oc.shape
    cdt = torch.promote_types(lse_d.dtype, torch.float32)
    od5, ld5 = o_d.unflatten(0, (B, n)), lse_d.unflatten(0, (B, n))
    oc[:, :, :C] = od5[:, 0]  # chunk 0: the diagonal is its whole window, no sink outside it
    idx = _prev_query_index(C, oc.device) if o_p is not None else None
    js = max(1, MERGE_SLAB_ELEMENTS // max(1, B * Hc * C * D))
    for j0 in range(1, n, js):
        j1 = min(n, j0 + js)
        nj = j1 - j0
        terms = [(od5[:, j0:j1].to(cdt), ld5[:, j0:j1].to(cdt))]
        if o_p is not None:
            op = o_p.unflatten(0, (B, n - 1))[:, j0 - 1:j1 - 1].index_select(3, idx).to(cdt)
            lp = lse_p.unflatten(0, (B, n - 1))[:, j0 - 1:j1 - 1].index_select(3, idx).to(cdt)
            lp[..., C - 1] = float("-inf")  # the dummy row: query C-1 sees nothing of chunk j-1
            terms.append((op, lp))
        if ks is not None:
            o_s, l_s = _sink_term(qp[:, :, j0 * C:j1 * C], ks, vs, j0 * C, C, scale, cdt)
            terms.append((o_s.unflatten(2, (nj, C)).transpose(1, 2), l_s.unflatten(2, (nj, C)).transpose(1, 2)))
        M = terms[0][1]
        for _, l_ in terms[1:]:
            M = torch.maximum(M, l_)
        num = den = None
        for o_, l_ in terms:
            w = torch.exp(l_ - M)
            num = w[..., None] * o_ if num is None else num + w[..., None] * o_
            den = w if den is None else den + w
        res = (num / den[..., None]).to(oc.dtype)  # [B, nj, Hc, C, D]
        r0, r1 = j0 * C, min(j1 * C, T)
        oc[:, :, r0:r1] = res.transpose(1, 2).reshape(B, Hc, nj * C, D)[:, :, :r1 - r0]


# ---------------------------------------------------------------------------- merge: Triton

if _HAVE_TRITON:

    @triton.jit
    def _window_merge_kernel(
        out_ptr, q_ptr, od_ptr, ld_ptr, op_ptr, lp_ptr, ks_ptr, vs_ptr,
        T, C, n, H, G, S, scale,
        so_b, so_h, so_t, so_d,
        sq_b, sq_h, sq_t, sq_d,
        sod_n, sod_h, sod_t, sod_d,
        sld_n, sld_h, sld_t,
        sop_n, sop_h, sop_t, sop_d,
        slp_n, slp_h, slp_t,
        sk_b, sk_h, sk_t, sk_d,
        sv_b, sv_h, sv_t, sv_d,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_PREV: tl.constexpr, HAS_SINKS: tl.constexpr,
    ):
        """One program: BLOCK_M query rows of one (batch, head). Row m = j*C + a reads the diagonal
        result (chunk b*n + j, row a), the previous-chunk result (chunk b*(n-1) + j-1, flipped row
        C-2-a; none for j = 0 or a = C-1), computes the sink term from q (keys i < S with
        i <= m - C), merges by LSE in fp32 and writes the output row."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)
        h = (pid_bh % H).to(tl.int64)
        m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        row_ok = m < T
        dmask = d < D
        mask2 = row_ok[:, None] & dmask[None, :]
        j = m // C
        a = m - j * C
        nd = b * n + j
        od = tl.load(od_ptr + nd[:, None] * sod_n + h * sod_h + a[:, None] * sod_t + d[None, :] * sod_d,
                     mask=mask2, other=0.0).to(tl.float32)
        ld = tl.load(ld_ptr + nd * sld_n + h * sld_h + a * sld_t, mask=row_ok, other=0.0).to(tl.float32)
        mx = ld
        if HAS_PREV:
            has_p = row_ok & (j >= 1) & (a <= C - 2)
            npv = b * (n - 1) + j - 1
            ap = C - 2 - a
            op = tl.load(op_ptr + npv[:, None] * sop_n + h * sop_h + ap[:, None] * sop_t + d[None, :] * sop_d,
                         mask=has_p[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            lp = tl.load(lp_ptr + npv * slp_n + h * slp_h + ap * slp_t, mask=has_p, other=0.0).to(tl.float32)
            lp = tl.where(has_p, lp, float("-inf"))
            mx = tl.maximum(mx, lp)
        if HAS_SINKS:
            qrow = tl.load(q_ptr + b * sq_b + h * sq_h + m[:, None] * sq_t + d[None, :] * sq_d,
                           mask=mask2, other=0.0).to(tl.float32)
            kvh = h // G
            ms = tl.full([BLOCK_M], float("-inf"), tl.float32)
            ls = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for i in range(0, S):
                kr = tl.load(ks_ptr + b * sk_b + kvh * sk_h + i * sk_t + d * sk_d, mask=dmask, other=0.0).to(tl.float32)
                vr = tl.load(vs_ptr + b * sv_b + kvh * sv_h + i * sv_t + d * sv_d, mask=dmask, other=0.0).to(tl.float32)
                s = tl.sum(qrow * kr[None, :], axis=1) * scale
                s = tl.where(row_ok & (m - C - i >= 0), s, float("-inf"))
                m_new = tl.maximum(ms, s)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(ms - m_safe)
                p = tl.exp(s - m_safe)
                ls = ls * alpha + p
                acc = acc * alpha[:, None] + p[:, None] * vr[None, :]
                ms = m_new
            mx = tl.maximum(mx, ms)
        wd = tl.exp(ld - mx)
        num = wd[:, None] * od
        den = wd
        if HAS_PREV:
            wp = tl.exp(lp - mx)
            num += wp[:, None] * op
            den += wp
        if HAS_SINKS:
            ws = tl.exp(ms - mx)  # ms - mx: the sink sum is acc * exp(ms), its lse ms + log(ls)
            num += ws[:, None] * acc
            den += ws * ls
        res = num / den[:, None]
        tl.store(out_ptr + b * so_b + h * so_h + m[:, None] * so_t + d[None, :] * so_d,
                 res.to(out_ptr.dtype.element_ty), mask=mask2)


def _merge_triton(oc, qc, o_d, lse_d, o_p, lse_p, ks, vs, *, C, n, scale) -> None:
    B, Hc, T, D = oc.shape
    has_prev = o_p is not None
    has_sinks = ks is not None
    G = Hc // ks.shape[1] if has_sinks else 1
    S = ks.shape[2] if has_sinks else 0
    dummy = o_d  # never read when the term is off (constexpr-pruned)
    op_, lp_ = (o_p, lse_p) if has_prev else (dummy, lse_d)
    ks_, vs_ = (ks, vs) if has_sinks else (dummy, dummy)
    sop = op_.stride() if has_prev else (0, 0, 0, 0)
    slp = lp_.stride() if has_prev else (0, 0, 0)
    sk = ks_.stride() if has_sinks else (0, 0, 0, 0)
    sv = vs_.stride() if has_sinks else (0, 0, 0, 0)
    grid = (triton.cdiv(T, _MERGE_BLOCK_M), B * Hc)
    with torch.cuda.device(oc.device) if oc.is_cuda else contextlib.nullcontext():
        _window_merge_kernel[grid](
            oc, qc, o_d, lse_d, op_, lp_, ks_, vs_,
            T, C, n, Hc, G, S, scale,
            *oc.stride(), *qc.stride(), *o_d.stride(), *lse_d.stride(), *sop, *slp, *sk, *sv,
            D=D, BLOCK_M=_MERGE_BLOCK_M, BLOCK_D=triton.next_power_of_2(D),
            HAS_PREV=has_prev, HAS_SINKS=has_sinks, num_warps=_MERGE_WARPS,
        )
