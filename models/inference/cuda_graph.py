"""CUDA graphs of the decode step, one per cache-length bucket (used by models/inference/engine.py).

What a graph replays: the engine's `_decode_core(bucket)` - embedding, every layer (norms, projections,
RoPE, KV-cache writes at the positions held in a static device buffer, decode attention over the cache
views [:, :, :bucket], graph-safe MoE / FFN), final norm and output head - reading the token ids and the
positions from static device buffers and writing the logits into a static output tensor. With the engine's
fused decode (the default on CUDA) the non-attention part of each layer is a handful of Triton launches
(kernels/fused_decode.py, kernels/moe_decode.py) instead of ~73 small torch kernels; the warm-up runs below
compile them before the capture.

Why buckets: a graph fixes every shape, and the decode kernels take the cache as a view [:, :, :L_view].
With L_view = max_len one graph would serve every step, but the parts of a step whose cost follows the
view rather than the valid length (the indexer scoring grid and the top-p mask row of the retrieval heads,
the kept-token count for the density statistic, every pure-torch reference) would then pay for max_len at
every step (a 4K-token chat in a 1M cache). Power-of-two buckets (min_bucket, 2*min_bucket, ..., max_len)
bound that waste to 2x the used length with log2(max_len / min_bucket) + 1 graphs at most, captured
lazily the first time a step needs the bucket. The graphs share one memory pool (they never run at the
same time), so the extra memory is one step's intermediates, not one per graph.

Capture protocol (torch.cuda.graphs docs): the step is first run eagerly on a side stream (Triton JIT
compilation, cached device index tensors, cuBLAS workspaces), then captured. Running the step is
idempotent for the cache (it rewrites the same K/V at the same positions), but not for the density
accumulators: the caller passes the tensors to restore after the warm-up runs.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)


class GraphCaptureError(RuntimeError):
    pass


def bucket_length(n: int, *, min_bucket: int, max_len: int) -> int:
    """Smallest min_bucket * 2**i >= n, capped at max_len."""
    if n > max_len:
        raise ValueError(f"length {n} exceeds max_len={max_len}")
    b = max(1, int(min_bucket))
    while b < n:
        b *= 2
    return min(b, max_len)


class DecodeGraphs:
    """Lazily captured CUDA graphs of step(key) -> Tensor, one per key (the bucket length)."""

    def __init__(self, step: Callable[[int], torch.Tensor], device: torch.device, *, warmup: int = 2,
                 restore: Sequence[torch.Tensor] = ()):
        self.step = step
        self.device = device
        self.warmup = int(warmup)
        self.restore = list(restore)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.last: torch.cuda.CUDAGraph | None = None
        self.capture_s = 0.0  # wall time spent in warm-ups + captures (kernel JIT compilation included)

    def capture(self, key: int) -> None:
        t0 = time.perf_counter()
        saved = [t.clone() for t in self.restore]
        cur = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(cur)
        try:
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.step(key)
            cur.wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = self.step(key)
        except Exception as e:  # noqa: BLE001 - reported with its cause
            torch.cuda.synchronize(self.device)
            raise GraphCaptureError(f"capturing the decode step (cache view {key}) failed: "
                                    f"{type(e).__name__}: {e}") from e
        finally:
            for t, s in zip(self.restore, saved):
                t.copy_(s)
        self.graphs[key] = (g, out)
        torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - t0
        log.info("captured a CUDA graph of the decode step for cache view length %d (%d graphs)", key,
                 len(self.graphs))

    def run(self, key: int) -> torch.Tensor:
        """Replay the graph of `key` (capturing it first if needed); returns its static output."""
        if key not in self.graphs:
            self.capture(key)
        g, out = self.graphs[key]
        g.replay()
        self.last = g
        return out

    def clear(self) -> None:
        self.graphs.clear()
        self.last = None
