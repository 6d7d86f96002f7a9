"""Document sources: the embedded stdlib corpus and local .txt / .jsonl files.

A source is a `Documents` object: an indexable, lazily-read sequence of strings. Listing a source is
cheap and validates everything up front (so a bad file fails at startup, not hours into training);
the text of document i is read from disk only when `documents[i]` is called.

Every document has a stable `key` (stdlib: its path relative to the stdlib root; .txt: the file name;
.jsonl: "file name:line number"). The train/val/test split is a hash of that key, so a document
lands in the same split on every machine and Python version that has it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import stat
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test", "all")
# Of 100 hash buckets: bucket 0 is val, bucket 1 is test, the other 98 are train.
_VAL_BUCKET = 0
_TEST_BUCKET = 1
_NUM_BUCKETS = 100

# Directories under the stdlib root that hold third-party packages, not the standard library.
_STDLIB_EXCLUDED_TOP_DIRS = ("site-packages", "dist-packages")


def split_of_key(key: str) -> str:
    """The split ("train", "val" or "test") a document with this key belongs to (98/1/1)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "little") % _NUM_BUCKETS
    if bucket == _VAL_BUCKET:
        return "val"
    if bucket == _TEST_BUCKET:
        return "test"
    return "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


@dataclass(frozen=True)
class _WholeFile:
    """One document per file (stdlib .py, .txt)."""

    path: Path
    key: str


@dataclass(frozen=True)
class _JsonlLines:
    """Selected lines of one .jsonl file, one document per line (byte offsets, 1-based line numbers)."""

    path: Path
    byte_offsets: np.ndarray  # int64
    line_numbers: np.ndarray  # int64
    text_field: str


class Documents(Sequence):
    """Lazily-read documents. `docs[i]` reads document i from disk and returns its text."""

    def __init__(self, name: str, parts: Sequence[_WholeFile | _JsonlLines]):
        self.name = name
        self._parts = list(parts)
        counts = [1 if isinstance(p, _WholeFile) else len(p.line_numbers) for p in self._parts]
        # _starts[j] is the global index of part j's first document.
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[_WholeFile | _JsonlLines, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"document index {index} out of range for {self.name!r} ({len(self)} documents)")
        index %= len(self)
        part_index = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._parts[part_index], index - int(self._starts[part_index])

    def key(self, index: int) -> str:
        """Stable identity of document `index` (used for the split hash and in error messages)."""
        part, local = self._locate(index)
        if isinstance(part, _WholeFile):
            return part.key
        return f"{part.path.name}:{int(part.line_numbers[local])}"

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("Documents does not support slicing; index one document at a time")
        part, local = self._locate(index)
        if isinstance(part, _WholeFile):
            return _read_utf8(part.path)
        with open(part.path, "rb") as f:
            f.seek(int(part.byte_offsets[local]))
            raw = f.readline()
        return _parse_jsonl_line(raw, part.path, int(part.line_numbers[local]), part.text_field)

    def __repr__(self) -> str:
        return f"Documents(name={self.name!r}, num_documents={len(self)})"


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e})") from e
    except OSError as e:
        raise OSError(f"{path}: cannot read ({e})") from e


# ----------------------------------------------------------------------------------------------
# The Python standard library as a corpus
# ----------------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    """The directory holding this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=4)
def _stdlib_files(root: str) -> tuple[tuple[str, str], ...]:
    """(relative posix path, absolute path) of every usable stdlib .py file, sorted by relative path.

    Usable: a regular file (not a symlink), readable, valid UTF-8, not empty; not under site-packages.
    Reads every file once (~30 MB, under a second) so that the listing is exact.
    """
    root_path = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root_path):
        rel_dir = Path(dirpath).relative_to(root_path)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_TOP_DIRS]
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for filename in filenames:
            if not filename.endswith(".py"):
                continue
            path = Path(dirpath) / filename
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                data = path.read_bytes()
                if not data:
                    continue
                data.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # unreadable or not UTF-8 (a few test files use legacy encodings on purpose)
            found.append(((rel_dir / filename).as_posix(), str(path)))
    return tuple(sorted(found))


