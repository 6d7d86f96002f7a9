"""Stage 2: self-distillation. The indexers are frozen; every other weight trains so that the sparse
model's next-token distribution matches the dense teacher's.

The teacher is the same model before training, run with dense attention. Its targets are computed once
for every batch the run will see and cached on the host (the paper caches top-10 logits too), so no second
copy of the weights is ever held: teacher and student share one set of weights, and the teacher's are
only needed before the first update.

rtpurbo.stage2_loss:
  "topk" (paper): KL(softmax(teacher top-k logits) || softmax(student logits at those k token ids)).
  "full": KL over the whole vocabulary (the cache then holds full log-probs at label positions; use
          rtpurbo.stage2_label_tokens to keep that small).
rtpurbo.stage2_label_tokens = N > 0 makes only the last N positions of each sequence label tokens (the
paper: ~300 label tokens after ~48K of context); 0 uses every position.

Context parallelism: labels are restricted on the FULL sequence (its last N positions), then the batch is
sharded (context_parallel.shard_batch) and the teacher runs under CP too, so each rank caches the targets
of its own label tokens, in its local token order: exactly the order in which the student's sharded
forward selects them. The cache holds only the teacher tensors; TeacherCachedLoader re-applies the
(deterministic) label restriction to every full batch it yields.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from models.rtpurbo.convert import (
    freeze_for_stage,
    iter_rtpurbo_backends,
    rtpurbo_density_report,
    set_rtpurbo_mode,
)
from models.rtpurbo.export import dense_backends
from torchtitan_rtpurbo.distributed.utils import unwrap_compiled
from torchtitan_rtpurbo.tasks.pretrain import IGNORE_INDEX, attention_context, model_inputs
from torchtitan_rtpurbo.tasks.stage1 import export_rtpurbo


logger = logging.getLogger("torchtitan_rtpurbo")


class TeacherCachedLoader:
    """Wraps the data loader: batch i comes with its labels restricted (rtpurbo.stage2_label_tokens) and the
    teacher's cached targets for batch i (under CP: for this rank's label tokens).

    Resumable: its state is the base loader's state plus the batch counter, so a resumed run pairs the
    same batches with the same cached targets."""

    def __init__(self, make_base, cache: list[dict], label_tokens: int = 0):
        self._make_base = make_base
        self.base = make_base()
        self.cache = cache
        self.label_tokens = label_tokens
        self.cursor = 0

    def __iter__(self):
        for batch in self.base:
            if self.cursor >= len(self.cache):
                raise RuntimeError(f"stage2: batch {self.cursor} has no cached teacher targets "
                                   f"(cached {len(self.cache)}; training.steps changed after caching?)")
            out = dict(batch)
            out["labels"] = restrict_labels(out["labels"], self.label_tokens)
            out.update(self.cache[self.cursor])
            self.cursor += 1
            yield out

    def state_dict(self):
        return {"base": self.base.state_dict(), "cursor": self.cursor}

    def load_state_dict(self, state):
        self.base.load_state_dict(state["base"])
        self.cursor = int(state["cursor"])


def restrict_labels(labels: torch.Tensor, last_n: int) -> torch.Tensor:
    if last_n <= 0:
        return labels
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, -last_n:] = labels[:, -last_n:]
    return out


class Stage2Task:
    name = "stage2"
    primary_metric = "kl"

    def __init__(self, job_config):
        self.cfg = job_config
        rt = job_config.rtpurbo
        if rt.stage2_loss not in ("topk", "full"):
            raise ValueError(f"rtpurbo.stage2_loss must be 'topk' or 'full', got {rt.stage2_loss!r}")
        if not rt.init_checkpoint:
            raise ValueError("stage2 needs rtpurbo.init_checkpoint: the stage-1 RTPurbo export (HF + rtpurbo)")

    def prepare(self, model, tokenizer=None):
        rt = self.cfg.rtpurbo
        for _, b in iter_rtpurbo_backends(model):
            b.stage2_retrieval = rt.stage2_retrieval  # this run's choice, not the one saved at export
        set_rtpurbo_mode(model, "stage2")
        freeze_for_stage(model, "stage2")
        return model

    def trainable_parameters(self, model):
        return [p for p in model.parameters() if p.requires_grad]

    # ---- teacher cache ----
    def _restricted(self, batch: dict) -> dict:
        """The full batch with only its label tokens kept (before any CP sharding: the last N positions of
        the whole sequence)."""
        return {**batch, "labels": restrict_labels(batch["labels"], self.cfg.rtpurbo.stage2_label_tokens)}

    @torch.no_grad()
    def _teacher_targets(self, model, batch: dict, autocast) -> dict:
        """Teacher targets at the label tokens of `batch`: a full micro-batch, or a CP-sharded one
        (batch["cp"]) whose labels were restricted before sharding (self._restricted)."""
        rt = self.cfg.rtpurbo
        labels = batch["labels"] if "cp" in batch else restrict_labels(batch["labels"], rt.stage2_label_tokens)
        pos = labels != IGNORE_INDEX  # [B, T]
        with autocast:
            sel = model(batch["input"], ctx=attention_context(batch, collect=False), logits_mask=pos,
                        **model_inputs(batch, self.cfg.training.document_mask)).float()  # [N, V]
        if rt.stage2_loss == "topk":
            vals, idx = sel.topk(rt.stage2_topk, dim=-1)
            return {"labels": labels, "t_vals": vals.cpu(), "t_idx": idx.to(torch.int32).cpu()}
        return {"labels": labels, "t_logp": F.log_softmax(sel, -1).to(torch.bfloat16).cpu()}

    def build_dataloader(self, trainer):
        from torchtitan_rtpurbo.train import build_training_dataloader

        cfg = trainer.cfg

        def make_base():
            return build_training_dataloader(cfg, trainer.tokenizer, trainer.dp_rank, trainer.parallel_dims.dp)

        n = cfg.training.steps * cfg.training.gradient_accumulation_steps
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if trainer.device.type == "cuda"
                    else torch.autocast("cpu", enabled=False))
        cache, nbytes = [], 0
        t_model = trainer.model
        was_training = t_model.training
        t_model.eval()
        with dense_backends(unwrap_compiled(t_model)):
            for i, batch in enumerate(make_base()):
                if i >= n:
                    break
                local = trainer.cp_shard(self._restricted(trainer._to_device(batch)))
                entry = self._teacher_targets(t_model, local, autocast)
                # labels are not cached: TeacherCachedLoader restricts every full batch again
                entry = {k: v.cpu() for k, v in entry.items() if k != "labels"}
                nbytes += sum(v.numel() * v.element_size() for v in entry.values())
                cache.append(entry)
        t_model.train(was_training)
        logger.info(f"stage2: cached dense-teacher targets ({self.cfg.rtpurbo.stage2_loss}) for {len(cache)} "
                    f"batches, {nbytes / 2**20:.1f} MiB on the host")
        return TeacherCachedLoader(make_base, cache, self.cfg.rtpurbo.stage2_label_tokens)

    def build_val_batches(self, trainer) -> list[dict]:
        from torchtitan_rtpurbo.train import build_training_dataloader

        it = iter(build_training_dataloader(trainer.cfg, trainer.tokenizer, trainer.dp_rank,
                                            trainer.parallel_dims.dp, validation=True))
        batches = [trainer.cp_shard(self._restricted(trainer._to_device(next(it))))
                   for _ in range(trainer.cfg.training.val_batches)]
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if trainer.device.type == "cuda"
                    else torch.autocast("cpu", enabled=False))
        was_training = trainer.model.training
        trainer.model.eval()
        with dense_backends(unwrap_compiled(trainer.model)):
            for b in batches:
                b.update({k: v for k, v in self._teacher_targets(trainer.model, b, autocast).items()})
        trainer.model.train(was_training)
        return batches

    # ---- loss ----
    def loss(self, model, batch: dict, global_tokens: int, n_micro: int, dp: int):
        # under CP the batch is this rank's tokens and t_vals / t_idx / t_logp its label tokens' targets
        ctx = attention_context(batch)
        pos = batch["labels"] != IGNORE_INDEX
        s = model(batch["input"], ctx=ctx, logits_mask=pos,
                  **model_inputs(batch, self.cfg.training.document_mask)).float()  # [N, V]
        if self.cfg.rtpurbo.stage2_loss == "topk":
            t_vals = batch["t_vals"].to(s.device)
            t_idx = batch["t_idx"].to(s.device).long()
            t_logp = F.log_softmax(t_vals, -1)
            s_logp = F.log_softmax(s.gather(-1, t_idx), -1)
        else:
            t_logp = batch["t_logp"].to(s.device).float()
            s_logp = F.log_softmax(s, -1)
        kl_sum = (t_logp.exp() * (t_logp - s_logp)).sum()
        ce_sum = F.cross_entropy(s, batch["labels"][pos], reduction="sum")
        metrics = {"kl_sum": kl_sum.detach(), "ce_sum": ce_sum.detach()}
        report = rtpurbo_density_report(ctx.collect)
        if "rtpurbo/density_mean" in report:
            # under CP the RTPurbo backend leaves per-rank shares that add up over the cp ranks
            metrics["density_cpsum"] = torch.tensor(report["rtpurbo/density_mean"]) / n_micro
        return kl_sum / global_tokens, metrics

    def finish(self, trainer) -> None:
        from models.rtpurbo.roles import HeadRoles  # noqa: F401  (roles travel with the model)

        export_rtpurbo(trainer, trainer.rtpurbo_roles, Path(trainer.cfg.job.dump_folder) / "stage2")
