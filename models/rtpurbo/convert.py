"""Turn a dense Qwen3 model into an RTPurbo model (and the helpers the trainer needs around it).

apply_rtpurbo swaps every layer's `attention.inner_attention` for an RTPurboAttention built from the roles
and the config; the model code does not change. Apply it before FSDP / torch.compile wrap the model.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn as nn

from models.rtpurbo.attention import MODES, RTPurboAttention, rtpurbo_backend_from_config
from models.rtpurbo.indexer import rope_average_rotation
from models.rtpurbo.roles import HeadRoles


def iter_rtpurbo_backends(model: nn.Module) -> Iterator[tuple[int, RTPurboAttention]]:
    """(layer index, backend) for every layer whose attention backend is an RTPurboAttention."""
    for name, layer in model.layers.items():
        backend = layer.attention.inner_attention
        if isinstance(backend, RTPurboAttention):
            yield int(name), backend


def apply_rtpurbo(model: nn.Module, roles: HeadRoles, cfg: Any, *, check: bool = True) -> nn.Module:
    """Replace each layer's attention backend by an RTPurboAttention (in place; returns the model).

    Head roles come from `roles` (the JSON the user may have edited); window, sinks, top_p, block size,
    prefill mode, indexer_dim and the stage options come from `cfg` (an RTPurbo config section). Indexers are
    created on the layer's device and dtype with the "random" init; SVD init is applied afterwards from
    calibration samples (init_indexers_svd). A previously applied RTPurbo backend is replaced too.
    """
    args = model.args
    if check:
        roles.check_matches(args)
    for name, layer in model.layers.items():
        i = int(name)
        w = layer.attention.wq.weight
        layer.attention.inner_attention = rtpurbo_backend_from_config(
            cfg, layer_id=i, retrieval_heads=roles.retrieval_heads(i), n_heads=args.n_heads,
            n_kv_heads=args.n_kv_heads, head_dim=args.head_dim, device=w.device, dtype=w.dtype,
        )
    return model


def is_rtpurbo(model: nn.Module) -> bool:
    return any(True for _ in iter_rtpurbo_backends(model))


def set_rtpurbo_mode(model: nn.Module, mode: str) -> None:
    """"infer" | "stage1" | "stage2" on every RTPurbo layer (see models/rtpurbo/attention.py)."""
    if mode not in MODES:
        raise ValueError(f"RTPurbo mode must be one of {MODES}, got {mode!r}")
    n = 0
    for _, b in iter_rtpurbo_backends(model):
        b.mode = mode
        n += 1
    if n == 0:
        raise ValueError("set_rtpurbo_mode: the model has no RTPurbo layers (call apply_rtpurbo first)")


def indexer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The selector projections (wq, wk of every layer), for the stage-1 optimiser."""
    params = []
    for _, b in iter_rtpurbo_backends(model):
        if b.indexer is not None:
            params.extend([b.indexer.wq, b.indexer.wk])
    return params


def freeze_for_stage(model: nn.Module, stage: str) -> None:
    """stage1: only the indexers train; stage2: everything but the indexers trains."""
    idx = {id(p) for p in indexer_parameters(model)}
    for p in model.parameters():
        p.requires_grad_((id(p) in idx) if stage == "stage1" else (id(p) not in idx))


@torch.no_grad()
def init_indexers_svd(model: nn.Module, samples: dict[int, dict[str, Any]], *, rope_aware: bool = True) -> None:
    """SVD init of every indexer from collect_qk_samples(...) output (see indexer.py for the derivation).

    rope_aware: fit the RoPE-averaged logits (M = E[R(n - m)] over causal pairs up to the calibration length)
    rather than the raw pre-RoPE product (M = I)."""
    for i, b in iter_rtpurbo_backends(model):
        if b.indexer is None:
            continue
        if i not in samples:
            raise KeyError(f"init_indexers_svd: no q/k samples for layer {i}")
        s = samples[i]
        if list(s["heads"]) != b.retrieval_list:
            raise ValueError(f"layer {i}: samples are for heads {list(s['heads'])}, the layer retrieves with "
                             f"{b.retrieval_list}")
        M = None
        if rope_aware:
            M = rope_average_rotation(model.rope_inv_freq, int(s["seq_len"]), float(model.rope_mscale))
        b.indexer.init_from_samples(s["q"], s["k"], M)


