"""Qwen3 / Qwen3-MoE decoder in plain PyTorch (single-device code; parallelism lives in parallelize.py).

Also loads Llama / Qwen2-family checkpoints: those differ only by flags (no QK-norm, optional qkv bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import AttentionContext, build_attention_backend
from models.qwen3.args import Qwen3ModelArgs
from models.qwen3.moe import MoE
from models.qwen3.rope import apply_rope, rope_cos_sin, rope_inv_freq


class RMSNorm(nn.Module):
    """HF-exact RMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, args: Qwen3ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        hd = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * hd, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * hd, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * hd, args.dim, bias=False)
        self.q_norm = RMSNorm(hd, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(hd, args.norm_eps) if args.qk_norm else None
        self.inner_attention = build_attention_backend(args.attn_backend)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q_pre, k_pre, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        q, k = apply_rope(q_pre, cos, sin), apply_rope(k_pre, cos, sin)
        out = self.inner_attention(q, k, v, q_pre=q_pre, k_pre=k_pre, ctx=ctx)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate_proj
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up_proj
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down_proj

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: Qwen3ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.moe_enabled = args.is_moe_layer(layer_id)
        if self.moe_enabled:
            self.moe = MoE(args.dim, args.moe_hidden_dim, args.num_experts, args.num_experts_per_tok,
                           args.norm_topk_prob)
        else:
            self.feed_forward = FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, cos, sin, ctx: AttentionContext):
        x = x + self.attention(self.attention_norm(x), cos, sin, ctx)
        h = self.ffn_norm(x)
        if self.moe_enabled:
            out, aux = self.moe(h)
            if ctx.collect is not None:
                ctx.collect.setdefault("moe_aux_loss", []).append(aux)
            return x + out
        return x + self.feed_forward(h)


class Qwen3Model(nn.Module):
    def __init__(self, args: Qwen3ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        inv_freq, mscale = rope_inv_freq(args)
        # A tiny [head_dim/2] buffer, not a [max_seq_len, head_dim] table (see rope.py).
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)
        self.rope_mscale = mscale

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        ctx: AttentionContext | None = None,
        return_hidden: bool = False,
        logits_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab] (or final hidden states with return_hidden).

        logits_mask [B, T] bool: logits only at those positions, [N, vocab] in row-major order (stage 2 needs
        a few label tokens of a long sequence: [T, vocab] logits would be 79 GB at 131K tokens, 151K vocab)."""
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        if ctx is None:
            ctx = AttentionContext(doc_ids=doc_ids)
        elif doc_ids is not None:
            ctx.doc_ids = doc_ids
        h = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(positions, self.rope_inv_freq, self.rope_mscale, h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin, ctx)
        h = self.norm(h)
        if return_hidden:
            return h
        if logits_mask is not None:
            h = h[logits_mask]
        return self.output(h)

    # ---- initialisation (meta-device construction, then to_empty + init_weights) ----
    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        args = self.args
        std = 0.02
        depth_std = std / math.sqrt(2 * args.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers.values():
            a = layer.attention
            for lin in (a.wq, a.wk, a.wv):
                nn.init.trunc_normal_(lin.weight, std=std, a=-3 * std, b=3 * std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.trunc_normal_(a.wo.weight, std=depth_std, a=-3 * depth_std, b=3 * depth_std)
            for norm in (a.q_norm, a.k_norm, layer.attention_norm, layer.ffn_norm):
                if norm is not None:
                    norm.reset_parameters()
            if layer.moe_enabled:
                e = layer.moe.experts
                nn.init.trunc_normal_(layer.moe.router.gate.weight, std=std, a=-3 * std, b=3 * std)
                nn.init.trunc_normal_(e.w1, std=std, a=-3 * std, b=3 * std)
                nn.init.trunc_normal_(e.w3, std=std, a=-3 * std, b=3 * std)
                nn.init.trunc_normal_(e.w2, std=depth_std, a=-3 * depth_std, b=3 * depth_std)
            else:
                f = layer.feed_forward
                nn.init.trunc_normal_(f.w1.weight, std=std, a=-3 * std, b=3 * std)
                nn.init.trunc_normal_(f.w3.weight, std=std, a=-3 * std, b=3 * std)
                nn.init.trunc_normal_(f.w2.weight, std=depth_std, a=-3 * depth_std, b=3 * depth_std)
            for m in layer.attention.inner_attention.modules():
                if hasattr(m, "reset_parameters") and m is not layer.attention.inner_attention:
                    m.reset_parameters()
        self.norm.reset_parameters()
        if not args.tie_embeddings:
            out_std = args.dim**-0.5
            nn.init.trunc_normal_(self.output.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
        inv_freq, _ = rope_inv_freq(args)
        self.rope_inv_freq = inv_freq.to(buffer_device or self.tok_embeddings.weight.device)


def build_model(args: Qwen3ModelArgs, device: str | torch.device = "cpu", init: bool = True) -> Qwen3Model:
    """Build on the meta device, then materialise on `device` (and initialise unless loading weights)."""
    with torch.device("meta"):
        model = Qwen3Model(args)
    model.to_empty(device=device)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    if init:
        model.init_weights(buffer_device=torch.device(device))
    else:
        inv_freq, _ = rope_inv_freq(args)
        model.rope_inv_freq = inv_freq.to(device)
    return model
