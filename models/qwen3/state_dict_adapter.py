"""Qwen3 / Qwen3-MoE (and Llama / Qwen2 / Mistral) <-> Hugging Face state-dict key mapping.

One adapter, both directions:

    adapter = Qwen3StateDictAdapter(args)
    hf_sd   = adapter.to_hf(model.state_dict())      # HF keys (+ "rtpurbo.<our key>" for unmapped weights)
    our_sd  = adapter.from_hf(hf_sd)                 # our keys, ready for model.load_state_dict(strict=True)

Key map (per layer ``i``; ``{w}`` is ``weight`` and, with q/k/v biases, ``bias``)::

    tok_embeddings.weight                  model.embed_tokens.weight
    layers.i.attention.w{q,k,v,o}.{w}      model.layers.i.self_attn.{q,k,v,o}_proj.{w}
    layers.i.attention.{q,k}_norm.weight   model.layers.i.self_attn.{q,k}_norm.weight
    layers.i.attention_norm.weight         model.layers.i.input_layernorm.weight
    layers.i.ffn_norm.weight               model.layers.i.post_attention_layernorm.weight
    layers.i.feed_forward.w{1,3,2}.weight  model.layers.i.mlp.{gate,up,down}_proj.weight
    layers.i.moe.router.gate.weight        model.layers.i.mlp.gate.weight
    layers.i.moe.experts.w{1,3,2} [E,...]  model.layers.i.mlp.experts.{j}.{gate,up,down}_proj.weight (j < E)
    norm.weight                            model.norm.weight
    output.weight                          lm_head.weight   (not written when the embeddings are tied)

``from_hf`` also accepts the fused expert layout that transformers >= 5 uses in memory
(``mlp.experts.gate_up_proj`` [E, 2*hidden, dim] and ``mlp.experts.down_proj`` [E, dim, hidden]) and drops
``*.rotary_emb.inv_freq``. ``to_hf`` always writes the per-expert layout that the published Qwen3-MoE
checkpoints (and vLLM / RTP-LLM / transformers 4.x) use.

Weights HF has no name for (RTPurbo's indexer/selector weights live under ``...attention.inner_attention.``)
are never dropped: ``to_hf`` returns them under the namespace ``rtpurbo.<our key>`` and ``from_hf`` maps
``rtpurbo.<our key>`` back to ``<our key>``. ``split_extra`` separates them so the caller decides where they
go (``models.hf_checkpoint.save_hf_checkpoint`` writes them to ``rtpurbo.safetensors`` next to the
HF shards, so the main checkpoint stays loadable by transformers).
"""

from __future__ import annotations

import logging
import re
from typing import Mapping

import torch

from models.qwen3.args import Qwen3ModelArgs

logger = logging.getLogger(__name__)

EXTRA_PREFIX = "rtpurbo."

# our key (layer-relative) -> HF key (layer-relative)
_LAYER_MAP: dict[str, str] = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
}
_LAYER_MAP_INV = {v: k for k, v in _LAYER_MAP.items()}
# stacked expert tensors: our key (layer-relative) -> HF per-expert projection name
_EXPERT_MAP: dict[str, str] = {
    "moe.experts.w1": "gate_proj",
    "moe.experts.w3": "up_proj",
    "moe.experts.w2": "down_proj",
}
_EXPERT_MAP_INV = {v: k for k, v in _EXPERT_MAP.items()}
_TOP_MAP: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_TOP_MAP_INV = {v: k for k, v in _TOP_MAP.items()}

_OUR_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_HF_FUSED_RE = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)$")
# Wrapper segments that torch.compile / activation checkpointing / FSDP put into state-dict keys.
_WRAPPER_SEGMENTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "module.")


def strip_wrapper_prefixes(key: str) -> str:
    """`layers.0._checkpoint_wrapped_module.attention.wq.weight` -> `layers.0.attention.wq.weight`."""
    for seg in _WRAPPER_SEGMENTS:
        if seg in key:
            key = key.replace(seg, "") if seg != "module." else re.sub(r"(^|\.)module\.", r"\1", key)
    return key


