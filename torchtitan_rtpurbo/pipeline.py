"""The non-loop modes: calibrate (head roles), eval (long-context suite, dense vs RTPurbo vs baselines),
and pipeline (run several stage configs in order: the README's main job).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from torchtitan_rtpurbo.config import JobConfig, load_job_config
from torchtitan_rtpurbo.distributed.utils import init_distributed, set_determinism
from torchtitan_rtpurbo.metrics.logger import init_logging

logger = logging.getLogger("torchtitan_rtpurbo")


def _setup(cfg: JobConfig):
    rank, world, device = init_distributed()
    init_logging(rank)
    set_determinism(cfg.job.seed, cfg.job.deterministic)
    Path(cfg.job.dump_folder).mkdir(parents=True, exist_ok=True)
    return rank, device


def run_calibrate(cfg: JobConfig) -> dict | None:
    """Needle-repeat calibration of head roles on the dense model -> roles JSON + heatmap + summary."""
    from models.rtpurbo.calibrate import calibrate_roles, plot_scores_heatmap
    from torchtitan_rtpurbo.data import build_tokenizer
    from torchtitan_rtpurbo.tasks.stage1 import calibration_sequences, roles_path
    from torchtitan_rtpurbo.train import load_base_model

    rank, device = _setup(cfg)
    summary = None
    if rank == 0:  # calibration is one forward per sequence: no need to spread it
        t0 = time.perf_counter()
        tokenizer = build_tokenizer(cfg.model.tokenizer_path)
        args, model, _ = load_base_model(cfg, device, tokenizer.vocab_size)
        seqs = calibration_sequences(cfg, tokenizer)
        roles, per_seq, summary = calibrate_roles(model, seqs, cfg.rtpurbo)
        out = roles_path(cfg)
        out.parent.mkdir(parents=True, exist_ok=True)
        roles.save_json(out)
        heatmap = Path(cfg.job.dump_folder) / "roles_heatmap.png"
        plot_scores_heatmap(per_seq.mean(0), roles, str(heatmap), n_kv_heads=args.n_kv_heads)
        summary = {"roles_file": str(out), "heatmap": str(heatmap), **summary,
                   "seconds": time.perf_counter() - t0}
        (Path(cfg.job.dump_folder) / "calibration_summary.json").write_text(json.dumps(summary, indent=2))
        logger.info(roles.summary())
        logger.info("calibration: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in summary.items()))
    if dist.is_initialized():
        dist.barrier()
    return summary


def run_eval(cfg: JobConfig) -> dict | None:
    from torchtitan_rtpurbo.evaluation.compare import run_comparison

    rank, device = _setup(cfg)
    result = None
    if rank == 0:
        # On CUDA the models run as they were trained (bf16 autocast): fused attention kernels, half the memory.
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        if device.type == "cuda":
            logger.info("eval: bf16 autocast on CUDA (as in training)")
        with autocast:
            result = run_comparison(cfg, device)
    if dist.is_initialized():
        dist.barrier()
    return result


def run_pipeline(cfg: JobConfig, argv: list[str]) -> None:
    """Run each stage config in order, with the pipeline's own command-line overrides applied to each."""
    from torchtitan_rtpurbo.train import LOOP_MODES, Trainer

    if not cfg.job.pipeline_stages:
        raise ValueError(f"{cfg.job.config_file}: job.mode = 'pipeline' needs job.pipeline_stages")
    overrides = _strip_config_file(argv)
    t0 = time.perf_counter()
    for i, stage_file in enumerate(cfg.job.pipeline_stages):
        if not Path(stage_file).is_file():
            raise FileNotFoundError(f"{cfg.job.config_file}: job.pipeline_stages[{i}] = {stage_file} not found")
        # defaults <- the pipeline file (shared sections) <- the stage file <- command line
        stage_cfg = load_job_config(["--job.config_file", cfg.job.config_file, "--job.config_file", stage_file,
                                     "--job.dump_folder", cfg.job.dump_folder, *overrides])
        stage_cfg.job.pipeline_stages = []
        mode = stage_cfg.job.mode
        logger.info(f"=== pipeline stage {i + 1}/{len(cfg.job.pipeline_stages)}: {mode} ({stage_file}) ===")
        if mode in LOOP_MODES:
            Trainer(stage_cfg).train()
        elif mode == "calibrate":
            run_calibrate(stage_cfg)
        elif mode == "eval":
            run_eval(stage_cfg)
        else:
            raise ValueError(f"{stage_file}: job.mode {mode!r} cannot be a pipeline stage")
    logger.info(f"pipeline finished in {time.perf_counter() - t0:.0f} s; outputs in {cfg.job.dump_folder}")


def _strip_config_file(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--job.config_file":
            skip = True
            continue
        if a.startswith("--job.config_file=") or a.startswith("--job.mode"):
            if a == "--job.mode":
                skip = True
            continue
        out.append(a)
    return out
