"""The RTPurbo token indexer (selector) of one layer: two r x d_h projections per retrieval query head.

score s_h(m, n) = (W^Q_h q_pre_{m,h}) . (W^K_h k_pre_{n,kv(h)}), on pre-RoPE (post-QK-norm) q and k.
It only routes: the attention over the selected tokens is exact (full post-RoPE q, k, v).

Initialisation
--------------
"random": N(0, std^2) with std = d_h^-1/2 * r^-1/4. For RMS-normalised q/k (unit RMS per channel) each
  projected coordinate has variance d_h * std^2 = r^-1/2, so a score (a sum of r such products) has variance
  ~1: the initial selector softmax is mildly peaked, neither uniform nor one-hot.
"svd": fit the bilinear form W_Q^T W_K (rank r) to the head's own attention logits on calibration samples,
  in the least-squares sense over (query, key) pairs:
      minimise  E_q E_k [ (q^T (W_Q^T W_K) k_c  -  q^T M k_c / sqrt(d_h))^2 ],   k_c = k - E[k]
  * keys are centred because a key component that is the same for every key only shifts all logits of one
    query by a constant, which the softmax ignores (the indexer has no bias, and needs none);
  * M is the RoPE-aware target: post-RoPE q_m . k_n = q^T R(n - m) k, and the indexer sees pre-RoPE vectors,
    so the best it can do is the *average* rotation over the causal distances it will meet:
    M = E_{m >= n}[R(n - m)] (block [[C, S], [-S, C]] with C, S = mean cos / sin of each rotary pair,
    distances distributed as over all causal pairs of a length-T sequence). High-frequency pairs average to
    ~0 (they carry position, not content: the paper's reason for pre-RoPE scoring); low-frequency pairs keep
    ~their full weight. M = I ("plain" SVD) is available for comparison.
  With C_q = E[q q^T] = L_q L_q^T and C_k = Cov(k) = L_k L_k^T, the objective is
  ||L_q^T (A - M/sqrt(d_h)) L_k||_F^2, so the optimum is the truncated SVD of G = L_q^T M L_k / sqrt(d_h) =
  U S V^T:  W_Q = S_r^1/2 U_r^T L_q^-1,  W_K = S_r^1/2 V_r^T L_k^-1  (so W_Q^T W_K = L_q^-T U_r S_r V_r^T L_k^-1,
  and the 1/sqrt(d_h) of the attention is split evenly, d_h^-1/4 each, through G).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn


def rope_average_rotation(
    inv_freq: torch.Tensor, seq_len: int, mscale: float = 1.0, n_samples: int = 4096
) -> torch.Tensor:
    """M = E[R(n - m)] over causal pairs (m >= n) of a length-`seq_len` sequence, as a [D, D] float64 matrix
    for rotate-half RoPE (pair i = channels (i, i + D/2)). Distance d = m - n has density ~ (T - d)."""
    D2 = inv_freq.numel()
    T = max(int(seq_len), 1)
    d = torch.linspace(0, T - 1, min(n_samples, T), dtype=torch.float64)
    w = (T - d)
    w = w / w.sum()
    ang = d[:, None] * inv_freq.double().cpu()[None, :]  # [S, D/2]
    C = (w[:, None] * ang.cos()).sum(0) * mscale**2
    S = (w[:, None] * ang.sin()).sum(0) * mscale**2
    M = torch.zeros(2 * D2, 2 * D2, dtype=torch.float64)
    idx = torch.arange(D2)
    # q^T R(-d) k with R(-d) on a pair = [[cos, sin], [-sin, cos]]
    M[idx, idx] = C
    M[idx + D2, idx + D2] = C
    M[idx, idx + D2] = S
    M[idx + D2, idx] = -S
    return M


def svd_indexer_init(
    q: torch.Tensor, k: torch.Tensor, r: int, M: torch.Tensor | None = None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, D], k [N', D] samples of one head's pre-RoPE query / key -> (W_Q [r, D], W_K [r, D]) with
    (W_Q q) . (W_K k) ~= q^T M k / sqrt(D) in the weighted least-squares sense described in the module doc."""
    q = q.double()
    k = k.double()
    D = q.shape[-1]
    if M is None:
        M = torch.eye(D, dtype=torch.float64)
    M = M.double().to(q.device)
    Cq = q.T @ q / max(q.shape[0], 1)
    kc = k - k.mean(0, keepdim=True)
    Ck = kc.T @ kc / max(k.shape[0], 1)

    def factor(C):
        lam, V = torch.linalg.eigh(C)
        lam = lam.clamp_min(eps * float(lam.max().clamp_min(1e-30)))
        L = V * lam.sqrt()  # L L^T = C
        Linv = (V / lam.sqrt()).T  # L^-1
        return L, Linv

    Lq, Lq_inv = factor(Cq)
    Lk, Lk_inv = factor(Ck)
    G = Lq.T @ M @ Lk / math.sqrt(D)
    U, S, Vh = torch.linalg.svd(G)
    r_eff = min(r, D)
    sr = S[:r_eff].sqrt()
    Wq = (sr[:, None] * U[:, :r_eff].T) @ Lq_inv
    Wk = (sr[:, None] * Vh[:r_eff]) @ Lk_inv
    if r_eff < r:  # r > D: pad with zero rows (they add nothing to the score)
        Wq = torch.cat([Wq, Wq.new_zeros(r - r_eff, D)])
        Wk = torch.cat([Wk, Wk.new_zeros(r - r_eff, D)])
    return Wq, Wk