class Qwen3StateDictAdapter:
    """Maps our state dict to/from Hugging Face's Qwen3 / Qwen3-MoE / Llama / Qwen2 / Mistral layout."""

    extra_prefix = EXTRA_PREFIX

    def __init__(self, args: Qwen3ModelArgs):
        self.args = args

    # ------------------------------------------------------------------ ours -> HF
    def hf_key(self, key: str) -> str | None:
        """HF name of one of our (non-expert) keys; None when HF has no name for it."""
        if key in _TOP_MAP:
            return _TOP_MAP[key]
        m = _OUR_LAYER_RE.match(key)
        if m and m.group(2) in _LAYER_MAP:
            return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
        return None

    def hf_expert_keys(self, key: str, num_experts: int) -> list[str] | None:
        """HF per-expert names of one of our stacked expert tensors (None if `key` is not one)."""
        m = _OUR_LAYER_RE.match(key)
        if not m or m.group(2) not in _EXPERT_MAP:
            return None
        proj = _EXPERT_MAP[m.group(2)]
        return [f"model.layers.{m.group(1)}.mlp.experts.{j}.{proj}.weight" for j in range(num_experts)]

    def describe_hf_keys(self, key: str) -> str:
        """Human-readable HF name(s) for one of our keys (for error messages)."""
        if self.hf_key(key) is not None:
            return self.hf_key(key)
        m = _OUR_LAYER_RE.match(key)
        if m and m.group(2) in _EXPERT_MAP:
            return f"model.layers.{m.group(1)}.mlp.experts.{{j}}.{_EXPERT_MAP[m.group(2)]}.weight"
        return EXTRA_PREFIX + key

    def hf_names(self, key: str, shape: tuple[int, ...] | torch.Size) -> list[tuple[str, int | None]]:
        """``[(HF key, expert row or None)]`` that one of our tensors (of `shape`) is written as.

        [] for ``output.weight`` of a tied model; E entries for a stacked [E, ...] expert tensor;
        ``rtpurbo.<key>`` for weights HF has no name for (never dropped).
        """
        key = strip_wrapper_prefixes(key)
        if key == "output.weight" and self.args.tie_embeddings:
            return []
        hf = self.hf_key(key)
        if hf is not None:
            return [(hf, None)]
        names = self.hf_expert_keys(key, int(shape[0])) if len(shape) else None
        if names is not None:
            return [(name, j) for j, name in enumerate(names)]
        return [(key if key.startswith(EXTRA_PREFIX) else EXTRA_PREFIX + key, None)]

    def to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict -> HF state dict.

        Stacked experts [E, ...] become E per-expert tensors (views, no copy). `output.weight` is left out
        when the embeddings are tied (HF re-ties `lm_head` on load). Keys HF has no name for are returned as
        ``rtpurbo.<our key>`` (never dropped); use `split_extra` to separate them.
        """
        out: dict[str, torch.Tensor] = {}
        for key, t in state_dict.items():
            for name, j in self.hf_names(key, t.shape):
                out[name] = t if j is None else t[j]
        return out

    # ------------------------------------------------------------------ HF -> ours
    def from_hf_tensor(self, hf_key: str, tensor: torch.Tensor) -> list[tuple[str, int | None, torch.Tensor]]:
        """Map one HF tensor to pieces ``(our key, expert index or None, tensor)``.

        Expert index ``j`` means "row j of the stacked [E, ...] tensor". Returns [] for tensors that are
        dropped (`rotary_emb.inv_freq`, `lm_head.weight` of a tied model). Raises KeyError naming the key
        when the name is not a known weight. Used by `from_hf` and by the streaming shard loader.
        """
        if hf_key.startswith(EXTRA_PREFIX):
            return [(hf_key[len(EXTRA_PREFIX):], None, tensor)]
        if hf_key.endswith("rotary_emb.inv_freq"):
            return []
        if hf_key in _TOP_MAP_INV:
            ours = _TOP_MAP_INV[hf_key]
            if ours == "output.weight" and self.args.tie_embeddings:
                return []  # tied: lm_head is the embedding (compared by the loader when both are present)
            return [(ours, None, tensor)]
        m = _HF_LAYER_RE.match(hf_key)
        if m:
            layer, rest = m.group(1), m.group(2)
            if rest in _LAYER_MAP_INV:
                return [(f"layers.{layer}.{_LAYER_MAP_INV[rest]}", None, tensor)]
            em = _HF_EXPERT_RE.match(rest)
            if em:
                return [(f"layers.{layer}.{_EXPERT_MAP_INV[em.group(2)]}", int(em.group(1)), tensor)]
            fm = _HF_FUSED_RE.match(rest)
            if fm:
                if fm.group(1) == "down_proj":
                    return [(f"layers.{layer}.moe.experts.w2", None, tensor)]
                if tensor.dim() != 3 or tensor.shape[1] % 2:
                    raise KeyError(
                        f"{hf_key}: fused gate_up_proj must be [E, 2*hidden, dim], got {tuple(tensor.shape)}"
                    )
                h = tensor.shape[1] // 2
                return [
                    (f"layers.{layer}.moe.experts.w1", None, tensor[:, :h]),
                    (f"layers.{layer}.moe.experts.w3", None, tensor[:, h:]),
                ]
        raise KeyError(
            f"unexpected key {hf_key!r}: not a Qwen3/Qwen3-MoE/Llama/Qwen2 weight name "
            f"(weights outside the HF model belong under the {EXTRA_PREFIX!r} prefix)"
        )

    def from_hf(self, hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF state dict -> our state dict (experts stacked to [E, ...]; `output.weight` is the embedding
        when tied; ``rtpurbo.<key>`` -> ``<key>``). Raises KeyError naming the key for unknown names,
        duplicate or missing experts."""
        out: dict[str, torch.Tensor] = {}
        experts: dict[str, dict[int, torch.Tensor]] = {}
        expert_src: dict[str, str] = {}
        for hf_key, t in hf_state_dict.items():
            for ours, j, piece in self.from_hf_tensor(hf_key, t):
                if j is None:
                    if ours in out:
                        raise KeyError(f"{hf_key}: {ours!r} given twice (per-expert and fused layouts mixed?)")
                    out[ours] = piece
                else:
                    slot = experts.setdefault(ours, {})
                    if j in slot:
                        raise KeyError(f"{hf_key}: expert {j} given twice")
                    slot[j] = piece
                    expert_src[ours] = hf_key
        for ours, pieces in experts.items():
            if ours in out:
                raise KeyError(f"{expert_src[ours]}: {ours!r} given twice (per-expert and fused layouts mixed?)")
            n = max(pieces) + 1
            if self.args.num_experts and n < self.args.num_experts:
                n = self.args.num_experts
            missing = [j for j in range(n) if j not in pieces]
            if missing:
                example = self.describe_hf_keys(ours).replace("{j}", str(missing[0]))
                raise KeyError(f"missing key {example!r} (experts {missing} of {ours!r} absent)")
            out[ours] = torch.stack([pieces[j] for j in range(n)])
        if self.args.tie_embeddings and "tok_embeddings.weight" in out:
            out["output.weight"] = out["tok_embeddings.weight"]
        return out

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def split_extra(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Split an HF-side dict into (HF model weights, ``rtpurbo.*`` extra weights)."""
        main, extra = {}, {}
        for k, v in state_dict.items():
            (extra if k.startswith(EXTRA_PREFIX) else main)[k] = v
        return main, extra

    @staticmethod
    def is_extra_key(hf_key: str) -> bool:
        return hf_key.startswith(EXTRA_PREFIX)
