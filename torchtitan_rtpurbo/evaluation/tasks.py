"""RULER-style long-context tasks, generated with fixed seeds (see docs/evaluation.md).

Every task turns (split, target length in tokens, seed, index) into a `Sample`: a prompt (text and its
token ids under the given tokenizer), the exact expected answer string, and the continuation a model is
trained to write (`target` = " " + answer). Prompts are built so that len(prompt_ids) is as close to the
target length as the tokenizer allows and never above it (usually exactly equal).

Tasks (RULER names in brackets):
  niah_single        [niah_single]      one "# special key K: value V" line in a code haystack.
  niah_multikey      [niah_multikey]    four such lines with different keys; one is asked.
  niah_multivalue    [niah_multivalue]  four values for the same key; all four are asked.
  niah_multiquery    [niah_multiquery]  four keys; the values of all four are asked.
  variable_tracking  [vt]               "var_x = 12345", then "var_y = var_x", ... (2 chains, 4 hops);
                                        asked: every variable equal to 12345.
  common_words       [cwe]              a list of made-up words; asked: the 10 most common.
  frequent_words     [fwe]              Zipf(2)-distributed made-up "coded" words; asked: the 3 most frequent.
  qa                 [qa]               "# The capital of Zorvania is Miltock." facts (several relations and
                                        countries) in a code haystack; asked: one relation of one country.

Held out: split "train" and split "eval" draw from disjoint random streams (the split is part of every
seed) AND from disjoint key spaces (numbers and made-up words are assigned to a split by a hash), so no
key, value, variable, word or entity of an eval sample ever occurs in a training sample.

Scoring (`score_prediction`): the prediction is the model's greedy continuation. Its answer line is the
text before the first newline, stripped. Single-answer tasks score 100 if the answer line equals the
answer or starts with it followed by a character that is not a letter, digit or "_" (so "93117." and
"93117, ..." count, "931170" does not), else 0. Multi-answer tasks score the percentage of the expected
items found among the first len(answers) items of the answer line (items: runs of [A-Za-z0-9_]).
"""

from __future__ import annotations

import bisect
import math
import re
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

SPLITS = ("train", "eval")
_SPLIT_CODE = {"train": 1, "eval": 2}
# Stable integer per task: part of every sample's seed (never reorder; append new tasks at the end).
_TASK_CODE = {
    "niah_single": 1,
    "niah_multikey": 2,
    "niah_multivalue": 3,
    "niah_multiquery": 4,
    "variable_tracking": 5,
    "common_words": 6,
    "frequent_words": 7,
    "qa": 8,
}

# Haystack lines longer than this are cut.
MAX_LINE_CHARS = 200