def init_indexers(model: nn.Module, cfg: Any, samples: dict[int, dict[str, Any]] | None = None) -> None:
    """Apply cfg.indexer_init: "random" (reset_parameters) or "svd" (needs samples)."""
    if cfg.indexer_init == "random":
        for _, b in iter_rtpurbo_backends(model):
            if b.indexer is not None:
                b.indexer.reset_parameters()
    elif cfg.indexer_init == "svd":
        if samples is None:
            raise ValueError("rtpurbo.indexer_init='svd' needs q/k samples (calibrate.collect_qk_samples)")
        init_indexers_svd(model, samples)
    else:
        raise ValueError(f"rtpurbo.indexer_init must be 'svd' or 'random', got {cfg.indexer_init!r}")


def indexer_kl_loss(collect: dict[str, Any], reduction: str = "mean") -> torch.Tensor:
    """Stage-1 loss from ctx.collect: the per-head KLs of all layers, averaged ("mean", scale-free in the
    number of retrieval heads) or summed ("sum", the paper's L_proj) over heads."""
    kls = collect.get("indexer_kl") or []
    if not kls:
        raise ValueError("no 'indexer_kl' in collect: was the model in stage1 mode with ctx.collect set?")
    allk = torch.cat([k.reshape(-1) for k in kls])
    return allk.mean() if reduction == "mean" else allk.sum()


def rtpurbo_density_report(collect: dict[str, Any], *, per_head: bool = False) -> dict[str, float]:
    """Flatten what RTPurbo layers left in ctx.collect into scalars for logging.

    Keys: rtpurbo/density_mean, rtpurbo/density/layer_{i} (mean over the layer's retrieval heads; stage 1:
    token-level kept fraction of the visible keys, sparse prefill: kept fraction of the selectable key blocks
    beyond sinks + window, see models/rtpurbo/attention.py), rtpurbo/teacher_density/... (stage 1: the true
    attention's own top-p set), rtpurbo/keys_per_query/... (sparse prefill: key tokens listed per query),
    rtpurbo/indexer_kl_mean, rtpurbo/indexer_kl/layer_{i},
    rtpurbo/indexer_recall_mean, rtpurbo/indexer_recall/layer_{i}; with per_head also .../head_{h}.
    Several forwards in one collect (gradient accumulation) are averaged per layer."""
    out: dict[str, float] = {}

    def add(prefix: str, per_layer: dict[int, list[torch.Tensor]], heads: dict[int, list[int]]):
        allv = []
        for layer in sorted(per_layer):
            v = torch.stack([t.detach().float().cpu() for t in per_layer[layer]]).mean(0)
            allv.append(v)
            out[f"rtpurbo/{prefix}/layer_{layer}"] = float(v.mean())
            if per_head:
                for h, x in zip(heads.get(layer, range(v.numel())), v.tolist()):
                    out[f"rtpurbo/{prefix}/layer_{layer}/head_{h}"] = float(x)
        if allv:
            out[f"rtpurbo/{prefix}_mean"] = float(torch.cat(allv).mean())

    heads: dict[int, list[int]] = {}
    per_key: dict[str, dict[int, list]] = {"density": {}, "teacher_density": {}, "keys_per_query": {}}
    for e in collect.get("density", []) or []:
        heads[e["layer"]] = list(e["heads"])
        for key, per in per_key.items():
            if e.get(key) is not None:
                per.setdefault(e["layer"], []).append(e[key])
    for key, per in per_key.items():
        add(key, per, heads)
    layers = collect.get("indexer_layers", []) or []
    for key, name in (("indexer_kl", "indexer_kl"), ("indexer_recall", "indexer_recall")):
        per: dict[int, list] = {}
        for j, t in enumerate(collect.get(key, []) or []):
            per.setdefault(layers[j] if j < len(layers) else j, []).append(t)
        add(name, per, heads)
    return out
