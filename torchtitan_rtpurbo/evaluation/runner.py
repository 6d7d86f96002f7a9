"""Run the long-context suite on a model: greedy decoding, scoring, kept-token density, perplexity.

The runner talks to a model only through a *generate function*:

    generate_fn(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]] | GenerationOutput

(prompts of one call all have the same length). `GreedyGenerator(model, tokenizer)` is the one for a
`Qwen3Model`-like module; tests swap in an oracle or a random generator. A generator may also report the
kept-token density of its attention (GenerationOutput.density).

Greedy decoding re-runs the full forward for every new token (there is no KV cache yet); it stops at EOS
or once the continuation contains a newline (answers are one line). Only the last position's logits are
computed (`return_hidden=True` + the output projection) so long prompts with large vocabularies fit.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .tasks import Sample, generate_suite, score_prediction

# Extra tokens allowed beyond the answer's own token count when max_new_tokens is automatic.
AUTO_NEW_TOKENS_MARGIN = 8


@dataclass
class GenerationOutput:
    """What a generate function returns: the new tokens per prompt (EOS may be included; the runner cuts
    there) and optionally the kept-token density per prompt (fraction 0..1 of causal attention entries kept,
    as reported by the attention backends; None where unknown)."""

    tokens: list[list[int]]
    density: list[float | None] | None = None


GenerateFn = Callable[[list[list[int]], int], "list[list[int]] | GenerationOutput"]


def _as_float(value: Any) -> tuple[float, float] | None:
    """(sum, weight) of one density entry; see default_density_fn."""
    if isinstance(value, dict):
        if "kept" in value and "total" in value:
            total = float(_as_float(value["total"])[0])
            return (float(_as_float(value["kept"])[0]), total) if total > 0 else None
        for key in ("density", "value"):
            if key in value:
                return _as_float(value[key])
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return None
        v = value.detach().float()
        return float(v.sum().item()), float(v.numel())
    if isinstance(value, (int, float)):
        return float(value), 1.0
    if isinstance(value, (list, tuple)) and value:
        parts = [p for p in (_as_float(v) for v in value) if p is not None]
        return (sum(p[0] for p in parts), sum(p[1] for p in parts)) if parts else None
    return None


def default_density_fn(ctx: Any) -> float | None:
    """Mean kept-token density from `ctx.collect["density"]`, or None if no backend reported any.

    Entries may be floats, tensors (every element is one value, e.g. per head), lists of those, or dicts
    {"density": x} / {"kept": k, "total": t} (the latter weighted by t). RTPurbo backends append one entry
    per layer per forward.
    """
    collect = getattr(ctx, "collect", None)
    if not collect:
        return None
    entries = collect.get("density")
    if not entries:
        return None
    parts = [p for p in (_as_float(e) for e in entries) if p is not None]
    weight = sum(p[1] for p in parts)
    return sum(p[0] for p in parts) / weight if weight > 0 else None


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


class LastLogits:
    """Calls a model and returns the logits of the last position only, [B, V] in float32.

    Uses `return_hidden=True` and the model's `output` projection when both exist (a Qwen3Model), so that
    [B, T, V] logits are never materialised. Passes `ctx` when the model's forward takes it.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        forward = model.forward
        self.takes_ctx = _accepts(forward, "ctx")
        self.hidden = _accepts(forward, "return_hidden") and isinstance(getattr(model, "output", None), torch.nn.Module)

    def __call__(self, tokens: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        kwargs = {"ctx": ctx} if (ctx is not None and self.takes_ctx) else {}
        if self.hidden:
            h = self.model(tokens, return_hidden=True, **kwargs)
            return self.model.output(h[:, -1]).float()
        return self.model(tokens, **kwargs)[:, -1].float()


class GreedyGenerator:
    """Greedy decoding with a full forward per new token (see the module docstring).

    density_fn(ctx) -> float | None is applied to the AttentionContext of the first forward (the prompt);
    pass density_fn=None to skip collecting.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        device: str | torch.device | None = None,
        density_fn: Callable[[Any], float | None] | None = default_density_fn,
        stop_at_newline: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else model_device(model)
        self.density_fn = density_fn
        self.stop_at_newline = stop_at_newline
        self.eos_id = int(tokenizer.eos_id)
        self._logits = LastLogits(model)

    def _new_ctx(self) -> Any:
        if self.density_fn is None or not self._logits.takes_ctx:
            return None
        from models.attention import AttentionContext

        return AttentionContext(collect={})

    def _finished(self, tokens: list[int]) -> bool:
        if tokens and tokens[-1] == self.eos_id:
            return True
        return self.stop_at_newline and "\n" in safe_decode(self.tokenizer, tokens)

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], max_new_tokens: int) -> GenerationOutput:
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("GreedyGenerator needs prompts of equal length in one call")
        x = torch.tensor(prompts, dtype=torch.long, device=self.device)
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        density: float | None = None
        for step in range(max_new_tokens):
            ctx = self._new_ctx() if step == 0 else None
            logits = self._logits(x, ctx)
            if ctx is not None:
                density = self.density_fn(ctx)
            next_tokens = logits.argmax(dim=-1)
            for b, t in enumerate(next_tokens.tolist()):
                if not done[b]:
                    new[b].append(int(t))
                    done[b] = self._finished(new[b])
            if all(done):
                break
            x = torch.cat([x, next_tokens[:, None].to(x.dtype)], dim=1)
        return GenerationOutput(tokens=new, density=[density] * len(prompts))


def safe_decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """decode() without ids outside the tokenizer's vocabulary (a model's embedding table may be padded
    beyond it, and an untrained model may predict those rows)."""
    vocab = getattr(tokenizer, "vocab_size", None)
    return tokenizer.decode([int(t) for t in ids if vocab is None or 0 <= int(t) < vocab])


def _cut_at_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    tokens = [int(t) for t in tokens]
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-sample records (task, length, score, density) into the result tables.

    scores[task][length]: mean score (0..100); task_average[task], length_average[length] (mean over the
    task cells of that length), average (mean over all task x length cells), density[length] (mean kept
    density over the samples that reported one, else None), num_samples[task][length].
    """
    cells: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        cells[r["task"]][int(r["length"])].append(r)
    tasks = list(cells)
    lengths = sorted({int(r["length"]) for r in records})
    scores = {t: {L: _mean(r["score"] for r in cells[t][L]) for L in lengths if cells[t][L]} for t in tasks}
    num = {t: {L: len(cells[t][L]) for L in lengths if cells[t][L]} for t in tasks}
    length_average = {L: _mean(scores[t][L] for t in tasks if L in scores[t]) for L in lengths}
    task_average = {t: _mean(scores[t].values()) for t in tasks}
    density = {L: _mean(r.get("density") for r in records if int(r["length"]) == L) for L in lengths}
    prompt_tokens = {L: _mean(r["prompt_tokens"] for r in records if int(r["length"]) == L) for L in lengths}
    return {
        "tasks": tasks,
        "lengths": lengths,
        "scores": scores,
        "task_average": task_average,
        "length_average": length_average,
        "average": _mean(s for t in tasks for s in scores[t].values()),
        "density": density,
        "mean_prompt_tokens": prompt_tokens,
        "num_samples": num,
    }


