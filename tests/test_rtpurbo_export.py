import json

import pytest
import torch

from models.qwen3 import build_model, get_flavor
from models.rtpurbo import (
    apply_rtpurbo,
    indexer_state_dict,
    load_indexer_state_dict,
    rtpurbo_config_section,
    roles_from_config,
)
from models.rtpurbo.roles import HeadRoles
from torchtitan_rtpurbo.config.job_config import RTPurbo


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    m = build_model(get_flavor("debug"))
    scores = torch.rand(4, 8, generator=torch.Generator().manual_seed(1))
    roles = roles_from_config(scores, m.args, cfg, method="test")
    apply_rtpurbo(m, roles, cfg)
    return m, roles


def test_indexer_state_dict_round_trip_exact():
    cfg = RTPurbo(window=16, sinks=4, retrieval_ratio=0.25, indexer_dim=8)
    a, roles = _model(cfg, seed=0)
    b, _ = _model(cfg, seed=1)
    sd = indexer_state_dict(a)
    assert sd and all(k.startswith("rtpurbo.layers.") and k.endswith((".indexer.wq", ".indexer.wk")) for k in sd)
    for l in range(4):
        n = len(roles.retrieval_heads(l))
        if n:
            assert sd[f"rtpurbo.layers.{l}.indexer.wq"].shape == (n, 8, 32)
        else:
            assert f"rtpurbo.layers.{l}.indexer.wq" not in sd
    assert any(not torch.equal(sd[k], v) for k, v in indexer_state_dict(b).items())
    load_indexer_state_dict(b, sd)
    for k, v in indexer_state_dict(b).items():
        assert torch.equal(v, sd[k])
    missing = dict(sd)
    missing.pop(next(iter(missing)))
    with pytest.raises(KeyError):
        load_indexer_state_dict(b, missing)
    bad = {k: v[:, :4] for k, v in sd.items()}
    with pytest.raises(ValueError, match="shape"):
        load_indexer_state_dict(b, bad)


def test_config_section_has_roles_and_headwise_config():
    cfg = RTPurbo(window=64, sinks=4, retrieval_ratio=0.25, granularity="kv_head", prefill="sparse")
    m, roles = _model(cfg)
    sec = rtpurbo_config_section(m, roles, cfg)
    json.dumps(sec)
    rt = sec["rtpurbo"]
    for key in ("granularity", "window", "sinks", "indexer_dim", "top_p", "block_size", "prefill"):
        assert rt[key] == getattr(cfg, key)
    back = HeadRoles.from_dict(rt["roles"])
    assert back.retrieval == roles.retrieval and back.scores == roles.scores and back.window == 64
    hw = sec["headwise_config"]
    assert hw["swa_token_num"] == 64 and hw["sink_token_num"] == 4
    assert [hw[str(l)] for l in range(4)] == [[int(x) for x in r] for r in roles.retrieval]


def test_save_and_load_rtpurbo_checkpoint(tmp_path):
    pytest.importorskip("models.hf_checkpoint")
    from models.rtpurbo import load_rtpurbo_checkpoint, save_rtpurbo_checkpoint

    cfg = RTPurbo(window=16, sinks=4, retrieval_ratio=0.25, prefill="sparse", top_p=0.8, block_size=16)
    m, roles = _model(cfg)
    x = torch.randint(0, 4096, (1, 96))
    with torch.no_grad():
        ref = m(x)
    save_rtpurbo_checkpoint(m, roles, cfg, str(tmp_path / "ck"))
    conf = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert "rtpurbo" in conf and "headwise_config" in conf
    args, m2, roles2, sec = load_rtpurbo_checkpoint(str(tmp_path / "ck"))
    assert roles2.retrieval == roles.retrieval and sec["prefill"] == "sparse" and args.n_layers == 4
    for k, v in indexer_state_dict(m).items():
        assert torch.equal(indexer_state_dict(m2)[k], v)
    with torch.no_grad():
        assert torch.equal(m2(x), ref)  # bit-for-bit: fp32 export, same code path
    # the converted model in the original is untouched by the save (backends restored)
    assert all(type(l.attention.inner_attention).__name__ == "RTPurboAttention" for l in m.layers.values())
