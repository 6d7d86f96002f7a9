"""Optimizer and LR schedule from config: AdamW (torch) or torchao's low-precision AdamW variants;
linear warm-up then cosine / linear decay or constant."""

from __future__ import annotations

import math

import torch

from torchtitan_rtpurbo.config.job_config import LRScheduler as LRConfig
from torchtitan_rtpurbo.config.job_config import Optimizer as OptConfig


def build_optimizer(params, cfg: OptConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("optimizer: no trainable parameters (is everything frozen?)")
    # Weight decay applies to matrices only (not norms / biases / 1-d params).
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.name == "AdamW":
        return torch.optim.AdamW(groups, **kw, foreach=True)
    if cfg.name in ("AdamW8bit", "AdamW4bit", "AdamWFp8"):
        try:
            import torchao.optim as ao_optim
        except ImportError as e:  # pragma: no cover
            raise ImportError(f"optimizer.name={cfg.name!r} needs torchao: {e}") from e
        return getattr(ao_optim, cfg.name)(groups, **kw)
    raise ValueError(f"optimizer.name must be AdamW, AdamW8bit, AdamW4bit or AdamWFp8, got {cfg.name!r}")


def lr_lambda(step: int, cfg: LRConfig, total_steps: int) -> float:
    """Multiplier of the base LR after `step` optimizer steps (step counts from 0)."""
    warm = cfg.warmup_steps
    if step < warm:
        return (step + 1) / (warm + 1)
    if cfg.decay_type == "constant":
        return 1.0
    span = max(total_steps - warm, 1)
    progress = min((step - warm) / span, 1.0)
    if cfg.decay_type == "linear":
        frac = 1.0 - progress
    elif cfg.decay_type == "cosine":
        frac = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"lr_scheduler.decay_type must be cosine, linear or constant, got {cfg.decay_type!r}")
    return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * frac


def build_lr_scheduler(optimizer, cfg: LRConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg, total_steps))
