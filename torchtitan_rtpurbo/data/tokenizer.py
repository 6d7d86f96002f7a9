"""Tokenizers: SentencePiece (.model) and Hugging Face tokenizer.json, behind one small protocol.

`encode` never adds BOS/EOS; the caller decides (the packed dataset appends EOS after every document).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

REPO_ROOT = Path(__file__).resolve().parents[2]
# The project's own tokenizer for the embedded stdlib corpus (see docs/data.md and scripts/train_tokenizer.py).
DEFAULT_TOKENIZER_PATH = REPO_ROOT / "assets" / "tokenizer" / "stdlib_sp4096.model"


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None  # None when the tokenizer has no BOS token (e.g. Qwen3)
    eos_id: int
    pad_id: int  # falls back to eos_id when the tokenizer defines no pad token

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece .model file. EOS must be defined in the model; pad falls back to EOS."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"SentencePiece model {self.path} does not exist")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with no path in the message
            raise ValueError(f"{self.path}: not a readable SentencePiece model ({e})") from e
        self.vocab_size: int = self._sp.get_piece_size()
        bos, eos, pad = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
        if eos < 0:
            raise ValueError(f"{self.path}: SentencePiece model defines no EOS token (needed to pack documents)")
        self.bos_id: int | None = bos if bos >= 0 else None
        self.eos_id: int = eos
        self.pad_id: int = pad if pad >= 0 else eos

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


# Token names tried, in order, when no file names the special tokens.
_WELL_KNOWN_TOKENS = {
    "bos": ("<|begin_of_text|>", "<s>", "<bos>"),
    "eos": ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"),
    "pad": ("<|pad|>", "<pad>"),
}


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores a special token as a string, {"content": ...}, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"unrecognised special-token entry {value!r}")


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


class HuggingFaceTokenizer:
    """A Hugging Face tokenizer.json, read with the `tokenizers` library.

    Special tokens, each resolved independently, first match wins:
      1. the bos_token / eos_token / pad_token arguments (token strings);
      2. tokenizer_config.json, then special_tokens_map.json, beside tokenizer.json
         (an explicit null there means "this tokenizer has none");
      3. config.json's bos_token_id / eos_token_id / pad_token_id beside it;
      4. a well-known name present in the vocabulary ("<|endoftext|>", "</s>", "<s>", "<pad>", ...).
    EOS is required; pad falls back to EOS.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file {self.path} does not exist")
        try:
            self._tok = _HFTokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception naming no file
            raise ValueError(f"{self.path}: not a readable tokenizer.json ({e})") from e
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

        explicit = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
        folder = self.path.parent
        token_files = [(folder / n, _read_json(folder / n)) for n in ("tokenizer_config.json", "special_tokens_map.json")]
        model_config = _read_json(folder / "config.json")
        resolved: dict[str, int | None] = {}
        for kind in ("bos", "eos", "pad"):
            resolved[kind] = self._resolve(kind, explicit[kind], token_files, model_config)
        if resolved["eos"] is None:
            raise ValueError(
                f"{self.path}: no EOS token found (tokenizer_config.json, special_tokens_map.json, config.json "
                f"or a well-known name); pass eos_token=... explicitly"
            )
        self.bos_id: int | None = resolved["bos"]
        self.eos_id: int = resolved["eos"]
        self.pad_id: int = resolved["pad"] if resolved["pad"] is not None else resolved["eos"]

    def _token_id(self, token: str, source: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{source}: special token {token!r} is not in the vocabulary of {self.path}")
        return token_id

    def _resolve(self, kind: str, explicit: str | None, token_files, model_config) -> int | None:
        if explicit is not None:
            return self._token_id(explicit, f"argument {kind}_token")
        field = f"{kind}_token"
        for file_path, data in token_files:
            if data is not None and field in data:
                try:
                    token = _token_content(data[field])
                except ValueError as e:
                    raise ValueError(f"{file_path}: field {field!r}: {e}") from e
                return None if token is None else self._token_id(token, f"{file_path} field {field!r}")
        id_field = f"{kind}_token_id"
        if model_config is not None and model_config.get(id_field) is not None:
            value = model_config[id_field]
            value = value[0] if isinstance(value, list) and value else value
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{self.path.parent / 'config.json'}: {id_field}={value!r} is not a valid token id")
            return value
        for token in _WELL_KNOWN_TOKENS[kind]:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HuggingFaceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def build_tokenizer(
    path: str | os.PathLike,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
) -> Tokenizer:
    """A tokenizer from a file or a directory.

    A `.model` file is SentencePiece; a `.json` file is a Hugging Face tokenizer.json. A directory must
    hold tokenizer.json (preferred: real checkpoints ship it) or exactly one *.model file.
    The token arguments override the Hugging Face special tokens (SentencePiece takes them from the model).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        else:
            models = sorted(path.glob("*.model"))
            if len(models) != 1:
                found = [m.name for m in models] or "none"
                raise FileNotFoundError(
                    f"tokenizer directory {path} must hold tokenizer.json or exactly one *.model file (found: {found})"
                )
            path = models[0]
    if path.suffix == ".model":
        if any(t is not None for t in (bos_token, eos_token, pad_token)):
            raise ValueError(f"{path}: SentencePiece special tokens come from the model; do not pass *_token arguments")
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HuggingFaceTokenizer(path, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)
    raise ValueError(f"{path}: unknown tokenizer file type {path.suffix!r} (expected .model or tokenizer.json)")
