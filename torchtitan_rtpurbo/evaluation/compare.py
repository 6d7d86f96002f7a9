"""job.mode = "eval": dense teacher vs RTPurbo (after stage 1 and after stage 2) vs peer baselines, on one
shared set of samples of the long-context suite, with kept density; writes a table, JSON and PNGs.

Models compared (those whose checkpoints exist):
  dense        the full-attention teacher (model.hf_checkpoint)
  streaming    teacher, every head window + sinks (StreamingLLM-style)
  duo          teacher, retrieval heads dense + local heads windowed, no indexer (DuoAttention-style)
  topk         RTPurbo stage 2 with a FIXED block budget per query equal to RTPurbo's mean kept blocks
  rtpurbo_s1   RTPurbo after stage 1 only (stage-1 export)
  rtpurbo      RTPurbo after stage 2 (rtpurbo.init_checkpoint)
  rtpurbo_fp8  (eval.indexer_fp8) rtpurbo with its decode rows' indexer keys rounded as the engine's
               float8_e4m3fn indexer cache stores them (InferenceEngine(indexer_cache_dtype="float8_e4m3fn"))
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

    def __init__(self, model, tokenizer, *, device=None, top_k_blocks: int = 0, indexer_key_dtype=None):
        super().__init__(model, tokenizer, device=device, density_fn=None)
        self.top_k_blocks = top_k_blocks
        self.indexer_key_dtype = indexer_key_dtype  # e.g. torch.float8_e4m3fn: the engine's fp8 indexer cache

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
            ctx = AttentionContext(collect={}, extras={"decode_from": decode_from, "top_k_blocks": self.top_k_blocks,
                                                       "indexer_key_dtype": self.indexer_key_dtype})
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


class TeacherForcedScorer:
    """One forward over prompt + gold target per sample instead of one per generated token.

    Returns, per prompt, the model's argmax tokens at the target positions up to and including the first
    one that differs from the target (and EOS when all match). Greedy decoding and teacher forcing agree
    up to the first mismatch, so for exact-match tasks the score is identical to greedy decoding; for
    list (recall) tasks it is a lower bound (greedy might still recall later items). `emulate_decode`
    makes rows from the last prompt token on use decode-time selection (RTPurbo models)."""

    def __init__(self, model, tokenizer, samples, *, device, emulate_decode: bool = False, top_k_blocks: int = 0,
                 indexer_key_dtype=None):
        self.model = model
        self.device = device
        self.eos = int(tokenizer.eos_id)
        self.targets = {tuple(s.prompt_ids): list(tokenizer.encode(s.target)) for s in samples}
        self.emulate_decode = emulate_decode
        self.top_k_blocks = top_k_blocks
        self.indexer_key_dtype = indexer_key_dtype

    @torch.no_grad()
    def __call__(self, prompts, max_new_tokens):
        P = len(prompts[0])
        targets = [self.targets[tuple(p)] for p in prompts]
        L = max(len(t) for t in targets)
        x = torch.tensor([p + t + [self.eos] * (L - len(t)) for p, t in zip(prompts, targets)],
                         dtype=torch.long, device=self.device)
        extras = {"decode_from": P - 1, "top_k_blocks": self.top_k_blocks,
                  "indexer_key_dtype": self.indexer_key_dtype} if self.emulate_decode else {}
        ctx = AttentionContext(collect={}, extras=extras)
        h = self.model(x, ctx=ctx, return_hidden=True)
        pred = self.model.output(h[:, P - 1:P - 1 + L]).argmax(-1).tolist()
        out = []
        for b, t in enumerate(targets):
            toks = []
            for j, gold in enumerate(t):
                toks.append(int(pred[b][j]))
                if pred[b][j] != gold:
                    break
            else:
                toks.append(self.eos)
            out.append(toks)
        dens = [d for d in ctx.collect.get("decode_density", []) if not math.isnan(d)]
        density = sum(dens) / len(dens) if dens else None
        return GenerationOutput(tokens=out, density=[density] * len(prompts))


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
        if ev.indexer_fp8:  # the same module, decode rows scored from fp8-rounded indexer keys
            models["rtpurbo_fp8"] = DecodeEmulatingGenerator(rt2, tok, device=device,
                                                             indexer_key_dtype=torch.float8_e4m3fn)

    if ev.scoring not in ("teacher_forced", "greedy"):
        raise ValueError(f"eval.scoring must be 'teacher_forced' or 'greedy', got {ev.scoring!r}")
    modules = {}  # name -> (module, emulate_decode, indexer_key_dtype)
    for name, m in models.items():
        if isinstance(m, DecodeEmulatingGenerator):
            modules[name] = (m.model, True, m.indexer_key_dtype)
        else:
            modules[name] = (m, False, None)
    if ev.scoring == "teacher_forced":
        models = {name: TeacherForcedScorer(m, tok, samples, device=device, emulate_decode=emu, indexer_key_dtype=kd)
                  for name, (m, emu, kd) in modules.items()}

    def make_topk(k_blocks):
        m = modules["rtpurbo"][0]
        if ev.scoring == "teacher_forced":
            return TeacherForcedScorer(m, tok, samples, device=device, emulate_decode=True, top_k_blocks=k_blocks)
        return DecodeEmulatingGenerator(m, tok, device=device, top_k_blocks=k_blocks)

    for m, _, _ in modules.values():
        m.eval()
    comparison = compare_models(models, tok, samples=samples, lengths=ev.lengths,
                                samples_per_task=ev.samples_per_task, seed=ev.seed, device=device,
                                max_new_tokens=ev.max_new_tokens or None, batch_size=ev.batch_size)
    comparison["config"]["scoring"] = ev.scoring
    if ev.perplexity_seq_len:
        from torchtitan_rtpurbo.evaluation.runner import perplexity

        for name, (m, _, kd) in modules.items():  # held-out stdlib "test" documents, same windows for all
            if kd is not None:  # no decode rows in perplexity: it would repeat the unrounded model's
                continue
            comparison["models"][name]["perplexity"] = perplexity(
                m, tok, None, ev.perplexity_seq_len, ev.perplexity_max_docs, device=device, return_details=True,
                max_windows=ev.perplexity_max_windows)
        comparison["config"]["perplexity_seq_len"] = ev.perplexity_seq_len
    # Fixed-budget baseline at RTPurbo's measured mean kept blocks (the paper's top-k vs top-p claim).
    if "rtpurbo" in comparison["models"] and "topk" not in ev.skip_models:
        dens = [d for d in comparison["models"]["rtpurbo"].get("density", {}).values() if d is not None]
        if dens:
            mean_len = sum(ev.lengths) / len(ev.lengths)
            bs = cfg.rtpurbo.block_size
            beyond = max(mean_len - cfg.rtpurbo.window - cfg.rtpurbo.sinks, bs)
            k_blocks = max(1, round(sum(dens) / len(dens) * beyond / bs))
            topk = compare_models({"topk": make_topk(k_blocks)},
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
