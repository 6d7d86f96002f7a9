"""parallelize_qwen3: context parallel -> activation checkpointing -> torch.compile -> FSDP2, applied from
outside the model.

Context parallelism (apply_cp) only makes every layer's attention backend CP-aware; it adds no parameters
and renames nothing, so checkpoints saved under CP load without it. FSDP2 then shards over dp_shard x cp.

Order follows TorchTitan: AC wraps each block, compile runs per block, FSDP2 shards each block and the
root (embeddings / final norm / output stay in the root's group). Gradient division by FSDP is turned off:
the trainer divides the loss by the global number of label tokens instead.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from torchtitan_rtpurbo.config.job_config import JobConfig
from torchtitan_rtpurbo.distributed.parallel_dims import ParallelDims

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _make_backend_cp_aware(backend: nn.Module, layer: str) -> nn.Module:
    """The CP-aware version of one layer's attention backend (same parameters and FQNs)."""
    if getattr(backend, "supports_context_parallel", False):
        return backend  # DenseAttention reads ctx.extras["cp"] itself (models/attention.py)
    from models.rtpurbo.attention import RTPurboAttention

    if isinstance(backend, RTPurboAttention):
        try:
            from models.rtpurbo.context_parallel import make_cp_aware
        except ImportError as e:  # the module, or the function in it, does not exist yet
            raise NotImplementedError(
                "context parallelism for RTPurbo layers needs models.rtpurbo.context_parallel.make_cp_aware("
                f"backend) -> nn.Module, which is not available ({e})"
            ) from e
        return make_cp_aware(backend)
    raise NotImplementedError(
        f"context parallelism: layer {layer}'s attention backend {type(backend).__name__} is not CP-aware "
        "(supported: DenseAttention, RTPurboAttention)"
    )


def apply_cp(model: nn.Module) -> None:
    """Make every layer's attention backend context-parallel aware, in place, before AC / compile / FSDP.

    Under CP each rank holds a load-balanced part of every sequence (torchtitan_rtpurbo/distributed/
    context_parallel.py); the trainer puts the CPContext in AttentionContext.extras["cp"] and passes the
    global positions. Backends fall back to the single-process path when no CPContext is given."""
    keys_before = list(model.state_dict().keys())
    for name, layer in model.layers.items():
        attn = layer.attention
        new = _make_backend_cp_aware(attn.inner_attention, name)
        if new is not attn.inner_attention:
            attn.inner_attention = new
    keys_after = list(model.state_dict().keys())
    if keys_after != keys_before:  # a CP checkpoint must load without CP, and the reverse
        changed = sorted(set(keys_before) ^ set(keys_after))[:8]
        raise RuntimeError(f"apply_cp changed the model's state-dict keys (first differences: {changed})")
    logger.info("context parallel: attention backends made CP-aware")


def apply_ac(model: nn.Module, mode: str, selective_option: str) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"activation_checkpoint.mode must be none|full|selective, got {mode!r}")
    every = 1
    if mode == "selective":
        if not selective_option.isdigit() or int(selective_option) < 1:
            raise ValueError(
                "activation_checkpoint.selective_ac_option must be a positive integer N "
                f"(checkpoint every N-th block), got {selective_option!r}"
            )
        every = int(selective_option)
    for i, (name, block) in enumerate(list(model.layers.named_children())):
        if i % every == 0:
            model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False))
    logger.info(f"activation checkpointing: {mode} (every {every} block)")


def apply_compile(model: nn.Module) -> None:
    for name, block in list(model.layers.named_children()):
        model.layers.register_module(name, torch.compile(block, fullgraph=False))
    logger.info("torch.compile applied to each transformer block")


def fsdp_ignored_params(model: nn.Module, job_config: JobConfig) -> set[nn.Parameter]:
    """Parameters FSDP must not manage: those trained through a side channel rather than through the block
    outputs. Stage 1's loss is the indexers' KL, left in ctx.collect, computed from DETACHED q/k: no gradient
    reaches any block output, so FSDP's backward hooks never run and it would never reduce the indexers'
    gradients (they would stay zero). They stay plain replicated tensors instead (a few thousand values per
    layer), and the trainer averages their gradients itself (Trainer._sync_replicated_grads)."""
    if job_config.job.mode != "stage1":
        return set()
    from models.rtpurbo.convert import indexer_parameters

    return set(indexer_parameters(model))


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: str, ignored_params: set[nn.Parameter] | None = None) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mesh=mesh, mp_policy=mp, ignored_params=ignored_params or None)
    n = len(model.layers)
    for i, block in enumerate(model.layers.values()):
        if reshard_after_forward == "default":
            reshard = i < n - 1  # the last block is needed again at once by backward
        else:
            reshard = reshard_after_forward == "always"
        fully_shard(block, reshard_after_forward=reshard, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward == "always", **kw)
    # FSDP averages gradients over its ranks; the trainer multiplies the loss by that rank count so the
    # result is the sum over ranks of (loss / global label tokens). (set_gradient_divide_factor(1.0) would
    # do the same but needs PREMUL_SUM, which gloo lacks.)


def parallelize_qwen3(model: nn.Module, parallel_dims: ParallelDims, mesh: DeviceMesh | None,
                      job_config: JobConfig, device: torch.device) -> nn.Module:
    if parallel_dims.cp_enabled:
        if parallel_dims.dp_replicate_enabled:
            raise NotImplementedError("context parallelism with HSDP (data_parallel_replicate_degree > 1) is "
                                      "not implemented")
        apply_cp(model)
    ac = job_config.activation_checkpoint
    apply_ac(model, ac.mode, ac.selective_ac_option)
    if job_config.compile.enable and "model" in job_config.compile.components:
        apply_compile(model)
    if parallel_dims.fsdp_enabled:
        if parallel_dims.dp_replicate_enabled:
            raise NotImplementedError("HSDP (data_parallel_replicate_degree > 1) is not implemented yet")
        on_gpu = device.type == "cuda"
        param_dtype = _DTYPES[job_config.training.mixed_precision_param] if on_gpu else torch.float32
        reduce_dtype = _DTYPES[job_config.training.mixed_precision_reduce]
        apply_fsdp(model, mesh["dp_shard_cp"], param_dtype, reduce_dtype,
                   job_config.parallelism.fsdp_reshard_after_forward, fsdp_ignored_params(model, job_config))
        logger.info(f"FSDP2 over {parallel_dims.dp_shard * parallel_dims.cp} ranks, params {param_dtype}")
    elif parallel_dims.dp_replicate_enabled:
        raise NotImplementedError("DDP-only (data_parallel_replicate_degree > 1, shard 1) is not implemented")
    return model
