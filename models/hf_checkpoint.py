"""Hugging Face checkpoints (config.json + safetensors, single file or sharded with an index) <-> our model.

    args, model = load_hf_checkpoint("Qwen3-0.6B/", device="cuda", dtype=torch.bfloat16)
    save_hf_checkpoint(model, "out/", dtype=torch.bfloat16,
                       extra_config={"rtpurbo": {...}, "headwise_config": {...}},
                       extra_tensors={"rtpurbo.layers.0.attention.inner_attention.xxx": t})
    extra = load_extra_tensors("out/")

* Loading streams the shards: one shard open at a time (safetensors ``safe_open``, memory-mapped), one tensor
  at a time copied into the already-allocated parameter, so peak memory is the model plus one tensor.
* Saving is atomic: everything is written into a hidden sibling directory which is ``os.replace``-d onto
  ``path`` at the end; a killed or failed save never leaves a directory at ``path`` that looks complete.
* Weights HF has no name for (RTPurbo's indexer weights, ``extra_tensors``) go to ``rtpurbo.safetensors``,
  not into the HF shards, so transformers / vLLM / RTP-LLM load the main checkpoint unchanged.
* Every mismatch raises `HFCheckpointError` naming the key, the file and both shapes.

See docs/hf_checkpoints.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn

from models.qwen3.args import Qwen3ModelArgs, RopeScaling
from models.qwen3.state_dict_adapter import EXTRA_PREFIX, Qwen3StateDictAdapter, strip_wrapper_prefixes

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
EXTRA_WEIGHTS_NAME = "rtpurbo.safetensors"
# Files copied by `copy_files_from` (tokenizer and generation settings; never weights or config.json).
AUX_FILE_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
)
_PROGRESS_MIN_SHARDS = 4

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe", "llama", "qwen2", "mistral")
_ARCHITECTURES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
_ARCH_TO_TYPE = {v: k for k, v in _ARCHITECTURES.items()}


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint does not match the model (the message names the key, file and shapes)."""


class HFCheckpointFileNotFound(HFCheckpointError, FileNotFoundError):
    """config.json, the weights or a shard named by the index is missing."""


