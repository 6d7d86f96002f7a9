"""Build the windows of a window-indexed source in worker processes, in order.

A source whose window w depends only on w (SyntheticTaskDataset.window) can be generated in parallel
without losing determinism or exact resume: workers compute windows w, w + dp, ... ahead and the
stream yields them in the same order as the single-process iterator. The state stays the source's own
(the number of windows yielded).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from typing import Any

import torch

_SOURCE: Any = None  # set in the parent before the fork; workers inherit it


def _build_window(w: int):
    # numpy, not tensors: torch would send tensors through shared-memory file descriptors, and a long run
    # exhausts them ("received 0 items of ancdata").
    return {k: v.numpy() for k, v in _SOURCE.window(w).items()}


class ParallelWindows:
    def __init__(self, source: Any, num_workers: int, chunksize: int = 4):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.source = source
        self.num_workers = num_workers
        self.chunksize = chunksize

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)

    def __iter__(self) -> Iterator[dict]:
        global _SOURCE
        src = self.source
        _SOURCE = src
        ctx = mp.get_context("fork")
        with ctx.Pool(self.num_workers) as pool:
            start = src._windows_yielded

            def indices():
                i = start
                while True:
                    yield src.dp_rank + i * src.dp_degree
                    i += 1

            for sample in pool.imap(_build_window, indices(), chunksize=self.chunksize):
                src._windows_yielded += 1
                yield {k: torch.from_numpy(v) for k, v in sample.items()}
