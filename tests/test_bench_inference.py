"""scripts/bench_inference.py at toy size on CPU: the smoke run writes the JSON the GPU run writes (keys only,
never timings), and the GPU self-check's code runs (at toy size, on the CPU path) and passes."""

import json

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_bench_inference_smoke_json(tmp_path, capsys):
    from scripts.bench_inference import main

    out = tmp_path / "bench.json"
    assert main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) >= {"meta", "results", "max_context", "speedups", "notes"}
    assert res["meta"]["smoke"] is True and res["meta"]["rtpurbo"]["retrieval_layers"] == [1]
    assert {(r["model"], r["seq_len"]) for r in res["results"]} == {(m, t) for m in ("dense", "rtpurbo")
                                                                     for t in (256, 512)}
    for r in res["results"]:
        assert set(r) >= {"model", "seq_len", "fill", "prefill_ms", "prefill_ms_per_layer", "prefill_ms_by_layer_kind",
                          "decode_step_ms", "decode_ms_per_layer", "decode_wall_ms", "decode_density", "kv_cache_bytes",
                          "kv_bytes_per_token", "graph_status", "decode_path"}
        assert r["fill"] == "prefill" and r["decode_path"] == "static"
        # the decode split (attention vs the rest) and launch counts; on CPU the engine runs the modules
        sp = r["decode_split"]["modules"]
        assert set(sp) >= {"step_ms", "no_attention_ms", "attention_ms", "step_ms_per_layer", "launches"}
        assert sp["launches"]["per_layer"] > 0 and sp["launches"]["fixed"] > 0
        assert r["decode_layers"].startswith("the model's torch modules") and "fused" not in r["decode_split"]
        if r["model"] == "rtpurbo":
            assert 0.0 < r["decode_density"] < 1.0 and r["planted_density"] == 0.05
            assert set(r["prefill_ms_by_layer_kind"]) == {"rtp_0of4", "rtp_1of4"}
    for kind in ("dense", "rtpurbo"):
        for what in ("stack", "full_48_layers"):
            m = res["max_context"][kind][what]
            assert set(m) >= {"weights_bytes", "kv_bytes_per_token", "act_bytes_per_token", "max_tokens_decode_only",
                              "max_tokens_one_shot_prefill", "free_bytes"}
    # RTPurbo keeps one of four KV heads in full in one of two layers (+ indexer keys): far fewer bytes
    assert res["max_context"]["rtpurbo"]["stack"]["kv_bytes_per_token"] < \
        res["max_context"]["dense"]["stack"]["kv_bytes_per_token"] / 2
    assert "Longest context" in capsys.readouterr().out


def test_bench_inference_check_code_on_cpu(capsys):
    from scripts.bench_inference import main

    assert main(["--smoke", "--check", "--check-steps", "2"]) == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith("PASS: ") and last.endswith(" checks passed") and "FAIL" not in out, out[-3000:]


def test_bench_inference_decode_only(tmp_path, capsys):
    """--decode-only: no prefill (random fill), the decode split table."""
    from scripts.bench_inference import main

    out = tmp_path / "d.json"
    assert main(["--smoke", "--decode-only", "--seq-lens", "256", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert {r["model"] for r in res["results"]} == {"dense", "rtpurbo"}
    for r in res["results"]:
        assert r["fill"].startswith("random") and "prefill_ms" not in r
        assert r["decode_rest_ms_per_layer"] > 0 and r["launches_per_layer"] > 0
    assert "Decode per layer, split" in capsys.readouterr().out