# ---------------------------------------------------------------------------------------------- config
def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        return str(_parse_dtype(dtype)).removeprefix("torch.")
    return str(dtype).removeprefix("torch.")


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    d = getattr(torch, name, None)
    if not isinstance(d, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return d


def _rope_from_config(config: Mapping[str, Any], max_pos: int) -> tuple[float, RopeScaling | None]:
    """(rope_theta, RopeScaling | None) from either the legacy (`rope_theta` + `rope_scaling`) or the
    transformers >= 5 (`rope_parameters`) form, with HF's defaults (see modeling_rope_utils)."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    params = dict(params)
    theta = params.get("rope_theta", config.get("rope_theta", 10_000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "yarn":
        raise NotImplementedError(
            f"rope_scaling rope_type {rope_type!r} is not supported (only default RoPE and 'yarn'); "
            "models/qwen3/rope.py would need it"
        )
    if params.get("truncate", True) is False:
        raise NotImplementedError("yarn rope_scaling with truncate=false is not supported by models/qwen3/rope.py")
    orig = config.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / orig

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None and params.get("mscale") and params.get("mscale_all_dim"):
        attention_factor = get_mscale(factor, params["mscale"]) / get_mscale(factor, params["mscale_all_dim"])
    scaling = RopeScaling(
        rope_type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=None if attention_factor is None else float(attention_factor),
    )
    return float(theta), scaling


def args_from_hf_config(config: Mapping[str, Any]) -> Qwen3ModelArgs:
    """Our model args from a Hugging Face config.json dict (qwen3, qwen3_moe, llama, qwen2, mistral)."""
    config = dict(config)
    model_type = config.get("model_type")
    if model_type is None:
        for arch in config.get("architectures") or []:
            model_type = _ARCH_TO_TYPE.get(arch)
            if model_type:
                break
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"config.json model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise NotImplementedError(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
    if config.get("mlp_bias"):
        raise NotImplementedError("mlp_bias=true is not supported (our SwiGLU has no biases)")
    if model_type != "qwen2" and config.get("attention_bias"):
        raise NotImplementedError(
            f"attention_bias=true for {model_type} also puts a bias on o_proj, which our Attention lacks "
            "(only Qwen2's q/k/v biases are supported)"
        )
    dim = int(config["hidden_size"])
    n_heads = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_heads)
    head_dim = config.get("head_dim")
    if head_dim is None:
        head_dim = 128 if model_type == "qwen3" else dim // n_heads  # Qwen3Config's own default is 128
    max_pos = int(config.get("max_position_embeddings", 32768))
    theta, scaling = _rope_from_config(config, max_pos)
    sliding = config.get("sliding_window")
    if (config.get("use_sliding_window") or (model_type == "mistral" and sliding)) and sliding and sliding < max_pos:
        logger.warning(
            "config.json asks for sliding-window attention (window %s); this model attends to the full context, "
            "so outputs differ from transformers beyond %s tokens", sliding, sliding,
        )
    eos = config.get("eos_token_id")
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    kw: dict[str, Any] = dict(
        vocab_size=int(config["vocab_size"]),
        dim=dim,
        n_layers=int(config["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=int(head_dim),
        hidden_dim=int(config.get("intermediate_size") or 0),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=max_pos,
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        hf_model_type=model_type,
    )
    if eos is not None:
        kw["eos_id"] = int(eos)
    if model_type == "qwen3_moe":
        kw.update(
            # transformers >= 5 saves `num_experts` under its attribute_map name `num_local_experts`
            num_experts=int(config.get("num_experts") or config.get("num_local_experts") or 128),
            num_experts_per_tok=int(config.get("num_experts_per_tok", 8)),
            moe_hidden_dim=int(config.get("moe_intermediate_size", 768)),
            norm_topk_prob=bool(config.get("norm_topk_prob", False)),  # HF's default is False
            decoder_sparse_step=int(config.get("decoder_sparse_step", 1)),
            mlp_only_layers=[int(i) for i in (config.get("mlp_only_layers") or [])],
            router_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.001)),
        )
        if kw["hidden_dim"] == 0:
            kw["hidden_dim"] = 6144  # Qwen3MoeConfig default (only used by mlp_only_layers)
    else:
        kw["num_experts"] = 0
    return Qwen3ModelArgs(**kw)


def hf_config_from_args(args: Qwen3ModelArgs, dtype: torch.dtype | str | None = "bfloat16") -> dict[str, Any]:
    """A config.json dict that transformers (4.51+ and 5.x) accepts for ``args.hf_model_type``.

    RoPE is written in the legacy ``rope_theta`` + ``rope_scaling`` form that the published Qwen3 configs,
    transformers 4.x, vLLM and RTP-LLM read (transformers 5 converts it to ``rope_parameters``). ``dtype``
    is the dtype of the saved weights (``torch_dtype`` for 4.x readers, ``dtype`` for 5.x).
    """
    model_type = args.hf_model_type or ("qwen3_moe" if args.num_experts else "qwen3")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"hf_model_type {model_type!r} not supported ({', '.join(SUPPORTED_MODEL_TYPES)})")
    want_qk_norm = model_type in ("qwen3", "qwen3_moe")
    if args.qk_norm != want_qk_norm:
        raise ValueError(f"hf_model_type {model_type!r} {'needs' if want_qk_norm else 'has no'} QK-norm, "
                         f"but args.qk_norm={args.qk_norm}")
    if args.qkv_bias != (model_type == "qwen2"):
        raise ValueError(f"args.qkv_bias={args.qkv_bias} cannot be expressed as a {model_type!r} config "
                         "(only qwen2 has q/k/v biases without an o_proj bias)")
    if (args.num_experts > 0) != (model_type == "qwen3_moe"):
        raise ValueError(f"num_experts={args.num_experts} does not fit hf_model_type {model_type!r}")
    rope_scaling = None
    if args.rope_scaling is not None and args.rope_scaling.rope_type not in ("default", "none"):
        sc = args.rope_scaling
        rope_scaling = {
            "rope_type": sc.rope_type,
            "factor": float(sc.factor),
            "original_max_position_embeddings": int(sc.original_max_position_embeddings),
            "beta_fast": float(sc.beta_fast),
            "beta_slow": float(sc.beta_slow),
        }
        if sc.attention_factor is not None:
            rope_scaling["attention_factor"] = float(sc.attention_factor)
    cfg: dict[str, Any] = {
        "architectures": [_ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "initializer_range": 0.02,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_dropout": 0.0,
        "use_cache": True,
        "eos_token_id": args.eos_id,
    }
    if model_type in ("qwen3", "qwen3_moe", "llama"):
        cfg["attention_bias"] = False
    if model_type in ("qwen3", "qwen3_moe", "qwen2"):
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.n_layers)
    if model_type == "mistral":
        cfg["sliding_window"] = None
    if model_type == "llama":
        cfg.update(mlp_bias=False, pretraining_tp=1)
    if model_type == "qwen3_moe":
        cfg.update(
            num_experts=args.num_experts,
            num_experts_per_tok=args.num_experts_per_tok,
            moe_intermediate_size=args.moe_hidden_dim,
            norm_topk_prob=args.norm_topk_prob,
            decoder_sparse_step=args.decoder_sparse_step,
            mlp_only_layers=list(args.mlp_only_layers),
            router_aux_loss_coef=args.router_aux_loss_coef,
            output_router_logits=False,
        )
    name = _dtype_name(dtype)
    if name is not None:
        cfg["torch_dtype"] = name
        cfg["dtype"] = name
    return cfg


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a checkpoint directory (or the path of a config.json file itself)."""
    p = Path(path)
    f = p if p.is_file() else p / CONFIG_NAME
    if not f.is_file():
        raise HFCheckpointFileNotFound(f"missing {CONFIG_NAME}: {f} does not exist")
    with open(f) as fh:
        return json.load(fh)


# ---------------------------------------------------------------------------------------------- loading
def _progress(it, total: int, desc: str):
    """A tqdm bar over shards when there are many of them (rank 0 only under torch.distributed)."""
    if total < _PROGRESS_MIN_SHARDS:
        return it
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, total=total, desc=desc, unit="shard")


