"""job.mode = "eval": dense teacher vs RTPurbo (after stage 1 and after stage 2) vs peer baselines, on one
shared set of samples of the long-context suite, with kept density; writes a table, JSON and PNGs.

Models compared (those whose checkpoints exist):
  dense        the full-attention teacher (model.hf_checkpoint)
  streaming    teacher, every head window + sinks (StreamingLLM-style)
  duo          teacher, retrieval heads dense + local heads windowed, no indexer (DuoAttention-style)
  topk         RTPurbo stage 2 with a FIXED block budget per query equal to RTPurbo's mean kept blocks
  rtpurbo_s1   RTPurbo after stage 1 only (stage-1 export)
  rtpurbo      RTPurbo after stage 2 (rtpurbo.init_checkpoint)
RTPurbo models run the paper's inference scheme: prompt prefilled with retrieval heads dense, every
generated token selecting blocks by dynamic top-p (models/rtpurbo/decode_rows.py).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import torch

from models.attention import AttentionContext
from torchtitan_rtpurbo.evaluation.runner import GenerationOutput, GreedyGenerator

logger = logging.getLogger("torchtitan_rtpurbo")


class DecodeEmulatingGenerator(GreedyGenerator):
    """Greedy decoding where rows from the last prompt token on use decode-time selection, and the kept
    density of those decode rows is reported."""

    def __init__(self, model, tokenizer, *, device=None, top_k_blocks: int = 0):
        super().__init__(model, tokenizer, device=device, density_fn=None)
        self.top_k_blocks = top_k_blocks

    @torch.no_grad()
    def __call__(self, prompts, max_new_tokens):
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("prompts of one call must have equal length")
        x = torch.tensor(prompts, dtype=torch.long, device=self.device)
        decode_from = x.shape[1] - 1
        new = [[] for _ in prompts]
        done = [False] * len(prompts)
        dens = []
        for _ in range(max_new_tokens):
            ctx = AttentionContext(collect={}, extras={"decode_from": decode_from,
                                                       "top_k_blocks": self.top_k_blocks})
            logits = self._logits(x, ctx)
            for d in ctx.collect.get("decode_density", []):
                if not math.isnan(d):
                    dens.append(d)
            nxt = logits.argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                if not done[b]:
                    new[b].append(int(t))
                    done[b] = self._finished(new[b])
            if all(done):
                break
            x = torch.cat([x, nxt[:, None].to(x.dtype)], dim=1)
        density = sum(dens) / len(dens) if dens else None
        return GenerationOutput(tokens=new, density=[density] * len(prompts))


def _all_local_roles(roles):
    r = copy.deepcopy(roles)
    r.retrieval = [[False] * len(row) for row in r.retrieval]
    return r


def run_comparison(cfg, device: torch.device) -> dict:
    from models.hf_checkpoint import load_hf_checkpoint
    from models.rtpurbo.convert import apply_rtpurbo, set_rtpurbo_mode
    from models.rtpurbo.export import load_rtpurbo_checkpoint
    from models.rtpurbo.roles import HeadRoles
    from torchtitan_rtpurbo.data import build_tokenizer
    from torchtitan_rtpurbo.evaluation.report import compare_models, format_table, write_report
    from torchtitan_rtpurbo.evaluation.tasks import generate_suite

    ev = cfg.eval
    dump = Path(cfg.job.dump_folder)
    tok = build_tokenizer(cfg.model.tokenizer_path)
    samples = generate_suite(None if ev.tasks == ["all"] else ev.tasks, ev.lengths, ev.samples_per_task,
                             ev.seed, tok, split="eval")
    models: dict = {}
    _, dense = load_hf_checkpoint(cfg.model.hf_checkpoint, device=device)
    models["dense"] = dense

    stage2 = Path(cfg.rtpurbo.init_checkpoint) if cfg.rtpurbo.init_checkpoint else dump / "stage2"
    stage1 = dump / "stage1"
    roles = None
    if (stage2 / "config.json").is_file():
        _, rt2, roles, _ = load_rtpurbo_checkpoint(str(stage2), device=device)
    if roles is None and cfg.rtpurbo.roles_file:
        roles = HeadRoles.load_json(cfg.rtpurbo.roles_file)
    if roles is not None and "streaming" not in ev.skip_models:
        _, m = load_hf_checkpoint(cfg.model.hf_checkpoint, device=device)
        apply_rtpurbo(m, _all_local_roles(roles), cfg.rtpurbo, check=False)
        set_rtpurbo_mode(m, "infer")
        models["streaming"] = m
    if roles is not None and "duo" not in ev.skip_models:
        _, m = load_hf_checkpoint(cfg.model.hf_checkpoint, device=device)
        rt = copy.copy(cfg.rtpurbo)
        rt.prefill = "dense"
        apply_rtpurbo(m, roles, rt)
        set_rtpurbo_mode(m, "infer")
        models["duo"] = m
    if (stage1 / "config.json").is_file() and "rtpurbo_s1" not in ev.skip_models:
        _, m1, _, _ = load_rtpurbo_checkpoint(str(stage1), device=device)
        models["rtpurbo_s1"] = DecodeEmulatingGenerator(m1, tok, device=device)
    if (stage2 / "config.json").is_file():
        models["rtpurbo"] = DecodeEmulatingGenerator(rt2, tok, device=device)

    comparison = compare_models(models, tok, samples=samples, lengths=ev.lengths,
                                samples_per_task=ev.samples_per_task, seed=ev.seed, device=device,
                                max_new_tokens=ev.max_new_tokens or None)
    # Fixed-budget baseline at RTPurbo's measured mean kept blocks (the paper's top-k vs top-p claim).
    if "rtpurbo" in comparison["models"] and "topk" not in ev.skip_models:
        dens = [d for d in comparison["models"]["rtpurbo"].get("density", {}).values() if d is not None]
        if dens:
            mean_len = sum(ev.lengths) / len(ev.lengths)
            bs = cfg.rtpurbo.block_size
            beyond = max(mean_len - cfg.rtpurbo.window - cfg.rtpurbo.sinks, bs)
            k_blocks = max(1, round(sum(dens) / len(dens) * beyond / bs))
            topk = compare_models({"topk": DecodeEmulatingGenerator(rt2, tok, device=device, top_k_blocks=k_blocks)},
                                  tok, samples=samples, lengths=ev.lengths, samples_per_task=ev.samples_per_task,
                                  seed=ev.seed, device=device, max_new_tokens=ev.max_new_tokens or None)
            comparison["models"]["topk"] = topk["models"]["topk"]
            comparison["config"]["topk_blocks"] = k_blocks
    out_dir = dump / "eval"
    write_report(comparison, out_dir)
    table = format_table(comparison)
    print(table, flush=True)
    (out_dir / "table.txt").write_text(table + "\n")
    logger.info(f"evaluation report written to {out_dir}")
    return comparison
