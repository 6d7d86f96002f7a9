"""Synthetic long-context training samples: the TRAINING split of the RULER-style tasks
(torchtitan_rtpurbo/evaluation/tasks.py), packed into windows that follow the dataset protocol of
dataset.py ("input", "labels", "positions", "doc_ids").

Each document in a window is  prompt_ids + encode(" " + answer) + [EOS]; labels are -100 everywhere
except the answer tokens and that EOS, so training on a mixture with this source teaches retrieval, not
the haystack. A window is filled with further samples while at least `min_sample_tokens` tokens are left
(each later sample's prompt is sized to what is left); the rest is padding (pad_id, its own doc id,
labels -100). Positions restart at 0 for every document (and for the padding); doc_ids count the
documents of the window 0, 1, 2, ...

Deterministic and resumable: window w is built from a generator seeded by (seed, split, w) alone, so the
state is just the number of windows this rank has yielded. Under data parallelism rank r yields windows
r, r + dp_degree, r + 2 * dp_degree, ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

_SYNTHETIC_STREAM = 0x53594E  # "SYN": keeps window seeds apart from the evaluation generators' seeds


class SyntheticTaskDataset(IterableDataset):
    """An infinite source of packed synthetic task samples (see the module docstring).

    tokenizer: the training tokenizer (encode/decode/eos_id/pad_id).
    tasks: task names (evaluation.tasks.TASKS; "all" or None for every task); weights: their sampling
        weights (default uniform).
    lengths: prompt lengths in tokens to draw from (uniformly); each is capped so that the sample fits
        in the space left in the window.
    split: "train" (default) draws training keys; "eval" gives held-out samples (for validation loss).
    corpus_docs: haystack documents (default: stdlib "train" split for split="train", "val" for "eval").
    """

    def __init__(
        self,
        tokenizer: Any,
        tasks: str | Sequence[str] | None = None,
        lengths: Sequence[int] = (1024, 2048, 4096),
        seq_len: int = 4096,
        seed: int = 0,
        split: str = "train",
        *,
        weights: Sequence[float] | None = None,
        corpus_docs: Sequence[str] | None = None,
        dp_rank: int = 0,
        dp_degree: int = 1,
        min_sample_tokens: int = 128,
        answer_reserve: int = 64,
    ):
        from torchtitan_rtpurbo.evaluation.tasks import SPLITS, TASKS, default_corpus, get_haystack, resolve_tasks

        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.task_names = resolve_tasks(tasks)
        if weights is None:
            weights = [1.0] * len(self.task_names)
        w = np.asarray(weights, dtype=np.float64)
        if len(w) != len(self.task_names) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f"need one finite non-negative weight per task ({self.task_names}), got {list(weights)}")
        self.probabilities = w / w.sum()
        self.lengths = [int(x) for x in lengths]
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"lengths must be positive, got {list(lengths)}")
        if dp_degree < 1 or not 0 <= dp_rank < dp_degree:
            raise ValueError(f"need 0 <= dp_rank < dp_degree, got dp_rank={dp_rank}, dp_degree={dp_degree}")
        if seq_len < min_sample_tokens + answer_reserve:
            raise ValueError(
                f"seq_len={seq_len} is too short for a synthetic sample (needs >= min_sample_tokens + answer_reserve "
                f"= {min_sample_tokens + answer_reserve})"
            )
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.split = split
        self.dp_rank = dp_rank
        self.dp_degree = dp_degree
        self.min_sample_tokens = int(min_sample_tokens)
        self.answer_reserve = int(answer_reserve)
        self.eos_id = int(tokenizer.eos_id)
        self.pad_id = int(getattr(tokenizer, "pad_id", tokenizer.eos_id))
        self._tasks = TASKS
        self._haystack = None
        if any(TASKS[t].uses_haystack for t in self.task_names):
            docs = corpus_docs if corpus_docs is not None else default_corpus(split)
            self._haystack = get_haystack(docs, tokenizer)
        self._windows_yielded = 0
        self._state_version = 0

    # ---------------------------------------------------------------- state

    def _identity(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "split": self.split,
            "seq_len": self.seq_len,
            "tasks": list(self.task_names),
            "lengths": list(self.lengths),
            "dp_rank": self.dp_rank,
            "dp_degree": self.dp_degree,
            "eos_id": self.eos_id,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"windows_yielded": self._windows_yielded, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, expected in self._identity().items():
            if key not in state:
                raise KeyError(f"SyntheticTaskDataset state has no {key!r}")
            if state[key] != expected:
                raise ValueError(f"SyntheticTaskDataset state mismatch on {key!r}: saved {state[key]!r}, have {expected!r}")
        self._windows_yielded = int(state["windows_yielded"])
        self._state_version += 1

    # ---------------------------------------------------------------- windows

    def window(self, w: int) -> dict[str, torch.Tensor]:
        """Window w of the global stream (every rank computes the same window w)."""
        return self.window_with_samples(w)[0]

    def window_with_samples(self, w: int) -> tuple[dict[str, torch.Tensor], list[Any]]:
        """Window w and the evaluation.tasks.Sample of each of its documents, in order (the padding
        after them, if any, is the last doc id)."""
        from torchtitan_rtpurbo.evaluation.tasks import PromptTooLong, _SPLIT_CODE

        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], _SYNTHETIC_STREAM, int(w)])
        total = self.seq_len + 1  # one extra token: the label of the last input position
        tokens: list[int] = []
        is_target: list[bool] = []
        positions: list[np.ndarray] = []
        doc_ids: list[np.ndarray] = []
        samples: list[Any] = []
        failures = 0
        while total - len(tokens) >= self.min_sample_tokens + self.answer_reserve and failures < 8:
            remaining = total - len(tokens)
            task = self.task_names[int(rng.choice(len(self.task_names), p=self.probabilities))]
            length = min(int(self.lengths[int(rng.integers(len(self.lengths)))]), remaining - self.answer_reserve)
            sample_seed = int(rng.integers(2**63))
            doc = None
            for _ in range(3):  # shrink the prompt if the answer needs more than answer_reserve
                try:
                    sample = self._tasks[task].sample(
                        self.split,
                        length,
                        self.seed,
                        int(w) * 4096 + len(positions),
                        self.tokenizer,
                        self._haystack,
                        rng=np.random.default_rng(sample_seed),
                    )
                except PromptTooLong:
                    break
                answer_ids = list(self.tokenizer.encode(sample.target)) + [self.eos_id]
                if len(sample.prompt_ids) + len(answer_ids) <= remaining:
                    doc = (sample.prompt_ids, answer_ids)
                    samples.append(sample)
                    break
                length -= len(sample.prompt_ids) + len(answer_ids) - remaining
                if length < 1:
                    break
            if doc is None:
                failures += 1
                continue
            prompt_ids, answer_ids = doc
            tokens.extend(prompt_ids)
            tokens.extend(answer_ids)
            is_target.extend([False] * len(prompt_ids))
            is_target.extend([True] * len(answer_ids))
            n = len(prompt_ids) + len(answer_ids)
            positions.append(np.arange(n, dtype=np.int64))
            doc_ids.append(np.full(n, len(doc_ids), dtype=np.int32))
        pad = total - len(tokens)
        if pad:
            tokens.extend([self.pad_id] * pad)
            is_target.extend([False] * pad)
            positions.append(np.arange(pad, dtype=np.int64))
            doc_ids.append(np.full(pad, len(doc_ids), dtype=np.int32))
        arr = np.asarray(tokens, dtype=np.int64)
        target = np.asarray(is_target, dtype=bool)
        labels = np.where(target[1:], arr[1:], -100)
        window = {
            "input": torch.from_numpy(arr[:-1].copy()),
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "positions": torch.from_numpy(np.concatenate(positions)[:-1].copy()),
            "doc_ids": torch.from_numpy(np.concatenate(doc_ids)[:-1].copy()),
        }
        return window, samples

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        version = self._state_version
        while True:
            w = self.dp_rank + self._windows_yielded * self.dp_degree
            sample = self.window(w)
            if self._state_version != version:
                raise RuntimeError("SyntheticTaskDataset state was loaded after this iterator started; call iter() again")
            self._windows_yielded += 1
            yield sample
