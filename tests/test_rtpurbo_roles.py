import json

import pytest
import torch

from models.qwen3 import get_flavor
from models.rtpurbo.roles import HeadRoles, RolesError, build_roles, choose_roles, model_fingerprint


def _scores(L=4, H=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(L, H, generator=g)


def test_choose_roles_query_head_global_top_ratio():
    s = _scores()
    r = choose_roles(s, ratio=0.25, granularity="query_head", n_kv_heads=2)
    chosen = {(l, h) for l in range(4) for h in range(8) if r[l][h]}
    assert len(chosen) == 8  # round(0.25 * 32)
    top = set(torch.topk(s.flatten(), 8).indices.tolist())
    assert chosen == {(i // 8, i % 8) for i in top}
    # global, not per layer: make layer 3 dominate
    s2 = s.clone()
    s2[3] += 10
    r2 = choose_roles(s2, ratio=0.25, granularity="query_head", n_kv_heads=2)
    assert sum(r2[3]) == 8 and sum(map(sum, r2)) == 8


def test_choose_roles_kv_head_uses_max_of_group():
    s = torch.zeros(2, 8)
    s[0, 1] = 0.9  # one strong query head in KV group 0 of layer 0 (mean would be 0.225)
    s[1, 4:8] = 0.3  # KV group 1 of layer 1: uniformly medium (max 0.3)
    r = choose_roles(s, ratio=0.25, granularity="kv_head", n_kv_heads=2)  # 1 of 4 KV heads
    assert r[0] == [True] * 4 + [False] * 4
    assert r[1] == [False] * 8
    r = choose_roles(s, ratio=0.5, granularity="kv_head", n_kv_heads=2)
    assert r[1] == [False] * 4 + [True] * 4
    r = choose_roles(s, threshold=0.5, granularity="kv_head", n_kv_heads=2)
    assert sum(map(sum, r)) == 4 and all(r[0][:4])


def test_choose_roles_threshold_and_errors():
    s = _scores()
    r = choose_roles(s, threshold=0.5, granularity="query_head", n_kv_heads=2)
    assert torch.equal(torch.tensor(r), s >= 0.5)
    with pytest.raises(RolesError):
        choose_roles(s, granularity="query_head", n_kv_heads=2)
    with pytest.raises(RolesError):
        choose_roles(s, ratio=0.1, granularity="layer", n_kv_heads=2)
    assert sum(map(sum, choose_roles(s, ratio=0.001, granularity="query_head", n_kv_heads=2))) == 1


def test_roles_json_round_trip_and_user_edit(tmp_path):
    args = get_flavor("debug")
    roles = build_roles(_scores(), model_args=args, granularity="kv_head", ratio=0.25, window=128, sinks=4,
                        method="needle-repeat test")
    p = tmp_path / "roles.json"
    roles.save_json(p)
    back = HeadRoles.load_json(p)
    assert back.retrieval == roles.retrieval and torch.allclose(torch.tensor(back.scores), torch.tensor(roles.scores))
    assert back.granularity == "kv_head" and back.window == 128 and back.fingerprint == model_fingerprint(args)
    back.check_matches(args)
    assert not list(tmp_path.glob("*.tmp*"))
    # a user flips a whole KV group of layer 0 to local, the loaded roles obey
    d = json.loads(p.read_text())
    d["granularity"] = "query_head"
    d["retrieval"][0] = [0] * 8
    d["retrieval"][1][3] = 1
    p.write_text(json.dumps(d))
    edited = HeadRoles.load_json(p)
    assert edited.retrieval_heads(0) == [] and 3 in edited.retrieval_heads(1)


def test_roles_fingerprint_mismatch_names_both(tmp_path):
    roles = build_roles(_scores(), model_args=get_flavor("debug"), ratio=0.25)
    other = get_flavor("debug").replace(head_dim=64)
    with pytest.raises(RolesError) as e:
        roles.check_matches(other)
    msg = str(e.value)
    assert "'head_dim': 32" in msg and "'head_dim': 64" in msg
    p = tmp_path / "r.json"
    roles.save_json(p)
    with pytest.raises(RolesError, match=str(p)):
        HeadRoles.load_json(p).check_matches(get_flavor("tiny").replace(n_layers=3))


def test_roles_load_errors_name_file_and_key(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(RolesError, match="bad.json"):
        HeadRoles.load_json(p)
    p.write_text(json.dumps({"scores": [[0.1]]}))
    with pytest.raises(RolesError, match="retrieval"):
        HeadRoles.load_json(p)
    p.write_text(json.dumps({"retrieval": [[0, 2]]}))
    with pytest.raises(RolesError, match=r"'retrieval'\[0\]\[1\]"):
        HeadRoles.load_json(p)
    roles = build_roles(_scores(), model_args=get_flavor("debug"), granularity="kv_head", ratio=0.25)
    d = roles.to_dict()
    d["retrieval"][0] = [1, 0, 0, 0, 0, 0, 0, 0]  # mixes a KV group at kv_head granularity
    p.write_text(json.dumps(d))
    with pytest.raises(RolesError, match="layer 0 KV head 0"):
        HeadRoles.load_json(p)
    with pytest.raises(RolesError, match="cannot read"):
        HeadRoles.load_json(tmp_path / "missing.json")


def test_headwise_config_rtp_llm_format():
    roles = build_roles(_scores(), model_args=get_flavor("debug"), ratio=0.25, window=8192, sinks=4)
    hw = roles.headwise_config(seqlen_threshold=16384)
    assert hw["sink_token_num"] == 4 and hw["swa_token_num"] == 8192 and hw["seqlen_threshold"] == 16384
    for l in range(4):
        assert hw[str(l)] == [int(x) for x in roles.retrieval[l]]
    json.dumps(hw)
    assert roles.kv_retrieval(0) == [any(roles.retrieval[0][:4]), any(roles.retrieval[0][4:])]
