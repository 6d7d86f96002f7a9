"""Stage 1: train the RTPurbo indexers (selectors) with the backbone frozen.

Loss: per retrieval head, forward KL(true attention || indexer softmax), averaged over query tokens and
heads; each RTPurboAttention computes it in query chunks (never a T x T tensor) and leaves it in
ctx.collect. The indexers start from an SVD of the head's own pre-RoPE q/k on calibration data
(rtpurbo.indexer_init = "svd") or at random. At the end the adapted model is exported (HF + rtpurbo).

Context parallelism: the RTPurbo CP backend (models/rtpurbo/context_parallel.py) leaves in
collect["indexer_kl"], per rank, the KL summed over this rank's query rows divided by the GLOBAL number of
rows, so the per-rank values add up over the cp ranks to the single-process KL. The loss therefore keeps the
1 / (n_micro * dp) normalisation (gradients are summed over all dp x cp ranks). The recall and density
statistics follow the same contract, so every stage-1 metric is reported as "<name>_cpsum" (summed over
cp, averaged over dp by Trainer._reduce_metrics; without CP that is the plain average over ranks).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.rtpurbo.convert import (
    apply_rtpurbo,
    freeze_for_stage,
    indexer_kl_loss,
    indexer_parameters,
    init_indexers,
    iter_rtpurbo_backends,
    rtpurbo_density_report,
    set_rtpurbo_mode,
)
from models.rtpurbo.roles import HeadRoles
from torchtitan_rtpurbo.tasks.pretrain import attention_context, model_inputs

logger = logging.getLogger("torchtitan_rtpurbo")


def roles_path(cfg) -> Path:
    return Path(cfg.rtpurbo.roles_file or Path(cfg.job.dump_folder) / "roles.json")


def calibration_sequences(cfg, tokenizer, n: int | None = None):
    from models.rtpurbo.calibrate import make_needle_sequences
    from torchtitan_rtpurbo.data import get_documents

    rt = cfg.rtpurbo
    docs = get_documents(cfg.training.dataset if cfg.training.dataset != "mix" else "stdlib", split="val")
    need = max(rt.calib_lengths)
    token_docs, total = [], 0
    for i in range(len(docs)):  # enough text for the longest sequence, a few times over
        ids = tokenizer.encode(docs[i])
        token_docs.append(ids)
        total += len(ids)
        if total > 8 * need and len(token_docs) >= 8:
            break
    return make_needle_sequences(token_docs, lengths=rt.calib_lengths, n=n or rt.calib_num_sequences,
                                 needle_tokens=rt.calib_needle_tokens, seed=cfg.job.seed)


class Stage1Task:
    name = "stage1"
    primary_metric = "indexer_kl"

    def __init__(self, job_config):
        self.cfg = job_config

    def prepare(self, model, tokenizer=None):
        from models.rtpurbo.calibrate import collect_qk_samples

        cfg = self.cfg
        path = roles_path(cfg)
        if not path.is_file():
            raise FileNotFoundError(f"stage1 needs head roles: {path} not found (run job.mode=calibrate first "
                                    f"or set rtpurbo.roles_file)")
        self.roles = HeadRoles.load_json(path)
        self.roles.check_matches(model.args)
        samples = None
        if cfg.rtpurbo.indexer_init == "svd":
            # q/k statistics of the dense model (before its local heads are windowed)
            seqs = calibration_sequences(cfg, tokenizer, n=min(4, cfg.rtpurbo.calib_num_sequences))
            samples = collect_qk_samples(model, seqs, self.roles)
        apply_rtpurbo(model, self.roles, cfg.rtpurbo)
        init_indexers(model, cfg.rtpurbo, samples)
        set_rtpurbo_mode(model, "stage1")
        freeze_for_stage(model, "stage1")
        logger.info(f"stage1: {self.roles.num_retrieval()} retrieval heads, indexer init {cfg.rtpurbo.indexer_init}, "
                    f"{sum(p.numel() for p in indexer_parameters(model))} trainable indexer parameters")
        return model

    def trainable_parameters(self, model):
        return [p for p in model.parameters() if p.requires_grad]

    def before_step(self, model, step: int, log_step: bool) -> None:
        # recall / density statistics cost ~3x the loss: compute them on logging steps only
        for _, b in iter_rtpurbo_backends(model):
            b.stage1_stats = log_step

    def loss(self, model, batch: dict, global_tokens: int, n_micro: int, dp: int):
        ctx = attention_context(batch)
        model(batch["input"], ctx=ctx, return_hidden=True, **model_inputs(batch, self.cfg.training.document_mask))
        kl = indexer_kl_loss(ctx.collect)  # under CP: this rank's additive share (see the module docstring)
        report = rtpurbo_density_report(ctx.collect)
        metrics = {"indexer_kl_cpsum": kl.detach() / n_micro}
        for key in ("rtpurbo/indexer_recall_mean", "rtpurbo/density_mean", "rtpurbo/teacher_density_mean"):
            if key in report:  # per-rank shares under CP too (same contract as the KL)
                metrics[key.split("/")[-1] + "_cpsum"] = torch.tensor(report[key]) / n_micro
        return kl / (n_micro * dp), metrics

    def finish(self, trainer) -> None:
        export_rtpurbo(trainer, self.roles, Path(trainer.cfg.job.dump_folder) / "stage1")


def export_rtpurbo(trainer, roles: HeadRoles, path: Path) -> None:
    """Gather the full state and write the HF + rtpurbo checkpoint from rank 0."""
    import torch.distributed as dist

    from models.qwen3 import build_model
    from models.rtpurbo.export import save_rtpurbo_checkpoint

    sd = trainer.full_model_state()
    if trainer.rank == 0:
        plain = build_model(trainer.model_args, device="cpu", init=False)
        apply_rtpurbo(plain, roles, trainer.cfg.rtpurbo)
        plain.load_state_dict(sd)
        dtype = getattr(torch, trainer.cfg.checkpoint.export_dtype)
        save_rtpurbo_checkpoint(plain, roles, trainer.cfg.rtpurbo, str(path), dtype=dtype)
        logger.info(f"exported RTPurbo checkpoint to {path}")
    if dist.is_initialized():
        dist.barrier()