def _batches(samples: Sequence[Sample], batch_size: int) -> list[list[int]]:
    """Indices of samples grouped into batches of equal prompt length (and the same task, so the
    automatic max_new_tokens is per task), in the samples' order within each group."""
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        groups[(s.task, len(s.prompt_ids))].append(i)
    out = []
    for idx in groups.values():
        out.extend(idx[j : j + batch_size] for j in range(0, len(idx), batch_size))
    return sorted(out, key=lambda b: b[0])


def evaluate_samples(
    samples: Sequence[Sample],
    generate_fn: GenerateFn,
    tokenizer: Any,
    *,
    batch_size: int = 1,
    max_new_tokens: int | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> dict[str, Any]:
    """Score `generate_fn` on `samples`; returns summarize(records) plus "records" (one per sample:
    task, length, index, prompt_tokens, answer, prediction, score, density).

    max_new_tokens: None = per batch, the longest answer's token count (" " + answer) + 8.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos_id = int(tokenizer.eos_id)
    records: list[dict[str, Any] | None] = [None] * len(samples)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(samples), desc=desc, disable=not progress, unit="sample")
    start = time.perf_counter()
    for batch in _batches(samples, batch_size):
        chunk = [samples[i] for i in batch]
        if max_new_tokens is None:
            n_new = max(len(tokenizer.encode(s.target)) for s in chunk) + AUTO_NEW_TOKENS_MARGIN
        else:
            n_new = int(max_new_tokens)
        out = generate_fn([list(s.prompt_ids) for s in chunk], n_new)
        if not isinstance(out, GenerationOutput):
            out = GenerationOutput(tokens=list(out))
        if len(out.tokens) != len(chunk):
            raise ValueError(f"generate_fn returned {len(out.tokens)} continuations for {len(chunk)} prompts")
        densities = out.density if out.density is not None else [None] * len(chunk)
        for i, s, toks, dens in zip(batch, chunk, out.tokens, densities):
            prediction = safe_decode(tokenizer, _cut_at_eos(toks[:n_new], eos_id))
            records[i] = {
                "task": s.task,
                "length": s.length,
                "index": s.index,
                "prompt_tokens": len(s.prompt_ids),
                "answer": s.answer,
                "prediction": prediction,
                "score": score_prediction(s, prediction),
                "density": None if dens is None else float(dens),
            }
        bar.update(len(chunk))
    bar.close()
    result = summarize(records)  # type: ignore[arg-type]
    result["records"] = records
    result["elapsed_s"] = round(time.perf_counter() - start, 3)
    return result


def evaluate_model(
    model: torch.nn.Module | None,
    tokenizer: Any,
    *,
    tasks: str | Iterable[str] | None = None,
    lengths: Iterable[int] = (1024,),
    samples_per_task: int = 10,
    seed: int = 0,
    max_new_tokens: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    corpus_docs: Sequence[str] | None = None,
    samples: Sequence[Sample] | None = None,
    generate_fn: GenerateFn | None = None,
    density_fn: Callable[[Any], float | None] | None = default_density_fn,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy of a model on the suite: per task x length mean score (0..100), averages, density.

    The samples are the held-out "eval" split: `samples_per_task` per task and length, from `seed`
    (haystacks from `corpus_docs`, default stdlib "val"), unless `samples` is given. The model is run by
    GreedyGenerator (model.eval(), torch.no_grad, the model's own dtype and device unless `device`), or
    `generate_fn` replaces it (then `model` may be None). Returns summarize()'s tables plus "records",
    "config" and "elapsed_s".
    """
    lengths = [int(x) for x in lengths]
    if samples is None:
        samples = generate_suite(tasks, lengths, samples_per_task, seed, tokenizer, corpus_docs, split="eval")
    was_training = None
    if generate_fn is None:
        if model is None:
            raise ValueError("evaluate_model needs a model or a generate_fn")
        was_training = model.training
        model.eval()
        if device is not None and model_device(model) != torch.device(device):
            model.to(device)
        generate_fn = GreedyGenerator(model, tokenizer, device=device, density_fn=density_fn)
    try:
        result = evaluate_samples(samples, generate_fn, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    finally:
        if was_training:
            model.train()
    result["config"] = {
        "tasks": list(dict.fromkeys(s.task for s in samples)),
        "lengths": sorted({s.length for s in samples}),
        "samples_per_task": samples_per_task,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "num_samples": len(samples),
    }
    return result


# ----------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------


def _position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """[0, 256), [256, 512), [512, 1K), ... up to seq_len."""
    edges = [0, 256]
    while edges[-1] < seq_len:
        edges.append(edges[-1] * 2)
    edges[-1] = seq_len
    return [(a, b) for a, b in zip(edges, edges[1:]) if a < seq_len]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    docs: Sequence[str] | None = None,
    seq_len: int = 4096,
    max_docs: int = 16,
    *,
    device: str | torch.device | None = None,
    longest_first: bool = True,
    max_windows: int | None = None,
    density_fn: Callable[[Any], float | None] | None = default_density_fn,
    return_details: bool = False,
    progress: bool = False,
) -> float | dict[str, Any]:
    """Perplexity of held-out long documents (default: the stdlib "test" split).

    The `max_docs` longest documents (longest first; in the given order if longest_first=False) are
    tokenised, each followed by EOS, concatenated, and cut into non-overlapping windows of seq_len + 1
    tokens (a stream shorter than that gives one shorter window; at most `max_windows`). Each window is one causal sequence with
    positions 0..seq_len-1 (no document mask: most windows are one long document). Returns exp(mean NLL)
    over all predicted tokens; with return_details a dict that adds the NLL per position bucket
    ([0, 256), [256, 512), ...: does the model use long context?) and the mean kept density.
    """
    if docs is None:
        from torchtitan_rtpurbo.data.corpus import stdlib_documents

        docs = stdlib_documents("test")
    order = list(range(len(docs)))
    if longest_first:
        sizes = [len(docs[i]) for i in order]
        order.sort(key=lambda i: -sizes[i])
    order = order[:max_docs]
    stream: list[int] = []
    for i in order:
        stream.extend(tokenizer.encode(docs[i]))
        stream.append(int(tokenizer.eos_id))
    if len(stream) < 2:
        raise ValueError("not enough tokens for perplexity")
    n_windows = max((len(stream) - 1) // seq_len, 1)
    if max_windows is not None:
        n_windows = min(n_windows, max(int(max_windows), 1))
    was_training = model.training
    model.eval()
    dev = torch.device(device) if device is not None else model_device(model)
    buckets = _position_buckets(seq_len)
    bucket_nll = [0.0] * len(buckets)
    bucket_count = [0] * len(buckets)
    takes_ctx = _accepts(model.forward, "ctx")
    use_hidden = _accepts(model.forward, "return_hidden") and isinstance(getattr(model, "output", None), torch.nn.Module)
    densities = []
    from tqdm.auto import tqdm

    try:
        for w in tqdm(range(n_windows), desc="perplexity", disable=not progress):
            chunk = stream[w * seq_len : w * seq_len + seq_len + 1]
            x = torch.tensor(chunk[:-1], dtype=torch.long, device=dev)[None]
            y = torch.tensor(chunk[1:], dtype=torch.long, device=dev)
            kwargs: dict[str, Any] = {}
            ctx = None
            if takes_ctx and density_fn is not None:
                from models.attention import AttentionContext

                ctx = AttentionContext(collect={})
                kwargs["ctx"] = ctx
            out = model(x, return_hidden=True, **kwargs) if use_hidden else model(x, **kwargs)
            nll = torch.empty(y.shape[0], device=dev, dtype=torch.float32)
            step = 2048
            for a in range(0, y.shape[0], step):
                logits = model.output(out[0, a : a + step]) if use_hidden else out[0, a : a + step]
                nll[a : a + step] = torch.nn.functional.cross_entropy(logits.float(), y[a : a + step], reduction="none")
            nll_cpu = nll.double().cpu()
            for k, (lo, hi) in enumerate(buckets):
                part = nll_cpu[lo:hi]
                bucket_nll[k] += float(part.sum())
                bucket_count[k] += int(part.numel())
            if ctx is not None:
                densities.append(density_fn(ctx))
    finally:
        if was_training:
            model.train()
    total = sum(bucket_count)
    mean_nll = sum(bucket_nll) / total
    ppl = math.exp(mean_nll)
    if not return_details:
        return ppl
    return {
        "perplexity": ppl,
        "nll": mean_nll,
        "tokens": total,
        "windows": n_windows,
        "seq_len": seq_len,
        "documents": len(order),
        "nll_by_position": {f"{lo}-{hi}": (bucket_nll[k] / bucket_count[k] if bucket_count[k] else None) for k, (lo, hi) in enumerate(buckets)},
        "density": _mean(densities),
    }
