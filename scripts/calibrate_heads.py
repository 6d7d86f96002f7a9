"""Calibrate RTPurbo head roles: model + tokenizer + corpus -> roles JSON + heatmap PNG + printed summary.

    python -m scripts.calibrate_heads --hf-checkpoint Qwen3-0.6B/ --corpus docs.jsonl --out roles.json
    python -m scripts.calibrate_heads --dcp outputs/checkpoint --flavor tiny --out roles.json
    python -m scripts.calibrate_heads --flavor debug --lengths 512 --num-sequences 2 --out /tmp/roles.json  # smoke

The tokenizer defaults to the checkpoint directory's own (HF) or the project's SentencePiece model; the corpus
is a registered name ("stdlib") or a path / glob of .txt / .jsonl files (torchtitan_rtpurbo.data.get_documents).
The core lives in models/rtpurbo/calibrate.py (the trainer's job.mode = "calibrate" uses it too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch


def load_model(a: argparse.Namespace, device: torch.device):
    from models.qwen3 import build_model, get_flavor

    dtype = getattr(torch, a.dtype)
    if a.hf_checkpoint:
        from models.hf_checkpoint import load_hf_checkpoint

        return load_hf_checkpoint(a.hf_checkpoint, device=device, dtype=dtype)[1]
    args = get_flavor(a.flavor)
    if a.vocab_size:
        args = dataclasses.replace(args, vocab_size=a.vocab_size)
    model = build_model(args, device=device, init=not a.dcp).to(dtype)
    if a.dcp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        from torchtitan_rtpurbo.checkpoint.manager import complete_steps

        ckpt = Path(a.dcp)
        steps = complete_steps(ckpt)
        if steps:  # a checkpoint folder: take the latest complete step
            ckpt = ckpt / f"step-{steps[-1]}"
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(ckpt))
        set_model_state_dict(model, state["model"])
    return model


def load_corpus(a: argparse.Namespace, tokenizer, need: int) -> list[list[int]]:
    from torchtitan_rtpurbo.data import get_documents

    docs = get_documents(a.corpus, split=a.split)
    out, total = [], 0
    for i in range(len(docs)):
        ids = tokenizer.encode(docs[i])
        out.append(ids)
        total += len(ids)
        if total > 8 * need and len(out) >= 8:
            break
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf-checkpoint", default="", help="Hugging Face checkpoint directory")
    src.add_argument("--dcp", default="", help="our DCP checkpoint (a step-N dir or the checkpoint folder); needs --flavor")
    p.add_argument("--flavor", default="debug", help="model flavour (for --dcp, or random init for a smoke test)")
    p.add_argument("--vocab-size", type=int, default=0)
    p.add_argument("--tokenizer", default="", help="tokenizer file/dir (default: the checkpoint's, else the project's)")
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--split", default="val")
    p.add_argument("--lengths", default="1024,2048")
    p.add_argument("--num-sequences", type=int, default=10)
    p.add_argument("--needle-tokens", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--threshold", type=float, default=-1.0, help=">= 0: choose by score threshold instead of ratio")
    p.add_argument("--granularity", choices=["query_head", "kv_head"], default="query_head")
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--out", default="roles.json")
    p.add_argument("--heatmap", default="", help="PNG path (default: next to --out)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from models.rtpurbo.calibrate import calibrate_roles, make_needle_sequences, plot_scores_heatmap
    from torchtitan_rtpurbo.config.job_config import RTPurbo
    from torchtitan_rtpurbo.data import build_tokenizer
    from torchtitan_rtpurbo.data.tokenizer import DEFAULT_TOKENIZER_PATH

    t0 = time.perf_counter()
    device = torch.device(a.device)
    tok_path = a.tokenizer or (a.hf_checkpoint if a.hf_checkpoint and Path(a.hf_checkpoint, "tokenizer.json").is_file()
                               else str(DEFAULT_TOKENIZER_PATH))
    tokenizer = build_tokenizer(tok_path)
    model = load_model(a, device)
    if tokenizer.vocab_size > model.args.vocab_size:
        sys.exit(f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens, the model only {model.args.vocab_size}")
    lengths = [int(x) for x in a.lengths.split(",") if x]
    docs = load_corpus(a, tokenizer, max(lengths))
    seqs = make_needle_sequences(docs, lengths=lengths, n=a.num_sequences, needle_tokens=a.needle_tokens, seed=a.seed)
    cfg = RTPurbo(granularity=a.granularity, retrieval_ratio=a.ratio, retrieval_threshold=a.threshold,
                  window=a.window, sinks=a.sinks)
    roles, per_seq, summary = calibrate_roles(model, seqs, cfg, batch_size=a.batch_size)
    roles.extra["source"] = a.hf_checkpoint or a.dcp or f"random init ({a.flavor})"
    out = Path(a.out)
    roles.save_json(out)
    heatmap = Path(a.heatmap) if a.heatmap else out.with_suffix(".png")
    plot_scores_heatmap(per_seq.mean(0), roles, str(heatmap))
    summary.update(roles_file=str(out), heatmap=str(heatmap), seconds=round(time.perf_counter() - t0, 2))
    print(roles.summary())
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
