"""parallelize_qwen3: activation checkpointing -> torch.compile -> FSDP2, applied from outside the model.

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


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kw = dict(mesh=mesh, mp_policy=mp)
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
        raise NotImplementedError(
            "parallelism.context_parallel_degree > 1 is not implemented yet (see the context-parallel issue)"
        )
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
                   job_config.parallelism.fsdp_reshard_after_forward)
        logger.info(f"FSDP2 over {parallel_dims.dp_shard * parallel_dims.cp} ranks, params {param_dtype}")
    elif parallel_dims.dp_replicate_enabled:
        raise NotImplementedError("DDP-only (data_parallel_replicate_degree > 1, shard 1) is not implemented")
    return model
