"""End-to-end trainer checks through the real entry point: FSDP2 on 2 CPU processes (gloo) matches one
process, DCP resume is exact, a killed save leaves no complete-looking checkpoint, HF export works."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--job.config_file", "train_configs/debug_model.toml", "--training.seq_len", "64",
          "--training.dataset_shard_by", "sample", "--metrics.log_freq", "1",
          "--metrics.enable_tensorboard", "false", "--lr_scheduler.warmup_steps", "2"]


def _run(args, nproc=1, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(env_extra or {})
    if nproc == 1:
        cmd = [sys.executable, "-m", "torchtitan_rtpurbo.train", *COMMON, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
               "-m", "torchtitan_rtpurbo.train", *COMMON, *args]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if nproc > 1 and p.returncode != 0 and "terminate called without an active exception" in p.stdout + p.stderr:
        # gloo's C++ teardown was seen to abort after a finished run on a loaded 2-core box (see
        # test_context_parallel._train); a real failure fails the retry too
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _losses(dump):
    return json.loads((Path(dump) / "loss_history_pretrain.json").read_text())["loss"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    dump = tmp_path_factory.mktemp("single")
    _run(["--training.steps", "6", "--training.local_batch_size", "4", "--job.dump_folder", str(dump)])
    return _losses(dump)


def test_fsdp2_two_processes_match_single_process(single_run, tmp_path):
    _run(["--training.steps", "6", "--training.local_batch_size", "2", "--job.dump_folder", str(tmp_path)],
         nproc=2)
    fsdp = _losses(tmp_path)
    assert len(fsdp) == 6
    for a, b in zip(single_run, fsdp):
        assert abs(a - b) < 2e-4 * abs(a), (single_run, fsdp)
    assert fsdp[-1] < fsdp[0]


def test_resume_is_exact(single_run, tmp_path):
    base = ["--training.local_batch_size", "4", "--job.dump_folder", str(tmp_path),
            "--checkpoint.enable", "--checkpoint.interval", "3"]
    _run(base + ["--training.steps", "6"])
    assert (tmp_path / "checkpoint" / "step-3" / ".metadata").is_file()
    assert _losses(tmp_path) == single_run  # checkpointing itself changes nothing
    # Simulate a crash after step 3: drop the final checkpoint, run again, it resumes from step 3.
    import shutil

    shutil.rmtree(tmp_path / "checkpoint" / "step-6")
    _run(base + ["--training.steps", "6"])
    resumed = _losses(tmp_path)
    assert json.loads((tmp_path / "loss_history_pretrain.json").read_text())["first_step"] == 4
    assert resumed == single_run[3:6]  # bit-exact: same data, RNG, optimizer and LR state


def test_partial_checkpoint_is_never_loaded(tmp_path):
    from torchtitan_rtpurbo.checkpoint.manager import complete_steps

    (tmp_path / "step-5.partial").mkdir()
    (tmp_path / "step-5.partial" / ".metadata").write_text("x")
    (tmp_path / "step-2").mkdir()  # renamed but without metadata: not complete either
    assert complete_steps(tmp_path) == []


def test_activation_checkpointing_gives_identical_losses(single_run, tmp_path):
    for mode in ("full", "selective"):
        dump = tmp_path / mode
        _run(["--training.steps", "6", "--training.local_batch_size", "4", "--job.dump_folder", str(dump),
              "--activation_checkpoint.mode", mode, "--activation_checkpoint.selective_ac_option", "2"])
        # same initial weights, same data: AC recomputes activations, it must not change the numbers
        assert all(abs(a - b) < 1e-5 for a, b in zip(_losses(dump), single_run)), (mode, _losses(dump))


def test_bad_config_is_one_clear_error(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "torchtitan_rtpurbo.train", *COMMON, "--training.stepz", "3"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "unknown key 'training.stepz'" in p.stderr


def test_torchao_low_precision_optimizer_trains(tmp_path):
    pytest.importorskip("torchao")
    _run(["--training.steps", "6", "--training.local_batch_size", "4", "--job.dump_folder", str(tmp_path),
          "--optimizer.name", "AdamW8bit"])
    losses = _losses(tmp_path)
    assert len(losses) == 6 and all(l == l for l in losses) and losses[-1] < losses[0]


def test_time_limit_stops_early_and_still_exports(tmp_path):
    # a 1000-step job with a tiny time budget ends after its first step, then exports as at the last step
    p = _run(["--training.steps", "1000", "--training.local_batch_size", "2", "--job.dump_folder", str(tmp_path),
              "--training.time_limit_s", "0.001", "--checkpoint.export_hf", "true"])
    losses = _losses(tmp_path)
    assert 1 <= len(losses) < 1000
    assert "time_limit_s=0.001 reached after step" in p.stdout + p.stderr
    assert (tmp_path / "hf_export" / "config.json").exists()
