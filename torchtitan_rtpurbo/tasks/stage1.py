"""Stage 1: train the RTPurbo indexers (selectors) with the backbone frozen.

Loss: per retrieval head, forward KL(true attention || indexer softmax), averaged over query tokens and
heads; each RTPurboAttention computes it in query chunks (never a T x T tensor) and leaves it in
ctx.collect. The indexers start from an SVD of the head's own pre-RoPE q/k on calibration data
(rtpurbo.indexer_init = "svd") or at random. At the end the adapted model is exported (HF + rtpurbo);
with rtpurbo.indexer_sharpen = "calibrate" a per-head sharpening factor is first measured on calibration
sequences and folded into each retrieval head's wq (models/rtpurbo/sharpen.py; report in
<dump_folder>/indexer_sharpen.json).

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
        from models.rtpurbo.sharpen import validate_sharpen_config

        validate_sharpen_config(job_config.rtpurbo)  # fail before training, not at export
        self.cfg = job_config
        self.tokenizer = None

    def prepare(self, model, tokenizer=None):
        from models.rtpurbo.calibrate import collect_qk_samples

        cfg = self.cfg
        self.tokenizer = tokenizer
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
        before_save = self.sharpen if self.cfg.rtpurbo.indexer_sharpen == "calibrate" else None
        export_rtpurbo(trainer, self.roles, Path(trainer.cfg.job.dump_folder) / "stage1", before_save=before_save)

    def sharpen(self, model, trainer) -> dict:
        """rtpurbo.indexer_sharpen = "calibrate": per-head sharpening of the trained indexer, folded into wq
        of `model` (the plain full model about to be exported; rank 0). See models/rtpurbo/sharpen.py."""
        import json
        import time

        from models.rtpurbo.sharpen import calibrate_sharpening, log_sharpening_report

        rt = self.cfg.rtpurbo
        t0 = time.perf_counter()
        tokenizer = self.tokenizer if self.tokenizer is not None else trainer.tokenizer
        seqs = calibration_sequences(self.cfg, tokenizer, n=rt.sharpen_num_sequences)
        device = trainer.device
        model.to(device)
        try:
            report = calibrate_sharpening(model, seqs, factors=rt.sharpen_factors, min_mass=rt.sharpen_min_mass,
                                          chunk=rt.sharpen_query_chunk)
        finally:
            model.to("cpu")
        report["seconds"] = time.perf_counter() - t0
        log_sharpening_report(report, Path(self.cfg.job.dump_folder) / "indexer_sharpen.json")
        logger.info(f"indexer sharpening: {json.dumps(report['summary'])} ({report['seconds']:.1f} s)")
        return report


def export_rtpurbo(trainer, roles: HeadRoles, path: Path, before_save=None) -> None:
    """Gather the full state and write the HF + rtpurbo checkpoint from rank 0. before_save(model, trainer),
    if given, runs on rank 0 on the plain full model (CPU, float32 or the trained dtype) before it is saved."""
    import torch.distributed as dist

    from models.qwen3 import build_model
    from models.rtpurbo.export import save_rtpurbo_checkpoint

    sd = trainer.full_model_state()
    if trainer.rank == 0:
        plain = build_model(trainer.model_args, device="cpu", init=False)
        apply_rtpurbo(plain, roles, trainer.cfg.rtpurbo)
        plain.load_state_dict(sd)
        if before_save is not None:
            before_save(plain, trainer)
        dtype = getattr(torch, trainer.cfg.checkpoint.export_dtype)
        save_rtpurbo_checkpoint(plain, roles, trainer.cfg.rtpurbo, str(path), dtype=dtype)
        logger.info(f"exported RTPurbo checkpoint to {path}")
    if dist.is_initialized():
        dist.barrier()
