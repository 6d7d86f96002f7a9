"""Indexer sharpening ("temperature") calibration, run after stage 1 (rtpurbo.indexer_sharpen = "calibrate").

Stage 1 fits the indexer softmax to the true attention with the forward KL(true || indexer), which is
mass-covering: the indexer's distribution comes out broad, and top-p over it keeps many key blocks even
where its *ranking* of the blocks is good. Scaling one retrieval head's indexer scores by a factor f >= 1
(a temperature 1/f) keeps the ranking and concentrates the mass, so top-p stops earlier. Since
s(m, n) = (Wq q_m) . (Wk k_n), multiplying that head's wq by f scales its scores by f: no kernel, cache
format or checkpoint format changes.

Measurement (selection_mass_stats), per retrieval head and per factor f, over every query row m of
calibration sequences, with the model's own selection rule for one query at position m (the decode rule,
the prefill rule of kernels/block_select.py applied to a query block of one query, see
kernels/sparse_decode.py select_decode_blocks_reference and docs/kernels.md "Selection rule"):
  * block mass: softmax_{n <= m}(f * qi_m . ki_n) summed per key block of `block_size` tokens;
  * forced blocks: those holding a sink token (t < sinks) or one of the last `window` positions; always
    kept, their mass counts toward top_p; free blocks: the other blocks holding a token t <= m;
  * chosen: the smallest set of free blocks, by decreasing mass (ties: lower block first; zero mass
    never), with mass(forced) + mass(chosen) >= top_p;
  * kept density = chosen / free, summed over rows (and sequences) before dividing (the eval's
    decode_block_density, kernels/sparse_decode.py);
  * captured mass = the true attention's mass (softmax over n <= m of q_m . k_n * scale, post-RoPE)
    inside the kept blocks (forced + chosen), averaged over the rows that have at least one free block
    (rows without one keep everything at every factor).
For reference the same is measured for the oracle selection that ranks blocks by the true attention's
own block mass (what the head itself needs at top_p).
Queries are processed in chunks of `chunk` rows: at most a [B, Hr, chunk, T] score tensor, never T x T.

Choice (choose_factors): per head, the largest factor whose captured mass is >= min_mass x (the captured
mass at factor 1); factor 1 always qualifies, so a head whose sharpening loses mass keeps its weights.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from kernels.sparse_decode import decode_forced_blocks, topp_extra

logger = logging.getLogger("torchtitan_rtpurbo")

SHARPEN_MODES = ("none", "calibrate")


def validate_sharpen_config(rt: Any) -> None:
    """Raise ValueError naming the offending rtpurbo.* key."""
    mode = getattr(rt, "indexer_sharpen", "none")
    if mode not in SHARPEN_MODES:
        raise ValueError(f"rtpurbo.indexer_sharpen must be one of {SHARPEN_MODES}, got {mode!r}")
    factors = list(getattr(rt, "sharpen_factors", [1.0]))
    if not factors:
        raise ValueError("rtpurbo.sharpen_factors must not be empty")
    for f in factors:
        if not (isinstance(f, (int, float)) and math.isfinite(f) and f >= 1.0):
            raise ValueError(f"rtpurbo.sharpen_factors must be finite numbers >= 1 (sharpening only), got {f!r}")
    if 1.0 not in [float(f) for f in factors]:
        raise ValueError(f"rtpurbo.sharpen_factors must contain 1 (the reference), got {factors}")
    m = getattr(rt, "sharpen_min_mass", 0.98)
    if not (isinstance(m, (int, float)) and 0.0 < m <= 1.0):
        raise ValueError(f"rtpurbo.sharpen_min_mass must be in (0, 1] (a fraction of the true-attention mass "
                         f"captured at factor 1), got {m!r}")
    n = getattr(rt, "sharpen_num_sequences", 4)
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ValueError(f"rtpurbo.sharpen_num_sequences must be an int >= 1, got {n!r}")
    c = getattr(rt, "sharpen_query_chunk", 256)
    if not (isinstance(c, int) and not isinstance(c, bool) and c >= 1):
        raise ValueError(f"rtpurbo.sharpen_query_chunk must be an int >= 1, got {c!r}")


# ----------------------------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------------------------
def _block_sums(p: torch.Tensor, block_size: int) -> torch.Tensor:
    n = p.shape[-1]
    nb = -(-n // block_size)
    p = torch.nn.functional.pad(p, (0, nb * block_size - n))
    return p.unflatten(-1, (nb, block_size)).sum(-1)


@torch.no_grad()
def selection_mass_stats(
    q_r: torch.Tensor,
    k_r: torch.Tensor,
    qi: torch.Tensor,
    ki: torch.Tensor,
    factors: Sequence[float],
    *,
    top_p: float,
    block_size: int,
    window: int,
    sinks: int,
    scale: float | None = None,
    chunk: int = 256,
) -> dict[str, torch.Tensor]:
    """Sums over the batch and the query rows, per factor and retrieval head (see the module doc).

    q_r, k_r: [B, Hr, T, D] post-RoPE queries / keys of the retrieval heads (keys gathered per query head);
    qi, ki: [B, Hr, T, r] indexer projections (unscaled); factors: F sharpening factors.
    Returns float64 tensors: chosen [F, Hr] (chosen free blocks), free [Hr] (free blocks), captured [F, Hr]
    (true mass inside the kept blocks, over rows with a free block), rows [Hr] (rows with a free block),
    oracle_chosen [Hr], oracle_captured [Hr] (the same for the selection by true block mass)."""
    B, Hr, T, D = q_r.shape
    if k_r.shape[:3] != (B, Hr, T) or qi.shape[:3] != (B, Hr, T) or ki.shape[:3] != (B, Hr, T):
        raise ValueError(f"selection_mass_stats: shapes q_r {tuple(q_r.shape)}, k_r {tuple(k_r.shape)}, "
                         f"qi {tuple(qi.shape)}, ki {tuple(ki.shape)} do not match")
    if scale is None:
        scale = D**-0.5
    F = len(factors)
    dev = q_r.device
    f64 = dict(dtype=torch.float64, device=dev)
    chosen = torch.zeros(F, Hr, **f64)
    captured = torch.zeros(F, Hr, **f64)
    free_tot = torch.zeros(Hr, **f64)
    rows_tot = torch.zeros(Hr, **f64)
    o_chosen = torch.zeros(Hr, **f64)
    o_captured = torch.zeros(Hr, **f64)
    qf, kf, qif, kif = q_r.float(), k_r.float(), qi.float(), ki.float()
    for c0 in range(0, T, chunk):
        c1 = min(c0 + chunk, T)
        lens = torch.arange(c0 + 1, c1 + 1, device=dev)  # query m sees keys n < m + 1
        nb = -(-c1 // block_size)
        forced, valid = decode_forced_blocks(lens, nb, block_size=block_size, window=window, sinks=sinks)  # [C, nb]
        free = valid & ~forced
        has_free = free.any(-1)  # [C]
        if not bool(has_free.any()):
            continue
        causal = torch.arange(c1, device=dev)[None, :] < lens[:, None]  # [C, c1]
        tl = (qf[:, :, c0:c1] @ kf[:, :, :c1].transpose(-1, -2)) * scale
        p_true = _block_sums(tl.masked_fill(~causal, float("-inf")).softmax(-1), block_size)  # [B, Hr, C, nb]
        s = (qif[:, :, c0:c1] @ kif[:, :, :c1].transpose(-1, -2)).masked_fill(~causal, float("-inf"))
        row_w = has_free.double()  # rows without a free block: nothing to decide
        free_tot += free.sum(-1).double().sum() * B
        rows_tot += row_w.sum() * B
        for i, f in enumerate(factors):
            mass = _block_sums((s * float(f)).softmax(-1), block_size)
            if top_p >= 1.0:  # every valid block (the rule's top_p >= 1 case)
                extra = free.expand_as(mass)
            else:
                target = top_p - torch.where(forced, mass, 0.0).sum(-1)
                extra = topp_extra(mass, free, target)
            kept = forced | extra
            chosen[i] += extra.sum(-1).double().sum(dim=(0, 2))
            captured[i] += ((p_true * kept).sum(-1).double() * row_w).sum(dim=(0, 2))
        if top_p >= 1.0:
            extra = free.expand_as(p_true)
        else:
            extra = topp_extra(p_true, free, top_p - torch.where(forced, p_true, 0.0).sum(-1))
        o_chosen += extra.sum(-1).double().sum(dim=(0, 2))
        o_captured += ((p_true * (forced | extra)).sum(-1).double() * row_w).sum(dim=(0, 2))
    return dict(chosen=chosen, free=free_tot, captured=captured, rows=rows_tot, oracle_chosen=o_chosen,
                oracle_captured=o_captured)


def summarize_stats(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sums -> density [F, Hr] (chosen / free; NaN without a free block), captured [F, Hr] (mean over rows
    with a free block; 1.0 without one), oracle_density / oracle_captured [Hr]."""
    free = stats["free"]
    rows = stats["rows"]
    nan = torch.full_like(free, float("nan"))
    one = torch.ones_like(rows)
    dens = torch.where(free > 0, stats["chosen"] / free.clamp_min(1), nan)
    cap = torch.where(rows > 0, stats["captured"] / rows.clamp_min(1), one)
    return dict(density=dens, captured=cap,
                oracle_density=torch.where(free > 0, stats["oracle_chosen"] / free.clamp_min(1), nan),
                oracle_captured=torch.where(rows > 0, stats["oracle_captured"] / rows.clamp_min(1), one))


