"""Long-context evaluation (RULER-style suite + perplexity) of one or more checkpoints, side by side.

    python scripts/eval_long.py --model dense=outputs/teacher/hf_export --model rtpurbo=outputs/rtp/hf_export \
        --lengths 1024,2048,4096,8192 --samples 20 --out-dir outputs/eval --device cuda --dtype bfloat16

    # smoke test without a checkpoint: a randomly initialised model of a flavour
    python scripts/eval_long.py --model random=random:debug --lengths 256 --samples 2 --device cpu

--model NAME=PATH (repeatable): PATH is a Hugging Face checkpoint directory (config.json + safetensors);
one whose config.json has an "rtpurbo" section is loaded as an RTPurbo model (roles + selectors), its
retrieval heads' prefill set by --rtpurbo-prefill. "random:FLAVOR" builds a random model (testing only).
Every model is scored on the same samples. Prints the table; writes results.json, table.md and the plots
(accuracy_density.png, accuracy_by_task.png) to --out-dir. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def _int_list(text: str) -> list[int]:
    out = []
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        mult = 1
        if part[-1] in "kK":
            part, mult = part[:-1], 1024
        out.append(int(part) * mult)
    if not out:
        raise argparse.ArgumentTypeError("expected a comma-separated list of lengths, e.g. 1024,4K,8K")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from torchtitan_rtpurbo.data.tokenizer import DEFAULT_TOKENIZER_PATH

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH", help="a checkpoint to evaluate (repeatable)")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER_PATH), help="tokenizer file or directory (default: %(default)s)")
    p.add_argument("--tasks", default="all", help="comma-separated task names or 'all' (default: %(default)s)")
    p.add_argument("--lengths", type=_int_list, default=[1024, 2048, 4096], help="prompt lengths in tokens, e.g. 1K,2K,4K")
    p.add_argument("--samples", type=int, default=10, help="samples per task and length (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the answer's token count + 8")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES), help="model dtype (default: %(default)s)")
    p.add_argument("--haystack", default="stdlib", help="haystack documents: 'stdlib' (val split) or a path / glob of .txt/.jsonl")
    p.add_argument("--rtpurbo-prefill", choices=("keep", "dense", "sparse"), default="keep",
                   help="retrieval-head prefill of RTPurbo checkpoints (keep: as saved)")
    p.add_argument("--ppl-seq-len", type=int, default=0, help="perplexity window in tokens (0: skip perplexity)")
    p.add_argument("--ppl-max-docs", type=int, default=8, help="longest stdlib 'test' documents used for perplexity")
    p.add_argument("--ppl-max-windows", type=int, default=None)
    p.add_argument("--samples-file", default=None, help="read samples from this JSONL (save_samples) instead of generating")
    p.add_argument("--save-samples", action="store_true", help="also write samples.jsonl (prompts included) to --out-dir")
    p.add_argument("--out-dir", default="outputs/eval_long")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def load_model(spec: str, device: str, dtype: str, prefill: str = "keep"):
    """A model from PATH ("random:FLAVOR" for a random one); returns (model, description)."""
    import torch

    if spec.startswith("random:"):
        from models.qwen3 import build_model, get_flavor

        torch.manual_seed(0)
        model = build_model(get_flavor(spec.split(":", 1)[1]), device=device).to(getattr(torch, dtype))
        return model, f"random {spec.split(':', 1)[1]}"
    path = Path(spec)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if "rtpurbo" in config:
        from models.rtpurbo.export import load_rtpurbo_checkpoint

        _, model, roles, _ = load_rtpurbo_checkpoint(str(path), device=device, dtype=dtype)
        if prefill != "keep":
            from models.rtpurbo.convert import iter_rtpurbo_backends

            for _, backend in iter_rtpurbo_backends(model):
                backend.prefill = prefill
        return model, f"rtpurbo {path} ({roles.num_retrieval()} retrieval heads)"
    from models.hf_checkpoint import load_hf_checkpoint

    _, model = load_hf_checkpoint(path, device=device, dtype=dtype)
    return model, f"dense {path}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from torchtitan_rtpurbo.data.tokenizer import build_tokenizer
    from torchtitan_rtpurbo.evaluation.report import compare_models, format_table, write_report
    from torchtitan_rtpurbo.evaluation.tasks import default_corpus, generate_suite, load_samples, resolve_tasks, save_samples

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _DTYPES[args.dtype]
    tokenizer = build_tokenizer(args.tokenizer)
    models = {}
    for item in args.model:
        if "=" not in item:
            raise SystemExit(f"--model expects NAME=PATH, got {item!r}")
        name, spec = item.split("=", 1)
        t0 = time.perf_counter()
        models[name], desc = load_model(spec, device, dtype, args.rtpurbo_prefill)
        print(f"[eval_long] {name}: {desc} loaded in {time.perf_counter() - t0:.1f}s", flush=True)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.samples_file:
        samples = load_samples(args.samples_file)
    else:
        if args.haystack == "stdlib":
            docs = default_corpus("eval")
        else:
            from torchtitan_rtpurbo.data.corpus import get_documents

            docs = get_documents(args.haystack, split="all")
        samples = generate_suite(resolve_tasks(args.tasks), args.lengths, args.samples, args.seed, tokenizer, docs, split="eval")
    print(f"[eval_long] {len(samples)} samples ready in {time.perf_counter() - t0:.1f}s", flush=True)
    if args.save_samples:
        save_samples(samples, out_dir / "samples.jsonl")

    comparison = compare_models(
        models,
        tokenizer,
        samples=samples,
        seed=args.seed,
        samples_per_task=args.samples,
        max_new_tokens=args.max_new_tokens,
        device=device,
        batch_size=args.batch_size,
        perplexity_seq_len=args.ppl_seq_len or None,
        perplexity_max_docs=args.ppl_max_docs,
        perplexity_max_windows=args.ppl_max_windows,
        progress=not args.no_progress,
    )
    comparison["config"].update({"tokenizer": args.tokenizer, "dtype": dtype, "device": device,
                                 "models": {n: s.split("=", 1)[1] for n, s in zip(models, args.model)}})
    paths = write_report(comparison, out_dir)
    print(format_table(comparison))
    print(f"[eval_long] wrote {', '.join(str(p) for p in paths.values())}")
    return comparison


if __name__ == "__main__":
    main()
