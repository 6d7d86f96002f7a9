"""DCP checkpoints: save / load model, optimizer, LR schedule, data loader and train state; exact resume.

Atomic by construction: every save goes to `step-N.partial/`, and only when all ranks have written it
(DCP writes `.metadata` last, after gathering every rank's results) does rank 0 rename it to `step-N/`.
A killed save therefore leaves a `.partial` directory that is never loaded (and is removed next time).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


def complete_steps(folder: Path) -> list[int]:
    """Steps with a complete checkpoint (renamed from .partial, with DCP's .metadata)."""
    if not folder.is_dir():
        return []
    steps = []
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / ".metadata").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


class CheckpointManager:
    def __init__(self, folder: str | Path, *, model, optimizer=None, lr_scheduler=None, dataloader=None,
                 enable: bool = True, interval: int = 500, async_mode: str = "disabled", keep_latest_k: int = 0):
        self.folder = Path(folder)
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.dataloader = dataloader
        self.enable = enable
        self.interval = interval
        self.keep_latest_k = keep_latest_k
        if async_mode not in ("disabled", "async"):
            raise ValueError(f"checkpoint.async_mode must be 'disabled' or 'async', got {async_mode!r}")
        self.async_mode = async_mode
        self._pending: tuple[Any, int] | None = None  # (future, step) of an async save in flight
        self._pg = None
        if async_mode == "async" and dist.is_initialized():
            self._pg = dist.new_group(backend="gloo")  # async saves must not block the NCCL stream
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    # ---- state ----
    def _state(self, train_state: dict) -> dict:
        opts = StateDictOptions(full_state_dict=False)
        state: dict[str, Any] = {"model": get_model_state_dict(self.model, options=opts)}
        if self.optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        # Data loader and RNG states differ per rank: keep one entry per rank.
        per_rank = {"rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            per_rank["rng_cuda"] = torch.cuda.get_rng_state()
        if self.dataloader is not None:
            per_rank["dataloader"] = self.dataloader.state_dict()
        state[f"rank_{self.rank}"] = per_rank
        state["train_state"] = dict(train_state)
        return state

    # ---- save ----
    def should_save(self, step: int, last_step: bool) -> bool:
        return self.enable and (last_step or (self.interval > 0 and step % self.interval == 0))

    def save(self, step: int, train_state: dict, *, force_sync: bool = False) -> None:
        self.wait()  # one save in flight at a time
        final = self.folder / f"step-{step}"
        partial = self.folder / f"step-{step}.partial"
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if partial.exists():
                shutil.rmtree(partial)
        if dist.is_initialized():
            dist.barrier()
        state = self._state(train_state)
        if self.async_mode == "async" and not force_sync:
            fut = dcp.async_save(state, checkpoint_id=str(partial), process_group=self._pg)
            self._pending = (fut, step)
        else:
            dcp.save(state, checkpoint_id=str(partial))
            self._finalize(step)

    def wait(self) -> None:
        if self._pending is not None:
            fut, step = self._pending
            fut.result()
            self._pending = None
            self._finalize(step)

    def _finalize(self, step: int) -> None:
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            final = self.folder / f"step-{step}"
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.folder / f"step-{step}.partial", final)  # the commit point
            logger.info(f"checkpoint saved: {final}")
            self._purge()
        if dist.is_initialized():
            dist.barrier()

    def _purge(self) -> None:
        if self.keep_latest_k <= 0:
            return
        for s in complete_steps(self.folder)[: -self.keep_latest_k]:
            shutil.rmtree(self.folder / f"step-{s}", ignore_errors=True)

    # ---- load ----
    def load(self, step: int = -1) -> dict | None:
        """Load `step` (or the latest complete one). Returns the train_state, or None if there is none."""
        steps = complete_steps(self.folder)
        if not steps:
            if step != -1:
                raise FileNotFoundError(f"checkpoint.load_step={step}: no complete checkpoint in {self.folder}")
            return None
        if step == -1:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"checkpoint.load_step={step} not found in {self.folder} (have {steps})")
        state = self._state({"step": 0})
        dcp.load(state, checkpoint_id=str(self.folder / f"step-{step}"))
        opts = StateDictOptions(full_state_dict=False)
        set_model_state_dict(self.model, state["model"], options=opts)
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        per_rank = state[f"rank_{self.rank}"]
        torch.set_rng_state(per_rank["rng_cpu"])
        if torch.cuda.is_available() and "rng_cuda" in per_rank:
            torch.cuda.set_rng_state(per_rank["rng_cuda"])
        if self.dataloader is not None:
            self.dataloader.load_state_dict(per_rank["dataloader"])
        logger.info(f"checkpoint loaded: {self.folder / f'step-{step}'}")
        return state["train_state"]