def choose_factors(factors: Sequence[float], captured: torch.Tensor, min_mass: float) -> list[int]:
    """Per head (column of captured [F, Hr]), the index of the largest factor whose captured mass is
    >= min_mass x the captured mass at factor 1 (factors must contain 1; it always qualifies)."""
    fl = [float(f) for f in factors]
    if 1.0 not in fl:
        raise ValueError(f"rtpurbo.sharpen_factors must contain 1, got {list(factors)}")
    i1 = fl.index(1.0)
    floor = captured[i1] * float(min_mass)
    out = []
    for h in range(captured.shape[1]):
        ok = [i for i in range(len(fl)) if i == i1 or bool(captured[i, h] >= floor[h])]
        out.append(max(ok, key=lambda i: (fl[i], -i)))
    return out


# ----------------------------------------------------------------------------------------------------------
# on a model
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def measure_model_sharpening(
    model: nn.Module,
    sequences: Sequence[Any],
    factors: Sequence[float],
    *,
    chunk: int = 256,
) -> dict[int, dict[str, Any]]:
    """Run the calibration sequences (NeedleSequence or 1-D token tensors) through an RTPurbo model with
    the dense backbone (every layer in "stage1" mode without statistics: exactly the frozen teacher's
    forward, as stage 1 sees it) and measure each retrieval head's selection at every factor, with the
    layer's own top_p / block_size / window / sinks.
    Returns {layer: {"heads": [query heads], **summarize_stats(...), "free_blocks", "rows"}}."""
    from models.attention import AttentionContext
    from models.rtpurbo.calibrate import NeedleSequence, probed
    from models.rtpurbo.convert import iter_rtpurbo_backends

    backends = {l: b for l, b in iter_rtpurbo_backends(model) if b.indexer is not None}
    if not backends:
        raise ValueError("measure_model_sharpening: the model has no retrieval heads (apply_rtpurbo first)")
    acc: dict[int, dict[str, torch.Tensor]] = {}

    def hook(layer, q, k, v, q_pre, k_pre, ctx):
        b = backends.get(layer)
        if b is None:
            return
        qi, ki = b.indexer(q_pre, k_pre)
        st = selection_mass_stats(
            q[:, b.retrieval_list], k[:, b.indexer.kv_head_list], qi, ki, factors, top_p=b.top_p,
            block_size=b.block_size, window=b.window, sinks=b.sinks, chunk=chunk)
        if layer in acc:
            for key, val in st.items():
                acc[layer][key] += val.cpu()
        else:
            acc[layer] = {key: val.cpu() for key, val in st.items()}

    modes = {l: b.mode for l, b in backends.items()}
    was_training = model.training
    model.eval()
    device = model.tok_embeddings.weight.device
    try:
        for b in backends.values():
            b.mode = "stage1"  # dense attention for every head; collect=None: no KL
        with probed(model, hook):
            for s in sequences:
                toks = s.tokens if isinstance(s, NeedleSequence) else s
                model(toks.view(1, -1).to(device), ctx=AttentionContext(), return_hidden=True)
    finally:
        for l, b in backends.items():
            b.mode = modes[l]
        model.train(was_training)
    out = {}
    for l, st in acc.items():
        out[l] = {"heads": list(backends[l].retrieval_list), **summarize_stats(st),
                  "free_blocks": st["free"], "rows": st["rows"]}
    return out


