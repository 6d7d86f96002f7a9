"""Needle-repeat calibration of head roles (RTPurbo paper, section 3.1), averaged over several sequences.

A calibration sequence is a long document with one identical "needle" span inserted after a few tokens at
its start and again at its end. For each query head h,
    R_h = mean over the later needle's tokens t of  sum over the earlier needle's tokens j of A_h(t, j),
with A_h the post-softmax causal attention of the real model (post-RoPE q and k, all heads dense).
The measurement wraps every layer's attention backend in a probe that computes just the later needle's
rows (needle_tokens x T per head, never T x T) and then calls the original backend, so the forward itself
is untouched. Everything here is tokenizer-agnostic: it works on lists of token ids.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from models.rtpurbo.roles import HeadRoles


@dataclass
class NeedleSequence:
    tokens: torch.Tensor  # [T] long
    pre: tuple[int, int]  # [start, end) of the earlier needle
    post: tuple[int, int]  # [start, end) of the later needle (the last needle_tokens positions)


def _to_docs(source: Any, tokenizer: Any | None) -> list[list[int]]:
    """Accept a flat token stream (1-D tensor / list of ints), a list of documents (lists / tensors of ids),
    or a list of strings with a tokenizer that has .encode(str) -> list[int]."""
    if isinstance(source, torch.Tensor):
        if source.dim() == 1:
            return [source.tolist()]
        return [row.tolist() for row in source]
    source = list(source)
    if not source:
        raise ValueError("calibration corpus is empty")
    if isinstance(source[0], int):
        return [[int(t) for t in source]]
    docs = []
    for d in source:
        if isinstance(d, str):
            if tokenizer is None:
                raise ValueError("calibration corpus holds text: pass a tokenizer with .encode()")
            d = tokenizer.encode(d)
        elif isinstance(d, torch.Tensor):
            d = d.tolist()
        docs.append([int(t) for t in d])
    return docs


def make_needle_sequences(
    source: Any,
    tokenizer: Any | None = None,
    *,
    lengths: Sequence[int],
    n: int,
    needle_tokens: int = 64,
    seed: int = 0,
    needle_offset: int = 8,
) -> list[NeedleSequence]:
    """n calibration sequences, lengths cycling through `lengths`.

    Layout of one sequence of length T (n_d = needle_tokens):
        hay[:needle_offset] | needle | hay[needle_offset : T - 2 n_d] | needle
    The haystack is T - 2 n_d consecutive tokens from one document long enough (a random one among them),
    or from the concatenated corpus when no document is long enough; the needle is n_d consecutive tokens
    from elsewhere in the corpus (another document when there is one), so both are natural text."""
    docs = [d for d in _to_docs(source, tokenizer) if d]
    if not docs:
        raise ValueError("calibration corpus has no tokens")
    rng = random.Random(seed)
    stream = [t for d in docs for t in d]
    out = []
    for i in range(n):
        T = int(lengths[i % len(lengths)])
        H = T - 2 * needle_tokens
        if H < needle_offset + 1 or needle_tokens < 1:
            raise ValueError(f"calibration length {T} too short for needles of {needle_tokens} tokens")
        long_docs = [j for j, d in enumerate(docs) if len(d) >= H]
        if long_docs:
            j = rng.choice(long_docs)
            a = rng.randint(0, len(docs[j]) - H)
            hay = docs[j][a:a + H]
        else:
            if len(stream) < H:
                raise ValueError(f"calibration corpus has {len(stream)} tokens, length {T} needs {H}")
            j = -1
            a = rng.randint(0, len(stream) - H)
            hay = stream[a:a + H]
        others = [d for jj, d in enumerate(docs) if jj != j and len(d) >= needle_tokens]
        if others:
            d = rng.choice(others)
            b = rng.randint(0, len(d) - needle_tokens)
            needle = d[b:b + needle_tokens]
        else:  # one document only: a span outside the haystack window if possible
            src = docs[0] if j >= 0 else stream
            b = rng.randint(0, len(src) - needle_tokens)
            needle = src[b:b + needle_tokens]
        toks = hay[:needle_offset] + needle + hay[needle_offset:] + needle
        assert len(toks) == T
        pre = (needle_offset, needle_offset + needle_tokens)
        out.append(NeedleSequence(torch.tensor(toks, dtype=torch.long), pre, (T - needle_tokens, T)))
    return out


# ----------------------------------------------------------------------------------------------------------
# probes
# ----------------------------------------------------------------------------------------------------------
def needle_attention_mass(
    q: torch.Tensor, k: torch.Tensor, pre: tuple[int, int], post: tuple[int, int],
    scale: float | None = None, max_elems: int = 1 << 26,
) -> torch.Tensor:
    """Mean over the query rows post[0]:post[1] of the causal attention mass on keys pre[0]:pre[1].

    q [B, Hq, T, D], k [B, Hkv, T, D] post-RoPE -> [B, Hq] (float32). Computes [n_post, post_end] logits
    per head (in KV-head chunks to stay under max_elems floats), never T x T."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    p0, p1 = post
    n = p1 - p0
    scale = D**-0.5 if scale is None else scale
    rows = torch.arange(p0, p1, device=q.device)
    cols = torch.arange(p1, device=q.device)
    visible = cols[None, :] <= rows[:, None]  # [n, p1]
    per_kv = max(1, max_elems // max(1, B * g * n * p1))
    out = []
    for c0 in range(0, Hkv, per_kv):
        c1 = min(Hkv, c0 + per_kv)
        qq = q[:, c0 * g:c1 * g, p0:p1].float().reshape(B, c1 - c0, g * n, D)
        kk = k[:, c0:c1, :p1].float()
        logits = (qq @ kk.transpose(-1, -2) * scale).view(B, c1 - c0, g, n, p1)
        probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
        out.append(probs[..., pre[0]:pre[1]].sum(-1).mean(-1).reshape(B, (c1 - c0) * g))
    return torch.cat(out, dim=1)


class _Probe(nn.Module):
    """Wraps a layer's attention backend: runs `hook(layer, q, k, v, q_pre, k_pre, ctx)` and then the backend."""

    def __init__(self, inner: nn.Module, layer: int, hook: Callable):
        super().__init__()
        self.inner = inner
        self.layer = layer
        self.hook = hook

    def forward(self, q, k, v, *, q_pre=None, k_pre=None, ctx=None):
        self.hook(self.layer, q, k, v, q_pre, k_pre, ctx)
        return self.inner(q, k, v, q_pre=q_pre, k_pre=k_pre, ctx=ctx)


@contextmanager
def probed(model: nn.Module, hook: Callable):
    """Temporarily wrap every layer's inner_attention with a probe calling hook; always restored."""
    originals = {}
    try:
        for name, layer in model.layers.items():
            originals[name] = layer.attention.inner_attention
            layer.attention.inner_attention = _Probe(originals[name], int(name), hook)
        yield model
    finally:
        for name, inner in originals.items():
            model.layers[name].attention.inner_attention = inner


def _batches(sequences: Sequence[NeedleSequence], batch_size: int) -> Iterable[list[int]]:
    """Indices of sequences grouped so that a batch shares length and needle positions."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(sequences):
        groups.setdefault((s.tokens.numel(), s.pre, s.post), []).append(i)
    for idx in groups.values():
        for a in range(0, len(idx), batch_size):
            yield idx[a:a + batch_size]


def _device(model: nn.Module) -> torch.device:
    return model.tok_embeddings.weight.device


@torch.no_grad()
def calibrate_retrieval_scores(
    model: nn.Module,
    sequences: Sequence[NeedleSequence],
    *,
    batch_size: int = 1,
    return_per_sequence: bool = False,
) -> torch.Tensor:
    """Retrieval score R_h of every query head -> [L, Hq] float32 (CPU), the mean over sequences
    (or [N, L, Hq] per sequence with return_per_sequence). The model runs its own forward (call it on the
    dense model); the probe measures true full causal attention from the layer's real q and k."""
    from models.attention import AttentionContext

    args = model.args
    L, Hq = args.n_layers, args.n_heads
    per_seq = torch.zeros(len(sequences), L, Hq)
    state: dict[str, Any] = {}

    def hook(layer, q, k, v, q_pre, k_pre, ctx):
        state["out"][:, layer] = needle_attention_mass(q, k, state["pre"], state["post"]).cpu()

    was_training = model.training
    model.eval()
    try:
        with probed(model, hook):
            for idx in _batches(sequences, batch_size):
                s0 = sequences[idx[0]]
                tokens = torch.stack([sequences[i].tokens for i in idx]).to(_device(model))
                state.update(pre=s0.pre, post=s0.post, out=torch.zeros(len(idx), L, Hq))
                model(tokens, ctx=AttentionContext(), return_hidden=True)
                per_seq[idx] = state["out"]
    finally:
        model.train(was_training)
    return per_seq if return_per_sequence else per_seq.mean(0)


@torch.no_grad()
def collect_qk_samples(
    model: nn.Module,
    sequences: Sequence[NeedleSequence | torch.Tensor],
    roles: HeadRoles,
    *,
    max_tokens: int = 4096,
    seed: int = 0,
) -> dict[int, dict[str, Any]]:
    """Pre-RoPE queries of each retrieval head and pre-RoPE keys of its KV head, on calibration data, for
    the SVD init of the indexers. Token positions are subsampled uniformly (the same positions for q and k),
    up to max_tokens per head over all sequences.

    Returns {layer: {"heads": [query heads], "q": [Hr, N, D], "k": [Hr, N, D], "seq_len": longest T}}
    (float32, CPU), for layers with at least one retrieval head."""
    from models.attention import AttentionContext

    args = model.args
    g = args.n_heads // args.n_kv_heads
    heads = {l: roles.retrieval_heads(l) for l in range(args.n_layers) if roles.retrieval_heads(l)}
    gen = torch.Generator().manual_seed(seed)
    seqs = [s.tokens if isinstance(s, NeedleSequence) else s for s in sequences]
    per_seq = max(1, max_tokens // max(1, len(seqs)))
    acc: dict[int, dict[str, list]] = {l: {"q": [], "k": []} for l in heads}
    state: dict[str, Any] = {}

    def hook(layer, q, k, v, q_pre, k_pre, ctx):
        if layer not in heads:
            return
        pos = state["pos"].to(q_pre.device)
        hs = torch.tensor(heads[layer], device=q_pre.device)
        acc[layer]["q"].append(q_pre[0].index_select(0, hs)[:, pos].float().cpu())
        acc[layer]["k"].append(k_pre[0].index_select(0, hs // g)[:, pos].float().cpu())

    was_training = model.training
    model.eval()
    T_max = 0
    try:
        with probed(model, hook):
            for toks in seqs:
                T = toks.numel()
                T_max = max(T_max, T)
                state["pos"] = torch.randperm(T, generator=gen)[: min(per_seq, T)].sort().values
                model(toks.view(1, -1).to(_device(model)), ctx=AttentionContext(), return_hidden=True)
    finally:
        model.train(was_training)
    return {
        l: {"heads": heads[l], "q": torch.cat(acc[l]["q"], 1), "k": torch.cat(acc[l]["k"], 1), "seq_len": T_max}
        for l in heads
    }


# ----------------------------------------------------------------------------------------------------------
# analysis
# ----------------------------------------------------------------------------------------------------------
def _retrieval_set(r: Any) -> set[tuple[int, int]]:
    if isinstance(r, HeadRoles):
        r = r.retrieval
    if isinstance(r, torch.Tensor):
        r = r.tolist()
    return {(l, h) for l, row in enumerate(r) for h, x in enumerate(row) if x}


def stability_overlap(roles_a: Any, roles_b: Any) -> float:
    """|A & B| / max(|A|, |B|) of two retrieval-head sets (HeadRoles or [L][Hq] 0/1 tables): with the same
    ratio both sets have the same size and this is the share of heads both calibrations agree on.
    1.0 when both are empty."""
    a, b = _retrieval_set(roles_a), _retrieval_set(roles_b)
    if not a and not b:
        return 1.0
    return len(a & b) / max(len(a), len(b))


def plot_scores_heatmap(scores: Any, roles: HeadRoles | None, path: str, *, title: str | None = None,
                        n_kv_heads: int | None = None) -> None:
    """PNG heatmap of R_h, layers (rows) x query heads (columns); retrieval heads are outlined, KV groups
    separated by vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    s = torch.as_tensor(scores, dtype=torch.float32)
    L, H = s.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * H + 2), max(3.0, 0.25 * L + 1.5)))
    im = ax.imshow(s.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="retrieval score R_h")
    if roles is not None:
        for l, h in _retrieval_set(roles):
            ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
        n_kv_heads = n_kv_heads or roles.fingerprint.get("n_kv_heads")
    if n_kv_heads and n_kv_heads < H:
        g = H // n_kv_heads
        for kv in range(1, n_kv_heads):
            ax.axvline(kv * g - 0.5, color="white", linewidth=0.6, alpha=0.7)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    n_ret = len(_retrieval_set(roles)) if roles is not None else 0
    ax.set_title(title or f"needle retrieval scores (red: {n_ret} retrieval heads)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def calibrate_roles(model: nn.Module, sequences: Sequence[NeedleSequence], cfg: Any, *, batch_size: int = 1):
    """The whole calibration: scores over all sequences -> roles (cfg: an RTPurbo config section), plus a
    summary dict (stability of 1 sequence vs all, the other granularity's KV cost) for logs and reports.
    Returns (roles, per_sequence_scores [N, L, Hq], summary)."""
    from models.rtpurbo.roles import build_roles, roles_from_config

    args = model.args
    per_seq = calibrate_retrieval_scores(model, sequences, batch_size=batch_size, return_per_sequence=True)
    scores = per_seq.mean(0)
    lengths = sorted({s.tokens.numel() for s in sequences})
    needle = sequences[0].pre[1] - sequences[0].pre[0]
    method = (f"needle-repeat: {len(sequences)} sequences of lengths {lengths}, needle {needle} tokens; R_h = mean "
              f"over the later needle's tokens of the causal attention mass on the earlier needle")
    roles = roles_from_config(scores, args, cfg, method=method)
    one = roles_from_config(per_seq[0], args, cfg)
    other_gran = "kv_head" if cfg.granularity == "query_head" else "query_head"
    other = build_roles(scores, model_args=args, granularity=other_gran, ratio=roles.ratio,
                        threshold=roles.threshold, window=cfg.window, sinks=cfg.sinks)
    summary = {
        "num_sequences": len(sequences), "lengths": lengths, "needle_tokens": needle,
        "granularity": cfg.granularity, "retrieval_heads": roles.num_retrieval(),
        "retrieval_fraction": roles.retrieval_fraction(), "full_kv_fraction": roles.full_kv_fraction(),
        "stability_overlap_1_vs_all": stability_overlap(one, roles),
        f"{other_gran}_retrieval_heads": other.num_retrieval(),
        f"{other_gran}_full_kv_fraction": other.full_kv_fraction(),
        f"{other_gran}_overlap_with_chosen": stability_overlap(other, roles),
        "score_max": float(scores.max()), "score_mean": float(scores.mean()),
        "retrieval_per_layer": [len(roles.retrieval_heads(l)) for l in range(roles.n_layers)],
    }
    return roles, per_seq, summary
