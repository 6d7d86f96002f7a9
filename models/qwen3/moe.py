"""Qwen3-MoE feed-forward: softmax top-k router (normalised top-k weights) + grouped SwiGLU experts.

Experts are stored stacked ([E, hidden, dim]) so they shard with FSDP as three tensors and map to HF's
per-expert keys in the state-dict adapter. Tokens are sorted by expert once; each expert then runs one
matmul over its contiguous slice (torch._grouped_mm on CUDA when available: one launch for all experts).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)
_warned_grouped_mm = False


class Router(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(self, x: torch.Tensor):
        """x [N, dim] -> (top-k weights [N, k] in x.dtype, expert ids [N, k], router probs [N, E] fp32)."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts, probs


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/HF-Qwen3-MoE auxiliary loss: E * sum_e (fraction of routed slots to e) * (mean prob of e)."""
    mask = F.one_hot(experts, num_experts).float()  # [N, k, E]
    tokens_per_expert = mask.mean(dim=0)  # [k, E]
    prob_per_expert = probs.mean(dim=0)  # [E]
    return (tokens_per_expert * prob_per_expert[None]).sum() * num_experts


class GroupedExperts(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, num_experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # gate_proj
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # up_proj
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))  # down_proj
        self.num_experts = num_experts

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [N*k, dim] grouped by expert; counts [E] tokens per expert."""
        w1, w2, w3 = self.w1, self.w2, self.w3
        if hasattr(w1, "to_local"):  # FSDP2 DTensor params are unsharded by then; be safe
            w1, w2, w3 = w1.to_local(), w2.to_local(), w3.to_local()
        if _can_grouped_mm(x_sorted):
            offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
            h = F.silu(torch._grouped_mm(x_sorted, w1.transpose(-2, -1), offs=offs))
            h = h * torch._grouped_mm(x_sorted, w3.transpose(-2, -1), offs=offs)
            return torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
        # One matmul per expert over its contiguous slice (a loop over experts, never over tokens).
        out = torch.empty_like(x_sorted)
        for e, (start, n) in enumerate(zip(_starts(counts), counts.tolist())):
            if n == 0:
                continue
            xe = x_sorted[start : start + n]
            out[start : start + n] = (F.silu(xe @ w1[e].T) * (xe @ w3[e].T)) @ w2[e].T
        return out


def _starts(counts: torch.Tensor) -> list[int]:
    c = counts.tolist()
    return [sum(c[:i]) for i in range(len(c))]


def _can_grouped_mm(x: torch.Tensor) -> bool:
    global _warned_grouped_mm
    if not (x.is_cuda and x.dtype == torch.bfloat16):
        return False
    ok = hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(x.device)[0] >= 9
    if not ok and not _warned_grouped_mm:
        logger.warning("torch._grouped_mm unavailable on this GPU/torch: MoE experts run one matmul per expert")
        _warned_grouped_mm = True
    return ok


class MoE(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.router = Router(dim, num_experts, top_k, norm_topk_prob)
        self.experts = GroupedExperts(dim, hidden_dim, num_experts)
        self.num_experts = num_experts
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, dim] -> (out [B, T, dim], auxiliary load-balancing loss (scalar))."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, experts, probs = self.router(flat)
        aux = load_balancing_loss(probs, experts, self.num_experts)
        # Sort the N*k (token, expert) slots by expert so each expert sees one contiguous slice.
        flat_experts = experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_of_slot = order // self.top_k
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        y_sorted = self.experts(flat[token_of_slot], counts)
        y_sorted = y_sorted * weights.reshape(-1)[order, None]
        out = torch.zeros_like(flat).index_add_(0, token_of_slot, y_sorted)
        return out.reshape(B, T, D), aux
