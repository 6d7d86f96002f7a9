"""Convert between Hugging Face checkpoints and our DCP (torch.distributed.checkpoint) checkpoints.

    # HF directory (config.json + safetensors) -> OUT/step-0 (DCP, state {"model": state_dict})
    python -m scripts.convert_hf hf-to-dcp Qwen3-0.6B/ outputs/checkpoint [--step 0] [--dtype float32]

    # DCP checkpoint (a step folder, or a folder of step-N folders: the latest, or --step N) -> HF directory
    python -m scripts.convert_hf dcp-to-hf outputs/checkpoint hf_out/ --flavor tiny [--dtype bfloat16]
    python -m scripts.convert_hf dcp-to-hf outputs/checkpoint/step-600 hf_out/ --hf-config Qwen3-0.6B/ \
        [--extra-config rtpurbo.json] [--copy-files-from Qwen3-0.6B/] [--max-shard-size 5GB]

The architecture for dcp-to-hf comes from --flavor (models/qwen3/args.py) or --hf-config (a config.json or a
directory holding one); without either, the `hf_config.json` that hf-to-dcp leaves in the step folder is
used. The vocab size is taken from the checkpoint when it differs from the flavour's. Weights in the DCP
checkpoint that HF has no name for (RTPurbo's `...inner_attention.*`) are written to `rtpurbo.safetensors`.
See docs/hf_checkpoints.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import warnings
from pathlib import Path

logger = logging.getLogger("convert_hf")

HF_CONFIG_IN_DCP = "hf_config.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def _parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", s.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 5GB, 500MB, 1048576)")
    n = float(m.group(1))
    unit = (m.group(2) or "B").rstrip("B").rstrip("I")
    mult = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    return int(n * mult)


def find_step_dir(path: str | Path, step: int | None = None) -> Path:
    """A DCP step folder: `path` itself when it holds `.metadata`, else `path/step-<step>` (latest if None)."""
    p = Path(path)
    if step is None and (p / ".metadata").is_file():
        return p
    if step is not None:
        d = p / f"step-{step}"
        if not (d / ".metadata").is_file():
            raise FileNotFoundError(f"no DCP checkpoint at {d} (missing .metadata)")
        return d
    steps = sorted(
        (int(m.group(1)), c) for c in p.glob("step-*") if (m := _STEP_RE.match(c.name)) and (c / ".metadata").is_file()
    )
    if not steps:
        raise FileNotFoundError(f"no DCP checkpoint in {p} (no .metadata and no complete step-N folders)")
    return steps[-1][1]


def hf_to_dcp(hf_dir: str | Path, out_dir: str | Path, *, step: int = 0, dtype: str = "float32") -> Path:
    """Load an HF checkpoint and save {"model": state_dict} with DCP into out_dir/step-<step>."""
    import torch.distributed.checkpoint as dcp

    from models.hf_checkpoint import load_extra_tensors, load_hf_checkpoint, read_hf_config
    from models.qwen3.state_dict_adapter import EXTRA_PREFIX

    args, model = load_hf_checkpoint(hf_dir, device="cpu", dtype=dtype)
    state = {"model": model.state_dict()}
    extra = load_extra_tensors(hf_dir)
    for k, t in extra.items():
        if k.startswith(EXTRA_PREFIX):
            state["model"][k[len(EXTRA_PREFIX):]] = t
        else:
            state.setdefault("extra", {})[k] = t
    dest = Path(out_dir) / f"step-{step}"
    if dest.exists():
        raise FileExistsError(f"{dest} exists; choose another --step or remove it")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, checkpoint_id=str(dest))
    with open(dest / HF_CONFIG_IN_DCP, "w") as fh:
        json.dump(read_hf_config(hf_dir), fh, indent=2)
    logger.info("wrote %s (%d model tensors, %d extra)", dest, len(state["model"]), len(extra))
    return dest


def _dcp_model_entries(step_dir: Path) -> tuple[str, dict]:
    """(prefix, {our key: TensorStorageMetadata}) of the model weights in a DCP checkpoint: keys are
    "model.<key>" when saved as {"model": state_dict} (prefix "model.") or plain (prefix "")."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    tensors = {k: v for k, v in md.items() if isinstance(v, TensorStorageMetadata)}
    if any(k.startswith("model.") for k in tensors):
        return "model.", {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return "", tensors


def dcp_to_hf(
    ckpt: str | Path,
    out_dir: str | Path,
    *,
    flavor: str | None = None,
    hf_config: str | Path | None = None,
    step: int | None = None,
    dtype: str | None = "bfloat16",
    max_shard_size_bytes: int = 5 * 2**30,
    extra_config: dict | None = None,
    copy_files_from: str | Path | None = None,
) -> Path:
    """Load the model weights of a DCP checkpoint and save them as an HF checkpoint directory."""
    import torch
    import torch.distributed.checkpoint as dcp

    from models.hf_checkpoint import (
        HFCheckpointError,
        args_from_hf_config,
        build_empty_model,
        read_hf_config,
        save_hf_checkpoint,
    )
    from models.qwen3.args import get_flavor
    from models.qwen3.state_dict_adapter import EXTRA_PREFIX

    step_dir = find_step_dir(ckpt, step)
    if flavor and hf_config:
        raise ValueError("give --flavor or --hf-config, not both")
    if flavor:
        args = get_flavor(flavor)
    elif hf_config:
        args = args_from_hf_config(read_hf_config(hf_config))
    elif (step_dir / HF_CONFIG_IN_DCP).is_file():
        args = args_from_hf_config(read_hf_config(step_dir / HF_CONFIG_IN_DCP))
    else:
        raise ValueError(f"the architecture is unknown: pass --flavor or --hf-config ({step_dir} has no "
                         f"{HF_CONFIG_IN_DCP})")
    if args.num_experts and args.hf_model_type != "qwen3_moe":
        args.hf_model_type = "qwen3_moe"
    prefix, entries = _dcp_model_entries(step_dir)
    emb = entries.get("tok_embeddings.weight")
    if emb is None:
        raise HFCheckpointError(f"{step_dir}: no {prefix}tok_embeddings.weight in the checkpoint (not a model checkpoint?)")
    if emb.size[0] != args.vocab_size:
        logger.info("vocab_size %d from the checkpoint (the architecture said %d)", emb.size[0], args.vocab_size)
        args.vocab_size = int(emb.size[0])

    model = build_empty_model(args, "cpu", dtype)  # allocated in the output dtype (DCP casts on load)
    sd = model.state_dict()
    request: dict = {}
    for k, t in sd.items():
        if k not in entries:
            if k == "output.weight" and args.tie_embeddings:
                continue  # tied: filled through tok_embeddings
            raise HFCheckpointError(f"missing key {prefix}{k!r} in DCP checkpoint {step_dir} (model expects {tuple(t.shape)})")
        if tuple(entries[k].size) != tuple(t.shape):
            raise HFCheckpointError(f"shape mismatch for key {prefix}{k!r} in {step_dir}: checkpoint has "
                             f"{tuple(entries[k].size)}, model ({flavor or hf_config or HF_CONFIG_IN_DCP}) "
                             f"expects {tuple(t.shape)}")
        request[k] = t
    # Weights the (dense) model does not have: RTPurbo's, kept as extras (plain-key checkpoints may also
    # hold optimizer state etc., so there only inner_attention.* counts).
    extras = {}
    for k, meta in entries.items():
        if k in sd or (prefix == "" and "inner_attention." not in k):
            continue
        extras[k] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    to_load = {**request, **extras}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        if prefix:
            dcp.load({"model": to_load}, checkpoint_id=str(step_dir))
        else:
            dcp.load(to_load, checkpoint_id=str(step_dir))
    extra_tensors = {EXTRA_PREFIX + k: v for k, v in extras.items()}
    out = save_hf_checkpoint(
        model, out_dir, max_shard_size_bytes=max_shard_size_bytes, dtype=dtype, extra_config=extra_config,
        extra_tensors=extra_tensors or None, copy_files_from=copy_files_from,
    )
    logger.info("wrote %s from %s", out, step_dir)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.convert_hf",
        description="Convert between Hugging Face checkpoints (config.json + safetensors) and DCP checkpoints.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-dcp", help="HF directory -> OUT/step-N (DCP, {'model': state_dict})")
    a.add_argument("hf_dir", help="HF checkpoint directory (config.json + model*.safetensors)")
    a.add_argument("out_dir", help="checkpoint folder; the DCP checkpoint goes into OUT_DIR/step-STEP")
    a.add_argument("--step", type=int, default=0, help="step number of the folder written (default 0)")
    a.add_argument("--dtype", default="float32", help="dtype of the saved weights (default float32)")

    b = sub.add_parser("dcp-to-hf", help="DCP checkpoint -> HF directory")
    b.add_argument("ckpt", help="a DCP step folder, or a folder of step-N folders (latest unless --step)")
    b.add_argument("out_dir", help="HF checkpoint directory to write (replaced atomically)")
    arch = b.add_mutually_exclusive_group()
    arch.add_argument("--flavor", help="model flavour name (models/qwen3/args.py), e.g. tiny, 0.6B, 30B-A3B")
    arch.add_argument("--hf-config", help="config.json (or a directory with one) giving the architecture")
    b.add_argument("--step", type=int, default=None, help="step to convert (default: the latest)")
    b.add_argument("--dtype", default="bfloat16", help="dtype of the saved weights (default bfloat16)")
    b.add_argument("--max-shard-size", type=_parse_size, default=5 * 2**30, help="e.g. 5GB (default), 500MB")
    b.add_argument("--extra-config", help="JSON file merged into config.json at the top level "
                                          "(e.g. an 'rtpurbo' section and 'headwise_config')")
    b.add_argument("--copy-files-from", help="HF directory whose tokenizer/generation_config files are copied")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    if ns.cmd == "hf-to-dcp":
        hf_to_dcp(ns.hf_dir, ns.out_dir, step=ns.step, dtype=ns.dtype)
    else:
        extra_config = None
        if ns.extra_config:
            with open(ns.extra_config) as fh:
                extra_config = json.load(fh)
        dcp_to_hf(
            ns.ckpt, ns.out_dir, flavor=ns.flavor, hf_config=ns.hf_config, step=ns.step, dtype=ns.dtype,
            max_shard_size_bytes=ns.max_shard_size, extra_config=extra_config,
            copy_files_from=ns.copy_files_from,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
