"""Side-by-side reports: several models (e.g. dense / rtpurbo / streaming) on the same samples.

    comparison = compare_models({"dense": m0, "rtpurbo": m1}, tokenizer, tasks="all", lengths=[1024, 4096])
    print(format_table(comparison))
    write_report(comparison, "outputs/eval")   # results.json, table.md, accuracy_density.png, accuracy_by_task.png
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .runner import GreedyGenerator, default_density_fn, evaluate_samples, model_device, perplexity
from .tasks import Sample, generate_suite


def compare_models(
    models: Mapping[str, Any],
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
    perplexity_seq_len: int | None = None,
    perplexity_docs: Sequence[str] | None = None,
    perplexity_max_docs: int = 8,
    perplexity_max_windows: int | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate every model on one shared set of samples.

    models: name -> an nn.Module (run by GreedyGenerator, in eval mode) or a generate function
        (see runner.GenerateFn). Perplexity (if perplexity_seq_len) is computed for modules only.
    Returns {"config", "models": {name: evaluate_samples result (+ "perplexity")}}; with out_dir, also
    writes the report files there (write_report).
    """
    if not models:
        raise ValueError("no models to compare")
    lengths = [int(x) for x in lengths]
    if samples is None:
        samples = generate_suite(tasks, lengths, samples_per_task, seed, tokenizer, corpus_docs, split="eval")
    results: dict[str, Any] = {}
    for name, model in models.items():
        is_module = isinstance(model, torch.nn.Module)
        if is_module:
            was_training = model.training
            model.eval()
            if device is not None and model_device(model) != torch.device(device):
                model.to(device)
            generate_fn = GreedyGenerator(model, tokenizer, device=device, density_fn=default_density_fn)
        else:
            generate_fn = model
        try:
            res = evaluate_samples(samples, generate_fn, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc=name)
            if is_module and perplexity_seq_len:
                res["perplexity"] = perplexity(
                    model,
                    tokenizer,
                    perplexity_docs,
                    perplexity_seq_len,
                    perplexity_max_docs,
                    device=device,
                    max_windows=perplexity_max_windows,
                    return_details=True,
                    progress=progress,
                )
        finally:
            if is_module and was_training:
                model.train()
        results[name] = res
    comparison = {
        "config": {
            "tasks": list(dict.fromkeys(s.task for s in samples)),
            "lengths": sorted({s.length for s in samples}),
            "samples_per_task": samples_per_task,
            "seed": seed,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "num_samples": len(samples),
            "perplexity_seq_len": perplexity_seq_len,
            "perplexity_max_docs": perplexity_max_docs if perplexity_seq_len else None,
        },
        "models": results,
    }
    if out_dir is not None:
        write_report(comparison, out_dir)
    return comparison


def _fmt(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def table_rows(comparison: Mapping[str, Any]) -> list[list[str]]:
    """The comparison table as rows of strings: header, task x length rows, per-length and overall
    averages, kept density per length, perplexity."""
    names = list(comparison["models"])
    res = comparison["models"]
    tasks = comparison["config"]["tasks"]
    lengths = comparison["config"]["lengths"]
    rows = [["task", "length", *names]]
    for t in tasks:
        for L in lengths:
            rows.append([t, str(L), *(_fmt(_get(res[n]["scores"], t, L)) for n in names)])
    for L in lengths:
        rows.append(["average", str(L), *(_fmt(_get(res[n]["length_average"], L)) for n in names)])
    rows.append(["average", "all", *(_fmt(res[n]["average"]) for n in names)])
    if any(_get(res[n]["density"], L) is not None for n in names for L in lengths):
        for L in lengths:
            rows.append(["kept density", str(L), *(_fmt(_get(res[n]["density"], L), 3) for n in names)])
    if any("perplexity" in res[n] for n in names):
        seq = comparison["config"].get("perplexity_seq_len")
        rows.append(["perplexity", str(seq), *(_fmt(res[n]["perplexity"]["perplexity"], 3) if "perplexity" in res[n] else "-" for n in names)])
    return rows


def _get(d: Mapping, *keys):
    """d[k1][k2]..., accepting int keys stored as strings (after a JSON round trip); None if absent."""
    for k in keys:
        if d is None:
            return None
        if k in d:
            d = d[k]
        elif str(k) in d:
            d = d[str(k)]
        else:
            return None
    return d


def format_table(comparison: Mapping[str, Any]) -> str:
    """A Markdown table: rows task x length, one column per model (scores 0..100)."""
    rows = table_rows(comparison)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def _json_default(o: Any):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def plot_comparison(comparison: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """PNG: suite-average accuracy vs length (left) and kept-token density vs length (right), one line per
    model (a model that reports no density is left out of the right panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = comparison["config"]["lengths"]
    res = comparison["models"]
    fig, (ax_acc, ax_den) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in res:
        acc = [_get(res[name]["length_average"], L) for L in lengths]
        ax_acc.plot(lengths, [math.nan if a is None else a for a in acc], marker="o", label=name)
        den = [_get(res[name]["density"], L) for L in lengths]
        if any(d is not None for d in den):
            ax_den.plot(lengths, [math.nan if d is None else d for d in den], marker="o", label=name)
    for ax, title, ylabel in ((ax_acc, "suite average accuracy", "accuracy (%)"), (ax_den, "kept-token density", "density (fraction kept)")):
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(lengths) / 1.3, max(lengths) * 1.3)
        ax.set_xticks(lengths)
        ax.set_xticklabels([f"{L // 1024}K" if L >= 1024 and L % 1024 == 0 else str(L) for L in lengths])
        ax.minorticks_off()
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_acc.set_ylim(-2, 102)
    ax_den.set_ylim(0, 1.02)
    if ax_acc.get_legend_handles_labels()[0]:
        ax_acc.legend()
    if ax_den.get_legend_handles_labels()[0]:
        ax_den.legend()
    else:
        ax_den.text(0.5, 0.5, "no model reported density", ha="center", va="center", transform=ax_den.transAxes)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_tasks(comparison: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """PNG: one small panel per task, accuracy vs length, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = comparison["config"]["tasks"]
    lengths = comparison["config"]["lengths"]
    res = comparison["models"]
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for k, t in enumerate(tasks):
        ax = axes[k // cols][k % cols]
        for name in res:
            acc = [_get(res[name]["scores"], t, L) for L in lengths]
            ax.plot(lengths, [math.nan if a is None else a for a in acc], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(lengths) / 1.3, max(lengths) * 1.3)
        ax.set_xticks(lengths)
        ax.set_xticklabels([f"{L // 1024}K" if L >= 1024 and L % 1024 == 0 else str(L) for L in lengths], fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(-2, 102)
        ax.set_title(t, fontsize=9)
        ax.grid(True, alpha=0.3)
    for k in range(len(tasks), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(comparison: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json (everything, per-sample records included), table.md, accuracy_density.png and
    accuracy_by_task.png into out_dir. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "table": out / "table.md",
        "plot": out / "accuracy_density.png",
        "tasks_plot": out / "accuracy_by_task.png",
    }
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(comparison, f, indent=1, default=_json_default)
    paths["table"].write_text(format_table(comparison) + "\n", encoding="utf-8")
    plot_comparison(comparison, paths["plot"])
    plot_tasks(comparison, paths["tasks_plot"])
    return paths


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results.json written by write_report (length keys come back as strings; the table and
    plot functions accept both)."""
    with open(path, encoding="utf-8") as f:
        comparison = json.load(f)
    comparison["config"]["lengths"] = [int(x) for x in comparison["config"]["lengths"]]
    return comparison