def hf_weight_files(path: str | os.PathLike) -> tuple[list[Path], dict[str, str] | None]:
    """Weight files of a checkpoint directory: ([model.safetensors], None) or (shards, index weight_map)."""
    p = Path(path)
    index = p / WEIGHTS_INDEX_NAME
    if index.is_file():
        with open(index) as fh:
            weight_map: dict[str, str] = json.load(fh)["weight_map"]
        files = []
        for name in dict.fromkeys(weight_map.values()):  # ordered, unique
            f = p / name
            if not f.is_file():
                keys = [k for k, v in weight_map.items() if v == name]
                raise HFCheckpointFileNotFound(
                    f"shard {f} named by {index} is missing (holds {len(keys)} tensors, e.g. {keys[0]!r})"
                )
            files.append(f)
        return files, weight_map
    single = p / WEIGHTS_NAME
    if single.is_file():
        return [single], None
    others = sorted(x.name for x in p.glob("*.safetensors") if x.name != EXTRA_WEIGHTS_NAME)
    hint = f" (found {others}; is the index file missing?)" if others else ""
    if (p / "pytorch_model.bin").exists() or (p / "pytorch_model.bin.index.json").exists():
        hint = " (only pytorch_model.bin found: re-save it with safetensors)"
    raise HFCheckpointFileNotFound(f"missing weights in {p}: neither {WEIGHTS_INDEX_NAME} nor {WEIGHTS_NAME}{hint}")


def _iter_file_tensors(f: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(f), framework="pt", device="cpu") as fh:
        for key in fh.keys():
            yield key, fh.get_tensor(key)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


