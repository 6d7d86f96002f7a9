"""Generate text from a Hugging Face checkpoint (dense, or RTPurbo when config.json has an "rtpurbo" section)
with the role-aware KV cache and sparse decode of models/inference/ (see docs/inference.md).

    echo "def main(" | python scripts/generate.py --checkpoint assets/teachers/tiny \
        --tokenizer assets/tokenizer/stdlib_sp4096.model --max-new-tokens 64

Streams the text to stdout; the statistics (prompt tokens, time to first token, decode tokens/s, KV memory,
mean kept density of the retrieval heads, which prefill mode ran and why, whether the decode step ran as CUDA
graphs and why not) go to stderr at the end. --indexer-fp8 caches the RTPurbo indexer keys in float8_e4m3fn.
On CUDA the decode step is a CUDA graph by default (--cuda-graph auto|on|off) and the prefill runs every layer
over the whole prompt with the fast kernels when it fits (--prefill auto|chunked|one_shot). Bad inputs (missing /
corrupt checkpoint, tokenizer vocabulary larger than the model's, prompt longer than --max-len, KV cache or a
required one-shot prefill too large, --indexer-fp8 where fp8 keys cannot run) print one "error: ..." line and
exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class UsageError(Exception):
    pass


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="HF checkpoint directory (config.json + safetensors)")
    ap.add_argument("--tokenizer", required=True, help=".model (SentencePiece), tokenizer.json, or a directory")
    ap.add_argument("--prompt-file", default=None, help="prompt text file (default: stdin)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling over the vocabulary")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--chunk-size", type=int, default=256, help="prefill chunk (tokens)")
    ap.add_argument("--max-len", type=int, default=2048, help="KV cache length (prompt + generated)")
    ap.add_argument("--attn-top-p", type=float, default=None, help="override the RTPurbo decode top_p")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: float32 on CPU, bf16 on CUDA)")
    ap.add_argument("--kv-memory-limit-gb", type=float, default=None, help="CPU: refuse larger KV caches")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto",
                    help="decode step as CUDA graphs: auto = on CUDA (default), on = required, off")
    ap.add_argument("--prefill", choices=["auto", "chunked", "one_shot"], default="auto",
                    help="prefill mode: one_shot = every layer over the whole prompt with the fast kernels "
                         "(activations grow with the prompt), chunked = exact, --chunk-size tokens at a time; "
                         "auto (default) = one_shot on CUDA when it fits in memory, else chunked")
    ap.add_argument("--indexer-fp8", action="store_true",
                    help="cache the RTPurbo indexer keys in float8_e4m3fn (half the indexer bytes; stored unscaled, "
                         "saturated to +-448; docs/inference.md 'fp8 indexer keys'); no effect on a dense model")
    return ap.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load(args):
    import torch

    from models.hf_checkpoint import load_hf_checkpoint
    from torchtitan_rtpurbo.data import build_tokenizer

    ck = Path(args.checkpoint)
    if not (ck / "config.json").is_file():
        raise UsageError(f"checkpoint {ck}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        conf = json.loads((ck / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"checkpoint {ck}: cannot read config.json: {e}") from None
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    try:
        if isinstance(conf, dict) and "rtpurbo" in conf:
            from models.rtpurbo.export import load_rtpurbo_checkpoint

            margs, model, roles, _ = load_rtpurbo_checkpoint(str(ck), device=args.device, dtype=dtype)
            kind = f"rtpurbo ({roles.num_retrieval()} retrieval heads)" if hasattr(roles, "num_retrieval") else "rtpurbo"
        else:
            margs, model = load_hf_checkpoint(ck, device=args.device, dtype=dtype)
            kind = "dense"
    except Exception as e:  # any load failure is a bad checkpoint for the user
        raise UsageError(f"checkpoint {ck} could not be loaded: {type(e).__name__}: {e}") from None
    if args.attn_top_p is not None:
        from models.rtpurbo.convert import iter_rtpurbo_backends

        for _, be in iter_rtpurbo_backends(model):
            be.top_p = float(args.attn_top_p)
    try:
        tok = build_tokenizer(args.tokenizer)
    except Exception as e:
        raise UsageError(f"tokenizer {args.tokenizer} could not be loaded: {type(e).__name__}: {e}") from None
    if tok.vocab_size > margs.vocab_size:
        raise UsageError(f"tokenizer vocabulary ({tok.vocab_size}) exceeds the model's ({margs.vocab_size})")
    return model.eval(), tok, kind, torch


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.max_new_tokens < 0 or args.max_len < 1 or args.chunk_size < 1:
            raise UsageError("--max-new-tokens must be >= 0, --max-len and --chunk-size >= 1")
        text = Path(args.prompt_file).read_text() if args.prompt_file else sys.stdin.read()
        model, tok, kind, torch = load(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        ids = tok.encode(text)
        if tok.bos_id is not None:
            ids = [tok.bos_id] + ids
        if not ids:
            raise UsageError("the prompt is empty")
        if len(ids) > args.max_len:
            raise UsageError(f"prompt has {len(ids)} tokens, longer than --max-len {args.max_len}")
        from models.inference import InferenceEngine, KVCacheMemoryError
        from models.inference.prefill import PrefillMemoryError

        limit = int(args.kv_memory_limit_gb * 2**30) if args.kv_memory_limit_gb else None
        graphs = {"auto": None, "on": True, "off": False}[args.cuda_graph]
        if graphs and not str(args.device).startswith("cuda"):
            raise UsageError(f"--cuda-graph on needs a CUDA device (--device is {args.device})")
        try:
            eng = InferenceEngine(model, max_len=args.max_len, chunk_size=args.chunk_size, memory_limit_bytes=limit,
                                  cuda_graph=graphs, prefill_mode=args.prefill,
                                  indexer_cache_dtype="float8_e4m3fn" if args.indexer_fp8 else None)
        except ValueError as e:  # e.g. --indexer-fp8 on a device that cannot store / score fp8 keys
            raise UsageError(f"{e} (--indexer-fp8)" if args.indexer_fp8 and "indexer_cache_dtype" in str(e)
                             else str(e)) from None
        out: list[int] = []
        shown = [""]

        def stream(new):
            if new[0] is None or args.no_stream:
                return
            out.append(new[0])
            s = tok.decode(out)
            if s.startswith(shown[0]):
                sys.stdout.write(s[len(shown[0]):])
                sys.stdout.flush()
                shown[0] = s

        try:
            res = eng.generate([ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                               top_k=args.top_k, top_p=args.top_p, stop_tokens=[tok.eos_id], seed=args.seed,
                               on_tokens=stream)
        except (KVCacheMemoryError, PrefillMemoryError) as e:
            raise UsageError(str(e)) from None
    except (UsageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.no_stream:
        sys.stdout.write(tok.decode(res.tokens[0]))
    else:
        s = tok.decode(out)
        sys.stdout.write(s[len(shown[0]):])
    sys.stdout.write("\n")
    m = res.memory
    dens = "n/a (dense model)" if res.mean_density is None else f"{res.mean_density:.3f}"
    capture = ""
    if res.graph_capture_s > 0:
        rest = res.decode_s - res.graph_capture_s
        capture = (f" (of which {res.graph_capture_s:.3f} s capturing CUDA graphs, kernel compilation included; "
                   f"{res.decode_tokens / rest if rest > 0 else float('nan'):.1f} tokens/s without it)")
    print(f"[{kind}] prompt tokens: {len(ids)} | generated: {len(res.tokens[0])}"
          f"{' (stop token)' if res.finished[0] else ''}\n"
          f"time to first token: {res.ttft_s * 1e3:.1f} ms | decode: {res.decode_tokens} tokens in "
          f"{res.decode_s:.3f} s = {res.decode_tokens_per_s:.1f} tokens/s{capture}\n"
          f"KV cache: {m['total_bytes'] / 2**20:.2f} MiB for max_len {m['max_len']} "
          f"(dense {m['dense_total_bytes'] / 2**20:.2f} MiB); {m['bytes_per_token']} B/token (indexer keys "
          f"{m['indexer_bytes_per_token']} B, {res.indexer_cache_dtype}) + "
          f"{m['fixed_bytes_per_sequence']} B fixed vs dense {m['dense_bytes_per_token']} B/token\n"
          f"mean kept density (retrieval heads, decode): {dens}\n"
          f"prefill: {res.prefill_mode} ({res.prefill_status}) | decode path: {res.decode_path}; "
          f"CUDA graphs {res.graph_status}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
