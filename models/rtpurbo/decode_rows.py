"""Decode-time selection for the last rows of a full-sequence forward (evaluation without a KV cache).

The paper's inference scheme: the prompt is prefilled with retrieval heads dense, and every generated
token selects key blocks by dynamic top-p from the indexer keys. A greedy generator that re-runs the full
forward per new token reproduces that exactly when rows >= `decode_from` (the generated tokens and the last
prompt token, whose output predicts the first answer token) are computed with decode semantics and the
earlier rows with prefill semantics: the K/V of every position are the same either way.

Decode semantics per retrieval head and row m (kernels/sparse_decode.py's references, one definition):
block masses of the indexer softmax over keys n <= m, the smallest set of blocks reaching top_p (or, for the
fixed-budget baseline, the top_k blocks), plus the sinks and the last `window` tokens; exact attention over
the kept tokens with the real post-RoPE q/k/v.
"""

from __future__ import annotations

import torch

from kernels.sparse_decode import (
    indexer_block_mass_reference,
    kept_tokens_per_head,
    retrieval_decode_reference,
    select_decode_blocks_reference,
)


def topk_blocks(qi_row, ki, cache_lens, *, top_k: int, block_size: int) -> torch.Tensor:
    """Fixed budget baseline: the top_k key blocks by indexer mass -> bool [B, Hr, nBlocks]."""
    mass = indexer_block_mass_reference(qi_row, ki, cache_lens, block_size=block_size)
    k = min(top_k, mass.shape[-1])
    keep = torch.zeros_like(mass, dtype=torch.bool)
    if k > 0:
        keep.scatter_(-1, mass.topk(k, dim=-1).indices, True)
    valid = torch.arange(mass.shape[-1], device=mass.device)[None, None] * block_size < cache_lens[:, None, None]
    return keep & valid


@torch.no_grad()
def decode_rows_attention(q_r, k, v, qi, ki, kv_head_of_r, decode_from: int, *, top_p: float, window: int,
                          sinks: int, block_size: int, top_k_blocks: int = 0):
    """Outputs of the retrieval heads for rows decode_from..T-1 with decode semantics.

    q_r [B, Hr, T, D] (retrieval query heads), k/v [B, Hkv, T, D], qi/ki [B, Hr, T, r],
    kv_head_of_r: list of the kv head of each retrieval head. Returns (out [B, Hr, T - decode_from, D],
    density [Hr]: mean over rows of kept tokens beyond sinks + window / visible tokens beyond them)."""
    B, Hr, T, D = q_r.shape
    outs, dens, n_dens = [], torch.zeros(Hr), 0
    for m in range(decode_from, T):
        lens = torch.full((B,), m + 1, dtype=torch.long, device=q_r.device)
        qi_row = qi[:, :, m]
        if top_k_blocks > 0:
            blocks = topk_blocks(qi_row, ki, lens, top_k=top_k_blocks, block_size=block_size)
        else:
            blocks = select_decode_blocks_reference(qi_row, ki, lens, top_p=top_p, block_size=block_size,
                                                    window=window, sinks=sinks)
        out = retrieval_decode_reference(q_r[:, :, m], k, v, kv_head_of_r, blocks, lens, window=window,
                                         sinks=sinks, block_size=block_size)
        outs.append(out)
        beyond = m + 1 - min(m + 1, window + sinks)
        if beyond > 0:
            kept = kept_tokens_per_head(blocks, lens, window=window, sinks=sinks, block_size=block_size)
            kept_beyond = (kept.float() - min(m + 1, window + sinks)).clamp(min=0)
            dens += (kept_beyond / beyond).mean(0).cpu()
            n_dens += 1
    density = dens / n_dens if n_dens else torch.full((Hr,), float("nan"))
    return torch.stack(outs, dim=2), density
