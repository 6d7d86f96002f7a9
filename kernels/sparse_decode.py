"""RTPurbo decode attention: pure-torch references and the dispatching fast entry points.

One new query token per sequence. Shapes (all fixed by convention):

  q           [B, Hq, D]          post-RoPE query of the new token
  k/v_cache   [B, Hkv, L, D]      dense cache; entries n >= cache_lens[b] are garbage
  cache_lens  [B] int             valid tokens per sequence (the new token's k/v already written)

Local heads read sinks + a ring buffer:
  sink_k/v    [B, Hkv_l, S, D]    token t < sinks lives in slot t        (S >= sinks)
  ring_k/v    [B, Hkv_l, W, D]    token t lives in slot t % W            (W >= window)
and attend to {t < min(sinks, L)} U {max(sinks, L - window) <= t < L}.

Retrieval heads read the full cache of their KV head and their own low-rank indexer keys:
  qi          [B, Hr, r]          indexer query, score s(n) = qi . ki[n] (no scale)
  ki_cache    [B, Hr, L, r]       any float dtype, float8_e4m3fn included: the scoring kernel and
                                  the reference dequantise by a plain cast to float32 (no scale)
Dynamic top-p over key blocks of `block_size` tokens, the PREFILL rule of kernels/block_select.py
applied to the one query at position L - 1: the block mass is the indexer softmax (over n < L)
summed over the block;
  forced   = the sink blocks (holding a token t < min(sinks, L)) and the window blocks (holding a
             token t >= max(L - window, 0); none when window == 0): always selected;
  selected = forced + the smallest set of the other valid ("free") blocks, taken by decreasing
             mass (ties: lower block index first; blocks of zero mass never), such that
             mass(forced) + mass(chosen) >= top_p. The forced mass counts toward top_p: a step whose
             window already holds top_p of the mass chooses nothing more.
top_p >= 1 keeps every valid block, top_p <= 0 only the forced ones. The returned block mask holds
exactly the selected blocks (forced included), and the retrieval heads attend to every token t < L
of them: the forced tokens at block granularity, as in prefill. (retrieval_decode also attends to
the sink and window tokens of blocks outside the mask, token-level: that is a no-op for a
selection's mask and gives local semantics for an empty mask.) Attention over the kept tokens is
exact softmax with the real q/k/v.
Kept density (decode_block_density): chosen free blocks / free blocks, the prefill definition
(BlockSelection.density) for one query.

Every fast function has a `*_reference` twin with the same signature. The fast versions run the
Triton kernels of kernels/triton_decode.py; when Triton cannot run on the given tensors they log a
warning that says why and run the reference (impl="auto"), or raise (impl="triton"). Retrieval
attention has two kernels with the same result (`config.retrieval_union`, default
triton_decode.RETRIEVAL_UNION_DEFAULT): one program per query head over its kept blocks, or one
per KV group over the union of its heads' kept blocks, each block read once for the group; that
kernel's visit lists come from a separate launch or, `config.union_lists="fused"`, from mask bits
that the select kernel writes (rtpurbo_decode) or that retrieval_decode packs from the given mask.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

log = logging.getLogger(__name__)

IntList = Union[Sequence[int], torch.Tensor]

__all__ = [
    "topp_extra",
    "DecodeOutput",
    "dense_decode_reference",
    "dense_decode",
    "local_decode_reference",
    "select_decode_blocks_reference",
    "retrieval_decode_reference",
    "rtpurbo_decode_reference",
    "local_decode",
    "select_decode_blocks",
    "retrieval_decode",
    "rtpurbo_decode",
    "kept_tokens_per_head",
    "decode_forced_blocks",
    "decode_block_density",
    "triton_unavailable_reason",
]


@dataclass
class DecodeOutput:
    """Result of one RTPurbo decode step for one layer."""

    out: torch.Tensor  # [B, Hq, D], original head order, dtype of q
    # [B, Hr, nBlocks] bool selected blocks, forced (sink/window) ones included (None: no retrieval)
    block_mask: Optional[torch.Tensor]


# --------------------------------------------------------------------------------------------
# validation (shapes only: value checks on cache_lens would need a device sync every step)
# --------------------------------------------------------------------------------------------


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _check_lens(cache_lens: torch.Tensor, B: int, device: torch.device) -> None:
    if not isinstance(cache_lens, torch.Tensor) or cache_lens.shape != (B,):
        _fail(f"cache_lens must be an integer tensor of shape [B]=[{B}], got "
              f"{getattr(cache_lens, 'shape', type(cache_lens))}")
    if cache_lens.dtype.is_floating_point or cache_lens.dtype == torch.bool:
        _fail(f"cache_lens must be an integer tensor, got dtype {cache_lens.dtype}")
    if cache_lens.device != device:
        _fail(f"cache_lens is on {cache_lens.device} but the query is on {device}")


def _check_window(window: int, sinks: int) -> None:
    if window < 0 or sinks < 0:
        _fail(f"window and sinks must be >= 0, got window={window} sinks={sinks}")


def _as_index_list(x: IntList, name: str, n: int, bound: int) -> list[int]:
    vals = x.tolist() if isinstance(x, torch.Tensor) else [int(v) for v in x]
    if len(vals) != n:
        _fail(f"{name} must have {n} entries (one per head), got {len(vals)}")
    for v in vals:
        if not 0 <= v < bound:
            _fail(f"{name} holds {v}, outside [0, {bound})")
    return vals


def validate_local(q_l, sink_k, sink_v, ring_k, ring_v, cache_lens, window, sinks, kv_head_of_l):
    """Check local-decode arguments; returns the kv head of every local query head (list)."""
    _check_window(window, sinks)
    if q_l.dim() != 3:
        _fail(f"q_l must be [B, Hq_local, D], got shape {tuple(q_l.shape)}")
    B, Hl, D = q_l.shape
    if sink_k.dim() != 4 or sink_k.shape[0] != B or sink_k.shape[3] != D:
        _fail(f"sink_k must be [B={B}, Hkv_local, S, D={D}], got {tuple(sink_k.shape)}")
    Hkv = sink_k.shape[1]
    if sink_v.shape != sink_k.shape:
        _fail(f"sink_v shape {tuple(sink_v.shape)} != sink_k shape {tuple(sink_k.shape)}")
    if sink_k.shape[2] < sinks:
        _fail(f"sink_k holds {sink_k.shape[2]} sink slots, fewer than sinks={sinks}")
    if ring_k.dim() != 4 or ring_k.shape[:2] != (B, Hkv) or ring_k.shape[3] != D:
        _fail(f"ring_k must be [B={B}, Hkv_local={Hkv}, W, D={D}], got {tuple(ring_k.shape)}")
    if ring_v.shape != ring_k.shape:
        _fail(f"ring_v shape {tuple(ring_v.shape)} != ring_k shape {tuple(ring_k.shape)}")
    if ring_k.shape[2] < max(window, 1):
        _fail(f"ring_k holds W={ring_k.shape[2]} slots, fewer than window={window} (min 1)")
    for name, t in (("sink_k", sink_k), ("sink_v", sink_v), ("ring_k", ring_k), ("ring_v", ring_v)):
        if t.device != q_l.device:
            _fail(f"{name} is on {t.device} but q_l is on {q_l.device}")
    _check_lens(cache_lens, B, q_l.device)
    if kv_head_of_l is None:
        if Hkv == 0 or Hl % Hkv != 0:
            _fail(f"Hq_local={Hl} is not a multiple of Hkv_local={Hkv}; pass kv_head_of_l")
        return [h // (Hl // Hkv) for h in range(Hl)]
    return _as_index_list(kv_head_of_l, "kv_head_of_l", Hl, Hkv)


def validate_select(qi, ki_cache, cache_lens, top_p, block_size, window, sinks):
    _check_window(window, sinks)
    if block_size <= 0:
        _fail(f"block_size must be > 0, got {block_size}")
    if not math.isfinite(top_p):
        _fail(f"top_p must be finite, got {top_p}")
    if qi.dim() != 3:
        _fail(f"qi must be [B, Hr, r], got shape {tuple(qi.shape)}")
    B, Hr, r = qi.shape
    if ki_cache.dim() != 4 or ki_cache.shape[:2] != (B, Hr) or ki_cache.shape[3] != r:
        _fail(f"ki_cache must be [B={B}, Hr={Hr}, L, r={r}], got {tuple(ki_cache.shape)}")
    if ki_cache.device != qi.device:
        _fail(f"ki_cache is on {ki_cache.device} but qi is on {qi.device}")
    if not ki_cache.dtype.is_floating_point:
        _fail(f"ki_cache must be a float tensor (float8_e4m3fn allowed), got {ki_cache.dtype}")
    _check_lens(cache_lens, B, qi.device)


def validate_retrieval(q_r, k_cache, v_cache, kv_head_of_r, block_mask, cache_lens, window, sinks,
                       block_size):
    """Check retrieval-decode arguments; returns the kv head of every retrieval head (list)."""
    _check_window(window, sinks)
    if block_size <= 0:
        _fail(f"block_size must be > 0, got {block_size}")
    if q_r.dim() != 3:
        _fail(f"q_r must be [B, Hr, D], got shape {tuple(q_r.shape)}")
    B, Hr, D = q_r.shape
    if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[3] != D:
        _fail(f"k_cache must be [B={B}, Hkv, L, D={D}], got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        _fail(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_mask", block_mask)):
        if t is not None and t.device != q_r.device:
            _fail(f"{name} is on {t.device} but q_r is on {q_r.device}")
    L = k_cache.shape[2]
    nb = -(-L // block_size)
    if block_mask is not None and (block_mask.dtype != torch.bool
                                   or block_mask.shape != (B, Hr, nb)):
        _fail(f"block_mask must be bool [B={B}, Hr={Hr}, nBlocks={nb}] (L={L}, block_size="
              f"{block_size}), got {block_mask.dtype} {tuple(block_mask.shape)}")
    _check_lens(cache_lens, B, q_r.device)
    return _as_index_list(kv_head_of_r, "kv_head_of_r", Hr, k_cache.shape[1])


def _scale(D: int, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float32 normally; float64 inputs stay float64 so tests can build exact references.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _masked_attention(q, k, v, keep, scale):
    """q [..., D], k/v [..., N, D], keep [..., N] bool -> [..., D] in q's compute dtype.

    Rows with no kept key give 0. Masked keys are zeroed first so garbage (NaN) never leaks."""
    cd = _compute_dtype(q)
    kf = torch.where(keep[..., None], k.to(cd), 0)
    vf = torch.where(keep[..., None], v.to(cd), 0)
    s = torch.einsum("...d,...nd->...n", q.to(cd), kf) * scale
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(cd).min)  # all-masked rows: finite m
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.einsum("...n,...nd->...d", p, vf)
    return torch.where(denom > 0, out / denom.clamp_min(torch.finfo(cd).tiny), 0)


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------


def dense_decode_reference(q, k_cache, v_cache, cache_lens, *, scale=None):
    """Dense GQA decode over n < cache_lens[b]: query head h reads kv head h // (Hq // Hkv)."""
    B, Hq, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[3] != D:
        _fail(f"k_cache must be [B={B}, Hkv, L, D={D}], got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        _fail(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    if Hq % Hkv != 0:
        _fail(f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    _check_lens(cache_lens, B, q.device)
    G = Hq // Hkv
    keep = torch.arange(L, device=q.device)[None, :] < cache_lens[:, None]  # [B, L]
    qg = q.view(B, Hkv, G, D)
    # group form avoids expanding k/v to Hq heads (which costs Hq/Hkv x memory at long L)
    out = _masked_attention(
        qg, k_cache[:, :, None], v_cache[:, :, None], keep[:, None, None, :].expand(B, Hkv, G, L),
        _scale(D, scale))
    return out.reshape(B, Hq, D).to(q.dtype)


def _local_positions(cache_lens, S, W, window, sinks, device):
    """Token positions read by a local head: (sink_valid [B,S], win_pos [B,window], win_valid)."""
    L = cache_lens.to(torch.long)[:, None]
    n_sink = torch.clamp(L, max=sinks)
    sink_valid = torch.arange(S, device=device)[None, :] < n_sink
    win_pos = L - window + torch.arange(window, device=device)[None, :]
    win_valid = (win_pos >= n_sink) & (win_pos >= 0) & (win_pos < L)
    return sink_valid, win_pos, win_valid


def local_decode_reference(q_l, sink_k, sink_v, ring_k, ring_v, cache_lens, *, window, sinks,
                           scale=None, kv_head_of_l=None):
    """Local (sliding window + sinks) decode from the sink buffer and ring buffer. -> [B, Hl, D]"""
    kv_of = validate_local(q_l, sink_k, sink_v, ring_k, ring_v, cache_lens, window, sinks,
                           kv_head_of_l)
    B, Hl, D = q_l.shape
    S, W = sink_k.shape[2], ring_k.shape[2]
    sink_valid, win_pos, win_valid = _local_positions(cache_lens, S, W, window, sinks, q_l.device)
    slots = torch.remainder(win_pos, W)  # [B, window]
    idx = slots[:, None, :, None].expand(B, ring_k.shape[1], window, D)
    win_k = torch.gather(ring_k, 2, idx)
    win_v = torch.gather(ring_v, 2, idx)
    k = torch.cat([sink_k, win_k], dim=2)[:, kv_of]  # [B, Hl, S + window, D]
    v = torch.cat([sink_v, win_v], dim=2)[:, kv_of]
    keep = torch.cat([sink_valid, win_valid], dim=1)[:, None, :].expand(B, Hl, S + window)
    return _masked_attention(q_l, k, v, keep, _scale(D, scale)).to(q_l.dtype)


def indexer_block_mass_reference(qi, ki_cache, cache_lens, *, block_size):
    """Indexer softmax over n < L summed per key block -> [B, Hr, nBlocks] in float32/64."""
    B, Hr, r = qi.shape
    L = ki_cache.shape[2]
    cd = _compute_dtype(qi)
    valid = torch.arange(L, device=qi.device)[None, :] < cache_lens[:, None]  # [B, L]
    kf = torch.where(valid[:, None, :, None], ki_cache.to(cd), 0)
    s = torch.einsum("bhr,bhnr->bhn", qi.to(cd), kf).masked_fill(~valid[:, None, :], float("-inf"))
    prob = torch.softmax(s, dim=-1).nan_to_num(0.0)  # L == 0 rows are all -inf -> NaN -> 0
    nb = -(-L // block_size)
    prob = torch.nn.functional.pad(prob, (0, nb * block_size - L))
    return prob.view(B, Hr, nb, block_size).sum(-1)


def decode_forced_blocks(cache_lens, n_blocks, *, block_size, window, sinks):
    """(forced, valid) bool [B, n_blocks] for the query at position L - 1 (L = cache_lens[b]).

    valid: blocks holding a token t < L. forced: the sink blocks (holding a token
    t < min(sinks, L)) and the window blocks (holding a token max(L - window, 0) <= t < L; none
    when window == 0): kernels/block_select.py's forced blocks (window_sink_block_ranges) for a
    query block made of that one query."""
    L = cache_lens.to(torch.long)[:, None]
    blk = torch.arange(n_blocks, device=cache_lens.device)[None, :]
    start = blk * block_size
    valid = start < L
    sink = start < torch.clamp(L, max=sinks)
    win = (start + block_size > torch.clamp(L - window, min=0)) if window > 0 else torch.zeros_like(valid)
    return valid & (sink | win), valid


def topp_extra(mass, free, target):
    """Prefill rule on the free blocks (kernels/block_select.topp_keep_reference, in mass's own
    dtype): keep a free block iff its mass is > 0 and the free mass ranked ahead of it (descending,
    ties by lower index: a stable sort) is < target."""
    free_mass = torch.where(free, mass, 0)
    sorted_mass, order = torch.sort(free_mass, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_mass, dim=-1) - sorted_mass
    keep_sorted = (before < target[..., None]) & (sorted_mass > 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted) & free


def select_decode_blocks_reference(qi, ki_cache, cache_lens, *, top_p, block_size, window, sinks):
    """Block selection by full sort + cumsum (the prefill rule, see the module docstring).
    -> bool [B, Hr, nBlocks]: forced blocks + the chosen free blocks."""
    validate_select(qi, ki_cache, cache_lens, top_p, block_size, window, sinks)
    mass = indexer_block_mass_reference(qi, ki_cache, cache_lens, block_size=block_size)
    nb = mass.shape[-1]
    forced, valid = decode_forced_blocks(cache_lens, nb, block_size=block_size, window=window,
                                         sinks=sinks)
    forced, valid = forced[:, None, :].expand_as(mass), valid[:, None, :].expand_as(mass)
    if top_p >= 1.0:
        return valid.clone()
    target = top_p - torch.where(forced, mass, 0).sum(-1)  # top_p <= 0: target <= 0, no extra
    return forced | topp_extra(mass, valid & ~forced, target)


def decode_block_density(block_mask, cache_lens, *, block_size, window, sinks):
    """(chosen [B, Hr], free [B]) int64: selected non-forced blocks and selectable (valid,
    non-forced) blocks of each head's step. Kept density = chosen / free (summed over whatever is
    averaged: batch, heads, steps), the prefill definition (BlockSelection.density) for one query:
    what is kept beyond the always-kept sink and window blocks."""
    forced, valid = decode_forced_blocks(cache_lens, block_mask.shape[-1], block_size=block_size,
                                         window=window, sinks=sinks)
    free = valid & ~forced
    return (block_mask & free[:, None, :]).sum(-1), free.sum(-1)


def _retrieval_keep(block_mask, cache_lens, L, window, sinks, block_size):
    """Token-level kept set of retrieval heads: [B, Hr, L] bool."""
    t = torch.arange(L, device=block_mask.device)
    Lb = cache_lens.to(torch.long)[:, None, None]
    in_block = block_mask[:, :, t // block_size]
    forced = (t[None, None, :] < sinks) | (t[None, None, :] >= Lb - window)
    return (t[None, None, :] < Lb) & (in_block | forced)


def retrieval_decode_reference(q_r, k_cache, v_cache, kv_head_of_r, block_mask, cache_lens, *,
                               window, sinks, block_size, scale=None):
    """Exact attention of retrieval heads over the tokens t < L of the mask's blocks, plus the sink
    and window tokens (token level: already inside a selection's forced blocks). -> [B, Hr, D]"""
    kv_of = validate_retrieval(q_r, k_cache, v_cache, kv_head_of_r, block_mask, cache_lens,
                               window, sinks, block_size)
    B, Hr, D = q_r.shape
    L = k_cache.shape[2]
    keep = _retrieval_keep(block_mask, cache_lens, L, window, sinks, block_size)
    outs = []
    for h in range(Hr):  # per head: never expands the cache to Hr heads at long L
        kv = kv_of[h]
        outs.append(_masked_attention(q_r[:, h], k_cache[:, kv], v_cache[:, kv], keep[:, h],
                                      _scale(D, scale)))
    return torch.stack(outs, dim=1).to(q_r.dtype)


def kept_tokens_per_head(block_mask, cache_lens, *, window, sinks, block_size):
    """Number of tokens t < L each retrieval head attends to (tokens of the mask's blocks U sink
    tokens U window tokens). [B, Hr]"""
    L = block_mask.shape[-1] * block_size
    return _retrieval_keep(block_mask, cache_lens, L, window, sinks, block_size).sum(-1)


def _split_roles(is_retrieval, Hq: int, device):
    roles = is_retrieval.tolist() if isinstance(is_retrieval, torch.Tensor) else list(is_retrieval)
    if len(roles) != Hq:
        _fail(f"is_retrieval must have one entry per query head (Hq={Hq}), got {len(roles)}")
    retr = [h for h in range(Hq) if roles[h]]
    local = [h for h in range(Hq) if not roles[h]]
    return retr, local


def rtpurbo_decode_reference(q, cache_lens, *, is_retrieval, top_p, block_size, window, sinks,
                             sink_k=None, sink_v=None, ring_k=None, ring_v=None, kv_head_of_l=None,
                             k_cache=None, v_cache=None, kv_head_of_r=None, qi=None, ki_cache=None,
                             scale=None) -> DecodeOutput:
    """One RTPurbo decode step of one layer, from the per-role references.

    is_retrieval: one bool per query head. Local heads are the others in ascending head order,
    and index kv_head_of_l / the sink and ring caches; retrieval heads likewise index
    kv_head_of_r, qi and ki_cache. Output heads are in the original order."""
    B, Hq, D = q.shape
    retr, local = _split_roles(is_retrieval, Hq, q.device)
    out = torch.empty_like(q)
    mask = None
    if local:
        if sink_k is None or ring_k is None:
            _fail("the layer has local heads: pass sink_k/sink_v/ring_k/ring_v")
        out[:, local] = local_decode_reference(
            q[:, local], sink_k, sink_v, ring_k, ring_v, cache_lens, window=window, sinks=sinks,
            scale=scale, kv_head_of_l=kv_head_of_l)
    if retr:
        if k_cache is None or qi is None or ki_cache is None or kv_head_of_r is None:
            _fail("the layer has retrieval heads: pass k_cache/v_cache/kv_head_of_r/qi/ki_cache")
        mask = select_decode_blocks_reference(qi, ki_cache, cache_lens, top_p=top_p,
                                              block_size=block_size, window=window, sinks=sinks)
        out[:, retr] = retrieval_decode_reference(
            q[:, retr], k_cache, v_cache, kv_head_of_r, mask, cache_lens, window=window,
            sinks=sinks, block_size=block_size, scale=scale)
    return DecodeOutput(out=out, block_mask=mask)


# --------------------------------------------------------------------------------------------
# dispatch to Triton
# --------------------------------------------------------------------------------------------

_warned: set[str] = set()


def triton_unavailable_reason(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """None when the Triton kernels can run on these tensors, else why not (one line)."""
    on_cpu = False
    for t in tensors:
        if t is None or t.device.type == "cuda":
            continue
        if t.device.type != "cpu":
            return f"device type {t.device.type!r} is not supported by the Triton decode kernels"
        on_cpu = True
    if on_cpu and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    try:
        td = _td()
    except Exception as e:  # ImportError, or a broken triton install
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    if on_cpu and not td.interpreter_ready():
        return ("tensors are on the CPU and TRITON_INTERPRET=1 was set after triton was imported "
                "(the interpreter needs it before the first import)")
    return None


def _use_triton(impl: str, what: str, *tensors) -> bool:
    if impl not in ("auto", "triton", "torch"):
        _fail(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "torch":
        return False
    reason = triton_unavailable_reason(*tensors)
    if reason is None:
        return True
    if impl == "triton":
        raise RuntimeError(f"{what}: impl='triton' but Triton cannot run: {reason}")
    if reason not in _warned:  # once per reason: a decode loop would otherwise flood the log
        _warned.add(reason)
        log.warning("RTPurbo decode falls back to the pure-torch reference: %s", reason)
    return False


def _td():
    from kernels import triton_decode  # imported late: torch-only users never import triton

    return triton_decode


def local_decode(q_l, sink_k, sink_v, ring_k, ring_v, cache_lens, *, window, sinks, scale=None,
                 kv_head_of_l=None, impl="auto", config=None):
    """Fast local decode; same contract as local_decode_reference."""
    if not _use_triton(impl, "local_decode", q_l, sink_k, ring_k, cache_lens):
        return local_decode_reference(q_l, sink_k, sink_v, ring_k, ring_v, cache_lens,
                                      window=window, sinks=sinks, scale=scale,
                                      kv_head_of_l=kv_head_of_l)
    kv_of = validate_local(q_l, sink_k, sink_v, ring_k, ring_v, cache_lens, window, sinks,
                           kv_head_of_l)
    return _td().local_decode_triton(q_l, sink_k, sink_v, ring_k, ring_v, cache_lens,
                                     window=window, sinks=sinks, scale=scale, kv_head_of_l=kv_of,
                                     config=config)


def select_decode_blocks(qi, ki_cache, cache_lens, *, top_p, block_size, window, sinks,
                         impl="auto", config=None, return_bits=False):
    """Fast block selection (prefill rule); same contract as select_decode_blocks_reference.
    return_bits: (mask, bits) where bits are the packed mask rows the select kernel writes for
    the union kernel's fused visit lists (config.union_lists="fused"; else None), to hand to
    retrieval_decode(mask_bits=...)."""
    if not _use_triton(impl, "select_decode_blocks", qi, ki_cache, cache_lens):
        mask = select_decode_blocks_reference(qi, ki_cache, cache_lens, top_p=top_p,
                                              block_size=block_size, window=window, sinks=sinks)
        return (mask, None) if return_bits else mask
    validate_select(qi, ki_cache, cache_lens, top_p, block_size, window, sinks)
    sel = _td().select_decode_blocks_triton(qi, ki_cache, cache_lens, top_p=top_p,
                                            block_size=block_size, window=window, sinks=sinks,
                                            config=config)
    return (sel.block_mask, sel.block_bits) if return_bits else sel.block_mask


def retrieval_decode(q_r, k_cache, v_cache, kv_head_of_r, block_mask, cache_lens, *, window,
                     sinks, block_size, scale=None, impl="auto", config=None, mask_bits=None):
    """Fast retrieval-head decode; same contract as retrieval_decode_reference. mask_bits: the
    select kernel's packed mask (select_decode_blocks(return_bits=True)) for the union kernel's
    fused visit lists; ignored by the reference and the other kernels."""
    if not _use_triton(impl, "retrieval_decode", q_r, k_cache, block_mask, cache_lens):
        return retrieval_decode_reference(q_r, k_cache, v_cache, kv_head_of_r, block_mask,
                                          cache_lens, window=window, sinks=sinks,
                                          block_size=block_size, scale=scale)
    kv_of = validate_retrieval(q_r, k_cache, v_cache, kv_head_of_r, block_mask, cache_lens,
                               window, sinks, block_size)
    return _td().retrieval_decode_triton(q_r, k_cache, v_cache, kv_of, block_mask, cache_lens,
                                         window=window, sinks=sinks, block_size=block_size,
                                         scale=scale, config=config, mask_bits=mask_bits)


def validate_dense(q, k_cache, v_cache, cache_lens) -> None:
    if q.dim() != 3:
        _fail(f"q must be [B, Hq, D], got shape {tuple(q.shape)}")
    B, Hq, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[3] != D:
        _fail(f"k_cache must be [B={B}, Hkv, L, D={D}], got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        _fail(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    if k_cache.shape[1] == 0 or Hq % k_cache.shape[1] != 0:
        _fail(f"Hq={Hq} is not a multiple of Hkv={k_cache.shape[1]}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != q.device:
            _fail(f"{name} is on {t.device} but q is on {q.device}")
    _check_lens(cache_lens, B, q.device)


def dense_decode(q, k_cache, v_cache, cache_lens, *, scale=None, impl="auto", config=None):
    """Fast dense GQA decode; same contract as dense_decode_reference (keys n < cache_lens[b];
    entries beyond are never read, so k/v may be a fixed-size view such as the whole cache).

    Triton: the split-K local-attention kernel with the cache as a "ring" of W = L slots, window
    W and no sinks (token t < L <= W sits in slot t): it visits only the cache_lens[b] valid
    tokens whatever L is, reads each KV tile once for all query heads of its group (tl.dot), and
    has no shape that depends on cache_lens, so a CUDA graph of it serves every length <= L."""
    if not _use_triton(impl, "dense_decode", q, k_cache, cache_lens):
        return dense_decode_reference(q, k_cache, v_cache, cache_lens, scale=scale)
    validate_dense(q, k_cache, v_cache, cache_lens)
    return _td().dense_decode_triton(q, k_cache, v_cache, cache_lens, scale=scale, config=config)


def rtpurbo_decode(q, cache_lens, *, is_retrieval, top_p, block_size, window, sinks, sink_k=None,
                   sink_v=None, ring_k=None, ring_v=None, kv_head_of_l=None, k_cache=None,
                   v_cache=None, kv_head_of_r=None, qi=None, ki_cache=None, scale=None,
                   impl="auto", config=None) -> DecodeOutput:
    """Fast RTPurbo decode step; same contract as rtpurbo_decode_reference."""
    kwargs = dict(is_retrieval=is_retrieval, top_p=top_p, block_size=block_size, window=window,
                  sinks=sinks, sink_k=sink_k, sink_v=sink_v, ring_k=ring_k, ring_v=ring_v,
                  kv_head_of_l=kv_head_of_l, k_cache=k_cache, v_cache=v_cache,
                  kv_head_of_r=kv_head_of_r, qi=qi, ki_cache=ki_cache, scale=scale)
    if not _use_triton(impl, "rtpurbo_decode", q, cache_lens, sink_k, ring_k, k_cache, ki_cache):
        return rtpurbo_decode_reference(q, cache_lens, **kwargs)
    B, Hq, D = q.shape
    retr, local = _split_roles(is_retrieval, Hq, q.device)
    kv_of_l = kv_of_r = None
    if local:
        if sink_k is None or ring_k is None:
            _fail("the layer has local heads: pass sink_k/sink_v/ring_k/ring_v")
        kv_of_l = validate_local(q.narrow(1, 0, len(local)), sink_k, sink_v, ring_k, ring_v,
                                 cache_lens, window, sinks, kv_head_of_l)
    if retr:
        if k_cache is None or qi is None or ki_cache is None or kv_head_of_r is None:
            _fail("the layer has retrieval heads: pass k_cache/v_cache/kv_head_of_r/qi/ki_cache")
        validate_select(qi, ki_cache, cache_lens, top_p, block_size, window, sinks)
        if qi.shape[1] != len(retr):
            _fail(f"qi has {qi.shape[1]} heads but is_retrieval marks {len(retr)}")
        if ki_cache.shape[2] != k_cache.shape[2]:
            _fail(f"ki_cache holds L={ki_cache.shape[2]} tokens but k_cache L={k_cache.shape[2]}")
        # the mask does not exist yet: check everything else (narrow() is a view, not a copy)
        kv_of_r = validate_retrieval(q.narrow(1, 0, len(retr)), k_cache, v_cache, kv_head_of_r,
                                     None, cache_lens, window, sinks, block_size)
    return _td().rtpurbo_decode_triton(
        q, cache_lens, retrieval_heads=retr, local_heads=local, top_p=top_p,
        block_size=block_size, window=window, sinks=sinks, sink_k=sink_k, sink_v=sink_v,
        ring_k=ring_k, ring_v=ring_v, kv_head_of_l=kv_of_l, k_cache=k_cache, v_cache=v_cache,
        kv_head_of_r=kv_of_r, qi=qi, ki_cache=ki_cache, scale=scale, config=config)