# ----------------------------------------------------------------------------------------------
# Samples and scoring
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One generated prompt with its expected answer.

    length: the target prompt length in tokens (the bucket); len(prompt_ids) <= length.
    answer: the exact expected answer string (multi-answer tasks: the items joined by ", ").
    answers: the items scored (single-answer tasks: (answer,)).
    target: the continuation a model is trained to write after the prompt: " " + answer.
    depths: relative positions (0 = start, 1 = end of the haystack) of the inserted lines that hold the answer.
    """

    task: str
    length: int
    prompt: str = field(repr=False)
    prompt_ids: list[int] = field(repr=False)
    answer: str
    answers: tuple[str, ...]
    target: str
    split: str
    seed: int
    index: int
    depths: tuple[float, ...] = ()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["answers"] = list(self.answers)
        d["depths"] = list(self.depths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        d = dict(d)
        d["answers"] = tuple(d["answers"])
        d["depths"] = tuple(d.get("depths", ()))
        d["prompt_ids"] = [int(t) for t in d["prompt_ids"]]
        return cls(**d)


_ITEM_RE = re.compile(r"[A-Za-z0-9_]+")


def answer_line(prediction: str) -> str:
    """The part of a continuation that is scored: the text before the first newline, stripped.
    (A continuation that starts with a newline has an empty answer line, as greedy decoding stops there.)"""
    return prediction.split("\n", 1)[0].strip()


def score_exact(prediction: str, answer: str) -> float:
    """100.0 if the answer line is `answer`, or starts with it followed by a non-word character; else 0.0."""
    line = answer_line(prediction)
    if not answer:
        raise ValueError("empty expected answer")
    if not line.startswith(answer):
        return 0.0
    rest = line[len(answer) :]
    if rest and (rest[0].isalnum() or rest[0] == "_"):
        return 0.0
    return 100.0


def score_recall(prediction: str, answers: Sequence[str]) -> float:
    """Percentage of `answers` found among the first len(answers) items of the answer line (order-free)."""
    if not answers:
        raise ValueError("empty expected answer list")
    items = _ITEM_RE.findall(answer_line(prediction))[: len(answers)]
    found = set(items)
    return 100.0 * sum(1 for a in set(answers) if a in found) / len(set(answers))


# ----------------------------------------------------------------------------------------------
# Held-out key spaces
# ----------------------------------------------------------------------------------------------


def number_split(x: int) -> str:
    """Split ("train" / "eval") that owns integer x: 1/8 of all integers are eval (multiplicative hash)."""
    return "eval" if ((int(x) * 2654435761) & 0xFFFFFFFF) >> 29 == 0 else "train"


def word_split(word: str) -> str:
    """Split that owns a made-up word (case-insensitive): 1/8 of words are eval (CRC32)."""
    return "eval" if zlib.crc32(word.lower().encode("utf-8")) % 8 == 0 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown task split {split!r}; expected one of {SPLITS}")


def _draw_number(rng: np.random.Generator, lo: int, hi: int, split: str, used: set) -> int:
    """A number in [lo, hi) owned by `split`, not in `used` (added to it)."""
    while True:
        x = int(rng.integers(lo, hi))
        if x not in used and number_split(x) == split:
            used.add(x)
            return x


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


_SYLLABLES = tuple(c + v for c in _CONSONANTS for v in _VOWELS)


def _draw_words(
    rng: np.random.Generator, split: str, used: set, count: int, syllables: tuple[int, int] = (2, 3)
) -> list[str]:
    """`count` made-up lowercase words (consonant-vowel syllables) owned by `split`, not in `used`
    (added to it). Candidates are drawn in vectorised batches."""
    out: list[str] = []
    while len(out) < count:
        m = max(16, (count - len(out)) * 10)
        ks = rng.integers(syllables[0], syllables[1] + 1, size=m)
        sy = rng.integers(0, len(_SYLLABLES), size=(m, syllables[1]))
        for j in range(m):
            word = "".join(_SYLLABLES[x] for x in sy[j, : ks[j]])
            if word not in used and word_split(word) == split:
                used.add(word)
                out.append(word)
                if len(out) == count:
                    break
    return out


def _draw_word(rng: np.random.Generator, split: str, used: set, syllables: tuple[int, int] = (2, 3)) -> str:
    return _draw_words(rng, split, used, 1, syllables)[0]


# ----------------------------------------------------------------------------------------------
# Haystacks
# ----------------------------------------------------------------------------------------------


class CodeHaystack:
    """Lines of corpus documents (e.g. stdlib sources) in a seeded random order, with token estimates.

    A stream starts at a random line of a random document and continues through the other documents
    (random order), repeating the corpus as often as needed. Per-line token counts are estimated from
    each document's tokens-per-character ratio (one encode per document, cached); the length fit
    measures the real prompt, so the estimates only steer the search.
    """

    def __init__(self, docs: Sequence[str], tokenizer: Any, max_cached_docs: int = 2048):
        if len(docs) == 0:
            raise ValueError("empty haystack corpus")
        self.docs = docs
        self.tokenizer = tokenizer
        self._cache: OrderedDict[int, tuple[list[str], float]] = OrderedDict()
        self._max_cached = max_cached_docs

    def doc_lines(self, i: int) -> tuple[list[str], float]:
        """(lines of document i, estimated tokens per character)."""
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        text = self.docs[i].replace("\r\n", "\n").replace("\r", "\n")
        lines = [line[:MAX_LINE_CHARS] for line in text.split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        n_chars = sum(len(line) + 1 for line in lines)
        ratio = len(self.tokenizer.encode("\n".join(lines) + "\n")) / n_chars if n_chars else 0.3
        entry = (lines, max(ratio, 1e-3))
        self._cache[i] = entry
        if len(self._cache) > self._max_cached:
            self._cache.popitem(last=False)
        return entry

    def stream(self, rng: np.random.Generator) -> _LineStream:
        return _LineStream(self, rng)


class _LineStream:
    """A lazily extended list of haystack lines with cumulative token estimates (each line + newline)."""

    def __init__(self, haystack: CodeHaystack, rng: np.random.Generator):
        self.haystack = haystack
        self.rng = rng
        self.lines: list[str] = []
        self.costs: list[float] = []
        self.cum: list[float] = [0.0]
        self._order: list[int] = []
        self._first = True
        self._empty_docs_in_row = 0

    def _extend(self) -> None:
        n_docs = len(self.haystack.docs)
        if not self._order:
            self._order = [int(i) for i in self.rng.permutation(n_docs)][::-1]  # popped from the end
        doc = self._order.pop()
        lines, ratio = self.haystack.doc_lines(doc)
        if not lines:
            self._empty_docs_in_row += 1
            if self._empty_docs_in_row > n_docs:
                raise ValueError("every haystack document is empty")
            return
        self._empty_docs_in_row = 0
        start = int(self.rng.integers(len(lines))) if self._first else 0
        self._first = False
        for line in lines[start:]:
            cost = (len(line) + 1) * ratio
            self.lines.append(line)
            self.costs.append(cost)
            self.cum.append(self.cum[-1] + cost)

    def ensure(self, n: int) -> None:
        while len(self.lines) < n:
            self._extend()

    def line(self, i: int) -> str:
        self.ensure(i + 1)
        return self.lines[i]

    def cumulative(self, n: int) -> float:
        self.ensure(n)
        return self.cum[n]

    def advance(self, start: int, budget: float) -> int:
        """Largest n >= start with cum[n] - cum[start] <= budget."""
        base = self.cumulative(start)
        while self.cum[-1] - base <= budget:
            self._extend()
        return bisect.bisect_right(self.cum, base + budget) - 1


_HAYSTACK_CACHE: OrderedDict[tuple[int, int], CodeHaystack] = OrderedDict()


def get_haystack(corpus_docs: Sequence[str] | CodeHaystack, tokenizer: Any) -> CodeHaystack:
    """A (cached) CodeHaystack over `corpus_docs` for `tokenizer`."""
    if isinstance(corpus_docs, CodeHaystack):
        return corpus_docs
    key = (id(corpus_docs), id(tokenizer))
    hay = _HAYSTACK_CACHE.get(key)
    # The cached object holds references to both, so the ids cannot be reused while it lives.
    if hay is None or hay.docs is not corpus_docs or hay.tokenizer is not tokenizer:
        hay = CodeHaystack(corpus_docs, tokenizer)
        _HAYSTACK_CACHE[key] = hay
        if len(_HAYSTACK_CACHE) > 8:
            _HAYSTACK_CACHE.popitem(last=False)
    return hay


def default_corpus(split: str) -> Sequence[str]:
    """Haystack documents by task split: stdlib "train" for training, stdlib "val" for evaluation
    (the stdlib "test" split is left for perplexity). The same object on every call (haystack caching)."""
    _check_split(split)
    return _default_corpus("train" if split == "train" else "val")


@lru_cache(maxsize=4)
def _default_corpus(stdlib_split: str) -> Sequence[str]:
    from torchtitan_rtpurbo.data.corpus import stdlib_documents

    return stdlib_documents(stdlib_split)


# ----------------------------------------------------------------------------------------------
# Fitting a prompt to a token budget
# ----------------------------------------------------------------------------------------------


class PromptTooLong(ValueError):
    """The fixed parts of a task (needles, query, ...) alone exceed the target length."""


def _max_fit(
    measure: Callable[[int], tuple[int, Any]],
    target: int,
    lo: int,
    lo_len: int,
    lo_payload: Any,
    estimate: Callable[[int], float],
    advance: Callable[[int, float], int],
    limit: int | None = None,
    stop_gap: int = 0,
    max_measures: int = 40,
) -> tuple[int, int, Any]:
    """Largest x >= lo with measure(x)[0] <= target, for a roughly increasing measure.

    estimate(x): estimated cumulative cost of x; advance(x0, budget): largest x with
    estimate(x) - estimate(x0) <= budget. Interpolates with a scale learned from the measurements,
    falls back to bisection after two overshoots in a row, and stops early once a feasible x is within
    `stop_gap` of the target. Returns (x, length, payload) of the best feasible x measured.
    """
    best_x, best_len, best_payload = lo, lo_len, lo_payload
    hi: int | None = None  # smallest x known to be over the target
    scale = 1.0
    failures = 0
    for _ in range(max_measures):
        if target - best_len <= stop_gap:
            break
        if (hi is not None and hi - best_x <= 1) or (limit is not None and best_x >= limit):
            break
        if failures >= 2 and hi is not None:
            x = (best_x + hi) // 2
        else:
            x = advance(best_x, (target - best_len) / scale)
            if hi is not None:
                x = min(x, hi - 1)
            x = max(x, best_x + 1)
        if limit is not None:
            x = min(x, limit)
        if x <= best_x:
            break
        length, payload = measure(x)
        d_est = estimate(x) - estimate(best_x)
        if d_est > 0 and length > best_len:
            scale = min(max((length - best_len) / d_est, 0.05), 20.0)
        if length <= target:
            best_x, best_len, best_payload = x, length, payload
            failures = 0
        else:
            hi = x
            failures += 1
    return best_x, best_len, best_payload


# Lines of the body kept in front of the extension when measuring a change locally (see fit_prompt).
_TAIL_LINES = 4
# Characters scanned past the longest fitting extension prefix for an exact fit, and alternative
# extensions tried (see fit_prompt).
_EXACT_SCAN_CHARS = 12
_EXTENSION_VARIANTS = 4


def fit_prompt(
    tokenizer: Any,
    target: int,
    body_text: Callable[[int], str],
    query: str,
    units: Any,
    extension: Callable[[int, int, int], str],
    what: str,
    stop_gap: int,
) -> tuple[str, list[int]]:
    """The longest prompt  body_text(n) + ext[:c] + "\n" + query  with at most `target` tokens.

    body_text(n): the prompt body with n filler units (haystack lines, words) and every inserted line.
    units: token estimates of the filler, `cumulative(n)` and `advance(start, budget)`.
    extension(n, tokens, variant): text that may follow body_text(n) (more haystack lines, padding), at
    least `tokens` tokens long; any character prefix of it is allowed; variants 0, 1, ... are alternatives.

    Phase 1 searches n with full encodes until the gap to the target is <= stop_gap. Phase 2 searches the
    extension prefix c, measuring only a tail (the last few body lines + extension + query): tokenizers
    are local, so the change in tail tokens is the change in prompt tokens (the head/tail boundary is the
    same in every measurement and cancels). Phase 3 encodes the whole prompt once and backs off if that
    assumption failed. Typically 3-4 full encodes per prompt, and the result is exactly `target` tokens.
    """
    encode = tokenizer.encode

    def render(body: str, ext: str) -> str:
        return body + ext + ("\n" if body or ext else "") + query

    def measure_units(n: int) -> tuple[int, Any]:
        body = body_text(n)
        ids = encode(render(body, ""))
        return len(ids), (body, ids)

    body0 = body_text(0)
    ids0 = encode(render(body0, ""))
    if len(ids0) > target:
        raise PromptTooLong(f"{what}: the fixed parts of the prompt need {len(ids0)} tokens, more than the target {target}")
    n, length, (body, ids) = _max_fit(
        measure_units, target, 0, len(ids0), (body0, ids0), units.cumulative, units.advance, stop_gap=stop_gap
    )
    gap = target - length
    if gap == 0:
        return render(body, ""), ids
    anchor = len(body)
    for _ in range(_TAIL_LINES):
        anchor = body.rfind("\n", 0, anchor)
        if anchor <= 0:
            anchor = 0
            break
    head_tokens = length - len(encode(render(body[anchor:], "")))

    def local_fit(ext: str) -> tuple[int, int]:
        """(c, estimated prompt tokens) for the longest fitting prefix ext[:c], then a short scan past it for
        an exact fit (one more character may add two tokens, and counts are not monotone in c)."""

        def measure_local(c: int) -> tuple[int, Any]:
            return head_tokens + len(encode(render(body[anchor:], ext[:c]))), None

        per_char = max(len(encode(ext)), 1) / len(ext)
        c, local_len, _ = _max_fit(
            measure_local,
            target,
            0,
            length,
            None,
            lambda e: e * per_char,
            lambda e0, budget: e0 + int(math.floor(budget / per_char + 1e-9)),
            limit=len(ext),
        )
        if local_len < target:
            for c2 in range(c + 2, min(c + 1 + _EXACT_SCAN_CHARS, len(ext)) + 1):
                if measure_local(c2)[0] == target:
                    return c2, target
        return c, local_len

    # A few alternative extensions (e.g. starting one haystack line later) when one cannot hit the target.
    best = (-1, 0, "")
    for variant in range(_EXTENSION_VARIANTS):
        candidate = extension(n, gap, variant)
        if not candidate:
            continue
        c, local_len = local_fit(candidate)
        if local_len > best[0]:
            best = (local_len, c, candidate)
        if local_len == target:
            break
    _, c, ext = best
    per_char = max(len(encode(ext)), 1) / max(len(ext), 1)
    if c == 0:
        return render(body, ""), ids
    text = render(body, ext[:c])
    full = encode(text)
    if len(full) <= target:
        return text, full

    # The local measurement was off (a token spanning the head/tail boundary): search c with full encodes.
    def measure_full(e: int) -> tuple[int, Any]:
        t = render(body, ext[:e])
        i = encode(t)
        return len(i), (t, i)

    _, _, (text, full) = _max_fit(
        measure_full,
        target,
        0,
        length,
        (render(body, ""), ids),
        lambda e: e * per_char,
        lambda e0, budget: e0 + int(math.floor(budget / per_char + 1e-9)),
        limit=c - 1,
    )
    return text, full


class _UniformUnits:
    """Estimates for a filler of identical-cost units (word lists)."""

    def __init__(self, cost: float):
        self.cost = max(cost, 1e-3)

    def cumulative(self, n: int) -> float:
        return n * self.cost

    def advance(self, start: int, budget: float) -> int:
        return start + max(int(math.floor(budget / self.cost + 1e-9)), 0)


def _place_inserts(lines: list[str], n: int, inserts: Sequence[tuple[float, str]]) -> list[str]:
    """lines[:n] with each (depth, text) insert placed before line round(depth * n); ties keep list order."""
    slots: dict[int, list[str]] = {}
    for depth, text in inserts:
        slots.setdefault(min(n, int(round(depth * n))), []).append(text)
    out: list[str] = []
    for i in range(n + 1):
        out.extend(slots.get(i, ()))
        if i < n:
            out.append(lines[i])
    return out


def _code_prompt(
    tokenizer: Any,
    target: int,
    stream: _LineStream,
    inserts: Sequence[tuple[float, str]],
    query: str,
    what: str,
) -> tuple[str, list[int]]:
    """Haystack lines with inserted lines at relative depths, then the query (no trailing newline).
    The last haystack line may be cut (a partial line) so that the prompt has exactly `target` tokens."""

    def body_text(n: int) -> str:
        stream.ensure(n)
        return "\n".join(_place_inserts(stream.lines, n, inserts))

    def extension(n: int, tokens: int, variant: int) -> str:
        start = n + variant  # variant k skips k haystack lines
        end = stream.advance(start, 2 * tokens + 16) + 1
        return "".join("\n" + stream.line(i) for i in range(start, end))

    stop_gap = max(32, target // 64)
    return fit_prompt(tokenizer, target, body_text, query, stream, extension, what, stop_gap)


_WORDS_PER_LINE = 16
# Padding after the last word (never mistaken for a word; "." and "," are filtered when counting words).
_WORD_PADS = (" .", " ,", ".", " ;")


def _word_prompt(
    tokenizer: Any,
    target: int,
    header: str,
    build: Callable[[int], list[str]],
    query: str,
    what: str,
    probe_words: Sequence[str],
) -> tuple[str, list[int], list[str]]:
    """header + a list of n words (16 a line; n as large as fits) + query. The last line may end in
    " . . ." padding so that the prompt has exactly `target` tokens. Returns (text, ids, words)."""
    cache: dict[int, list[str]] = {}

    def words_for(n: int) -> list[str]:
        if n not in cache:
            cache[n] = build(n)
        return cache[n]

    def body_text(n: int) -> str:
        words = words_for(n)
        lines = [" ".join(words[i : i + _WORDS_PER_LINE]) for i in range(0, len(words), _WORDS_PER_LINE)]
        return header + "\n".join(lines)

    def extension(n: int, tokens: int, variant: int) -> str:
        return _WORD_PADS[variant % len(_WORD_PADS)] * (2 * tokens + 8)

    per_word = len(tokenizer.encode(" " + " ".join(probe_words))) / max(len(probe_words), 1)
    stop_gap = int(3 * per_word) + 4
    text, ids = fit_prompt(tokenizer, target, body_text, query, _UniformUnits(per_word), extension, what, stop_gap)
    body = text[len(header) : len(text) - len(query)]
    n = len(body.replace(" ;", " ").replace(",", " ").replace(".", " ").split())
    return text, ids, words_for(n)


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------


def _sample_rng(seed: int, split: str, task: str, length: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_CODE[split], _TASK_CODE[task], int(length), int(index)])


class Task:
    """A RULER-style task. Subclasses implement `_make(rng, split, length, tokenizer, haystack)`."""

    name: str = ""
    multi: bool = False  # scored by recall over several items
    uses_haystack: bool = True

    def generate(
        self,
        split: str,
        length_tokens: int,
        n: int,
        seed: int,
        tokenizer: Any,
        corpus_docs: Sequence[str] | CodeHaystack | None = None,
        start_index: int = 0,
    ) -> list[Sample]:
        """n samples (indices start_index .. start_index + n - 1) of this task at `length_tokens`.
        corpus_docs: haystack documents (default: default_corpus(split))."""
        if self.uses_haystack:
            corpus_docs = get_haystack(corpus_docs if corpus_docs is not None else default_corpus(split), tokenizer)
        return [self.sample(split, length_tokens, seed, i, tokenizer, corpus_docs) for i in range(start_index, start_index + n)]

    def sample(
        self,
        split: str,
        length_tokens: int,
        seed: int,
        index: int,
        tokenizer: Any,
        corpus_docs: Sequence[str] | CodeHaystack | None = None,
        rng: np.random.Generator | None = None,
    ) -> Sample:
        """Sample `index` of the (split, seed) stream; rng overrides the stream (used by the training source)."""
        _check_split(split)
        if length_tokens < 1:
            raise ValueError(f"length_tokens must be >= 1, got {length_tokens}")
        if rng is None:
            rng = _sample_rng(seed, split, self.name, length_tokens, index)
        haystack = None
        if self.uses_haystack:
            haystack = get_haystack(corpus_docs if corpus_docs is not None else default_corpus(split), tokenizer)
        prompt, ids, answers, depths = self._make(rng, split, length_tokens, tokenizer, haystack)
        answer = ", ".join(answers)
        return Sample(
            task=self.name,
            length=int(length_tokens),
            prompt=prompt,
            prompt_ids=list(ids),
            answer=answer,
            answers=tuple(answers),
            target=" " + answer,
            split=split,
            seed=int(seed),
            index=int(index),
            depths=tuple(float(d) for d in depths),
        )

    def score(self, sample: Sample, prediction: str) -> float:
        if self.multi:
            return score_recall(prediction, sample.answers)
        return score_exact(prediction, sample.answer)

    def _make(self, rng, split, length, tokenizer, haystack) -> tuple[str, list[int], list[str], list[float]]:
        raise NotImplementedError


def _needle(key: int, value: int) -> str:
    return f"# special key {key}: value {value}"


class NiahTask(Task):
    """Needles "# special key K: value V" (K: 5 digits, V: 6 digits) in a code haystack."""

    def __init__(self, name: str, num_keys: int, values_per_key: int, num_queries: int):
        self.name = name
        self.num_keys = num_keys
        self.values_per_key = values_per_key
        self.num_queries = num_queries
        self.multi = values_per_key > 1 or num_queries > 1

    def _make(self, rng, split, length, tokenizer, haystack):
        used: set = set()
        keys = [_draw_number(rng, 10_000, 100_000, split, used) for _ in range(self.num_keys)]
        needles = []  # (depth, text, key, value)
        for key in keys:
            for _ in range(self.values_per_key):
                value = _draw_number(rng, 100_000, 1_000_000, split, used)
                needles.append((float(rng.random()), key, value))
        needles.sort(key=lambda t: t[0])  # text order = depth order
        queried = [keys[int(i)] for i in rng.permutation(self.num_keys)[: self.num_queries]]
        if self.num_queries > 1:
            query = f"# special keys {', '.join(map(str, queried))}: values"
            chosen = [next(t for t in needles if t[1] == k) for k in queried]
        elif self.values_per_key > 1:
            query = f"# special key {queried[0]}: values"
            chosen = [t for t in needles if t[1] == queried[0]]
        else:
            query = f"# special key {queried[0]}: value"
            chosen = [next(t for t in needles if t[1] == queried[0])]
        stream = haystack.stream(rng)
        inserts = [(d, _needle(k, v)) for d, k, v in needles]
        text, ids = _code_prompt(tokenizer, length, stream, inserts, query, self.name)
        return text, ids, [str(v) for _, _, v in chosen], [d for d, _, _ in chosen]


class VariableTrackingTask(Task):
    """Chains "var_a = 12345", "var_b = var_a", ... in a code haystack; asked: all variables equal to 12345."""

    name = "variable_tracking"
    multi = True

    def __init__(self, num_chains: int = 2, num_hops: int = 4):
        self.num_chains = num_chains
        self.num_hops = num_hops

    def _make(self, rng, split, length, tokenizer, haystack):
        used_nums: set = set()
        used_words: set = set()
        chains = []
        for _ in range(self.num_chains):
            value = _draw_number(rng, 10_000, 100_000, split, used_nums)
            names = ["var_" + _draw_word(rng, split, used_words) for _ in range(self.num_hops + 1)]
            depths = sorted(float(d) for d in rng.random(self.num_hops + 1))
            lines = [f"{names[0]} = {value}"] + [f"{names[j]} = {names[j - 1]}" for j in range(1, len(names))]
            chains.append((value, names, depths, lines))
        inserts = [(d, line) for _, _, depths, lines in chains for d, line in zip(depths, lines)]
        inserts.sort(key=lambda t: t[0])  # stable: a chain's lines keep their order (depths sorted per chain)
        value, names, depths, _ = chains[0]
        query = f"# variables equal to {value}:"
        text, ids = _code_prompt(tokenizer, length, haystack.stream(rng), inserts, query, self.name)
        return text, ids, names, depths


def _freq_cw(n: int) -> int:
    return min(30, max(2, n // 20))


def _freq_ucw(freq_cw: int) -> int:
    return 1 if freq_cw <= 3 else (2 if freq_cw <= 6 else 3)


class CommonWordsTask(Task):
    """A list of made-up words: `num_common` words appear freq_cw times (30 at long lengths), the others
    freq_ucw times (3) or once; asked: the num_common most common words (order: first appearance)."""

    name = "common_words"
    multi = True
    uses_haystack = False

    def __init__(self, num_common: int = 10):
        self.num_common = num_common

    def _make(self, rng, split, length, tokenizer, haystack):
        used: set = set()
        common = [_draw_word(rng, split, used) for _ in range(self.num_common)]
        pool: list[str] = []
        pool_rng = np.random.default_rng(rng.integers(2**63))
        shuffle_seed = int(rng.integers(2**63))

        def build(n: int) -> list[str]:
            f_cw = _freq_cw(n)
            f_ucw = _freq_ucw(f_cw)
            rest = max(n - self.num_common * f_cw, 0)
            n_ucw, n_single = divmod(rest, f_ucw)
            if len(pool) < n_ucw + n_single:
                pool.extend(_draw_words(pool_rng, split, used, n_ucw + n_single - len(pool)))
            words = common * f_cw + pool[:n_ucw] * f_ucw + pool[n_ucw : n_ucw + n_single]
            order = np.random.default_rng([shuffle_seed, n]).permutation(len(words))
            return [words[i] for i in order]

        header = "# word list:\n"
        query = f"# the {self.num_common} most common words in the list:"
        text, ids, words = _word_prompt(tokenizer, length, header, build, query, self.name, common)
        first_seen = {w: i for i, w in reversed(list(enumerate(words)))}
        answers = sorted(common, key=lambda w: first_seen.get(w, len(words)))
        return text, ids, answers, []


class FrequentWordsTask(Task):
    """Made-up "coded" words drawn from Zipf(alpha) over a sample-specific vocabulary; asked: the
    `num_top` most frequent, most frequent first (redrawn until they are strictly ordered)."""

    name = "frequent_words"
    multi = True
    uses_haystack = False

    def __init__(self, num_top: int = 3, alpha: float = 2.0, vocab_size: int = 2000):
        self.num_top = num_top
        self.alpha = alpha
        self.vocab_size = vocab_size

    def _make(self, rng, split, length, tokenizer, haystack):
        used: set = set()
        vocab: list[str] = []
        vocab_rng = np.random.default_rng(rng.integers(2**63))
        draw_seed = int(rng.integers(2**63))
        k = self.num_top

        def build(n: int) -> list[str]:
            for attempt in range(1000 if n >= 4 * k else 1):
                r = np.random.default_rng([draw_seed, n, attempt])
                ranks = r.zipf(self.alpha, size=max(n, 1) * 2)
                ranks = ranks[ranks <= self.vocab_size][:n]
                while len(ranks) < n:  # rare: too many draws beyond the vocabulary
                    more = r.zipf(self.alpha, size=n)
                    ranks = np.concatenate([ranks, more[more <= self.vocab_size]])[:n]
                counts = Counter(int(x) for x in ranks).most_common(k + 1)
                freqs = [c for _, c in counts] + [0]
                if len(counts) >= k and all(freqs[i] > freqs[i + 1] for i in range(k)):
                    break
            need = int(ranks.max()) if n else 0
            if len(vocab) < need:
                vocab.extend(_draw_words(vocab_rng, split, used, need - len(vocab)))
            return [vocab[int(x) - 1] for x in ranks]

        header = "# coded text:\n"
        query = f"# the {k} most frequent words in the coded text:"
        probe = _draw_words(np.random.default_rng(draw_seed), split, set(), 8)
        text, ids, words = _word_prompt(tokenizer, length, header, build, query, self.name, probe)
        counts = Counter(words).most_common(k + 1)
        freqs = [c for _, c in counts] + [0]
        if len(counts) < k or not all(freqs[i] > freqs[i + 1] for i in range(k)):
            raise PromptTooLong(f"{self.name}: target {length} is too short for {k} clearly most frequent words")
        return text, ids, [w for w, _ in counts[:k]], []


_RELATIONS = ("capital", "river", "mountain", "currency", "language")


class QATask(Task):
    """Facts "# The <relation> of <Country> is <Name>." for several made-up countries and relations in a
    code haystack; the question asks one relation of one country:
        # Question: What is the <relation> of <Country>?
        # Answer:
    """

    name = "qa"
    multi = False

    def _make(self, rng, split, length, tokenizer, haystack):
        used: set = set()
        n_countries = int(np.clip(length // 512, 3, 64))
        facts = []  # (depth, text, country_index, relation, name)
        for c in range(n_countries):
            country = _draw_word(rng, split, used).capitalize() + "ia"
            rels = [_RELATIONS[int(i)] for i in rng.permutation(len(_RELATIONS))[: int(rng.integers(2, 4))]]
            for rel in rels:
                name = _draw_word(rng, split, used).capitalize()
                facts.append((float(rng.random()), f"# The {rel} of {country} is {name}.", c, rel, name, country))
        target = facts[int(rng.integers(len(facts)))]
        _, _, _, rel, name, country = target
        query = f"# Question: What is the {rel} of {country}?\n# Answer:"
        facts.sort(key=lambda t: t[0])
        inserts = [(f[0], f[1]) for f in facts]
        text, ids = _code_prompt(tokenizer, length, haystack.stream(rng), inserts, query, self.name)
        return text, ids, [name], [target[0]]


TASKS: dict[str, Task] = {
    "niah_single": NiahTask("niah_single", num_keys=1, values_per_key=1, num_queries=1),
    "niah_multikey": NiahTask("niah_multikey", num_keys=4, values_per_key=1, num_queries=1),
    "niah_multivalue": NiahTask("niah_multivalue", num_keys=1, values_per_key=4, num_queries=1),
    "niah_multiquery": NiahTask("niah_multiquery", num_keys=4, values_per_key=1, num_queries=4),
    "variable_tracking": VariableTrackingTask(),
    "common_words": CommonWordsTask(),
    "frequent_words": FrequentWordsTask(),
    "qa": QATask(),
}
ALL_TASKS: tuple[str, ...] = tuple(TASKS)
# Short names accepted wherever task names are (RULER's abbreviations).
TASK_ALIASES = {"vt": "variable_tracking", "cwe": "common_words", "fwe": "frequent_words"}


def resolve_tasks(tasks: str | Iterable[str] | None) -> list[str]:
    """Task names from a list, a comma-separated string, "all" or None (all); aliases resolved."""
    if tasks is None or tasks == "all":
        return list(ALL_TASKS)
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    names = []
    for t in tasks:
        t = TASK_ALIASES.get(t.strip(), t.strip())
        if t == "all":
            names.extend(n for n in ALL_TASKS if n not in names)
            continue
        if t not in TASKS:
            raise KeyError(f"unknown task {t!r}; known: {', '.join(ALL_TASKS)} (aliases: {', '.join(TASK_ALIASES)})")
        if t not in names:
            names.append(t)
    return names


def get_task(name: str) -> Task:
    return TASKS[resolve_tasks([name])[0]]


def score_prediction(sample: Sample, prediction: str) -> float:
    """Score (0..100) of a model's continuation for a sample (see the module docstring)."""
    return TASKS[sample.task].score(sample, prediction)


