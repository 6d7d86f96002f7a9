"""Qwen3 / Qwen3-MoE model arguments and the named flavours (real shapes from the published configs)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class RopeScaling:
    """YaRN scaling, as Hugging Face's `rope_scaling = {"rope_type": "yarn", ...}`."""

    rope_type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 32768
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: 0.1 * ln(factor) + 1


@dataclass
class Qwen3ModelArgs:
    vocab_size: int = 151936
    dim: int = 1024
    n_layers: int = 28
    n_heads: int = 16
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 3072  # dense SwiGLU intermediate size
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 40960
    qk_norm: bool = True  # Qwen3; Llama / Qwen2 have none
    qkv_bias: bool = False  # Qwen2 has q/k/v biases
    tie_embeddings: bool = False
    # MoE (num_experts == 0: dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_hidden_dim: int = 768
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    # Attention backend for full-attention heads ("sdpa" | "flex"); RTPurbo is applied by a converter.
    attn_backend: str = "sdpa"
    # Token ids the tokenizer uses (for document masks / generation)
    eos_id: int = 2
    # Which HF architecture this came from (for export): "qwen3", "qwen3_moe", "llama", "qwen2", "mistral"
    hf_model_type: str = "qwen3"

    def is_moe_layer(self, layer_id: int) -> bool:
        return (
            self.num_experts > 0
            and layer_id not in self.mlp_only_layers
            and (layer_id + 1) % self.decoder_sparse_step == 0
        )

    def replace(self, **kw) -> "Qwen3ModelArgs":
        return dataclasses.replace(self, **kw)

    def num_params(self, active_only: bool = False, include_embedding: bool = True) -> int:
        d, hd = self.dim, self.head_dim
        attn = d * hd * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * hd * d
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        total = 0
        for i in range(self.n_layers):
            if self.is_moe_layer(i):
                n_exp = self.num_experts_per_tok if active_only else self.num_experts
                ffn = n_exp * 3 * d * self.moe_hidden_dim + d * self.num_experts
            else:
                ffn = 3 * d * self.hidden_dim
            total += attn + ffn + 2 * d
        total += d
        if include_embedding:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (6N over active non-embedding weights + output + causal attention)."""
        n = self.num_params(active_only=True, include_embedding=False) + self.vocab_size * self.dim
        attn = 6 * self.n_layers * self.n_heads * self.head_dim * seq_len  # 12 L H D T / 2 for causal
        return 6 * n + attn


_DENSE_COMMON = dict(head_dim=128, rope_theta=1_000_000.0, max_seq_len=40960, vocab_size=151936)
_MOE_COMMON = dict(_DENSE_COMMON, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)

qwen3_flavors: dict[str, Qwen3ModelArgs] = {
    # Trains on 2 CPU cores in a minute or two.
    "debug": Qwen3ModelArgs(
        vocab_size=4096, dim=128, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=384,
        rope_theta=10_000.0, max_seq_len=8192, tie_embeddings=True,
    ),
    "debug_moe": Qwen3ModelArgs(
        vocab_size=4096, dim=128, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=384,
        rope_theta=10_000.0, max_seq_len=8192, tie_embeddings=True,
        num_experts=8, num_experts_per_tok=2, moe_hidden_dim=128, mlp_only_layers=[0],
    ),
    # The project's own teachers (see docs/results.md): tiny ships in the repo; small trains on one H100.
    # 4.4M params: 8.8 MB in bf16, ships in the repo (assets/teachers/tiny).
    "tiny": Qwen3ModelArgs(
        vocab_size=4096, dim=256, n_layers=6, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=512,
        rope_theta=100_000.0, max_seq_len=4096, tie_embeddings=True,
    ),
    # 24M params (< 25M so its bf16 checkpoint can travel to the GPU machine), GQA with 4 KV heads.
    "small": Qwen3ModelArgs(
        vocab_size=4096, dim=512, n_layers=6, n_heads=16, n_kv_heads=4, head_dim=64, hidden_dim=1536,
        rope_theta=1_000_000.0, max_seq_len=16384, tie_embeddings=True,
    ),
    "0.6B": Qwen3ModelArgs(**_DENSE_COMMON, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=3072,
                           tie_embeddings=True),
    "1.7B": Qwen3ModelArgs(**_DENSE_COMMON, dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=6144,
                           tie_embeddings=True),
    "4B": Qwen3ModelArgs(**_DENSE_COMMON, dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, hidden_dim=9728,
                         tie_embeddings=True),
    "8B": Qwen3ModelArgs(**_DENSE_COMMON, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, hidden_dim=12288),
    "14B": Qwen3ModelArgs(**_DENSE_COMMON, dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, hidden_dim=17408),
    "32B": Qwen3ModelArgs(**_DENSE_COMMON, dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, hidden_dim=25600),
    "30B-A3B": Qwen3ModelArgs(**_MOE_COMMON, dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, hidden_dim=6144,
                              moe_hidden_dim=768, hf_model_type="qwen3_moe"),
    "235B-A22B": Qwen3ModelArgs(**_MOE_COMMON, dim=4096, n_layers=94, n_heads=64, n_kv_heads=4, hidden_dim=12288,
                                moe_hidden_dim=1536, hf_model_type="qwen3_moe"),
    "Coder-30B-A3B": Qwen3ModelArgs(
        **dict(_MOE_COMMON, rope_theta=10_000_000.0, max_seq_len=262144), dim=2048, n_layers=48, n_heads=32,
        n_kv_heads=4, hidden_dim=6144, moe_hidden_dim=768, hf_model_type="qwen3_moe",
    ),
}
for _name in ("debug_moe", "30B-A3B", "235B-A22B", "Coder-30B-A3B"):
    qwen3_flavors[_name].hf_model_type = "qwen3_moe"


def get_flavor(name: str) -> Qwen3ModelArgs:
    if name not in qwen3_flavors:
        raise KeyError(f"unknown model.flavor {name!r}; known: {', '.join(qwen3_flavors)}")
    return dataclasses.replace(qwen3_flavors[name])
