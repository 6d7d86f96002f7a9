"""Export / import of an RTPurbo model: the original HF checkpoint plus an RTPurbo section.

config.json gains
    "rtpurbo": {"format": "rtpurbo/1", "roles": <roles JSON, with scores>, "granularity", "window", "sinks",
                "indexer_dim", "top_p", "block_size", "prefill", "retrieval_ratio", "indexer_init", ...},
    "headwise_config": {"sink_token_num", "swa_token_num", "seqlen_threshold", "<layer>": [0/1 per q head]}
(the latter is what RTP-LLM reads), and the selector weights are extra tensors named
"rtpurbo.layers.{i}.indexer.wq" / ".wk" ([Hr, r, head_dim]) next to the model weights.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from models.rtpurbo.convert import apply_rtpurbo, iter_rtpurbo_backends
from models.rtpurbo.roles import HeadRoles

SECTION_FORMAT = "rtpurbo/1"
_CFG_KEYS = ("granularity", "retrieval_ratio", "retrieval_threshold", "window", "sinks", "indexer_dim",
             "indexer_rope_periods", "indexer_init", "top_p", "block_size", "prefill", "stage1_target",
             "stage2_retrieval")


def _key(i: int, name: str) -> str:
    return f"rtpurbo.layers.{i}.indexer.{name}"


def indexer_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"rtpurbo.layers.{i}.indexer.wq" / ".wk": [Hr, r, D]} for every layer with retrieval heads (CPU copies)."""
    def full(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if hasattr(t, "full_tensor"):  # FSDP2 DTensor: a collective, every rank must call this
            t = t.full_tensor()
        return t.cpu().clone()

    sd = {}
    for i, b in iter_rtpurbo_backends(model):
        if b.indexer is not None:
            sd[_key(i, "wq")] = full(b.indexer.wq)
            sd[_key(i, "wk")] = full(b.indexer.wk)
    return sd


@torch.no_grad()
def load_indexer_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Copy indexer weights into an RTPurbo model. strict: every indexer must be present, shapes must match,
    and no rtpurbo.* key may be left unused."""
    used = set()
    for i, b in iter_rtpurbo_backends(model):
        if b.indexer is None:
            continue
        for name in ("wq", "wk"):
            key = _key(i, name)
            p = getattr(b.indexer, name)
            if key not in sd:
                if strict:
                    raise KeyError(f"indexer weight {key} missing (layer {i} has retrieval heads {b.retrieval_list})")
                continue
            t = sd[key]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{key}: checkpoint shape {tuple(t.shape)} != model shape {tuple(p.shape)} "
                                 f"(heads {b.retrieval_list}); were the roles changed after training?")
            if isinstance(p, DTensor):  # FSDP2-sharded: every rank passes the full tensor
                p.copy_(distribute_tensor(t.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(t.to(device=p.device, dtype=p.dtype))
            used.add(key)
    extra = sorted(k for k in sd if k.startswith("rtpurbo.") and k not in used)
    if strict and extra:
        raise KeyError(f"indexer weights for layers without retrieval heads: {extra}")


def rtpurbo_config_section(model: nn.Module, roles: HeadRoles, cfg: Any) -> dict[str, Any]:
    """{"rtpurbo": ..., "headwise_config": ...} to merge into config.json. The roles are recorded with the
    window / sinks the model actually runs with (cfg's)."""
    roles = dataclasses.replace(roles, window=int(cfg.window), sinks=int(cfg.sinks),
                                extra={k: v for k, v in roles.extra.items() if k != "source_file"})
    sec = {"format": SECTION_FORMAT, "roles": roles.to_dict()}
    for k in _CFG_KEYS:
        if hasattr(cfg, k):
            sec[k] = getattr(cfg, k)
    sec["indexer_layers"] = [i for i, b in iter_rtpurbo_backends(model) if b.indexer is not None]
    sec["num_retrieval_heads"] = roles.num_retrieval()
    sec["full_kv_fraction"] = roles.full_kv_fraction()
    return {"rtpurbo": sec, "headwise_config": roles.headwise_config()}


def config_from_section(section: dict[str, Any]):
    """An RTPurbo config dataclass filled from an exported section (unknown keys ignored)."""
    from torchtitan_rtpurbo.config.job_config import RTPurbo

    names = {f.name for f in dataclasses.fields(RTPurbo)}
    return RTPurbo(**{k: v for k, v in section.items() if k in names})


@contextmanager
def dense_backends(model: nn.Module):
    """Temporarily give every layer a plain dense backend, so the saved backbone state dict holds exactly
    the original model's parameters (the indexers travel as extra tensors)."""
    from models.attention import DenseAttention

    saved = {}
    try:
        for name, layer in model.layers.items():
            saved[name] = layer.attention.inner_attention
            layer.attention.inner_attention = DenseAttention(getattr(model.args, "attn_backend", "sdpa"))
        yield model
    finally:
        for name, b in saved.items():
            model.layers[name].attention.inner_attention = b


def save_rtpurbo_checkpoint(model: nn.Module, roles: HeadRoles, cfg: Any, path: str, **kwargs) -> None:
    """HF checkpoint (models/hf_checkpoint.py) + config.json RTPurbo section + indexer tensors."""
    from models.hf_checkpoint import save_hf_checkpoint

    section = rtpurbo_config_section(model, roles, cfg)
    tensors = indexer_state_dict(model)
    with dense_backends(model):
        save_hf_checkpoint(model, path, extra_config=section, extra_tensors=tensors, **kwargs)


def read_rtpurbo_section(path: str) -> dict[str, Any]:
    cfg_path = Path(path) / "config.json"
    try:
        conf = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {cfg_path}: {e}") from None
    if "rtpurbo" not in conf:
        raise KeyError(f"{cfg_path} has no 'rtpurbo' section: not an RTPurbo checkpoint")
    return conf["rtpurbo"]


def load_rtpurbo_checkpoint(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None):
    """-> (args, model, roles, rt_section): the backbone from the HF checkpoint, converted with the saved
    roles and settings, indexer weights loaded (mode "infer")."""
    from models.hf_checkpoint import load_extra_tensors, load_hf_checkpoint

    section = read_rtpurbo_section(path)
    args, model = load_hf_checkpoint(path, device=device, dtype=dtype)
    roles = HeadRoles.from_dict(section["roles"], source=f"{path}/config.json:rtpurbo.roles")
    apply_rtpurbo(model, roles, config_from_section(section))
    load_indexer_state_dict(model, load_extra_tensors(path))
    return args, model, roles, section
