"""Train the project's SentencePiece BPE tokenizer on the stdlib corpus (train split).

    python scripts/train_tokenizer.py                      # writes assets/tokenizer/stdlib_sp4096.model
    python scripts/train_tokenizer.py --vocab-size 8192 --output /tmp/sp8k.model
    python scripts/train_tokenizer.py --check assets/tokenizer/stdlib_sp4096.model   # round trip only

Options chosen so that decode(encode(code)) == code for Python sources (checked on every stdlib file
after training): identity normalisation, no whitespace collapsing, no dummy prefix, whitespace-only
pieces allowed (indentation becomes one token), byte fallback for characters outside the vocabulary.
Deterministic: the training text is chosen and ordered by a hash of each file's relative path, the
trainer gets it in that order (no sampling, no shuffle) and runs on one thread.
See docs/data.md for the recorded run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sentencepiece as spm  # noqa: E402

from torchtitan_rtpurbo.data.corpus import stdlib_documents  # noqa: E402
from torchtitan_rtpurbo.data.tokenizer import DEFAULT_TOKENIZER_PATH  # noqa: E402

# SentencePiece skips training "sentences" longer than max_sentence_length bytes; whole files are
# longer, so the text is cut at line boundaries into chunks of at most this many characters.
CHUNK_CHARS = 2000
MAX_SENTENCE_BYTES = 4 * CHUNK_CHARS  # a chunk of 2000 characters is at most 8000 UTF-8 bytes


def training_chunks(texts: list[str], chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut each text at line boundaries into chunks of <= chunk_chars characters, newlines kept."""
    chunks = []
    for text in texts:
        current = ""
        for line in text.splitlines(keepends=True):
            while len(line) > chunk_chars:  # a very long line is cut hard
                if current:
                    chunks.append(current)
                    current = ""
                chunks.append(line[:chunk_chars])
                line = line[chunk_chars:]
            if len(current) + len(line) > chunk_chars:
                chunks.append(current)
                current = ""
            current += line
        if current:
            chunks.append(current)
    return chunks


def select_training_texts(max_chars: int) -> tuple[list[str], int]:
    """Train-split stdlib files in the order of a hash of their path, up to max_chars characters."""
    docs = stdlib_documents("train")
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha256(docs.key(i).encode()).hexdigest())
    texts, total = [], 0
    for i in order:
        text = docs[i]
        if total + len(text) > max_chars:
            continue  # skip files that would overflow the cap; smaller ones later may still fit
        texts.append(text)
        total += len(text)
    return texts, total


def train(vocab_size: int, max_chars: int) -> tuple[bytes, dict]:
    texts, total_chars = select_training_texts(max_chars)
    chunks = training_chunks(texts)
    model = io.BytesIO()
    start = time.perf_counter()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # Code must come back byte for byte: no normalisation, keep runs of spaces, no added prefix.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        # Runs of spaces (indentation) may become single pieces ("▁▁▁▁", "▁▁▁▁▁▁▁▁").
        allow_whitespace_only_pieces=True,
        split_digits=True,
        # Rare characters are not in the vocabulary; byte fallback encodes them as UTF-8 bytes.
        byte_fallback=True,
        character_coverage=0.9995,
        max_sentence_length=MAX_SENTENCE_BYTES,
        # Determinism: all chunks, in our order, one thread.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    info = {
        "vocab_size": vocab_size,
        "training_files": len(texts),
        "training_chars": total_chars,
        "training_chunks": len(chunks),
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    return model.getvalue(), info


def check_round_trip(model_bytes: bytes) -> dict:
    """decode(encode(text)) == text on every stdlib file (all splits); tokens per byte on val."""
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    docs = stdlib_documents("all")
    failures = []
    start = time.perf_counter()
    total_tokens = total_bytes = 0
    for i in range(len(docs)):
        text = docs[i]
        ids = sp.encode(text, out_type=int)
        total_tokens += len(ids)
        total_bytes += len(text.encode("utf-8"))
        if sp.decode(ids) != text:
            failures.append(docs.key(i))
    seconds = time.perf_counter() - start
    val = stdlib_documents("val")
    val_tokens = sum(len(sp.encode(val[i], out_type=int)) for i in range(len(val)))
    val_bytes = sum(len(val[i].encode("utf-8")) for i in range(len(val)))
    return {
        "round_trip_files": len(docs),
        "round_trip_failures": failures,
        "all_tokens": total_tokens,
        "all_bytes": total_bytes,
        "encode_seconds_all": round(seconds, 2),
        "val_tokens_per_byte": round(val_tokens / val_bytes, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_TOKENIZER_PATH)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-chars", type=int, default=40_000_000, help="cap on training text (characters)")
    parser.add_argument("--skip-check", action="store_true", help="skip the round-trip check over the stdlib")
    parser.add_argument("--check", type=Path, metavar="MODEL", help="only check MODEL on this machine's stdlib")
    args = parser.parse_args(argv)

    if args.check is not None:
        result = {"model": str(args.check), **check_round_trip(args.check.read_bytes())}
        print(json.dumps(result, indent=2))
        return 1 if result["round_trip_failures"] else 0

    model_bytes, info = train(args.vocab_size, args.max_chars)
    info["model_bytes"] = len(model_bytes)
    info["model_sha256"] = hashlib.sha256(model_bytes).hexdigest()
    if not args.skip_check:
        info.update(check_round_trip(model_bytes))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_bytes(model_bytes)
    os.replace(tmp, args.output)  # atomic: a reader never sees a half-written model
    print(json.dumps({"output": str(args.output), **info}, indent=2))
    if info.get("round_trip_failures"):
        print(f"round trip FAILED on {len(info['round_trip_failures'])} files", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
