"""A decoding engine over a role-aware KV cache (models/inference/kv_cache.py).

It runs the model's own modules layer by layer (norms, wq/wk/wv/wo, q_norm/k_norm, RoPE, feed_forward or
moe); the model code is not changed and its attention backend is only read for the head roles and the
RTPurbo settings.

  * Chunked prefill (chunk_size tokens at a time, all sequences of the batch together, left-aligned):
    exact masked attention over the cache + the chunk: dense (causal) for dense layers and retrieval heads
    (the paper's dense prefill), window + sinks for local heads. Cache writes past a sequence's own
    prompt length are masked for the ring buffer (padding never evicts real tokens).
  * Decode: one token per sequence per step, at per-sequence positions (cache_lens); attention through
    kernels/sparse_decode.py: dense_decode_reference for dense layers; for RTPurbo layers the indexer's
    dynamic top-p block selection + retrieval_decode for retrieval heads, local_decode (sinks + ring) for
    local heads, and retrieval_decode with an empty block mask (= sinks + window) for local heads whose KV
    head is kept in full. The dispatching versions pick Triton on CUDA and the references elsewhere.
  * Sampling: greedy (temperature 0) or temperature / top-k / top-p over the vocabulary; stop tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import sparse_decode as sd
from models.inference.kv_cache import LayerPlan, RoleKVCache
from models.qwen3.rope import apply_rope, rope_cos_sin


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated tokens per sequence (stop token included if hit)
    prompt_lens: list[int]
    finished: list[bool]  # True: a stop token ended the sequence
    ttft_s: float = 0.0  # prefill + first sampled token
    decode_s: float = 0.0
    decode_steps: int = 0  # forward decode steps (each produces one token per sequence)
    decode_tokens: int = 0  # tokens produced by decode steps (over live sequences)
    mean_density: float | None = None  # mean kept fraction of visible tokens, retrieval heads at decode
    memory: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature <= 0: greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if top_k and 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sx, order = torch.sort(x, dim=-1, descending=True)
        probs = sx.softmax(-1)
        before = probs.cumsum(-1) - probs
        drop = before >= top_p
        drop[..., 0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = x.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _attn_mask(qpos: torch.Tensor, kpos: torch.Tensor, kvalid: torch.Tensor, local: bool, window: int,
               sinks: int) -> torch.Tensor:
    """[C] query positions, [N] key positions / validity -> bool [C, N]."""
    m = kvalid[None, :] & (kpos[None, :] <= qpos[:, None])
    if local:
        m = m & ((qpos[:, None] - kpos[None, :] < window) | (kpos[None, :] < sinks))
    return m


class InferenceEngine:
    def __init__(self, model: nn.Module, *, max_len: int, chunk_size: int = 256,
                 memory_limit_bytes: int | None = None, impl: str = "auto"):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = model.eval()
        self.args = model.args
        self.max_len, self.chunk_size = int(max_len), int(chunk_size)
        self.memory_limit_bytes = memory_limit_bytes
        self.impl = impl
        self.cache: RoleKVCache | None = None
        self.layers = list(model.layers.values())
        self._density_sum = 0.0
        self._density_n = 0

    # ------------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int) -> RoleKVCache:
        self.cache = RoleKVCache(self.model, batch_size, self.max_len, memory_limit_bytes=self.memory_limit_bytes)
        return self.cache

    def _qkv(self, attn, h, positions):
        B, T, _ = h.shape
        q = attn.wq(h).view(B, T, attn.n_heads, attn.head_dim)
        k = attn.wk(h).view(B, T, attn.n_kv_heads, attn.head_dim)
        v = attn.wv(h).view(B, T, attn.n_kv_heads, attn.head_dim)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q_pre, k_pre, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = rope_cos_sin(positions, self.model.rope_inv_freq, self.model.rope_mscale, h.dtype)
        return apply_rope(q_pre, cos, sin), apply_rope(k_pre, cos, sin), v, q_pre, k_pre

    def _ffn(self, layer, x):
        h = layer.ffn_norm(x)
        if layer.moe_enabled:
            out, _ = layer.moe(h)
            return x + out
        return x + layer.feed_forward(h)

    # ---- prefill ------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, lens: Sequence[int], *, all_logits: bool = False) -> torch.Tensor:
        """tokens [B, T] left-aligned prompts (entries past lens[b] are padding). Fills a new cache.
        Returns the logits of each sequence's last prompt token [B, V], or all positions [B, T, V]."""
        B, T = tokens.shape
        lens = [int(n) for n in lens]
        if min(lens) < 1:
            raise ValueError("every prompt needs at least one token")
        if max(lens) > self.max_len:
            raise ValueError(f"prompt of {max(lens)} tokens is longer than max_len={self.max_len}")
        T = max(lens)
        tokens = tokens[:, :T]
        cache = self.new_cache(B)
        dev = tokens.device
        lens_t = torch.tensor(lens, device=dev)
        last_h = None
        outs = []
        for c0 in range(0, T, self.chunk_size):
            c1 = min(c0 + self.chunk_size, T)
            pos = torch.arange(c0, c1, device=dev)
            x = self.model.tok_embeddings(tokens[:, c0:c1])
            for li, layer in enumerate(self.layers):
                h = layer.attention_norm(x)
                a = self._prefill_attention(li, layer.attention, h, pos, lens)
                x = self._ffn(layer, x + layer.attention.wo(a.transpose(1, 2).reshape(B, c1 - c0, -1)))
            x = self.model.norm(x)
            if all_logits:
                outs.append(self.model.output(x))
            else:
                inside = (lens_t - 1 >= c0) & (lens_t - 1 < c1)
                idx = (lens_t - 1 - c0).clamp(0, c1 - c0 - 1)
                hl = x[torch.arange(B, device=dev), idx]
                last_h = hl if last_h is None else torch.where(inside[:, None], hl, last_h)
        self.lens = list(lens)
        return torch.cat(outs, dim=1) if all_logits else self.model.output(last_h)

    def _prefill_attention(self, li: int, attn, h, pos, lens):
        cache, p = self.cache, self.cache.plans[li]
        B, C = h.shape[0], h.shape[1]
        c0, c1 = int(pos[0]), int(pos[-1]) + 1
        q, k, v, q_pre, k_pre = self._qkv(attn, h, pos.expand(B, C))
        if not p.rtpurbo:
            cache.k[li][:, :, c0:c1] = k
            cache.v[li][:, :, c0:c1] = v
            kpos = torch.arange(c1, device=h.device)
            mask = _attn_mask(pos, kpos, torch.ones_like(kpos, dtype=torch.bool), False, 0, 0)
            return F.scaled_dot_product_attention(q, cache.k[li][:, :, :c1], cache.v[li][:, :, :c1],
                                                  attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        out = torch.empty_like(q)
        if p.full_kv:
            cache.k[li][:, :, c0:c1] = k[:, p.full_kv]
            cache.v[li][:, :, c0:c1] = v[:, p.full_kv]
        if p.retrieval:
            _, ki = attn.inner_attention.indexer(q_pre, k_pre)
            cache.ki[li][:, :, c0:c1] = ki
        heads_f = p.retrieval + p.local_full
        if heads_f:
            kidx = p.full_index(heads_f)
            kpos = torch.arange(c1, device=h.device)
            ok = torch.ones_like(kpos, dtype=torch.bool)
            dense_m = _attn_mask(pos, kpos, ok, False, 0, 0)
            local_m = _attn_mask(pos, kpos, ok, True, p.window, p.sinks)
            mask = torch.stack([dense_m] * len(p.retrieval) + [local_m] * len(p.local_full))[None]
            out[:, heads_f] = F.scaled_dot_product_attention(
                q[:, heads_f], cache.k[li][:, kidx, :c1], cache.v[li][:, kidx, :c1], attn_mask=mask)
        if p.local_ring:
            S, W = cache.sink_k[li].shape[2], cache.ring_k[li].shape[2]
            dev = h.device
            spos = torch.arange(S, device=dev)
            svalid = spos < min(p.sinks, c0)
            rpos = c0 - W + torch.arange(W, device=dev)
            rvalid = (rpos >= 0) & (rpos >= p.sinks)
            slots = torch.remainder(rpos, W)
            kpos = torch.cat([spos, rpos, pos])
            kvalid = torch.cat([svalid, rvalid, torch.ones_like(pos, dtype=torch.bool)])
            mask = _attn_mask(pos, kpos, kvalid, True, p.window, p.sinks)
            ridx = p.ring_index(p.local_ring)
            kk = torch.cat([cache.sink_k[li], cache.ring_k[li][:, :, slots], k[:, p.ring_kv]], dim=2)
            vv = torch.cat([cache.sink_v[li], cache.ring_v[li][:, :, slots], v[:, p.ring_kv]], dim=2)
            # masked keys may hold uninitialised garbage: zero them so nothing non-finite leaks
            kk = torch.where(kvalid[None, None, :, None], kk, 0)
            vv = torch.where(kvalid[None, None, :, None], vv, 0)
            out[:, p.local_ring] = F.scaled_dot_product_attention(
                q[:, p.local_ring], kk[:, ridx], vv[:, ridx], attn_mask=mask)
            # write the chunk's tokens that belong to each sequence's prompt (padding never evicts)
            kr, vr = k[:, p.ring_kv], v[:, p.ring_kv]
            for b in range(B):
                end = min(c1, lens[b])
                if end <= c0:
                    continue
                s_end = min(end, p.sinks)
                if s_end > c0:
                    cache.sink_k[li][b, :, c0:s_end] = kr[b, :, : s_end - c0]
                    cache.sink_v[li][b, :, c0:s_end] = vr[b, :, : s_end - c0]
                lo = max(c0, end - W)
                sl = torch.remainder(torch.arange(lo, end, device=dev), W)
                cache.ring_k[li][b, :, sl] = kr[b, :, lo - c0: end - c0]
                cache.ring_v[li][b, :, sl] = vr[b, :, lo - c0: end - c0]
        return out

    # ---- decode -------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] at positions self.lens (one per sequence) -> logits [B, V]; advances the cache."""
        B = tokens.shape[0]
        dev = tokens.device
        pos = torch.tensor(self.lens, device=dev)
        if max(self.lens) >= self.max_len:
            raise ValueError(f"KV cache full (max_len={self.max_len})")
        lens1 = (pos + 1).to(torch.int32)
        bs = 64
        L_used = min(self.max_len, -(-(max(self.lens) + 1) // bs) * bs)
        x = self.model.tok_embeddings(tokens[:, None])
        for li, layer in enumerate(self.layers):
            h = layer.attention_norm(x)
            a = self._decode_attention(li, layer.attention, h, pos, lens1, L_used)
            x = self._ffn(layer, x + layer.attention.wo(a.reshape(B, 1, -1)))
        self.lens = [n + 1 for n in self.lens]
        return self.model.output(self.model.norm(x))[:, 0]

    def _decode_attention(self, li, attn, h, pos, lens1, L):
        cache, p = self.cache, self.cache.plans[li]
        B = h.shape[0]
        ar = torch.arange(B, device=h.device)
        q, k, v, q_pre, k_pre = self._qkv(attn, h, pos[:, None])
        q1 = q[:, :, 0]
        if not p.rtpurbo:
            cache.k[li][ar, :, pos] = k[:, :, 0]
            cache.v[li][ar, :, pos] = v[:, :, 0]
            return sd.dense_decode_reference(q1, cache.k[li][:, :, :L], cache.v[li][:, :, :L], lens1)
        out = torch.empty_like(q1)
        if p.full_kv:
            cache.k[li][ar, :, pos] = k[:, p.full_kv, 0]
            cache.v[li][ar, :, pos] = v[:, p.full_kv, 0]
        K = cache.k[li][:, :, :L] if p.full_kv else None
        V = cache.v[li][:, :, :L] if p.full_kv else None
        if p.retrieval:
            qi, ki = attn.inner_attention.indexer(q_pre, k_pre)
            cache.ki[li][ar, :, pos] = ki[:, :, 0]
            mask = sd.select_decode_blocks(qi[:, :, 0], cache.ki[li][:, :, :L], lens1, top_p=p.top_p,
                                           block_size=p.block_size, window=p.window, sinks=p.sinks, impl=self.impl)
            out[:, p.retrieval] = sd.retrieval_decode(
                q1[:, p.retrieval], K, V, p.full_index(p.retrieval), mask, lens1, window=p.window, sinks=p.sinks,
                block_size=p.block_size, impl=self.impl)
            kept = sd.kept_tokens_per_head(mask, lens1, window=p.window, sinks=p.sinks, block_size=p.block_size)
            self._density_sum += float((kept.float() / lens1[:, None].float()).mean())
            self._density_n += 1
        if p.local_full:
            nb = -(-L // p.block_size)
            empty = torch.zeros(B, len(p.local_full), nb, dtype=torch.bool, device=h.device)
            out[:, p.local_full] = sd.retrieval_decode(
                q1[:, p.local_full], K, V, p.full_index(p.local_full), empty, lens1, window=p.window,
                sinks=p.sinks, block_size=p.block_size, impl=self.impl)
        if p.local_ring:
            kr, vr = k[:, p.ring_kv, 0], v[:, p.ring_kv, 0]
            W, S = cache.ring_k[li].shape[2], cache.sink_k[li].shape[2]
            slot = torch.remainder(pos, W)
            cache.ring_k[li][ar, :, slot] = kr
            cache.ring_v[li][ar, :, slot] = vr
            is_sink = (pos < p.sinks)[:, None, None]
            ss = pos.clamp(max=S - 1)
            cache.sink_k[li][ar, :, ss] = torch.where(is_sink, kr, cache.sink_k[li][ar, :, ss])
            cache.sink_v[li][ar, :, ss] = torch.where(is_sink, vr, cache.sink_v[li][ar, :, ss])
            out[:, p.local_ring] = sd.local_decode(
                q1[:, p.local_ring], cache.sink_k[li], cache.sink_v[li], cache.ring_k[li], cache.ring_v[li], lens1,
                window=p.window, sinks=p.sinks, kv_head_of_l=p.ring_index(p.local_ring), impl=self.impl)
        return out

    # ---- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (), seed: int | None = None,
                 on_tokens: Callable[[list[int | None]], None] | None = None) -> GenerationResult:
        """Generate for a batch of prompts (token lists of any lengths). Each sequence stops at a stop token
        (kept in its output), after max_new_tokens, or when the cache (max_len) is full.
        on_tokens(list) is called after every step with the new token of each sequence (None: finished)."""
        dev = self.model.tok_embeddings.weight.device
        lens = [len(pr) for pr in prompts]
        B = len(prompts)
        tok = torch.zeros(B, max(lens), dtype=torch.long, device=dev)
        for b, pr in enumerate(prompts):
            tok[b, : len(pr)] = torch.tensor(list(pr), dtype=torch.long)
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        stops = set(int(t) for t in stop_tokens)
        self._density_sum, self._density_n = 0.0, 0
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        logits = self.prefill(tok, lens)
        out: list[list[int]] = [[] for _ in range(B)]
        finished = [False] * B
        live = [True] * B
        res = GenerationResult(out, lens, finished, memory=self.cache.memory_report())
        steps = 0
        while max_new_tokens > 0:
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
            vals = nxt.tolist()
            if steps == 0:
                sync()
                res.ttft_s = time.perf_counter() - t0
                t1 = time.perf_counter()
            emitted: list[int | None] = []
            for b in range(B):
                if not live[b]:
                    emitted.append(None)
                    continue
                out[b].append(vals[b])
                emitted.append(vals[b])
                if vals[b] in stops:
                    finished[b] = True
                    live[b] = False
                elif len(out[b]) >= max_new_tokens or self.lens[b] >= self.max_len:
                    live[b] = False
            if on_tokens is not None:
                on_tokens(emitted)
            if not any(live):
                break
            # finished sequences keep stepping on their last token (their cache position is clamped)
            feed = torch.tensor([vals[b] if live[b] else 0 for b in range(B)], device=dev)
            self.lens = [n if live[b] else min(n, self.max_len - 1) for b, n in enumerate(self.lens)]
            n_live = sum(live)
            logits = self.decode_step(feed)
            steps += 1
            res.decode_tokens += n_live
        sync()
        if steps:
            res.decode_s = time.perf_counter() - t1
        res.decode_steps = steps
        res.mean_density = self._density_sum / self._density_n if self._density_n else None
        return res
