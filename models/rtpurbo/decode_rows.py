"""Decode-time selection for the last rows of a full-sequence forward (evaluation without a KV cache).

The paper's inference scheme: the prompt is prefilled with retrieval heads dense, and every generated
token selects key blocks by dynamic top-p from the indexer keys. A greedy generator that re-runs the full
forward per new token reproduces that exactly when rows >= `decode_from` (the generated tokens and the last
prompt token, whose output predicts the first answer token) are computed with decode semantics and the
earlier rows with prefill semantics: the K/V of every position are the same either way.

Decode semantics per retrieval head and row m (kernels/sparse_decode.py's references, one definition, the
same rule as prefill's kernels/block_select.py for one query): block masses of the indexer softmax over keys
n <= m; the forced blocks (holding a sink token or one of the last `window` positions) are always kept and
their mass counts toward top_p; the free blocks are added by decreasing mass until forced + chosen reaches
top_p (or, for the fixed-budget baseline, the top_k free blocks); exact attention over every token n <= m of
the kept blocks with the real post-RoPE q/k/v.

`indexer_key_dtype` emulates an indexer-key cache of that dtype (InferenceEngine(indexer_cache_dtype=...)):
the keys are rounded as the cache stores them (float8_e4m3fn: models/inference/kv_cache.indexer_store_cast,
unscaled, saturated to +-448) and read back in their own dtype; the queries are not rounded (the engine keeps
them in the model dtype).
"""

from __future__ import annotations

import torch

from kernels.sparse_decode import (
    decode_block_density,
    decode_forced_blocks,
    indexer_block_mass_reference,
    retrieval_decode_reference,
    select_decode_blocks_reference,
)


def topk_blocks(qi_row, ki, cache_lens, *, top_k: int, block_size: int, window: int = 0,
                sinks: int = 0) -> torch.Tensor:
    """Fixed budget baseline: the forced (sink/window) blocks + the top_k free blocks by indexer mass
    (ties: lower block index first) -> bool [B, Hr, nBlocks]. top_k counts blocks beyond the forced ones,
    like the kept density."""
    mass = indexer_block_mass_reference(qi_row, ki, cache_lens, block_size=block_size)
    forced, valid = decode_forced_blocks(cache_lens, mass.shape[-1], block_size=block_size, window=window,
                                         sinks=sinks)
    forced, free = forced[:, None], (valid & ~forced)[:, None]
    order = torch.sort(torch.where(free, mass, -1.0), dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(mass.shape[-1], device=mass.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, ranks)
    return forced.expand_as(mass) | (free & (rank < top_k))


@torch.no_grad()
def decode_rows_attention(q_r, k, v, qi, ki, kv_head_of_r, decode_from: int, *, top_p: float, window: int,
                          sinks: int, block_size: int, top_k_blocks: int = 0,
                          indexer_key_dtype: torch.dtype | None = None):
    """Outputs of the retrieval heads for rows decode_from..T-1 with decode semantics.

    q_r [B, Hr, T, D] (retrieval query heads), k/v [B, Hkv, T, D], qi/ki [B, Hr, T, r],
    kv_head_of_r: list of the kv head of each retrieval head. Returns (out [B, Hr, T - decode_from, D],
    density [Hr]): kept density = chosen free blocks / free blocks (valid, not forced) summed over the batch
    and the rows, the prefill definition (BlockSelection.density) over the decoded rows; NaN when no row had
    a free block (the window and sinks covered everything). indexer_key_dtype: round ki as an indexer-key
    cache of that dtype stores it (None: as computed)."""
    if indexer_key_dtype is not None:
        from models.inference.kv_cache import indexer_store_cast  # (lazy: the package imports the engine)

        ki = indexer_store_cast(ki, indexer_key_dtype).to(ki.dtype)
    B, Hr, T, D = q_r.shape
    outs = []
    chosen = torch.zeros(Hr, dtype=torch.float64)
    selectable = 0.0
    for m in range(decode_from, T):
        lens = torch.full((B,), m + 1, dtype=torch.long, device=q_r.device)
        qi_row = qi[:, :, m]
        if top_k_blocks > 0:
            blocks = topk_blocks(qi_row, ki, lens, top_k=top_k_blocks, block_size=block_size, window=window,
                                 sinks=sinks)
        else:
            blocks = select_decode_blocks_reference(qi_row, ki, lens, top_p=top_p, block_size=block_size,
                                                    window=window, sinks=sinks)
        out = retrieval_decode_reference(q_r[:, :, m], k, v, kv_head_of_r, blocks, lens, window=window,
                                         sinks=sinks, block_size=block_size)
        outs.append(out)
        ch, free = decode_block_density(blocks, lens, block_size=block_size, window=window, sinks=sinks)
        chosen += ch.sum(0).double().cpu()
        selectable += float(free.sum())
    density = (chosen / selectable).float() if selectable > 0 else torch.full((Hr,), float("nan"))
    return torch.stack(outs, dim=2), density
