"""Context parallelism (CP) on CPU with gloo: the primitives against single-process SDPA (tests/cp_worker.py
under torchrun, 2 and 4 ranks), apply_cp's guarantees, and the trainer end to end: pretraining with CP and
with FSDP x CP, stage 1 and stage 2 with the RTPurbo CP backend, each against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# seq_len 62: not a multiple of 2 x cp (the layout's chunks then differ in length); packed documents
# (training.document_mask defaults to true), so the masks cross chunk and document boundaries.
COMMON = ["--job.config_file", "train_configs/debug_model.toml", "--training.seq_len", "62",
          "--training.dataset_shard_by", "sample", "--metrics.log_freq", "1",
          "--metrics.enable_tensorboard", "false", "--lr_scheduler.warmup_steps", "2"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _torchrun(nproc: int, target: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, *target]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", *target]


def _train(args, nproc=1):
    cmd = _torchrun(nproc, ["-m", "torchtitan_rtpurbo.train", *COMMON, *args])
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    if p.returncode != 0 and _teardown_abort(p):
        # Seen once in ~10 runs of the 4-rank case on a loaded 2-core box: every rank finished (validation
        # after training logged, destroy_process_group called) and one then died in gloo's C++ teardown
        # ("terminate called without an active exception"). Not a result of the run; one retry.
        p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _teardown_abort(p) -> bool:
    out = p.stdout + p.stderr
    return "terminate called without an active exception" in out and "validation (after)" in out


def _history(dump, mode):
    return json.loads((Path(dump) / f"loss_history_{mode}.json").read_text())


def _assert_close_lists(ref, got, what, rel=1e-5, abs_=1e-7):
    assert len(ref) == len(got), (what, ref, got)
    for a, b in zip(ref, got):
        assert abs(a - b) <= rel * abs(a) + abs_, (what, ref, got)


def _assert_same_history(ref: dict, got: dict, rel=1e-5, abs_=1e-7):
    _assert_close_lists(ref["loss"], got["loss"], "loss", rel, abs_)
    for when in ref["validation"]:
        r, g = ref["validation"][when], got["validation"][when]
        assert sorted(r) == sorted(g), (when, r, g)
        keys = [k for k in r if k != "step"]
        _assert_close_lists([r[k] for k in keys], [g[k] for k in keys], f"validation {when} {keys}", rel, abs_)


# ----------------------------------------------------------------------------------------------------------
# primitives
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nproc", [2, 4])
def test_primitives_match_single_process(nproc):
    """Layout round trip; all_gather_sequence forward / backward; cp_dense_attention output and dq / dk / dv
    equal to single-process SDPA (float64, GQA, batch 2, packed documents, T not a multiple of 2 cp, the
    FlexAttention BlockMask path); shard_batch."""
    cmd = _torchrun(nproc, [str(REPO / "tests" / "cp_worker.py"), "primitives"])
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "CP_WORKER_OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_doc_chunk_block_mask_is_the_chunk_mask():
    """The BlockMask of a chunk (queries [gs, ge) x keys [0, ge), causal + document) lists exactly the visible
    pairs: full blocks fully visible, partial ones through mask_mod (its dense view equals the dense mask),
    and eager FlexAttention with it equals SDPA with the dense mask."""
    from kernels.masks import block_mask_to_dense, flex_attention_call
    from torchtitan_rtpurbo.distributed.context_parallel import _chunk_mask, doc_chunk_block_mask

    g = torch.Generator().manual_seed(0)
    T, B = 300, 2
    doc_ids = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        for c in torch.randperm(T - 1, generator=g)[:5].tolist():
            doc_ids[b, c + 1:] += 1
    n_full = 0
    for gs, ge in [(0, 75), (75, 150), (225, 300), (37, 191), (0, 300)]:
        bm = doc_chunk_block_mask(gs, ge, doc_ids, block_size=16)
        dense = _chunk_mask(gs, ge, doc_ids, doc_ids.device)
        assert torch.equal(block_mask_to_dense(bm), dense.expand(B, 1, ge - gs, ge)), (gs, ge)
        n_full += int(bm.full_kv_num_blocks.sum())
        q = torch.randn(B, 4, ge - gs, 16, generator=g)
        k, v = torch.randn(B, 2, ge, 16, generator=g), torch.randn(B, 2, ge, 16, generator=g)
        with torch.no_grad():
            got = flex_attention_call(q, k, v, bm, compiled=False)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert n_full > 0  # the full-block classification was exercised


# ----------------------------------------------------------------------------------------------------------
# apply_cp and configuration errors
# ----------------------------------------------------------------------------------------------------------
def _rtpurbo_model():
    from models.qwen3 import build_model, get_flavor
    from models.rtpurbo import apply_rtpurbo, roles_from_config
    from torchtitan_rtpurbo.config import JobConfig

    torch.manual_seed(0)
    cfg = JobConfig()
    cfg.rtpurbo.window, cfg.rtpurbo.sinks, cfg.rtpurbo.block_size, cfg.rtpurbo.retrieval_ratio = 8, 2, 16, 0.25
    model = build_model(get_flavor("debug"))
    scores = torch.rand(4, 8, generator=torch.Generator().manual_seed(1))
    apply_rtpurbo(model, roles_from_config(scores, model.args, cfg.rtpurbo), cfg.rtpurbo)
    return model


def test_apply_cp_keeps_state_dict_keys_and_the_plain_path():
    """apply_cp swaps no parameter and renames nothing (CP checkpoints load without CP), and without a
    CPContext the model computes exactly what it computed before."""
    from models.qwen3 import build_model, get_flavor
    from models.qwen3.parallelize import apply_cp

    tokens = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(2))
    for model in (build_model(get_flavor("debug")), _rtpurbo_model()):
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            before = model(tokens)
        apply_cp(model)
        assert list(model.state_dict()) == list(sd)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), before, rtol=0, atol=0)


def test_apply_cp_names_the_missing_rtpurbo_backend(monkeypatch):
    from models.qwen3.parallelize import apply_cp

    monkeypatch.setitem(sys.modules, "models.rtpurbo.context_parallel", None)  # import -> ImportError
    with pytest.raises(NotImplementedError, match="make_cp_aware"):
        apply_cp(_rtpurbo_model())


def test_cp_configuration_errors():
    from torchtitan_rtpurbo.config import JobConfig
    from torchtitan_rtpurbo.train import Trainer, main

    for mode in ("calibrate", "eval"):
        with pytest.raises(SystemExit, match="context_parallel_degree = 1"):
            main(["--job.mode", mode, "--parallelism.context_parallel_degree", "2"])
    cfg = JobConfig()
    cfg.training.seq_len = 7
    fake = SimpleNamespace(parallel_dims=SimpleNamespace(cp=4), mesh=None)
    with pytest.raises(ValueError, match=r"training.seq_len = 7 .*context_parallel_degree \(2 x 4 = 8\)"):
        Trainer._build_cp_group(fake, cfg)


# ----------------------------------------------------------------------------------------------------------
# the trainer: pretraining
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_pretrain(tmp_path_factory):
    dump = tmp_path_factory.mktemp("cp_single")
    _train(["--training.steps", "4", "--training.local_batch_size", "4", "--training.val_batches", "1",
            "--job.dump_folder", str(dump)])
    return _history(dump, "pretrain")


def test_pretrain_cp2_matches_single_process_and_its_checkpoint_loads_without_cp(single_pretrain, tmp_path):
    base = ["--training.steps", "4", "--training.local_batch_size", "4", "--training.val_batches", "1",
            "--job.dump_folder", str(tmp_path), "--checkpoint.enable", "--checkpoint.interval", "2"]
    p = _train(base + ["--parallelism.context_parallel_degree", "2"], nproc=2)
    assert "attention backends made CP-aware" in p.stdout + p.stderr
    _assert_same_history(single_pretrain, _history(tmp_path, "pretrain"))
    # the step-2 checkpoint written by the 2 CP ranks resumes in one process, on the same trajectory
    import shutil

    shutil.rmtree(tmp_path / "checkpoint" / "step-4")
    _train(base)
    resumed = _history(tmp_path, "pretrain")
    assert resumed["first_step"] == 3
    _assert_close_lists(single_pretrain["loss"][2:], resumed["loss"], "resumed loss")


def test_pretrain_fsdp2_x_cp2_matches_single_process(single_pretrain, tmp_path):
    # 4 ranks: dp_shard 2 (each reads half of the batch) x cp 2 (each keeps half of every sequence)
    _train(["--training.steps", "4", "--training.local_batch_size", "2", "--training.val_batches", "1",
            "--parallelism.context_parallel_degree", "2", "--job.dump_folder", str(tmp_path)], nproc=4)
    _assert_same_history(single_pretrain, _history(tmp_path, "pretrain"))


# ----------------------------------------------------------------------------------------------------------
# the trainer: RTPurbo stage 1 and stage 2
# ----------------------------------------------------------------------------------------------------------
def _rtpurbo_cp_missing() -> str:
    try:
        from models.rtpurbo.context_parallel import make_cp_aware  # noqa: F401
    except ImportError as e:
        return f"models.rtpurbo.context_parallel.make_cp_aware is not available ({e})"
    return ""


RT = ["--rtpurbo.window", "8", "--rtpurbo.sinks", "2", "--rtpurbo.block_size", "16",
      "--training.steps", "3", "--training.local_batch_size", "2", "--training.val_batches", "1"]


@pytest.mark.skipif(bool(_rtpurbo_cp_missing()), reason=_rtpurbo_cp_missing() or "available")
def test_stage1_and_stage2_cp2_match_single_process(tmp_path):
    """Stage 1 (indexer KL: per-rank shares summed over cp; indexers outside FSDP) and stage 2 (teacher
    targets cached per rank for its label tokens, label restriction on the full sequence, sparse top-p
    retrieval under CP): losses and validation metrics equal the 1-process run."""
    from models.qwen3 import get_flavor
    from models.rtpurbo import roles_from_config
    from torchtitan_rtpurbo.config import JobConfig

    cfg = JobConfig()
    cfg.rtpurbo.window, cfg.rtpurbo.sinks, cfg.rtpurbo.retrieval_ratio = 8, 2, 0.25
    roles = tmp_path / "roles.json"
    scores = torch.rand(4, 8, generator=torch.Generator().manual_seed(1))
    roles_from_config(scores, get_flavor("debug"), cfg.rtpurbo).save_json(roles)
    s1 = RT + ["--job.mode", "stage1", "--rtpurbo.roles_file", str(roles), "--rtpurbo.indexer_init", "random",
               "--optimizer.lr", "1e-2"]
    _train(s1 + ["--job.dump_folder", str(tmp_path / "s1")])
    _train(s1 + ["--job.dump_folder", str(tmp_path / "s1cp"), "--parallelism.context_parallel_degree", "2"], nproc=2)
    ref = _history(tmp_path / "s1", "stage1")
    _assert_same_history(ref, _history(tmp_path / "s1cp", "stage1"))
    assert ref["loss"][-1] < ref["loss"][0]

    s2 = RT + ["--job.mode", "stage2", "--rtpurbo.init_checkpoint", str(tmp_path / "s1" / "stage1"),
               "--rtpurbo.stage2_retrieval", "topp", "--rtpurbo.stage2_label_tokens", "24", "--optimizer.lr", "1e-3"]
    _train(s2 + ["--job.dump_folder", str(tmp_path / "s2")])
    _train(s2 + ["--job.dump_folder", str(tmp_path / "s2cp"), "--parallelism.context_parallel_degree", "2"], nproc=2)
    # the distillation KL (~1e-2) is a difference of float32 log-probs (~8): looser, as in test_trainer.py
    _assert_same_history(_history(tmp_path / "s2", "stage2"), _history(tmp_path / "s2cp", "stage2"),
                         rel=1e-4, abs_=1e-6)