@torch.no_grad()
def fold_sharpening(model: nn.Module, factors: dict[int, Sequence[float]]) -> None:
    """Multiply layer l's indexer wq[j] by factors[l][j]: scores of retrieval head j scale by that factor."""
    from models.rtpurbo.convert import iter_rtpurbo_backends

    for l, b in iter_rtpurbo_backends(model):
        if l not in factors or b.indexer is None:
            continue
        f = torch.as_tensor([float(x) for x in factors[l]], dtype=b.indexer.wq.dtype, device=b.indexer.wq.device)
        if f.numel() != b.indexer.wq.shape[0]:
            raise ValueError(f"layer {l}: {f.numel()} factors for {b.indexer.wq.shape[0]} retrieval heads")
        b.indexer.wq.mul_(f[:, None, None])


def calibrate_sharpening(
    model: nn.Module,
    sequences: Sequence[Any],
    *,
    factors: Sequence[float],
    min_mass: float,
    chunk: int = 256,
    apply: bool = True,
) -> dict[str, Any]:
    """Measure, choose per head (choose_factors), fold into wq (when apply). Returns a JSON-able report:
    {"factors", "min_mass", "heads": [per head: layer, head, factor, density / captured at factor 1 and at
    the chosen factor, the oracle's, and the whole grid], "summary": means over heads}."""
    factors = sorted({float(f) for f in factors})
    meas = measure_model_sharpening(model, sequences, factors, chunk=chunk)
    i1 = factors.index(1.0)
    heads, chosen = [], {}
    for l in sorted(meas):
        m = meas[l]
        idx = choose_factors(factors, m["captured"], min_mass)
        chosen[l] = [factors[i] for i in idx]
        for j, h in enumerate(m["heads"]):
            i = idx[j]
            heads.append(dict(
                layer=l, head=h, factor=factors[i],
                density_f1=float(m["density"][i1, j]), density=float(m["density"][i, j]),
                captured_f1=float(m["captured"][i1, j]), captured=float(m["captured"][i, j]),
                oracle_density=float(m["oracle_density"][j]), oracle_captured=float(m["oracle_captured"][j]),
                grid={"density": [float(x) for x in m["density"][:, j]],
                      "captured": [float(x) for x in m["captured"][:, j]]}))
    if apply:
        fold_sharpening(model, chosen)

    def mean(key):
        vals = [h[key] for h in heads if not math.isnan(h[key])]
        return sum(vals) / len(vals) if vals else float("nan")

    summary = {k: mean(k) for k in ("factor", "density_f1", "density", "captured_f1", "captured",
                                    "oracle_density", "oracle_captured")}
    # the grid, averaged over heads: what a single global factor would give
    grid = {"density": [], "captured": []}
    for i in range(len(factors)):
        for key in grid:
            vals = [h["grid"][key][i] for h in heads if not math.isnan(h["grid"][key][i])]
            grid[key].append(sum(vals) / len(vals) if vals else float("nan"))
    return dict(factors=factors, min_mass=float(min_mass), applied=bool(apply), heads=heads, summary=summary,
                grid_mean=grid, num_sequences=len(sequences))