def stdlib_documents(split: str = "train", root: str | os.PathLike | None = None) -> Documents:
    """The standard library's own .py sources on this machine, one document per file.

    split: "train" (98%), "val" (1%), "test" (1%) by a hash of the relative path, or "all".
    root: the stdlib directory; default `sysconfig.get_paths()["stdlib"]`.
    """
    _check_split(split)
    root_path = Path(root) if root is not None else stdlib_root()
    if not root_path.is_dir():
        raise FileNotFoundError(f"stdlib root {root_path} is not a directory")
    parts = [
        _WholeFile(Path(abs_path), rel)
        for rel, abs_path in _stdlib_files(str(root_path.resolve()))
        if split == "all" or split_of_key(rel) == split
    ]
    if not parts:
        raise ValueError(f"no usable .py files for split {split!r} under {root_path}")
    return Documents(f"stdlib:{split}", parts)


# ----------------------------------------------------------------------------------------------
# Local .txt / .jsonl files
# ----------------------------------------------------------------------------------------------


def _parse_jsonl_line(raw: bytes, path: Path, line_number: int, text_field: str) -> str:
    where = f"{path}:{line_number}"
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 ({e})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise ValueError(f"{where}: missing field {text_field!r} (fields: {sorted(record)[:10]})")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
    return text


def _scan_jsonl(path: Path, text_field: str, split: str) -> _JsonlLines:
    """Validate every line of a .jsonl file; keep the byte offsets of the lines in `split`."""
    offsets, line_numbers = [], []
    offset = 0
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if raw.strip():  # blank lines (e.g. a trailing newline) are not documents
                _parse_jsonl_line(raw, path, line_number, text_field)
                if split == "all" or split_of_key(f"{path.name}:{line_number}") == split:
                    offsets.append(offset)
                    line_numbers.append(line_number)
            offset += len(raw)
    return _JsonlLines(path, np.asarray(offsets, np.int64), np.asarray(line_numbers, np.int64), text_field)


def text_documents(
    paths: Sequence[str | os.PathLike], *, text_field: str = "text", split: str = "all"
) -> Documents:
    """Documents from local files: .txt is one document per file, .jsonl one per non-blank line
    (the string in `text_field`). A bad .jsonl line raises ValueError naming "file:line".

    split: "all" (default) or "train"/"val"/"test" by a hash of the document key
    (.txt: file name; .jsonl: "file name:line").
    """
    _check_split(split)
    parts: list[_WholeFile | _JsonlLines] = []
    for raw_path in paths:
        path = Path(raw_path)
        if not path.is_file():
            raise FileNotFoundError(f"document file {path} does not exist or is not a file")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            _read_utf8(path)  # validate now: fail at startup, not mid-training
            if split == "all" or split_of_key(path.name) == split:
                parts.append(_WholeFile(path, path.name))
        elif suffix == ".jsonl":
            lines = _scan_jsonl(path, text_field, split)
            if len(lines.line_numbers):
                parts.append(lines)
        else:
            raise ValueError(f"{path}: unsupported document file type {suffix!r} (expected .txt or .jsonl)")
    return Documents(f"files:{split}", parts)


def _resolve_paths(path_or_glob: str) -> list[Path]:
    """A file, a directory (every .txt/.jsonl under it) or a glob, as a sorted list of files."""
    path = Path(path_or_glob).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".jsonl"))
        if not files:
            raise FileNotFoundError(f"directory {path} holds no .txt or .jsonl files")
        return files
    matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True) if Path(m).is_file())
    if not matches:
        raise FileNotFoundError(f"no file matches {path_or_glob!r}")
    return matches


# Named sources. A path or glob that is not a registered name is read with `text_documents`.
DOCUMENT_SOURCES: dict[str, Callable[..., Documents]] = {
    "stdlib": lambda split="train", **kw: stdlib_documents(split, **kw),
}


def get_documents(name: str, *, split: str = "train", text_field: str = "text", **kwargs) -> Documents:
    """Documents by name: a registered source ("stdlib") or a path / directory / glob of .txt/.jsonl files.

    For local files, split="train"/"val"/"test" keeps the hash-selected 98/1/1 share; pass split="all"
    to use every document (e.g. for a file that is already a held-out set).
    """
    if name in DOCUMENT_SOURCES:
        return DOCUMENT_SOURCES[name](split=split, **kwargs)
    if kwargs:
        raise TypeError(f"unexpected arguments for file documents {name!r}: {sorted(kwargs)}")
    return text_documents(_resolve_paths(name), text_field=text_field, split=split)
