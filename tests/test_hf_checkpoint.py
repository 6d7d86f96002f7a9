"""Hugging Face checkpoint load/save/convert: logits parity with transformers in both directions.

Tiny random models are built in transformers itself (no hub access); everything runs in float32 on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from models import hf_checkpoint as hfc  # noqa: E402
from models.hf_checkpoint import (  # noqa: E402
    HFCheckpointError,
    args_from_hf_config,
    hf_config_from_args,
    load_extra_tensors,
    load_hf_checkpoint,
    save_hf_checkpoint,
)
from models.qwen3 import build_model, get_flavor  # noqa: E402
from models.qwen3.state_dict_adapter import Qwen3StateDictAdapter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
VOCAB = 128

_BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10_000.0,
    eos_token_id=[5, 7], bos_token_id=1,
)

CASES = {
    "qwen3": ("Qwen3", dict(head_dim=16)),
    "qwen3_tied": ("Qwen3", dict(head_dim=32, tie_word_embeddings=True)),
    "qwen3_yarn": ("Qwen3", dict(head_dim=16, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                            "original_max_position_embeddings": 64})),
    "qwen3_moe": ("Qwen3Moe", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   decoder_sparse_step=1, norm_topk_prob=True)),
    "qwen3_moe_mlp_only": ("Qwen3Moe", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1],
                                            norm_topk_prob=False, tie_word_embeddings=True)),
    "llama": ("Llama", dict()),  # head_dim absent: hidden_size / heads
    "qwen2_bias": ("Qwen2", dict(tie_word_embeddings=True)),
    "mistral": ("Mistral", dict(sliding_window=None)),
}
SHARDED = {"qwen3", "qwen3_moe"}  # saved by transformers with a tiny max_shard_size (index + shards)


def _hf_model(case: str):
    prefix, extra = CASES[case]
    cfg_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForCausalLM")
    torch.manual_seed(0)
    cfg = cfg_cls(**{**_BASE, **extra})
    model = model_cls(cfg).float().eval()
    with torch.no_grad():  # make every weight distinct (norms are ones and biases zeros after init)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model


def _hf_load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _tokens(T: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_hf_parity_both_directions(case, tmp_path):
    hf = _hf_model(case)
    src = tmp_path / "hf"
    hf.save_pretrained(src, max_shard_size="40KB" if case in SHARDED else "1GB")
    assert (src / "model.safetensors.index.json").exists() == (case in SHARDED)

    args, ours = load_hf_checkpoint(src)
    if case == "qwen3_yarn":
        assert args.rope_scaling.factor == 4.0 and args.rope_scaling.original_max_position_embeddings == 64
    assert args.hf_model_type == {"qwen3_yarn": "qwen3", "qwen3_tied": "qwen3", "qwen3_moe_mlp_only": "qwen3_moe",
                                  "qwen2_bias": "qwen2"}.get(case, case)
    assert args.eos_id == 5  # list -> first
    ours.eval()
    T = 100 if case == "qwen3_yarn" else 24  # beyond original_max_position_embeddings for YaRN
    tok = _tokens(T)
    with torch.no_grad():
        ref = hf(tok).logits
        got = ours(tok)
    assert _rel(got, ref) <= TOL, f"HF -> ours: {_rel(got, ref)}"

    # ours -> HF: save (sharded for the MoE) and load with transformers
    dst = tmp_path / "ours"
    save_hf_checkpoint(ours, dst, max_shard_size_bytes=50_000 if "moe" in case else 5 * 2**30)
    back = _hf_load(dst)
    with torch.no_grad():
        ref2 = back(tok).logits
    assert _rel(got, ref2) <= TOL, f"ours -> HF: {_rel(got, ref2)}"
    if args.tie_embeddings:
        assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    # and back into ours again: identical tensors
    _, again = load_hf_checkpoint(dst)
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_tied_export_is_valid_and_retied(tmp_path):
    args = get_flavor("debug").replace(n_layers=2, vocab_size=VOCAB)
    torch.manual_seed(0)
    ours = build_model(args).eval()
    save_hf_checkpoint(ours, tmp_path / "t")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t" / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        assert fh.metadata() == {"format": "pt"}
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["architectures"] == ["Qwen3ForCausalLM"]
    hf = _hf_load(tmp_path / "t")
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert torch.equal(hf.lm_head.weight, ours.tok_embeddings.weight)
    tok = _tokens()
    with torch.no_grad():
        assert _rel(ours(tok), hf(tok).logits) <= TOL


def test_adapter_round_trip_with_extra_weights():
    args = get_flavor("debug_moe").replace(n_layers=3, vocab_size=VOCAB, tie_embeddings=False)
    torch.manual_seed(0)
    sd = dict(build_model(args).state_dict())
    sd["layers.1.attention.inner_attention.indexer.wq.weight"] = torch.randn(16, 32)
    ad = Qwen3StateDictAdapter(args)
    hf = ad.to_hf(sd)
    main, extra = ad.split_extra(hf)
    assert set(extra) == {"rtpurbo.layers.1.attention.inner_attention.indexer.wq.weight"}
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in main and "model.layers.0.mlp.up_proj.weight" in main
    assert "model.layers.1.mlp.gate.weight" in main and "lm_head.weight" in main
    assert main["model.layers.2.mlp.experts.3.gate_proj.weight"].shape == (args.moe_hidden_dim, args.dim)
    back = ad.from_hf({**hf, "model.rotary_emb.inv_freq": torch.ones(4)})
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # transformers >= 5 in-memory fused experts are accepted too
    fused = {k: v for k, v in main.items() if ".experts." not in k}
    for i in (1, 2):
        w1, w3, w2 = (sd[f"layers.{i}.moe.experts.{w}"] for w in ("w1", "w3", "w2"))
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=1)
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = w2
    back2 = ad.from_hf(fused)
    assert all(torch.equal(back2[k], sd[k]) for k in back2) and len(back2) == len(sd) - 1
    with pytest.raises(KeyError, match="model.layers.0.mlp.bogus.weight"):
        ad.from_hf({"model.layers.0.mlp.bogus.weight": torch.ones(1)})
    bad = dict(main)
    del bad["model.layers.2.mlp.experts.5.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        ad.from_hf(bad)


def test_extra_config_and_extra_tensors(tmp_path):
    args = get_flavor("debug").replace(n_layers=2, vocab_size=VOCAB)
    torch.manual_seed(0)
    ours = build_model(args).eval()
    extra_t = {"rtpurbo.layers.0.attention.inner_attention.selector": torch.randn(8, 4)}
    headwise = {"layers": [[1, 0, 0, 1, 0, 0, 0, 1], [0] * 8]}
    dst = save_hf_checkpoint(ours, tmp_path / "x", extra_config={"rtpurbo": {"window": 128, "sinks": 4},
                                                                 "headwise_config": headwise},
                             extra_tensors=extra_t, dtype=torch.bfloat16)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["rtpurbo"] == {"window": 128, "sinks": 4} and cfg["headwise_config"] == headwise
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    assert (dst / "rtpurbo.safetensors").exists()
    got = load_extra_tensors(dst)
    assert set(got) == set(extra_t) and torch.equal(got[next(iter(got))], next(iter(extra_t.values())))
    # transformers still loads the directory (extra config sections and rtpurbo.safetensors are ignored)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.bfloat16)
    assert hf.config.rtpurbo["window"] == 128
    # a model that has an RTPurbo parameter: saved to rtpurbo.safetensors, loaded back by load_hf_weights
    sel = torch.nn.Parameter(torch.randn(4, 3))
    ours.layers["1"].attention.inner_attention.register_parameter("sel", sel)
    dst2 = save_hf_checkpoint(ours, tmp_path / "y")
    assert set(load_extra_tensors(dst2)) == {"rtpurbo.layers.1.attention.inner_attention.sel"}
    _, dense = load_hf_checkpoint(dst2)  # the dense model skips it
    conv = build_model(args)
    conv.layers["1"].attention.inner_attention.register_parameter("sel", torch.nn.Parameter(torch.zeros(4, 3)))
    assert hfc.load_hf_weights(conv, dst2) == []
    assert torch.equal(conv.layers["1"].attention.inner_attention.sel, sel)
    assert torch.equal(conv.layers["0"].attention.wk.weight, ours.layers["0"].attention.wk.weight)
    del ours.layers["1"].attention.inner_attention.sel

    a2, m2 = load_hf_checkpoint(dst, dtype="bfloat16")
    assert m2.tok_embeddings.weight.dtype == torch.bfloat16 and a2 == args
    assert torch.equal(m2.layers["1"].attention.wq.weight, ours.layers["1"].attention.wq.weight.bfloat16())


def test_config_mapping():
    for fl in ("debug", "debug_moe", "0.6B", "30B-A3B", "Coder-30B-A3B"):
        a = get_flavor(fl)
        assert args_from_hf_config(hf_config_from_args(a)) == a, fl
    a = get_flavor("tiny").replace(rope_scaling=hfc.RopeScaling(factor=4.0, original_max_position_embeddings=4096),
                                   max_seq_len=16384)
    cfg = hf_config_from_args(a)
    assert cfg["rope_scaling"]["rope_type"] == "yarn" and args_from_hf_config(cfg) == a
    # transformers-5 form (rope_parameters), eos list, head_dim defaults
    v5 = {"model_type": "qwen3_moe", "vocab_size": 10, "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 32, "eos_token_id": [9, 3],
          "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 2.0,
                              "original_max_position_embeddings": 128}}
    a = args_from_hf_config(v5)
    assert a.rope_theta == 5e5 and a.rope_scaling.factor == 2.0 and a.eos_id == 9 and a.n_kv_heads == 4
    assert a.head_dim == 16 and a.num_experts == 128 and a.norm_topk_prob is False  # HF Qwen3MoeConfig defaults
    assert args_from_hf_config({**v5, "model_type": "qwen3", "rope_parameters": None}).head_dim == 128
    assert args_from_hf_config({**v5, "model_type": "llama", "rope_parameters": None}).qk_norm is False
    with pytest.raises(NotImplementedError, match="llama3"):
        args_from_hf_config({**v5, "model_type": "llama", "rope_parameters": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(NotImplementedError, match="gpt2"):
        args_from_hf_config({**v5, "model_type": "gpt2"})


def _save_tiny(tmp_path, case="qwen3", **kw):
    hf = _hf_model(case)
    d = tmp_path / case
    hf.save_pretrained(d, **kw)
    return d


def test_errors_name_key_file_and_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(HFCheckpointError, match="config.json"):
        load_hf_checkpoint(tmp_path)
    d = _save_tiny(tmp_path)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_checkpoint(tmp_path / "noweights")

    sd = load_file(str(d / "model.safetensors"))
    # missing key
    s2 = dict(sd)
    del s2["model.layers.1.self_attn.k_norm.weight"]
    save_file(s2, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError, match=r"missing key.*model\.layers\.1\.self_attn\.k_norm\.weight"):
        load_hf_checkpoint(d)
    # unexpected key (a layer the config does not have)
    s3 = {**sd, "model.layers.7.mlp.up_proj.weight": torch.zeros(96, 64)}
    save_file(s3, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError, match=r"unexpected key 'model\.layers\.7\.mlp\.up_proj\.weight' in file .*model\.safetensors"):
        load_hf_checkpoint(d)
    s3 = {**sd, "model.layers.0.mlp.mystery.weight": torch.zeros(2)}
    save_file(s3, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError, match=r"model\.layers\.0\.mlp\.mystery\.weight.*model\.safetensors"):
        load_hf_checkpoint(d)
    # shape mismatch: both shapes and the file
    s4 = {**sd, "model.layers.2.mlp.down_proj.weight": torch.zeros(64, 95)}
    save_file(s4, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError) as e:
        load_hf_checkpoint(d)
    msg = str(e.value)
    assert "model.layers.2.mlp.down_proj.weight" in msg and "(64, 95)" in msg and "(64, 96)" in msg
    assert "model.safetensors" in msg
    # rtpurbo.* tensors in the main file are tolerated (and returned as extras)
    s5 = {**sd, "rtpurbo.layers.0.attention.inner_attention.w": torch.ones(3)}
    save_file(s5, str(d / "model.safetensors"), metadata={"format": "pt"})
    load_hf_checkpoint(d)
    assert set(load_extra_tensors(d)) == {"rtpurbo.layers.0.attention.inner_attention.w"}


def test_sharded_moe_missing_expert_and_missing_shard(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _save_tiny(tmp_path, "qwen3_moe", max_shard_size="40KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    key = "model.layers.2.mlp.experts.3.down_proj.weight"
    shard = d / index["weight_map"][key]
    sd = load_file(str(shard))
    del sd[key]
    save_file(sd, str(shard), metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError, match=r"layers\.2\.mlp\.experts\.\{j\}\.down_proj.*experts \[3\]"):
        load_hf_checkpoint(d)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_hf_checkpoint(d)


def test_atomic_save(tmp_path, monkeypatch):
    args = get_flavor("debug_moe").replace(n_layers=2, vocab_size=VOCAB)
    torch.manual_seed(0)
    model = build_model(args)
    real = hfc._write_safetensors
    calls = {"n": 0, "crash_at": 3}

    def crash_on_third(tensors, file, metadata=None):
        calls["n"] += 1
        if calls["n"] == calls["crash_at"]:
            raise RuntimeError("simulated crash")
        real(tensors, file, metadata)

    monkeypatch.setattr(hfc, "_write_safetensors", crash_on_third)
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_hf_checkpoint(model, target, max_shard_size_bytes=100_000)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary directory was removed too

    # an existing checkpoint survives a failed overwrite, and is replaced by a successful one
    monkeypatch.setattr(hfc, "_write_safetensors", real)
    save_hf_checkpoint(model, target, max_shard_size_bytes=100_000)
    names = sorted(p.name for p in target.iterdir())
    assert "model.safetensors.index.json" in names and sum(n.startswith("model-0") for n in names) > 2, names
    calls.update(n=0, crash_at=1)
    monkeypatch.setattr(hfc, "_write_safetensors", crash_on_third)
    with pytest.raises(RuntimeError):
        save_hf_checkpoint(model, target, max_shard_size_bytes=10**9)
    assert sorted(p.name for p in target.iterdir()) == names
    monkeypatch.setattr(hfc, "_write_safetensors", real)
    save_hf_checkpoint(model, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_convert_cli_round_trip(tmp_path):
    from scripts.convert_hf import dcp_to_hf, hf_to_dcp, main

    src = _save_tiny(tmp_path, "qwen3_moe_mlp_only")
    step = hf_to_dcp(src, tmp_path / "ckpt", step=3)
    assert step.name == "step-3" and (step / ".metadata").exists()
    out = dcp_to_hf(tmp_path / "ckpt", tmp_path / "back", dtype="float32", copy_files_from=src)
    assert (out / "generation_config.json").exists()
    _, a = load_hf_checkpoint(src)
    _, b = load_hf_checkpoint(out)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    # with a flavour, a plain-key DCP checkpoint with RTPurbo weights (those go to rtpurbo.safetensors)
    import torch.distributed.checkpoint as dcp

    args = get_flavor("debug").replace(vocab_size=VOCAB)  # vocab size differs from the flavour's: inferred
    torch.manual_seed(0)
    m = build_model(args)
    sd = dict(m.state_dict())
    sd["layers.0.attention.inner_attention.proj.weight"] = torch.randn(4, 8)
    dcp.save(sd, checkpoint_id=str(tmp_path / "plain" / "step-5"))
    assert main(["dcp-to-hf", str(tmp_path / "plain"), str(tmp_path / "hf2"), "--flavor", "debug"]) == 0  # bf16
    extra = load_extra_tensors(tmp_path / "hf2")
    assert torch.equal(extra["rtpurbo.layers.0.attention.inner_attention.proj.weight"],
                       sd["layers.0.attention.inner_attention.proj.weight"])
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, m2 = load_hf_checkpoint(tmp_path / "hf2", dtype=torch.bfloat16)
    assert torch.equal(m2.layers["1"].feed_forward.w2.weight, m.layers["1"].feed_forward.w2.weight.bfloat16())
    with pytest.raises(HFCheckpointError, match=r"'tok_embeddings\.weight'.*\(128, 128\).*\(128, 64\)"):
        dcp_to_hf(tmp_path / "plain", tmp_path / "hf3", hf_config=tmp_path / "ckpt" / "step-3" / "hf_config.json")
    with pytest.raises(HFCheckpointError, match=r"missing key 'layers\.1\.moe\.router\.gate\.weight'.*\(8, 128\)"):
        dcp_to_hf(tmp_path / "plain", tmp_path / "hf3", flavor="debug_moe")


def test_convert_help():
    r = subprocess.run([sys.executable, "-m", "scripts.convert_hf", "--help"], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and "hf-to-dcp" in r.stdout and "dcp-to-hf" in r.stdout


_FSDP_SCRIPT = r"""
import sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, port, src, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from models.hf_checkpoint import args_from_hf_config, load_hf_weights, read_hf_config
    from models.qwen3.model import Qwen3Model
    from models.qwen3.rope import rope_inv_freq

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        args = args_from_hf_config(read_hf_config(src))
        with torch.device("meta"):
            m = Qwen3Model(args)
        mesh = init_device_mesh("cpu", (world,))
        for layer in m.layers.values():
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        m.to_empty(device="cpu")
        m.rope_inv_freq = rope_inv_freq(args)[0]
        load_hf_weights(m, src)  # DTensor parameters, experts sharded on dim 0 across the ranks
        assert m.layers["0"].moe.experts.w1.to_local().shape[0] == args.num_experts // world
        tok = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = m(tok)
        if rank == 0:
            torch.save(logits, out)
        # save from the sharded model: every rank gathers, rank 0 writes
        from models.hf_checkpoint import save_hf_checkpoint

        save_hf_checkpoint(m, out + ".hf", max_shard_size_bytes=60_000)
        dist.barrier()
        if rank == 0:  # a plain model saved by rank 0 alone: no collectives (would hang otherwise)
            from models.hf_checkpoint import load_hf_checkpoint

            _, plain = load_hf_checkpoint(src)
            save_hf_checkpoint(plain, out + ".plain")
        dist.barrier()  # leave together (gloo can abort when a peer tears down mid-flight)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    port, src, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    mp.spawn(worker, args=(2, port, src, out), nprocs=2, join=True)
"""


def test_load_into_fsdp2_sharded_model(tmp_path):
    """load_hf_weights fills FSDP2 (DTensor) parameters on 2 CPU ranks (gloo) with the same logits."""
    import socket

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("gloo not available")
    src = _save_tiny(tmp_path, "qwen3_moe", max_shard_size="40KB")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "logits.pt"
    script = tmp_path / "fsdp_load.py"
    script.write_text(_FSDP_SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(port), str(src), str(out)], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    _, ours = load_hf_checkpoint(src)
    _, resaved = load_hf_checkpoint(str(out) + ".hf")
    assert (Path(str(out) + ".plain") / "config.json").exists()
    assert (Path(str(out) + ".hf") / "model.safetensors.index.json").exists()
    for (k, a), (_, b) in zip(ours.state_dict().items(), resaved.state_dict().items()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert _rel(torch.load(out), ours(_tokens())) <= TOL
