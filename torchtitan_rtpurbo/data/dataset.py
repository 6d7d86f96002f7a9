"""Packed, sharded, resumable token streams for training.

Sample protocol (every source, including the synthetic long-context tasks, yields these keys):
    "input"     LongTensor[seq_len]  token ids
    "labels"    LongTensor[seq_len]  next-token targets (input shifted by one)
    "positions" LongTensor[seq_len]  position within its document, restarting at 0 after each EOS and
                                     at the start of the window (for per-document RoPE)
    "doc_ids"   IntTensor[seq_len]   index of the document within the window, 0, 1, 2, ... (document masks)
A source is an iterable whose `iter()` continues from its current state, with `state_dict()` /
`load_state_dict()`; `state_dict()` taken after receiving a sample describes the position after it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from .corpus import get_documents
from .tokenizer import Tokenizer, build_tokenizer

SAMPLE_KEYS = ("input", "labels", "positions", "doc_ids")
SHARD_MODES = ("document", "sample")


class PackedTokenDataset(IterableDataset):
    """Documents tokenised lazily (one at a time, as the stream needs them), each followed by EOS,
    concatenated into one stream and cut greedily into windows of seq_len + 1 tokens.

    Consecutive windows overlap by one token (window k = stream[k*seq_len : k*seq_len + seq_len + 1]),
    so every token of the stream is a label exactly once. The stream runs on across epochs: the window
    after the last document of epoch e continues with the first document of epoch e + 1. With
    shuffle=True, epoch e visits documents in the order permutation(seed, e).

    Data parallelism (shard_by):
      "document": rank r reads documents r, r + dp_degree, r + 2*dp_degree, ... of each epoch's order
                  and packs only those (tokenisation work is split across ranks; needs at least
                  dp_degree documents).
      "sample":   every rank walks the whole stream; rank r keeps windows r, r + dp_degree, ...
                  (works for any number of documents; every rank tokenises everything).

    infinite=False makes one pass over the data (epoch 0's order) and drops the last incomplete
    window: use it for evaluation.

    Token ids of documents already seen are kept in memory (up to `token_cache_max_tokens`), so later
    epochs do not tokenise again.

    Resume: state_dict() / load_state_dict() restore the exact stream position; call iter() again
    after load_state_dict (an iterator created before it raises if used afterwards).
    """

    def __init__(
        self,
        documents: Sequence[str],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        dp_rank: int = 0,
        dp_degree: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        infinite: bool = True,
        shard_by: str = "document",
        token_cache_max_tokens: int = 64 * 1024 * 1024,
    ):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if dp_degree < 1 or not 0 <= dp_rank < dp_degree:
            raise ValueError(f"need 0 <= dp_rank < dp_degree, got dp_rank={dp_rank}, dp_degree={dp_degree}")
        if shard_by not in SHARD_MODES:
            raise ValueError(f"shard_by must be one of {SHARD_MODES}, got {shard_by!r}")
        if len(documents) == 0:
            raise ValueError(f"no documents in {documents!r}")
        if shard_by == "document" and len(documents) < dp_degree:
            raise ValueError(
                f"{len(documents)} documents cannot be split across dp_degree={dp_degree} ranks; "
                f"use shard_by='sample'"
            )
        self.documents = documents
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.dp_rank = dp_rank
        self.dp_degree = dp_degree
        self.seed = seed
        self.shuffle = shuffle
        self.infinite = infinite
        self.shard_by = shard_by
        self.eos_id = int(tokenizer.eos_id)
        self._token_cache: dict[int, np.ndarray] = {}
        self._token_cache_tokens = 0
        self._token_cache_max_tokens = token_cache_max_tokens
        self._order_cache: dict[int, np.ndarray] = {}
        self._state_version = 0
        self._reset_position()

    # ---------------------------------------------------------------- state

    def _reset_position(self) -> None:
        # The next window starts at token `token_offset` of the document at position `doc_pos` of
        # this rank's order for `epoch`. `windows_seen` counts windows of the whole stream (all ranks'
        # windows under shard_by="sample"), `samples_yielded` those this rank yielded.
        self._epoch = 0
        self._doc_pos = 0
        self._token_offset = 0
        self._windows_seen = 0
        self._samples_yielded = 0

    def _identity(self) -> dict[str, Any]:
        """What must match for a saved position to mean the same thing after a restore."""
        return {
            "num_documents": len(self.documents),
            "seq_len": self.seq_len,
            "dp_rank": self.dp_rank,
            "dp_degree": self.dp_degree,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shard_by": self.shard_by,
            "eos_id": self.eos_id,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "doc_pos": self._doc_pos,
            "token_offset": self._token_offset,
            "windows_seen": self._windows_seen,
            "samples_yielded": self._samples_yielded,
            **self._identity(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, expected in self._identity().items():
            if key not in state:
                raise KeyError(f"PackedTokenDataset state has no {key!r}")
            if state[key] != expected:
                raise ValueError(
                    f"PackedTokenDataset state mismatch on {key!r}: saved {state[key]!r}, this dataset has "
                    f"{expected!r}; an exact resume needs the same data, tokenizer and sharding"
                )
        self._epoch = int(state["epoch"])
        self._doc_pos = int(state["doc_pos"])
        self._token_offset = int(state["token_offset"])
        self._windows_seen = int(state["windows_seen"])
        self._samples_yielded = int(state["samples_yielded"])
        self._state_version += 1

    @property
    def epoch(self) -> int:
        return self._epoch

    # ---------------------------------------------------------------- documents

    def _order(self, epoch: int) -> np.ndarray:
        """Global document indices this rank reads in `epoch`, in reading order."""
        if epoch not in self._order_cache:
            n = len(self.documents)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            if self.shard_by == "document":
                order = order[self.dp_rank :: self.dp_degree]
            if len(self._order_cache) >= 2:
                self._order_cache.pop(min(self._order_cache))
            self._order_cache[epoch] = order
        return self._order_cache[epoch]

    def _doc_tokens(self, epoch: int, doc_pos: int) -> np.ndarray:
        """Token ids of one document followed by EOS; empty for an empty document (it is skipped)."""
        doc_index = int(self._order(epoch)[doc_pos])
        tokens = self._token_cache.get(doc_index)
        if tokens is None:
            text = self.documents[doc_index]
            ids = self.tokenizer.encode(text) if text else []
            # int32 halves the cache's memory; vocabularies are far below 2**31.
            tokens = np.asarray(ids + [self.eos_id] if text else [], dtype=np.int32)
            if self._token_cache_tokens + len(tokens) <= self._token_cache_max_tokens:
                self._token_cache[doc_index] = tokens
                self._token_cache_tokens += len(tokens)
        return tokens

    def _next_doc(self, epoch: int, doc_pos: int) -> tuple[int, int] | None:
        doc_pos += 1
        if doc_pos < len(self._order(epoch)):
            return epoch, doc_pos
        if not self.infinite:
            return None
        return epoch + 1, 0

    # ---------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        version = self._state_version
        window_len = self.seq_len + 1
        # Documents loaded ahead of the head of the stream: (epoch, doc_pos, tokens), never empty.
        segments: deque[tuple[int, int, np.ndarray]] = deque()
        head_offset = self._token_offset
        cursor: tuple[int, int] | None = (self._epoch, self._doc_pos)  # next document to load
        available = -head_offset
        while True:
            docs_without_tokens = 0
            while available < window_len:
                if cursor is None:
                    return  # finite mode: the last incomplete window is dropped
                tokens = self._doc_tokens(*cursor)
                if len(tokens):
                    segments.append((cursor[0], cursor[1], tokens))
                    available += len(tokens)
                    docs_without_tokens = 0
                else:
                    docs_without_tokens += 1
                    if docs_without_tokens > len(self.documents):
                        raise ValueError(f"every document this rank reads from {self.documents!r} is empty")
                cursor = self._next_doc(*cursor)

            keep = self.shard_by == "document" or self._windows_seen % self.dp_degree == self.dp_rank
            sample = self._assemble(segments, head_offset) if keep else None

            # Advance the head by seq_len tokens; the window's last token starts the next window.
            to_consume = self.seq_len
            while to_consume >= len(segments[0][2]) - head_offset:
                to_consume -= len(segments[0][2]) - head_offset
                available -= len(segments[0][2]) - head_offset
                segments.popleft()
                head_offset = 0
            head_offset += to_consume
            available -= to_consume

            if self._state_version != version:
                raise RuntimeError("PackedTokenDataset state was loaded after this iterator started; call iter() again")
            # Update the saved position before yielding, so state_dict() after a sample is "after it".
            self._epoch, self._doc_pos, _ = segments[0]
            self._token_offset = head_offset
            self._windows_seen += 1
            if sample is not None:
                self._samples_yielded += 1
                yield sample

    def _assemble(self, segments: deque, head_offset: int) -> dict[str, torch.Tensor]:
        window_len = self.seq_len + 1
        pieces, positions, doc_ids = [], [], []
        need, start = window_len, head_offset
        for doc_in_window, (_, _, tokens) in enumerate(segments):
            piece = tokens[start : start + need]
            pieces.append(piece)
            positions.append(np.arange(len(piece), dtype=np.int64))
            doc_ids.append(np.full(len(piece), doc_in_window, dtype=np.int32))
            need -= len(piece)
            start = 0
            if need == 0:
                break
        window = np.concatenate(pieces).astype(np.int64)
        return {
            "input": torch.from_numpy(window[:-1].copy()),  # copies: the two views share memory
            "labels": torch.from_numpy(window[1:].copy()),
            "positions": torch.from_numpy(np.concatenate(positions)[:-1]),
            "doc_ids": torch.from_numpy(np.concatenate(doc_ids)[:-1]),
        }


class MixtureDataset(IterableDataset):
    """Interleaves several sources: sample i comes from source k drawn with probability weights[k]
    by a generator seeded with (seed, i), so the choice sequence depends only on seed and i.

    Each source must follow the sample protocol (module docstring) and be resumable. The mixture
    ends when a chosen source is exhausted (finite sources). Resume restores every source's state.
    """

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], seed: int = 0):
        if len(datasets) == 0 or len(datasets) != len(weights):
            raise ValueError(f"need one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights")
        weights_array = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(weights_array)) or np.any(weights_array < 0) or weights_array.sum() <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {list(weights)}")
        for i, ds in enumerate(datasets):
            for method in ("state_dict", "load_state_dict", "__iter__"):
                if not hasattr(ds, method):
                    raise TypeError(f"dataset {i} ({type(ds).__name__}) has no {method}()")
        self.datasets = list(datasets)
        self.probabilities = weights_array / weights_array.sum()
        self.seed = seed
        self._samples_yielded = 0
        self._state_version = 0

    def source_of(self, sample_index: int) -> int:
        """Which source sample `sample_index` of the mixture is drawn from."""
        rng = np.random.default_rng([self.seed, sample_index])
        return int(rng.choice(len(self.datasets), p=self.probabilities))

    def state_dict(self) -> dict[str, Any]:
        return {
            "samples_yielded": self._samples_yielded,
            "seed": self.seed,
            "num_sources": len(self.datasets),
            "sources": [ds.state_dict() for ds in self.datasets],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, expected in (("seed", self.seed), ("num_sources", len(self.datasets))):
            if state.get(key) != expected:
                raise ValueError(f"MixtureDataset state mismatch on {key!r}: saved {state.get(key)!r}, have {expected!r}")
        for ds, source_state in zip(self.datasets, state["sources"]):
            ds.load_state_dict(source_state)
        self._samples_yielded = int(state["samples_yielded"])
        self._state_version += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        version = self._state_version
        iterators: list[Iterator | None] = [None] * len(self.datasets)
        while True:
            k = self.source_of(self._samples_yielded)
            if iterators[k] is None:
                iterators[k] = iter(self.datasets[k])  # created lazily: a source never chosen is never read
            try:
                sample = next(iterators[k])
            except StopIteration:
                return
            if self._state_version != version:
                raise RuntimeError("MixtureDataset state was loaded after this iterator started; call iter() again")
            if set(sample) != set(SAMPLE_KEYS):
                raise ValueError(f"source {k} ({type(self.datasets[k]).__name__}) yielded keys {tuple(sample)}, expected {SAMPLE_KEYS}")
            self._samples_yielded += 1
            yield sample


class StatefulBatchLoader:
    """Stacks `batch_size` consecutive samples of a resumable source into [batch_size, seq_len] tensors.

    No worker processes: the source runs in the training process, so its state_dict is exact.
    state_dict() after a batch describes the position after that batch. An incomplete last batch of
    a finite source is dropped.
    """

    def __init__(self, dataset: Any, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self._batches_yielded = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        samples = iter(self.dataset)
        while True:
            batch = []
            for sample in samples:
                batch.append(sample)
                if len(batch) == self.batch_size:
                    break
            if len(batch) < self.batch_size:
                return
            self._batches_yielded += 1
            yield {key: torch.stack([s[key] for s in batch]) for key in batch[0]}

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "batches_yielded": self._batches_yielded, "dataset": self.dataset.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("batch_size") != self.batch_size:
            raise ValueError(f"loader state mismatch on 'batch_size': saved {state.get('batch_size')!r}, have {self.batch_size}")
        self.dataset.load_state_dict(state["dataset"])
        self._batches_yielded = int(state["batches_yielded"])


def build_dataloader(
    name_or_path: str,
    tokenizer: Tokenizer | str,
    *,
    seq_len: int,
    batch_size: int,
    dp_rank: int = 0,
    dp_degree: int = 1,
    seed: int = 0,
    split: str = "train",
    shuffle: bool = True,
    infinite: bool = True,
    shard_by: str = "document",
    text_field: str = "text",
) -> StatefulBatchLoader:
    """A resumable batch loader over "stdlib" or a path / directory / glob of .txt/.jsonl files.

    tokenizer: a Tokenizer or a path for `build_tokenizer`. split: "train"/"val"/"test" (98/1/1 by a
    hash of each document's key) or "all". See PackedTokenDataset for the other arguments.
    """
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = build_tokenizer(tokenizer)
    documents = get_documents(name_or_path, split=split, text_field=text_field)
    dataset = PackedTokenDataset(
        documents,
        tokenizer,
        seq_len=seq_len,
        dp_rank=dp_rank,
        dp_degree=dp_degree,
        seed=seed,
        shuffle=shuffle,
        infinite=infinite,
        shard_by=shard_by,
    )
    return StatefulBatchLoader(dataset, batch_size)
