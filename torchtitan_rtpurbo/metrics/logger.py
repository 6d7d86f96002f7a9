"""Metrics: a readable console line per log step and TensorBoard scalars (rank 0 only)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger("torchtitan_rtpurbo")


def init_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", force=True)


class MetricLogger:
    def __init__(self, folder: str | Path | None, rank: int, enable_tensorboard: bool, device: torch.device,
                 peak_flops: float | None):
        self.rank = rank
        self.device = device
        self.peak_flops = peak_flops
        self.writer = None
        if rank == 0 and enable_tensorboard and folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            Path(folder).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(log_dir=str(folder))
        self._t0 = time.perf_counter()
        self._tokens = 0

    def add_tokens(self, n: int) -> None:
        self._tokens += n

    def throughput(self) -> tuple[float, float]:
        """(tokens per second per rank since the last call, seconds elapsed)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self._t0
        tps = self._tokens / max(dt, 1e-9)
        self._t0, self._tokens = time.perf_counter(), 0
        return tps, dt

    def memory_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_reserved(self.device) / 2**30

    def log(self, step: int, scalars: dict[str, float], *, tps: float | None = None,
            flops_per_token: float | None = None, prefix: str = "") -> None:
        if tps is not None:
            scalars["throughput/tps"] = tps
            if self.peak_flops and flops_per_token:
                scalars["throughput/tflops"] = tps * flops_per_token / 1e12
                scalars["throughput/mfu_pct"] = 100 * tps * flops_per_token / self.peak_flops
        mem = self.memory_gib()
        if mem is not None:
            scalars["memory/max_reserved_gib"] = mem
        if self.rank != 0:
            return
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        parts = [f"step {step:5d}"]
        for k, v in scalars.items():
            short = k.split("/")[-1]
            parts.append(f"{short} {v:.4g}" if isinstance(v, float) else f"{short} {v}")
        logger.info(prefix + "  ".join(parts))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
