"""Process-group setup, device choice and small collective helpers (CUDA/NCCL or CPU/gloo)."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise the default process group (torchrun env, or a 1-rank group when run directly)."""
    dtype = device_type()
    if not dist.is_initialized():
        backend = "nccl" if dtype == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        else:  # plain `python -m torchtitan_rtpurbo.train` or an in-process test: a world of one
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                timeout=datetime.timedelta(minutes=30),
            )
    rank, world = dist.get_rank(), dist.get_world_size()
    if dtype == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return rank, world, device


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_reduce_max(x: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU (datasheet, as TorchTitan), or None on CPU (no MFU reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("H20", 148e12), ("A100", 312e12),
                       ("L40S", 362e12), ("B200", 2250e12)):
        if key in name:
            return flops
    return None


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Clip gradients (DTensor-aware) and return the total norm as a plain tensor."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def unwrap_compiled(model):
    """The module under a torch.compile wrapper (FSDP2 / AC keep the module itself)."""
    return getattr(model, "_orig_mod", model)