def generate(
    task: str,
    split: str,
    length_tokens: int,
    n: int,
    seed: int,
    tokenizer: Any,
    corpus_docs: Sequence[str] | CodeHaystack | None = None,
) -> list[Sample]:
    """n samples of one task (see Task.generate)."""
    return get_task(task).generate(split, length_tokens, n, seed, tokenizer, corpus_docs)


def generate_suite(
    tasks: str | Iterable[str] | None,
    lengths: Iterable[int],
    n: int,
    seed: int,
    tokenizer: Any,
    corpus_docs: Sequence[str] | CodeHaystack | None = None,
    split: str = "eval",
) -> list[Sample]:
    """n samples of every task at every length (task-major, then length, then index)."""
    _check_split(split)
    if corpus_docs is None and any(TASKS[t].uses_haystack for t in resolve_tasks(tasks)):
        corpus_docs = default_corpus(split)
    out: list[Sample] = []
    for task in resolve_tasks(tasks):
        for length in lengths:
            out.extend(TASKS[task].generate(split, int(length), n, seed, tokenizer, corpus_docs))
    return out


def save_samples(samples: Iterable[Sample], path) -> None:
    """Write samples as JSON lines (prompt text and ids included)."""
    import json

    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_dict()) + "\n")


def load_samples(path) -> list[Sample]:
    import json

    with open(path, encoding="utf-8") as f:
        return [Sample.from_dict(json.loads(line)) for line in f if line.strip()]
