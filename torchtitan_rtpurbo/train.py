"""The trainer: one loop for every mode (pretrain, stage1, stage2), plus the non-loop modes
(calibrate, eval, pipeline) dispatched from main().

    torchrun --nproc_per_node N -m torchtitan_rtpurbo.train --job.config_file train_configs/debug_model.toml
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from models.qwen3 import build_model, get_flavor
from models.qwen3.parallelize import parallelize_qwen3
from torchtitan_rtpurbo.checkpoint.manager import CheckpointManager
from torchtitan_rtpurbo.config import JobConfig, load_job_config
from torchtitan_rtpurbo.distributed.parallel_dims import ParallelDims
from torchtitan_rtpurbo.distributed.utils import (
    all_reduce_sum,
    clip_grad_norm_,
    init_distributed,
    peak_flops,
    set_determinism,
    unwrap_compiled,
)
from torchtitan_rtpurbo.metrics.logger import MetricLogger, init_logging
from torchtitan_rtpurbo.optimizer import build_lr_scheduler, build_optimizer
from torchtitan_rtpurbo.tasks.pretrain import PretrainTask, label_count

logger = logging.getLogger("torchtitan_rtpurbo")

LOOP_MODES = ("pretrain", "stage1", "stage2")


def build_task(cfg: JobConfig):
    mode = cfg.job.mode
    if mode == "pretrain":
        return PretrainTask(cfg)
    if mode == "stage1":
        from torchtitan_rtpurbo.tasks.stage1 import Stage1Task

        return Stage1Task(cfg)
    if mode == "stage2":
        from torchtitan_rtpurbo.tasks.stage2 import Stage2Task

        return Stage2Task(cfg)
    raise ValueError(f"job.mode {mode!r} is not a training-loop mode ({', '.join(LOOP_MODES)})")


def load_base_model(cfg: JobConfig, device: torch.device, vocab_needed: int):
    """The model the job starts from: an RTPurbo export (stage 2 / eval), a HF checkpoint, or a fresh
    flavour. Returns (args, model, roles or None)."""
    roles = None
    if cfg.job.mode == "stage2":
        from models.rtpurbo.export import load_rtpurbo_checkpoint

        args, model, roles, _ = load_rtpurbo_checkpoint(cfg.rtpurbo.init_checkpoint, device=device)
    elif cfg.model.hf_checkpoint:
        from models.hf_checkpoint import load_hf_checkpoint

        args, model = load_hf_checkpoint(cfg.model.hf_checkpoint, device=device)
        args.attn_backend = cfg.model.attn_backend
        _set_attn_backend(model, cfg.model.attn_backend)
    else:
        args = get_flavor(cfg.model.flavor)
        overrides = {"attn_backend": cfg.model.attn_backend}
        if cfg.model.vocab_size:
            overrides["vocab_size"] = cfg.model.vocab_size
        if cfg.model.max_seq_len:
            overrides["max_seq_len"] = cfg.model.max_seq_len
        args = dataclasses.replace(args, **overrides)
        model = build_model(args, device=device, init=True)
    if vocab_needed > args.vocab_size:
        raise ValueError(
            f"tokenizer {cfg.model.tokenizer_path} has {vocab_needed} tokens but the model's vocab_size is "
            f"{args.vocab_size} (set model.vocab_size or use a matching tokenizer)"
        )
    return args, model, roles


def build_training_dataloader(cfg: JobConfig, tokenizer, dp_rank: int, dp_degree: int, validation: bool = False):
    """The configured corpus, optionally mixed with the synthetic tasks' training split. validation=True:
    the held-out documents ("val" split) and the synthetic tasks' held-out ("eval") split, not shuffled."""
    from torchtitan_rtpurbo.data import MixtureDataset, StatefulBatchLoader, build_dataloader
    from torchtitan_rtpurbo.data.synthetic import SyntheticTaskDataset

    t = cfg.training
    base = build_dataloader(t.dataset, tokenizer, seq_len=t.seq_len, batch_size=t.local_batch_size,
                            dp_rank=dp_rank, dp_degree=dp_degree, seed=cfg.job.seed,
                            split="val" if validation else t.dataset_split, shard_by=t.dataset_shard_by,
                            shuffle=not validation)
    if t.synthetic_fraction <= 0:
        return base
    if not 0 < t.synthetic_fraction <= 1:
        raise ValueError(f"training.synthetic_fraction must be in [0, 1], got {t.synthetic_fraction}")
    lengths = t.synthetic_lengths or [t.seq_len // 4, t.seq_len // 2, t.seq_len]
    synthetic = SyntheticTaskDataset(tokenizer, "all", lengths, seq_len=t.seq_len, seed=cfg.job.seed,
                                     split="eval" if validation else "train", dp_rank=dp_rank,
                                     dp_degree=dp_degree)
    if t.synthetic_workers > 0 and not validation:
        from torchtitan_rtpurbo.data.prefetch import ParallelWindows

        synthetic = ParallelWindows(synthetic, t.synthetic_workers)
    mix = MixtureDataset([base.dataset, synthetic], [1 - t.synthetic_fraction, t.synthetic_fraction],
                         seed=cfg.job.seed)
    return StatefulBatchLoader(mix, t.local_batch_size)


def _set_attn_backend(model, backend: str) -> None:
    from models.attention import DenseAttention

    for layer in model.layers.values():
        if isinstance(layer.attention.inner_attention, DenseAttention):
            layer.attention.inner_attention.backend = backend


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        init_logging(self.rank)
        set_determinism(cfg.job.seed, cfg.job.deterministic)
        self.dump = Path(cfg.job.dump_folder)
        if self.rank == 0:
            self.dump.mkdir(parents=True, exist_ok=True)
            (self.dump / "job_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        par = cfg.parallelism
        self.parallel_dims = ParallelDims(par.data_parallel_replicate_degree, par.data_parallel_shard_degree,
                                          par.context_parallel_degree, self.world)
        self.mesh = self.parallel_dims.build_mesh(self.device.type) if self.world > 1 else None
        dp = self.parallel_dims.dp
        # The data loader is sharded over "dp" only: the cp ranks of one dp group read the same full
        # sequences and each keeps its part of them (cp_shard).
        self.dp_rank = self.mesh["dp"].get_local_rank() if self.mesh is not None else 0
        self.cp_group = self._build_cp_group(cfg)

        from torchtitan_rtpurbo.data import build_tokenizer

        self.tokenizer = build_tokenizer(cfg.model.tokenizer_path)
        self.model_args, model, self.rtpurbo_roles = load_base_model(cfg, self.device, self.tokenizer.vocab_size)
        self.task = build_task(cfg)
        model = self.task.prepare(model, self.tokenizer)
        if getattr(self.task, "roles", None) is not None:
            self.rtpurbo_roles = self.task.roles
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in self.task.trainable_parameters(model))
        logger.info(f"mode {cfg.job.mode}: model {cfg.model.flavor if not cfg.model.hf_checkpoint else cfg.model.hf_checkpoint}"
                    f" {n_params / 1e6:.2f}M params ({n_train / 1e6:.3f}M trainable), world {self.world}, "
                    f"device {self.device}")
        self.model = parallelize_qwen3(model, self.parallel_dims, self.mesh, cfg, self.device)
        pd = self.parallel_dims
        self.grad_average_factor = pd.dp_shard * pd.cp if pd.fsdp_enabled else 1
        self.optimizer = build_optimizer(self.task.trainable_parameters(self.model), cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, cfg.training.steps)
        self.dataloader = self.task.build_dataloader(self) if hasattr(self.task, "build_dataloader") else \
            build_training_dataloader(cfg, self.tokenizer, self.dp_rank, dp)
        self.checkpointer = CheckpointManager(
            self.dump / cfg.checkpoint.folder, model=self.model, optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler, dataloader=self.dataloader, enable=cfg.checkpoint.enable,
            interval=cfg.checkpoint.interval, async_mode=cfg.checkpoint.async_mode,
            keep_latest_k=cfg.checkpoint.keep_latest_k,
        )
        self.metrics = MetricLogger(self.dump / cfg.metrics.save_tb_folder / cfg.job.mode, self.rank,
                                    cfg.metrics.enable_tensorboard, self.device, peak_flops(self.device))
        self.val_batches = self._build_val_batches() if cfg.training.val_batches > 0 else []
        self.val_history: dict[str, dict] = {}
        self.step = 0
        self.loss_history: list[float] = []
        if cfg.checkpoint.enable:
            state = self.checkpointer.load(cfg.checkpoint.load_step)
            if state is not None:
                self.step = int(state["step"])
                logger.info(f"resumed at step {self.step}")

    def _build_cp_group(self, cfg: JobConfig):
        """The cp process group (None without context parallelism), after checking the sequence length."""
        cp = self.parallel_dims.cp
        if cp == 1:
            return None
        if cfg.training.seq_len < 2 * cp:
            raise ValueError(f"training.seq_len = {cfg.training.seq_len} is shorter than 2 x "
                             f"parallelism.context_parallel_degree (2 x {cp} = {2 * cp}): the CP layout cuts "
                             f"each sequence into 2 x cp chunks")
        return self.mesh["cp"].get_group()

    def cp_shard(self, batch: dict) -> dict:
        """A full micro-batch -> this rank's part of it under context parallelism (batch["cp"] holds the
        CPContext), or the batch itself without CP. Tasks see only the sharded batch."""
        if self.cp_group is None:
            return batch
        from torchtitan_rtpurbo.distributed.context_parallel import shard_batch

        return shard_batch(batch, self.cp_group, use_doc_ids=self.cfg.training.document_mask)

    def _build_val_batches(self) -> list[dict]:
        """A fixed set of held-out batches, measured before and after training (val/* metrics)."""
        if hasattr(self.task, "build_val_batches"):
            return self.task.build_val_batches(self)
        loader = build_training_dataloader(self.cfg, self.tokenizer, self.dp_rank, self.parallel_dims.dp,
                                           validation=True)
        it = iter(loader)
        return [self.cp_shard(self._to_device(next(it))) for _ in range(self.cfg.training.val_batches)]

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if not self.val_batches:
            return {}
        was_training = self.model.training
        self.model.eval()
        if hasattr(self.task, "before_step"):
            self.task.before_step(unwrap_compiled(self.model), self.step, True)
        tokens = int(all_reduce_sum(torch.tensor(float(sum(label_count(b) for b in self.val_batches)),
                                                 device=self.device)).item())
        sums: dict[str, torch.Tensor] = {}
        for batch in self.val_batches:
            _, m = self.task.loss(self.model, batch, max(tokens, 1), len(self.val_batches), self.parallel_dims.dp)
            for k, v in m.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        self.model.train(was_training)
        return self._reduce_metrics(sums, max(tokens, 1))

    def _reduce_metrics(self, sums: dict[str, torch.Tensor], global_tokens: int) -> dict[str, float]:
        """Per-rank metric sums -> global values, in ONE all-reduce and one host sync: "<name>_sum" keys are
        divided by the global label-token count (and lose the suffix); "<name>_cpsum" keys are per-rank
        shares that add up over the cp ranks of a sequence (stage 1's KL under CP): summed over cp, averaged
        over dp; the others are averaged over all ranks (dp x cp)."""
        if not sums:
            return {}
        keys = list(sums)
        total = all_reduce_sum(torch.stack([torch.as_tensor(sums[k], device=self.device).float() for k in keys]))
        out = {}
        for k, v in zip(keys, total.tolist()):
            if k.endswith("_cpsum"):
                out[k[:-6]] = v / max(self.world // self.parallel_dims.cp, 1)
            elif k.endswith("_sum"):
                out[k[:-4]] = v / global_tokens
            else:
                out[k] = v / max(self.world, 1)
        return out

    def _log_validation(self, when: str) -> None:
        val = self.validate()
        if not val:
            return
        self.val_history[when] = {"step": self.step, **val}
        self.metrics.log(self.step, {f"val/{k}": v for k, v in val.items()}, prefix=f"validation ({when}) ")

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, batches: list[dict]) -> dict:
        cfg = self.cfg
        dp = self.parallel_dims.dp
        global_tokens = int(all_reduce_sum(torch.tensor(float(sum(label_count(b) for b in batches)),
                                                        device=self.device)).item())
        global_tokens = max(global_tokens, 1)
        sums: dict[str, torch.Tensor] = {}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (
            self.device.type == "cuda" and not self.parallel_dims.fsdp_enabled
            and cfg.training.mixed_precision_param == "bfloat16") else _nullcontext()
        for batch in batches:
            with autocast:
                loss, m = self.task.loss(self.model, batch, global_tokens, len(batches), dp)
            # FSDP averages gradients over its ranks; undo that so gradients are sums over ranks.
            (loss * self.grad_average_factor).backward()
            for k, v in m.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        self._sync_replicated_grads()
        grad_norm = clip_grad_norm_(self.task.trainable_parameters(self.model), cfg.training.max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        out = self._reduce_metrics(sums, global_tokens)
        out["grad_norm"] = float(grad_norm)
        out["lr"] = lr
        out["tokens"] = global_tokens
        return out

    def _sync_replicated_grads(self) -> None:
        """Average over the FSDP ranks the gradients of trainable parameters that FSDP does not manage (plain
        tensors, not DTensors: stage 1's indexers, see parallelize.fsdp_ignored_params), exactly as FSDP does
        for its own, so that with the loss scaled by grad_average_factor every rank ends with the same sum."""
        if not self.parallel_dims.fsdp_enabled:
            return
        from torch.distributed.tensor import DTensor

        params = [p for p in self.task.trainable_parameters(self.model) if not isinstance(p, DTensor)]
        if not params:
            return
        # one flat all-reduce; a missing gradient counts as zeros so every rank sends the same shapes
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat, group=self.mesh["dp_shard_cp"].get_group())
        flat /= self.grad_average_factor
        offset = 0
        for p in params:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def _time_limit_reached(self, t0: float) -> bool:
        """True once training.time_limit_s has passed on rank 0 (all ranks agree, so they stop together)."""
        limit = self.cfg.training.time_limit_s
        if limit <= 0:
            return False
        up = torch.tensor([float(time.time() - t0 >= limit)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            up = up.to(self.device) if dist.get_backend() == "nccl" else up
            dist.broadcast(up, src=0)
        return bool(up.item())

    def train(self) -> list[float]:
        cfg = self.cfg
        data_iter = iter(self.dataloader)
        flops_per_token = self.model_args.flops_per_token(cfg.training.seq_len)
        self.model.train()
        logger.info(f"training {cfg.training.steps} steps from step {self.step}")
        self._log_validation("before")
        t_train = time.time()
        while self.step < cfg.training.steps:
            batches = [self.cp_shard(self._to_device(next(data_iter)))
                       for _ in range(cfg.training.gradient_accumulation_steps)]
            log_step = (self.step + 1) % cfg.metrics.log_freq == 0 or self.step == 0 or self.step + 1 == cfg.training.steps
            if hasattr(self.task, "before_step"):
                self.task.before_step(unwrap_compiled(self.model), self.step, log_step)
            out = self.train_step(batches)
            self.step += 1
            self.loss_history.append(out.get(self.task.primary_metric, float("nan")))
            self.metrics.add_tokens(sum(b["input"].numel() for b in batches))  # this rank's (local under CP)
            if log_step:
                tps, _ = self.metrics.throughput()
                tokens = out.pop("tokens")
                self.metrics.log(self.step, {f"{cfg.job.mode}/{k}": v for k, v in out.items()} |
                                 {"train/label_tokens": float(tokens)}, tps=tps, flops_per_token=flops_per_token)
            out_of_time = self.step < cfg.training.steps and self._time_limit_reached(t_train)
            if self.checkpointer.should_save(self.step, self.step == cfg.training.steps or out_of_time):
                self.checkpointer.save(self.step, {"step": self.step})
            if out_of_time:
                logger.info(f"training.time_limit_s={cfg.training.time_limit_s:g} reached after step {self.step} of "
                            f"{cfg.training.steps}; finishing here")
                break
        self.checkpointer.wait()
        self._log_validation("after")
        if self.rank == 0:
            hist = {"mode": cfg.job.mode, "first_step": self.step - len(self.loss_history) + 1,
                    "loss": self.loss_history, "validation": self.val_history}
            (self.dump / f"loss_history_{cfg.job.mode}.json").write_text(json.dumps(hist))
        if hasattr(self.task, "finish"):
            self.task.finish(self)
        elif cfg.checkpoint.export_hf:
            self.export_hf(self.dump / cfg.checkpoint.export_folder)
        self.metrics.close()
        return self.loss_history

    def full_model_state(self):
        """Unsharded state dict on every rank (CPU), for export."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def export_hf(self, path: Path) -> None:
        from models.hf_checkpoint import save_hf_checkpoint

        sd = self.full_model_state()
        if self.rank == 0:
            dtype = getattr(torch, self.cfg.checkpoint.export_dtype)
            plain = build_model(self.model_args, device="cpu", init=False)
            plain.load_state_dict(sd)
            save_hf_checkpoint(plain, path, dtype=dtype,
                               max_shard_size_bytes=self.cfg.checkpoint.export_max_shard_mb * 2**20)
            logger.info(f"exported Hugging Face checkpoint to {path}")
        if dist.is_initialized():
            dist.barrier()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def main(argv: list[str] | None = None) -> None:
    cfg = load_job_config(argv)
    mode = cfg.job.mode
    if mode in LOOP_MODES:
        trainer = Trainer(cfg)
        trainer.train()
    elif mode in ("calibrate", "eval"):
        from torchtitan_rtpurbo import pipeline

        if cfg.parallelism.context_parallel_degree > 1:
            raise SystemExit(f"job.mode = {mode!r} does not use context parallelism: run calibrate/eval with "
                             f"context_parallel_degree = 1 (got parallelism.context_parallel_degree = "
                             f"{cfg.parallelism.context_parallel_degree})")

        getattr(pipeline, f"run_{mode}")(cfg)
    elif mode == "pipeline":
        from torchtitan_rtpurbo.pipeline import run_pipeline

        run_pipeline(cfg, list(sys.argv[1:] if argv is None else argv))
    else:
        raise SystemExit(f"job.mode must be one of pretrain, calibrate, stage1, stage2, eval, pipeline; got {mode!r}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
