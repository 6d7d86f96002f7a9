"""eval.indexer_fp8: the evaluation's decode emulation with the indexer keys rounded as the inference engine's
float8_e4m3fn indexer cache stores them (models/rtpurbo/decode_rows.py, torchtitan_rtpurbo/evaluation/compare.py)."""

from __future__ import annotations

import pytest
import torch

from models.inference.kv_cache import FP8_E4M3_MAX, indexer_store_cast
from models.rtpurbo.decode_rows import decode_rows_attention

FP8 = getattr(torch, "float8_e4m3fn", None)
pytestmark = [pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn"),
              pytest.mark.usefixtures("one_thread")]
KW = dict(top_p=0.9, window=16, sinks=2, block_size=16)


def test_store_cast_is_torchs_saturating_fp8_round_trip():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(4, 3, 97, 16, generator=g) * torch.tensor([0.01, 1.0, 30.0, 1000.0])[:, None, None, None])
        x = x.to(dtype)
        assert (x.abs() > FP8_E4M3_MAX).any() and (x != 0).any()
        got = indexer_store_cast(x, FP8).to(dtype)
        assert torch.equal(got, x.clamp(-448, 448).to(FP8).to(dtype))
        assert got.isfinite().all() and got.abs().max() == FP8_E4M3_MAX  # saturated, never NaN
        assert not torch.equal(got, x)  # 3 mantissa bits: random values move


def _inputs(T=160, Hr=4, Hkv=2, D=16, r=16, key_scale=3.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    q_r = torch.randn(2, Hr, T, D, generator=g)
    k, v = torch.randn(2, Hkv, T, D, generator=g), torch.randn(2, Hkv, T, D, generator=g)
    qi, ki = torch.randn(2, Hr, T, r, generator=g), torch.randn(2, Hr, T, r, generator=g) * key_scale
    return q_r, k, v, qi, ki, [0, 0, 1, 1]


def test_decode_rows_fp8_exact_keys_change_nothing():
    """Keys that float8_e4m3fn represents exactly: the option is the identity (queries are never rounded)."""
    q_r, k, v, qi, ki, kv = _inputs()
    ki = ki.to(FP8).float()
    a, da = decode_rows_attention(q_r, k, v, qi, ki, kv, 100, **KW)
    b, db = decode_rows_attention(q_r, k, v, qi, ki, kv, 100, **KW, indexer_key_dtype=FP8)
    assert torch.equal(a, b) and torch.equal(da, db)


def test_decode_rows_fp8_random_keys_change_selection_not_density():
    q_r, k, v, qi, ki, kv = _inputs()
    a, da = decode_rows_attention(q_r, k, v, qi, ki, kv, 100, **KW)
    b, db = decode_rows_attention(q_r, k, v, qi, ki, kv, 100, **KW, indexer_key_dtype=FP8)
    # = the unrounded emulation on keys rounded by hand (the option rounds ki only, like the engine)
    c, dc = decode_rows_attention(q_r, k, v, qi, indexer_store_cast(ki, FP8).float(), kv, 100, **KW)
    assert torch.equal(b, c) and torch.equal(db, dc)
    assert not torch.equal(a, b)  # some block selections flipped
    assert ((da > 0) & (da < 1)).all() and (db - da).abs().max() < 0.02


def _checkpoints(tmp_path):
    """A random debug-size teacher and its RTPurbo conversion, saved as the comparison loads them."""
    from models.hf_checkpoint import save_hf_checkpoint
    from models.qwen3 import build_model, get_flavor
    from models.rtpurbo import apply_rtpurbo, roles_from_config
    from models.rtpurbo.export import save_rtpurbo_checkpoint
    from torchtitan_rtpurbo.config.job_config import RTPurbo

    torch.manual_seed(0)
    m = build_model(get_flavor("debug"))
    save_hf_checkpoint(m, str(tmp_path / "teacher"))
    rt = RTPurbo(window=32, sinks=4, retrieval_ratio=0.5, indexer_dim=8, block_size=16, top_p=0.9)
    roles = roles_from_config(torch.rand(4, 8, generator=torch.Generator().manual_seed(1)), m.args, rt,
                              method="test")
    apply_rtpurbo(m, roles, rt)
    save_rtpurbo_checkpoint(m, roles, rt, str(tmp_path / "stage2"))
    return rt


@pytest.mark.parametrize("scoring", ["teacher_forced", "greedy"])
def test_eval_indexer_fp8_reaches_the_comparison(tmp_path, monkeypatch, scoring):
    import models.rtpurbo.decode_rows as dr
    from torchtitan_rtpurbo.config import JobConfig
    from torchtitan_rtpurbo.evaluation.compare import run_comparison

    rt = _checkpoints(tmp_path)
    seen = []
    orig = dr.decode_rows_attention
    monkeypatch.setattr(dr, "decode_rows_attention",
                        lambda *a, **kw: seen.append(kw.get("indexer_key_dtype")) or orig(*a, **kw))
    cfg = JobConfig()
    cfg.job.dump_folder = str(tmp_path)
    cfg.model.hf_checkpoint = str(tmp_path / "teacher")
    cfg.model.tokenizer_path = "assets/tokenizer/stdlib_sp4096.model"
    cfg.rtpurbo = rt
    cfg.rtpurbo.init_checkpoint = str(tmp_path / "stage2")
    ev = cfg.eval
    ev.lengths, ev.tasks, ev.samples_per_task, ev.batch_size, ev.scoring = [256], ["niah_single"], 1, 1, scoring
    ev.max_new_tokens, ev.perplexity_seq_len, ev.perplexity_max_windows = 2, 64, 1
    ev.skip_models = ["streaming", "duo", "topk", "rtpurbo_s1"]
    assert not ev.indexer_fp8  # off by default: no extra model
    assert list(run_comparison(cfg, torch.device("cpu"))["models"]) == ["dense", "rtpurbo"]
    assert seen and set(seen) == {None}
    seen.clear()
    ev.indexer_fp8 = True
    res = run_comparison(cfg, torch.device("cpu"))["models"]
    assert list(res) == ["dense", "rtpurbo", "rtpurbo_fp8"]
    assert set(seen) == {None, FP8}
    assert "perplexity" in res["rtpurbo"] and "perplexity" not in res["rtpurbo_fp8"]  # no decode rows there
    d = res["rtpurbo_fp8"]["density"][256]
    assert d is not None and 0 < d <= 1
