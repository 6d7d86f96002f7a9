"""Post-stage-1 indexer sharpening (models/rtpurbo/sharpen.py): the chunked measurement against a per-row
brute force of the decode selection rule, folding into wq, the per-head choice, config validation and the
stage-1 export hook."""

import json
import types

import pytest
import torch

from kernels.sparse_decode import decode_block_density, select_decode_blocks_reference
from models.qwen3 import build_model, get_flavor
from models.rtpurbo import apply_rtpurbo, iter_rtpurbo_backends, roles_from_config
from models.rtpurbo.sharpen import (
    calibrate_sharpening,
    choose_factors,
    fold_sharpening,
    measure_model_sharpening,
    selection_mass_stats,
    summarize_stats,
    validate_sharpen_config,
)
from torchtitan_rtpurbo.config import ConfigError, JobConfig, load_job_config
from torchtitan_rtpurbo.config.job_config import RTPurbo

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(B=2, Hr=3, T=150, D=8, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hr, T, D, generator=g) * 1.5
    k = torch.randn(B, Hr, T, D, generator=g) * 1.5
    qi = torch.randn(B, Hr, T, r, generator=g)
    ki = torch.randn(B, Hr, T, r, generator=g)
    return q, k, qi, ki


def _brute_force(q, k, qi, ki, factors, *, top_p, block_size, window, sinks):
    """Row by row with the decode reference (kernels/sparse_decode.py) on qi * f, and the true mass of the
    kept tokens from a token-level softmax."""
    B, Hr, T, D = q.shape
    F = len(factors)
    chosen = torch.zeros(F, Hr, dtype=torch.float64)
    captured = torch.zeros(F, Hr, dtype=torch.float64)
    free_tot, rows = 0.0, 0.0
    nb = -(-T // block_size)
    for m in range(T):
        lens = torch.full((B,), m + 1, dtype=torch.long)
        p = torch.softmax((q[:, :, m, None, :] @ k[:, :, : m + 1].transpose(-1, -2))[:, :, 0] * D**-0.5, -1)
        tok_block = torch.arange(m + 1) // block_size
        for i, f in enumerate(factors):
            blocks = select_decode_blocks_reference(qi[:, :, m] * f, ki, lens, top_p=top_p, block_size=block_size,
                                                    window=window, sinks=sinks)  # [B, Hr, nb]
            ch, fr = decode_block_density(blocks, lens, block_size=block_size, window=window, sinks=sinks)
            chosen[i] += ch.sum(0).double()
            if int(fr[0]) > 0:
                kept_tok = blocks[:, :, tok_block]  # [B, Hr, m + 1]
                captured[i] += (p * kept_tok).sum(-1).sum(0).double()
            if i == 0:
                free_tot += float(fr.sum())
                rows += B * float(int(fr[0]) > 0)
        assert blocks.shape[-1] == nb
    return chosen, free_tot, captured, rows


def test_measurement_matches_brute_force():
    q, k, qi, ki = _inputs()
    factors = [1.0, 2.0, 8.0]  # powers of two: qi * f and f * (qi . ki) round identically
    kw = dict(top_p=0.8, block_size=16, window=32, sinks=4)
    st = selection_mass_stats(q, k, qi, ki, factors, chunk=37, **kw)  # chunk not dividing T
    chosen, free, captured, rows = _brute_force(q, k, qi, ki, factors, **kw)
    torch.testing.assert_close(st["chosen"], chosen)
    assert st["free"].tolist() == [free] * 3 and st["rows"].tolist() == [rows] * 3
    torch.testing.assert_close(st["captured"], captured, rtol=1e-5, atol=1e-4)
    # sharper scores keep fewer blocks here, and the summary divides the sums
    s = summarize_stats(st)
    assert (s["density"][2] < s["density"][0]).all()
    torch.testing.assert_close(s["density"], chosen / free)
    torch.testing.assert_close(s["captured"], captured / rows, rtol=1e-5, atol=1e-5)
    # the oracle (selection by the true block mass) captures at least top_p
    assert (s["oracle_captured"] >= 0.8 - 1e-5).all()
    # the chunk size does not matter
    st2 = selection_mass_stats(q, k, qi, ki, factors, chunk=150, **kw)
    for key in st:
        torch.testing.assert_close(st2[key], st[key])


def test_top_p_one_keeps_every_block():
    q, k, qi, ki = _inputs(B=1, Hr=2, T=70)
    st = selection_mass_stats(q, k, qi, ki, [1.0, 4.0], top_p=1.0, block_size=8, window=16, sinks=2, chunk=32)
    s = summarize_stats(st)
    torch.testing.assert_close(s["density"], torch.ones(2, 2, dtype=torch.float64))
    torch.testing.assert_close(s["captured"], torch.ones(2, 2, dtype=torch.float64))


def _rtpurbo_debug_model(seed=0):
    torch.manual_seed(seed)
    model = build_model(get_flavor("debug"))
    cfg = RTPurbo(window=32, sinks=4, retrieval_ratio=0.25, block_size=16, top_p=0.8)
    roles = roles_from_config(torch.rand(4, 8, generator=torch.Generator().manual_seed(seed)), model.args, cfg)
    apply_rtpurbo(model, roles, cfg)
    return model, cfg


def test_fold_into_wq_equals_scaling_scores():
    model, _ = _rtpurbo_debug_model()
    seqs = [torch.randint(0, 4096, (96,), generator=torch.Generator().manual_seed(3))]
    factors = {}
    for l, b in iter_rtpurbo_backends(model):
        if b.indexer is not None:
            factors[l] = [2.0 ** (j % 3) for j in range(len(b.retrieval_list))]
    q_pre = torch.randn(1, 8, 20, model.args.head_dim)
    k_pre = torch.randn(1, model.args.n_kv_heads, 20, model.args.head_dim)
    before = {l: b.indexer(q_pre, k_pre) for l, b in iter_rtpurbo_backends(model) if l in factors}
    ref = measure_model_sharpening(model, seqs, [1.0, 2.0, 4.0], chunk=40)
    fold_sharpening(model, factors)
    after = measure_model_sharpening(model, seqs, [1.0], chunk=40)
    for l, b in iter_rtpurbo_backends(model):
        if l not in factors:
            continue
        qi, ki = b.indexer(q_pre, k_pre)
        f = torch.tensor(factors[l])[None, :, None, None]
        torch.testing.assert_close(qi, before[l][0] * f)
        torch.testing.assert_close(ki, before[l][1])
        torch.testing.assert_close(qi @ ki.transpose(-1, -2), f * (before[l][0] @ before[l][1].transpose(-1, -2)))
        # the folded model at factor 1 measures what the unfolded one measured at each head's factor
        idx = [[1.0, 2.0, 4.0].index(x) for x in factors[l]]
        for j, i in enumerate(idx):
            assert after[l]["density"][0, j] == ref[l]["density"][i, j]
            torch.testing.assert_close(after[l]["captured"][0, j], ref[l]["captured"][i, j])


def test_choose_respects_floor_and_falls_back_to_one():
    factors = [1.0, 1.5, 2.0, 4.0]
    per_head = [
        [0.95, 0.94, 0.94, 0.94],  # everything within 2%: the sharpest
        [0.90, 0.80, 0.70, 0.60],  # nothing sharper qualifies: factor 1
        [0.99, 0.90, 0.98, 0.80],  # non-monotone: 2.0 qualifies, 4.0 does not
        [0.80, 0.79, 0.795, 0.81],  # sharpening gains mass
    ]
    captured = torch.tensor(per_head, dtype=torch.float64).T  # [F, Hr]
    idx = choose_factors(factors, captured, 0.98)
    assert idx == [3, 0, 2, 3]
    floor = captured[0] * 0.98
    for h, i in enumerate(idx):
        assert captured[i, h] >= floor[h]
        assert all(captured[j, h] < floor[h] for j in range(len(factors)) if factors[j] > factors[i])
    # min_mass 1.0: only factors that lose nothing
    assert choose_factors(factors, captured, 1.0) == [0, 0, 0, 3]
    with pytest.raises(ValueError, match="sharpen_factors"):
        choose_factors([1.5, 2.0], captured[:2], 0.98)


def test_calibrate_sharpening_applies_the_chosen_factors():
    model, _ = _rtpurbo_debug_model(seed=1)
    wq0 = {l: b.indexer.wq.detach().clone() for l, b in iter_rtpurbo_backends(model) if b.indexer is not None}
    seqs = [torch.randint(0, 4096, (96,), generator=torch.Generator().manual_seed(4))]
    rep = calibrate_sharpening(model, seqs, factors=[4, 1, 2], min_mass=0.9, chunk=48)
    assert rep["factors"] == [1.0, 2.0, 4.0]
    json.dumps(rep)  # JSON-able
    n = 0
    for h in rep["heads"]:
        assert h["captured"] >= 0.9 * h["captured_f1"]
        b = dict(iter_rtpurbo_backends(model))[h["layer"]]
        j = b.retrieval_list.index(h["head"])
        torch.testing.assert_close(b.indexer.wq[j], wq0[h["layer"]][j] * h["factor"])
        n += 1
    assert n == sum(len(b.retrieval_list) for _, b in iter_rtpurbo_backends(model) if b.indexer is not None)
    # min_mass 1: a sharper factor only where it loses no captured mass
    model2, _ = _rtpurbo_debug_model(seed=1)
    rep2 = calibrate_sharpening(model2, seqs, factors=[1, 2, 4], min_mass=1.0, chunk=48, apply=True)
    for h in rep2["heads"]:
        if h["factor"] != 1.0:
            assert h["captured"] >= h["captured_f1"]


@pytest.mark.parametrize("key,value", [
    ("indexer_sharpen", "sometimes"),
    ("sharpen_factors", [2.0, 4.0]),
    ("sharpen_factors", [1.0, 0.5]),
    ("sharpen_factors", []),
    ("sharpen_min_mass", 0.0),
    ("sharpen_min_mass", 1.5),
    ("sharpen_num_sequences", 0),
    ("sharpen_query_chunk", 0),
])
def test_bad_config_values_name_the_key(key, value):
    rt = RTPurbo()
    validate_sharpen_config(rt)  # defaults are valid
    setattr(rt, key, value)
    with pytest.raises(ValueError, match=f"rtpurbo.{key}"):
        validate_sharpen_config(rt)


def test_defaults_leave_stage1_unchanged_and_cli_validates():
    assert RTPurbo().indexer_sharpen == "none"
    cfg = load_job_config(["--rtpurbo.indexer_sharpen", "calibrate", "--rtpurbo.sharpen_factors", "1,2,3",
                           "--rtpurbo.sharpen_min_mass", "0.95"])
    assert cfg.rtpurbo.sharpen_factors == [1.0, 2.0, 3.0] and cfg.rtpurbo.sharpen_min_mass == 0.95
    with pytest.raises(ConfigError, match="rtpurbo.sharpen_factors"):
        load_job_config(["--rtpurbo.sharpen_factors", "1,two"])
    from torchtitan_rtpurbo.tasks.stage1 import Stage1Task

    bad = JobConfig()
    bad.rtpurbo.indexer_sharpen = "yes"
    with pytest.raises(ValueError, match="rtpurbo.indexer_sharpen"):
        Stage1Task(bad)  # before any training


def test_stage1_export_folds_the_sharpening(tmp_path, monkeypatch):
    """Stage1Task.finish with indexer_sharpen = "calibrate": the exported checkpoint's wq is the trained
    one times the chosen factor per head, and the report is written to the dump folder."""
    from models.rtpurbo.export import load_rtpurbo_checkpoint
    from models.rtpurbo.roles import HeadRoles
    from torchtitan_rtpurbo.tasks import stage1 as stage1_mod

    model, rt = _rtpurbo_debug_model(seed=2)
    cfg = JobConfig()
    cfg.job.dump_folder = str(tmp_path)
    cfg.rtpurbo = rt
    cfg.rtpurbo.indexer_sharpen = "calibrate"
    cfg.rtpurbo.sharpen_factors = [1.0, 2.0, 4.0]
    cfg.rtpurbo.sharpen_min_mass = 0.9
    cfg.rtpurbo.sharpen_query_chunk = 48
    cfg.checkpoint.export_dtype = "float32"
    seqs = [torch.randint(0, 4096, (96,), generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    monkeypatch.setattr(stage1_mod, "calibration_sequences", lambda c, tok, n=None: seqs[:n])
    roles = roles_from_config(torch.rand(4, 8, generator=torch.Generator().manual_seed(2)), model.args, rt)
    assert isinstance(roles, HeadRoles)
    trainer = types.SimpleNamespace(cfg=cfg, rank=0, device=torch.device("cpu"), tokenizer=None,
                                    model_args=model.args, full_model_state=lambda: model.state_dict())
    task = stage1_mod.Stage1Task(cfg)
    task.roles = roles
    task.finish(trainer)
    rep = json.loads((tmp_path / "indexer_sharpen.json").read_text())
    assert rep["num_sequences"] == 2 and len(rep["heads"]) == roles.num_retrieval()
    _, loaded, _, _ = load_rtpurbo_checkpoint(str(tmp_path / "stage1"))
    src = dict(iter_rtpurbo_backends(model))
    for l, b in iter_rtpurbo_backends(loaded):
        if b.indexer is None:
            continue
        for j, h in enumerate(b.retrieval_list):
            f = next(x["factor"] for x in rep["heads"] if x["layer"] == l and x["head"] == h)
            torch.testing.assert_close(b.indexer.wq[j], src[l].indexer.wq[j].detach() * f)
            torch.testing.assert_close(b.indexer.wk[j], src[l].indexer.wk[j].detach())
