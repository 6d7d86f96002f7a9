"""The rotary indexer (rtpurbo.indexer_rope_periods): scores depend on content and on the distance only, the
position-free indexer is unchanged, checkpoints keep the setting, and the inference engine (chunked prefill,
eager and static decode) selects exactly as the model's no-cache decode emulation."""

from __future__ import annotations

import pytest
import torch

from models.rtpurbo.export import config_from_section
from models.rtpurbo.indexer import LayerIndexer, check_rope_periods, indexer_rope_inv_freq
from tests.test_inference import prompt, rtpurbo_copy, rtpurbo_roles_cfg
from tests.test_inference import dense  # noqa: F401  pytest fixture

# the rotary-indexer conversion of the debug model used by the model-level tests below
ROPE = dict(window=4, sinks=2, top_p=0.5, block_size=4, indexer_rope_periods=[3.0, 40.0])


def _indexer(periods, seed=0):
    torch.manual_seed(seed)
    return LayerIndexer([0, 3, 5], n_heads=8, n_kv_heads=4, head_dim=16, indexer_dim=8, rope_periods=periods)


def test_scores_depend_on_distance_not_absolute_position():
    ix = _indexer([4.0, 300.0])
    g = torch.Generator().manual_seed(1)
    q_pre, k_pre = torch.randn(1, 8, 1, 16, generator=g), torch.randn(1, 4, 1, 16, generator=g)
    scores = []
    for m, n in ((40, 33), (1040, 1033), (7, 0)):  # the same distance 7 at three absolute positions
        qi, _ = ix(q_pre, k_pre, positions=torch.tensor([m]))
        _, ki = ix(q_pre, k_pre, positions=torch.tensor([n]))
        scores.append((qi * ki).sum(-1))
    torch.testing.assert_close(scores[1], scores[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores[2], scores[0], atol=1e-4, rtol=1e-4)
    qi, _ = ix(q_pre, k_pre, positions=torch.tensor([40]))
    _, ki = ix(q_pre, k_pre, positions=torch.tensor([20]))  # another distance: another score
    assert not torch.allclose((qi * ki).sum(-1), scores[0], atol=1e-3)


def test_rotation_keeps_norms_and_positions_default_to_arange():
    ix = _indexer([8.0, 64.0])
    g = torch.Generator().manual_seed(2)
    q_pre, k_pre = torch.randn(2, 8, 12, 16, generator=g), torch.randn(2, 4, 12, 16, generator=g)
    plain = _indexer(None)
    plain.load_state_dict(ix.state_dict())
    qp, kp = plain(q_pre, k_pre)
    qi, ki = ix(q_pre, k_pre)
    torch.testing.assert_close(qi.norm(dim=-1), qp.norm(dim=-1), atol=1e-5, rtol=1e-5)
    q2, k2 = ix(q_pre, k_pre, positions=torch.arange(12).expand(2, 12))  # [B, T] positions
    torch.testing.assert_close(q2, qi)
    torch.testing.assert_close(k2, ki)
    torch.testing.assert_close(qi[:, :, 0], qp[:, :, 0])  # position 0: no rotation
    assert not torch.allclose(qi[:, :, 5], qp[:, :, 5])
    torch.testing.assert_close(_indexer(None)(q_pre, k_pre, positions=torch.arange(12) + 5)[0],
                               _indexer(None)(q_pre, k_pre)[0])  # position-free: positions ignored
    inv = indexer_rope_inv_freq(8, (8.0, 64.0))
    torch.testing.assert_close(2 * torch.pi / inv, torch.tensor([8.0, 16.0, 32.0, 64.0]))


@pytest.mark.parametrize("bad", [[512.0], [0.0, 10.0], [100.0, 10.0]])
def test_bad_periods_name_the_key(bad):
    with pytest.raises(ValueError, match="indexer_rope_periods"):
        check_rope_periods(bad, 16)
    with pytest.raises(ValueError, match="even indexer_dim"):
        check_rope_periods([4.0, 8.0], 15)
    assert check_rope_periods([], 16) is None


def test_checkpoint_keeps_the_periods(dense, tmp_path):  # noqa: F811
    """save_rtpurbo_checkpoint -> load_rtpurbo_checkpoint restores the rotary indexer (same outputs); an old
    section without the key loads the position-free indexer."""
    from models.rtpurbo.export import load_rtpurbo_checkpoint, save_rtpurbo_checkpoint

    rt = rtpurbo_copy(dense, **ROPE)
    roles, cfg = rtpurbo_roles_cfg(**ROPE)
    save_rtpurbo_checkpoint(rt, roles, cfg, str(tmp_path / "ck"))
    _, back, _, sec = load_rtpurbo_checkpoint(str(tmp_path / "ck"))
    assert sec["indexer_rope_periods"] == [3.0, 40.0]
    x = torch.tensor([prompt(20, 3)])
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), rt(x), atol=1e-5, rtol=1e-5)
    ixs = [b.inner_attention.indexer for b in (layer.attention for layer in back.layers.values())
           if getattr(b.inner_attention, "indexer", None) is not None]
    assert ixs and all(ix.rope_periods == (3.0, 40.0) for ix in ixs)
    assert config_from_section({"window": 8}).indexer_rope_periods == []


@pytest.mark.parametrize("static", [False, True])
def test_engine_decode_matches_emulation_with_rotary_indexer(dense, static):  # noqa: F811
    """Chunked prefill + decode (eager, and the graph-safe static step) == the model's no-cache decode
    emulation with the rotary indexer: the cached keys carry their own positions' rotation."""
    from models.attention import AttentionContext
    from models.inference.engine import InferenceEngine

    rt = rtpurbo_copy(dense, **ROPE)
    p = prompt(30, 5)
    kw = dict(max_len=64, chunk_size=8, static_decode=static)
    res = InferenceEngine(rt, **kw).generate([p], max_new_tokens=8)
    seq = p + res.tokens[0]
    ctx = AttentionContext(collect={})
    ctx.extras["decode_from"] = len(p)
    with torch.no_grad():
        ref = rt(torch.tensor([seq]), ctx=ctx)[0]
    eng = InferenceEngine(rt, **kw)
    logits = [eng.prefill(torch.tensor([p]), [len(p)])[0]]
    for t in res.tokens[0][:-1]:
        logits.append(eng.decode_step(torch.tensor([t]))[0])
    torch.testing.assert_close(torch.stack(logits), ref[len(p) - 1: len(seq) - 1], atol=1e-4, rtol=1e-4)
    # and the rotation matters: the position-free indexer with the same weights selects differently
    plain = rtpurbo_copy(dense, window=4, sinks=2, top_p=0.5, block_size=4)
    plain.load_state_dict(rt.state_dict())
    with torch.no_grad():
        ref_plain = plain(torch.tensor([seq]), ctx=AttentionContext(collect={}, extras={"decode_from": len(p)}))[0]
    assert not torch.allclose(ref_plain, ref, atol=1e-4)