def log_sharpening_report(report: dict[str, Any], path: str | Path | None = None) -> None:
    """Log the per-head table (and write the report as JSON to `path`)."""
    lines = [f"indexer sharpening (min_mass {report['min_mass']:g} of the factor-1 captured mass, "
             f"{report['num_sequences']} sequences): layer/head factor  density f1 -> chosen  "
             f"captured f1 -> chosen  (oracle density / captured)"]
    for h in report["heads"]:
        lines.append(f"  L{h['layer']:>2} h{h['head']:>2}  x{h['factor']:<4g}  {h['density_f1']:.3f} -> "
                     f"{h['density']:.3f}   {h['captured_f1']:.3f} -> {h['captured']:.3f}   "
                     f"({h['oracle_density']:.3f} / {h['oracle_captured']:.3f})")
    s = report["summary"]
    lines.append(f"  mean  x{s['factor']:.3g}  {s['density_f1']:.3f} -> {s['density']:.3f}   "
                 f"{s['captured_f1']:.3f} -> {s['captured']:.3f}   ({s['oracle_density']:.3f} / "
                 f"{s['oracle_captured']:.3f})")
    g = report["grid_mean"]
    lines.append("  one global factor (mean over heads): " + ", ".join(
        f"x{f:g}: density {d:.3f} captured {c:.3f}" for f, d, c in zip(report["factors"], g["density"], g["captured"])))
    logger.info("\n".join(lines))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))