def _target_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our keys -> the live parameter / persistent buffer (wrapper prefixes stripped)."""
    return {strip_wrapper_prefixes(k): v for k, v in model.state_dict(keep_vars=True).items()}


@torch.no_grad()
def _copy_into(target: torch.Tensor, src: torch.Tensor, index: int | None) -> None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # type: ignore[assignment]
    if isinstance(target, DTensor):
        raise TypeError("internal: DTensor targets are filled whole by _load_into")
    dst = target.data if index is None else target.data[index]
    dst.copy_(src)


@torch.no_grad()
def _fill_dtensor(target, full: torch.Tensor) -> None:
    from torch.distributed.tensor import distribute_tensor

    try:
        d = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                              src_data_rank=None)  # every rank read the same file: no communication
    except TypeError:  # older torch: no src_data_rank
        d = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements)
    target.to_local().copy_(d.to_local())


def load_hf_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> list[str]:
    """Stream the HF weights of checkpoint directory `path` into an already-built `model` (in place).

    Shards are opened one at a time and every tensor is copied straight into its parameter (cast to the
    parameter's dtype/device), so peak memory is the model plus one tensor. FSDP2-sharded (DTensor)
    parameters are filled from the full tensor that every rank reads (no communication). Raises
    `HFCheckpointError` naming the key, the file and both shapes on any mismatch; with ``strict`` also for
    missing or unexpected keys. ``rtpurbo.*`` tensors (from ``rtpurbo.safetensors`` or the shards) fill the
    matching parameters of a model that has them (an RTPurbo-converted model) and are otherwise skipped
    (see `load_extra_tensors`). Returns the keys that were skipped.
    """
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()  # type: ignore[assignment]

    base = _unwrap(model)
    args: Qwen3ModelArgs = base.args
    adapter = Qwen3StateDictAdapter(args)
    targets = _target_tensors(base)
    tied = args.tie_embeddings
    required = {k for k in targets if not (tied and k == "output.weight")}
    # required entries -> done (True) or, for stacked experts, the set of expert rows filled so far
    filled: dict[str, Any] = {}
    pending_dt: dict[str, dict[int | None, torch.Tensor]] = {}  # DTensor targets: pieces until complete
    skipped: list[str] = []
    tied_lm_head: tuple[str, torch.Tensor] | None = None
    files, weight_map = hf_weight_files(path)
    extra_file = Path(path) / EXTRA_WEIGHTS_NAME
    all_files = files + ([extra_file] if extra_file.is_file() else [])

    for f in _progress(all_files, len(all_files), "loading shards"):
        for hf_key, tensor in _iter_file_tensors(f):
            if f == extra_file and not hf_key.startswith(EXTRA_PREFIX):
                skipped.append(hf_key)  # a caller's own extra tensor: see load_extra_tensors
                continue
            if tied and hf_key == "lm_head.weight":
                tied_lm_head = (str(f), tensor)
                continue
            try:
                pieces = adapter.from_hf_tensor(hf_key, tensor)
            except KeyError as e:
                if strict:
                    raise HFCheckpointError(f"{e.args[0]} (file {f})") from None
                skipped.append(hf_key)
                continue
            for ours, j, piece in pieces:
                if ours not in targets:
                    if hf_key.startswith(EXTRA_PREFIX):
                        skipped.append(hf_key)  # RTPurbo weights for a model that has no RTPurbo backend yet
                        continue
                    if strict:
                        raise HFCheckpointError(
                            f"unexpected key {hf_key!r} in file {f}: it maps to {ours!r}, which the model "
                            f"(n_layers={args.n_layers}, num_experts={args.num_experts}, "
                            f"mlp_only_layers={args.mlp_only_layers}, decoder_sparse_step="
                            f"{args.decoder_sparse_step}) does not have"
                        )
                    skipped.append(hf_key)
                    continue
                target = targets[ours]
                want = tuple(target.shape) if j is None else tuple(target.shape[1:])
                if j is not None and j >= target.shape[0]:
                    raise HFCheckpointError(
                        f"unexpected key {hf_key!r} in file {f}: expert {j} but {ours!r} has "
                        f"{target.shape[0]} experts"
                    )
                if tuple(piece.shape) != want:
                    raise HFCheckpointError(
                        f"shape mismatch for key {hf_key!r} in file {f}: checkpoint has {tuple(piece.shape)}, "
                        f"model expects {want} (for {ours!r}{'' if j is None else f' expert {j}'})"
                    )
                if isinstance(target, DTensor):
                    pending_dt.setdefault(ours, {})[j] = piece.clone() if j is not None else piece
                    if j is None:
                        _fill_dtensor(target, piece)
                        filled[ours] = True
                        pending_dt.pop(ours)
                    elif len(pending_dt[ours]) == target.shape[0]:
                        p = pending_dt.pop(ours)
                        _fill_dtensor(target, torch.stack([p[i] for i in range(target.shape[0])]))
                        filled[ours] = True
                    else:
                        filled[ours] = set(k for k in pending_dt[ours])
                    continue
                _copy_into(target, piece, j)
                if j is None:
                    filled[ours] = True
                else:
                    s = filled.setdefault(ours, set())
                    if s is True:
                        s = filled[ours] = set()
                    s.add(j)
                    if len(s) == target.shape[0]:
                        filled[ours] = True
            del tensor, pieces

    if tied_lm_head is not None:
        f, lm = tied_lm_head
        emb = targets["tok_embeddings.weight"]
        emb_full = emb.full_tensor() if isinstance(emb, DTensor) else emb
        if tuple(lm.shape) != tuple(emb_full.shape):
            raise HFCheckpointError(
                f"shape mismatch for key 'lm_head.weight' in file {f}: checkpoint has {tuple(lm.shape)}, "
                f"tied embedding is {tuple(emb_full.shape)}"
            )
        if not torch.equal(lm.to(emb_full.device, emb_full.dtype), emb_full.detach()):
            logger.warning("tie_word_embeddings=true but lm_head.weight in %s differs from the embedding; "
                           "using the embedding (as transformers does)", f)

    missing = [k for k in sorted(required) if filled.get(k) is not True]
    if missing and strict:
        src = f"index {Path(path) / WEIGHTS_INDEX_NAME}" if weight_map is not None else str(files[0])
        lines = []
        for k in missing[:10]:
            state = filled.get(k)
            part = f" (experts {sorted(set(range(targets[k].shape[0])) - state)[:8]} absent)" if state else ""
            lines.append(f"{adapter.describe_hf_keys(k)} -> {k}{part}")
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise HFCheckpointError(f"missing key(s) in {src}: " + "; ".join(lines) + more)
    if skipped:
        logger.info("skipped %d checkpoint tensors the model has no parameter for (e.g. %s)", len(skipped),
                    skipped[0])
    return skipped


def load_hf_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[Qwen3ModelArgs, nn.Module]:
    """Read config.json + model.safetensors (or the sharded index form) into a new model.

    The model is built with ``build_model(args, device, init=False)`` directly in ``dtype`` (None: float32,
    our training default) and the weights are streamed in strictly (see `load_hf_weights`).
    Extra RTPurbo tensors (``rtpurbo.safetensors``) are not applied: use `load_extra_tensors`.
    """
    path = Path(path)
    if not path.is_dir():
        raise HFCheckpointFileNotFound(f"checkpoint directory {path} does not exist")
    args = args_from_hf_config(read_hf_config(path))
    hf_weight_files(path)  # fail fast on missing weights before allocating the model
    model = build_empty_model(args, device, dtype)
    load_hf_weights(model, path, strict=True)
    return args, model


def build_empty_model(
    args: Qwen3ModelArgs, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> nn.Module:
    """``build_model(args, device, init=False)`` with the parameters allocated directly in ``dtype``
    (None: float32), so a bf16 load never holds a float32 copy. The RoPE buffer stays float32."""
    from models.qwen3.model import build_model

    dt = _parse_dtype(dtype) or torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        model = build_model(args, device, init=False)
    finally:
        torch.set_default_dtype(prev)
    model.rope_inv_freq = model.rope_inv_freq.float()
    return model


def load_extra_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors saved beside the HF weights: everything in ``rtpurbo.safetensors`` plus any ``rtpurbo.*``
    tensors found in the main weight files. Keys are as saved (model weights as ``rtpurbo.<our key>``:
    ``Qwen3StateDictAdapter(args).from_hf(extra)`` gives our keys). {} when there are none."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    out: dict[str, torch.Tensor] = {}
    f = p / EXTRA_WEIGHTS_NAME
    if f.is_file():
        out.update(load_file(str(f)))
    try:
        files, weight_map = hf_weight_files(p)
    except HFCheckpointFileNotFound:
        return out
    for wf in files:
        if weight_map is not None and not any(k.startswith(EXTRA_PREFIX) and v == wf.name
                                              for k, v in weight_map.items()):
            continue
        with safe_open(str(wf), framework="pt", device="cpu") as fh:
            for k in fh.keys():
                if k.startswith(EXTRA_PREFIX) and k not in out:
                    out[k] = fh.get_tensor(k)
    return out


# ---------------------------------------------------------------------------------------------- saving
def _write_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str] | None = None) -> None:
    """The one place files are written (tests monkeypatch it to simulate a crash mid-save)."""
    from safetensors.torch import save_file

    save_file(tensors, str(file), metadata=metadata)
    _fsync(file)


def _write_json(obj: Any, file: Path) -> None:
    with open(file, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _fsync(file: Path) -> None:
    try:
        fd = os.open(str(file), os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover (directories on some filesystems)
        pass
    finally:
        os.close(fd)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _materialize(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A CPU tensor in `dtype` with its own compact storage (safetensors refuses shared storage)."""
    if _is_dtensor(t):
        t = t.full_tensor()
    t = t.detach()
    out = t.to(device="cpu", dtype=dtype if dtype is not None else t.dtype)
    if out.data_ptr() == t.data_ptr() or not out.is_contiguous() or out.storage_offset() != 0 \
            or out.untyped_storage().nbytes() != out.numel() * out.element_size():
        out = out.contiguous().clone()
    return out


class _Gatherer:
    """Full (unsharded) tensors of our keys, gathered on demand; stacked expert tensors are kept in a tiny
    LRU so E per-expert rows cost one all-gather. Every rank must make the same calls (collectives)."""

    def __init__(self, state: Mapping[str, torch.Tensor], cache_size: int = 3):
        self.state = state
        self.cache: dict[str, torch.Tensor] = {}
        self.cache_size = cache_size

    def get(self, key: str, row: int | None) -> torch.Tensor:
        t = self.state[key]
        if not _is_dtensor(t):
            return t if row is None else t[row]
        if row is None:
            return t.full_tensor()
        if key not in self.cache:
            if len(self.cache) >= self.cache_size:
                self.cache.pop(next(iter(self.cache)))
            self.cache[key] = t.full_tensor()
        return self.cache[key][row]


def _hf_sort_key(k: str):
    """embed_tokens, layers in numeric order (a layer's experts grouped by projection, then numerically),
    model.norm, lm_head, extras."""
    parts = k.split(".")
    top = 0 if "embed_tokens" in k else 2 if k.startswith("model.norm") else 3 if k.startswith("lm_head") else 1
    if k.startswith(EXTRA_PREFIX):
        top = 4
    if len(parts) >= 6 and parts[3:5] == ["mlp", "experts"] and parts[5].isdigit():
        parts = parts[:5] + parts[6:] + [parts[5]]  # ...experts.<proj>.weight.<j>
    return (top, [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts])


def _dist_info() -> tuple[bool, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized() and d.get_world_size() > 1:
        return True, d.get_rank()
    return False, 0


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished `tmp` onto `final` (os.replace; an existing `final` is moved aside first)."""
    old = None
    if final.exists() or final.is_symlink():
        if final.is_dir() and not final.is_symlink():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        else:
            raise FileExistsError(f"{final} exists and is not a directory")
    os.replace(tmp, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_hf_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    max_shard_size_bytes: int = 5 * 2**30,
    dtype: torch.dtype | str | None = None,
    extra_config: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    copy_files_from: str | os.PathLike | None = None,
) -> Path:
    """Write `model` as a Hugging Face checkpoint directory at `path`, atomically.

    * ``config.json`` = `hf_config_from_args(model.args)` with ``extra_config`` merged at the top level
      (e.g. ``{"rtpurbo": {...}, "headwise_config": {...}}``; its keys win).
    * ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` when
      the weights exceed ``max_shard_size_bytes``. ``lm_head.weight`` is not written for tied embeddings.
    * ``rtpurbo.safetensors``: model weights HF has no name for (as ``rtpurbo.<our key>``) plus
      ``extra_tensors`` (keys as given), so the main checkpoint stays loadable by transformers.
    * ``copy_files_from``: a directory whose tokenizer / generation_config files are copied along.

    Everything is written to a hidden temporary sibling directory, fsync-ed, and ``os.replace``-d onto
    ``path`` at the end (an existing directory at ``path`` is replaced). If the save fails the temporary
    directory is removed; if the process is killed only a hidden ``.<name>.tmp-*`` directory can remain.
    A model with FSDP2 (DTensor) parameters must be passed in by every rank: the parameters are
    all-gathered one tensor (stacked experts: one [E, ...] tensor) at a time and rank 0 alone writes; all
    ranks raise if rank 0's write failed. A plain (unsharded) model is written by whichever rank calls,
    with no collectives (e.g. rank 0 alone with a gathered copy). Returns the final path.
    """
    base = _unwrap(model)
    args: Qwen3ModelArgs = base.args
    dt = _parse_dtype(dtype)
    adapter = Qwen3StateDictAdapter(args)
    state = {strip_wrapper_prefixes(k): v for k, v in base.state_dict().items()}
    # HF key -> (our key, expert row or None); tensors are only gathered/copied shard by shard below
    where: dict[str, tuple[str, int | None]] = {}
    for key, t in state.items():
        for name, j in adapter.hf_names(key, t.shape):
            where[name] = (key, j)
    main_keys = [k for k in where if not adapter.is_extra_key(k)]
    extra_keys = [k for k in where if adapter.is_extra_key(k)]
    if extra_tensors:
        clash = sorted(set(extra_tensors) & set(where))
        if clash:
            raise ValueError(f"extra_tensors key {clash[0]!r} collides with a model weight")
    saved_dtype = dt or state["tok_embeddings.weight"].dtype
    config = hf_config_from_args(args, dtype=saved_dtype)
    if extra_config:
        config.update(extra_config)

    def nbytes(k: str) -> int:
        our, j = where[k]
        shape = state[our].shape if j is None else state[our].shape[1:]
        return math.prod(shape) * (torch.empty((), dtype=dt or state[our].dtype).element_size())

    main_keys.sort(key=_hf_sort_key)
    shards: list[list[str]] = [[]]
    size = 0
    for k in main_keys:
        n = nbytes(k)
        if shards[-1] and size + n > max_shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    n_shards = len(shards)

    # Collective protocol only for sharded (DTensor) models, which every rank must pass in; a plain model
    # is written by whichever rank calls (e.g. rank 0 alone with a gathered copy).
    distributed, rank = _dist_info()
    distributed = distributed and any(_is_dtensor(t) for t in state.values())
    writer = not distributed or rank == 0
    final = Path(path).absolute()
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    error: BaseException | None = None
    gather = _Gatherer(state)
    metadata = {"format": "pt"}
    if writer:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for i, keys in enumerate(_progress(shards, n_shards, "saving shards")):
            name = WEIGHTS_NAME if n_shards == 1 else f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            if not writer:  # only take part in the all-gathers of sharded (DTensor) parameters
                for k in keys:
                    if _is_dtensor(state[where[k][0]]):
                        gather.get(*where[k])
                continue
            tensors = {k: _materialize(gather.get(*where[k]), dt) for k in keys}
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            if error is None:
                try:
                    _write_safetensors(tensors, tmp / name, metadata)
                except Exception as e:  # keep joining the collectives; re-raised below
                    error = e
            del tensors
            weight_map.update({k: name for k in keys})
        extras = {k: _materialize(gather.get(*where[k]), None) for k in extra_keys}
        if extra_tensors:
            extras.update({k: _materialize(v, None) for k, v in extra_tensors.items()})
        if writer and error is None:
            try:
                if n_shards > 1:
                    _write_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                                tmp / WEIGHTS_INDEX_NAME)
                if extras:
                    _write_safetensors(extras, tmp / EXTRA_WEIGHTS_NAME, metadata)
                if copy_files_from is not None:
                    src = Path(copy_files_from)
                    for fname in AUX_FILE_PATTERNS:
                        if (src / fname).is_file():
                            shutil.copy2(src / fname, tmp / fname)
                _write_json(config, tmp / CONFIG_NAME)  # last: a directory with config.json has all its weights
                _fsync(tmp)
                _replace_dir(tmp, final)
            except Exception as e:
                error = e
    except BaseException as e:  # KeyboardInterrupt, or a failure while gathering
        error = e
    if writer and error is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    if distributed:  # every rank learns whether rank 0 succeeded
        flag = [None if error is None else f"{type(error).__name__}: {error}"]
        torch.distributed.broadcast_object_list(flag, src=0)
        if flag[0] is not None and error is None:
            raise RuntimeError(f"save_hf_checkpoint failed on rank 0: {flag[0]}")
    if error is not None:
        raise error
    return final