def indexer_rope_inv_freq(indexer_dim: int, periods: Sequence[float], device=None) -> torch.Tensor:
    """Angular frequencies [r/2] of the rotary indexer: one per rotate-half pair, periods (in tokens) spaced
    geometrically from periods[0] to periods[1]."""
    p = torch.logspace(math.log10(float(periods[0])), math.log10(float(periods[1])), indexer_dim // 2,
                       dtype=torch.float32, device=device)
    return (2 * math.pi) / p


def check_rope_periods(periods, indexer_dim: int) -> tuple[float, float] | None:
    """rtpurbo.indexer_rope_periods -> (min, max) or None (empty: the paper's position-free indexer)."""
    if not periods:
        return None
    if len(periods) != 2 or not 0 < float(periods[0]) <= float(periods[1]):
        raise ValueError(f"rtpurbo.indexer_rope_periods must be [] or [min, max] with 0 < min <= max tokens, "
                         f"got {list(periods)}")
    if indexer_dim % 2:
        raise ValueError(f"rtpurbo.indexer_rope_periods needs an even indexer_dim, got {indexer_dim}")
    return float(periods[0]), float(periods[1])


class LayerIndexer(nn.Module):
    """Selector projections of the Hr retrieval query heads of one layer.

    wq, wk: [Hr, r, D]. forward(q_pre [B, Hq, T, D], k_pre [B, Hkv, T, D], positions=None) -> (qi, ki)
    [B, Hr, T, r]. `heads` are query-head indices; head h reads KV head h // (Hq // Hkv).

    rope_periods (min, max) (rtpurbo.indexer_rope_periods; None = the paper's indexer): the projected qi / ki
    are rotated by their token position (rotate-half over the r dims, r/2 periods from min to max tokens,
    geometric), so a score depends on the distance n - m as well as on content: qi_m . ki_n =
    (W_Q q_m)^T R(n - m) (W_K k_n). The projections still read pre-RoPE q / k; the rotation is the indexer's
    own, slow enough (periods >= a few hundred tokens) to model how attention decays with distance beyond
    the window. Caches store the rotated keys, so the decode kernels are unchanged.
    """

    def __init__(
        self,
        heads: Sequence[int],
        *,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        indexer_dim: int = 16,
        rope_periods: Sequence[float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.rope_periods = check_rope_periods(rope_periods, indexer_dim)
        heads = [int(h) for h in heads]
        if not heads:
            raise ValueError("LayerIndexer needs at least one retrieval head")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        g = n_heads // n_kv_heads
        self.n_heads, self.n_kv_heads, self.head_dim, self.indexer_dim = n_heads, n_kv_heads, head_dim, indexer_dim
        # Python lists, not buffers: a module built on the meta device and materialised with to_empty would
        # otherwise hold garbage indices.
        self.head_list = heads
        self.kv_head_list = [h // g for h in heads]
        Hr = len(heads)
        self.wq = nn.Parameter(torch.empty(Hr, indexer_dim, head_dim, device=device, dtype=dtype))
        self.wk = nn.Parameter(torch.empty(Hr, indexer_dim, head_dim, device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def heads(self) -> torch.Tensor:
        return torch.tensor(self.head_list, dtype=torch.long, device=self.wq.device)

    @property
    def kv_heads(self) -> torch.Tensor:
        return torch.tensor(self.kv_head_list, dtype=torch.long, device=self.wq.device)

    @property
    def init_std(self) -> float:
        return self.head_dim**-0.5 * self.indexer_dim**-0.25

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The "random" init (see the module doc). SVD init is applied later from samples."""
        if self.wq.is_meta:
            return
        nn.init.normal_(self.wq, std=self.init_std)
        nn.init.normal_(self.wk, std=self.init_std)

    def forward(self, q_pre: torch.Tensor, k_pre: torch.Tensor,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: the tokens' positions, [T] or [B, T] (None: 0..T-1); used by the rotary indexer only."""
        qh = q_pre[:, self.head_list].to(self.wq.dtype)
        kh = k_pre[:, self.kv_head_list].to(self.wk.dtype)
        qi = torch.einsum("bhtd,hrd->bhtr", qh, self.wq)
        ki = torch.einsum("bhtd,hrd->bhtr", kh, self.wk)
        if self.rope_periods is not None:
            if positions is None:
                positions = torch.arange(qi.shape[2], device=qi.device)
            qi, ki = self.rotate(qi, positions), self.rotate(ki, positions)
        return qi, ki

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, r] at positions [T] or [B, T] -> rotated (fp32 math, fp64 for fp64 x; x's dtype);
        identity without rope."""
        if self.rope_periods is None:
            return x
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        inv = indexer_rope_inv_freq(self.indexer_dim, self.rope_periods, device=x.device).to(dt)
        pos = positions.to(device=x.device, dtype=dt)
        ang = pos[..., None] * inv  # [T, r/2] or [B, T, r/2]
        ang = ang[None, None] if ang.dim() == 2 else ang[:, None]
        c, s = ang.cos(), ang.sin()
        h = self.indexer_dim // 2
        xf = x.to(dt)
        x1, x2 = xf[..., :h], xf[..., h:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(x.dtype)

    @torch.no_grad()
    def init_from_samples(
        self, q: torch.Tensor, k: torch.Tensor, M: torch.Tensor | None = None
    ) -> None:
        """SVD init. q: [Hr, N, D] pre-RoPE queries of each retrieval head, k: [Hr, N', D] pre-RoPE keys of
        each head's KV head; M: [D, D] target (None: identity, see rope_average_rotation)."""
        if q.shape[0] != len(self.head_list) or k.shape[0] != len(self.head_list):
            raise ValueError(f"samples for {q.shape[0]}/{k.shape[0]} heads, indexer has {len(self.head_list)}")
        for j in range(len(self.head_list)):
            Wq, Wk = svd_indexer_init(q[j], k[j], self.indexer_dim, M)
            self.wq[j].copy_(Wq.to(self.wq.dtype))
            self.wk[j].copy_(Wk.to(self.wk.dtype))

    def extra_repr(self) -> str:
        rope = f", rope_periods={self.rope_periods}" if self.rope_periods is not None else ""
        return f"heads={self.head_list}, r={self.indexer_dim}, head_dim={self.head_dim}{rope}"
