import copy
import os
from pathlib import Path

import pytest
import torch

from models.attention import AttentionContext
from models.inference import InferenceEngine, KVCacheMemoryError, RoleKVCache, sample_next
from models.qwen3 import build_model, get_flavor
from models.rtpurbo.convert import apply_rtpurbo
from models.rtpurbo.roles import HeadRoles
from torchtitan_rtpurbo.config.job_config import RTPurbo

# debug flavour: 4 layers, 8 query heads, 2 KV heads (heads 0-3 read KV 0, heads 4-7 read KV 1).
# Layer 0: retrieval 0,1 -> KV 0 full (local 2,3 read it with the window mask), KV 1 sinks + ring.
# Layer 1: retrieval 5 -> KV 1 full, KV 0 ring. Layer 2: all local (ring only). Layer 3: all retrieval.
RETRIEVAL = [[0, 1], [5], [], list(range(8))]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return build_model(get_flavor("debug")).eval()


def rtpurbo_roles_cfg(*, window, sinks=2, top_p=1.0, block_size=8, **cfg_kw):
    """(roles, RTPurbo config) of the test conversions: RETRIEVAL heads, indexer_dim 8 (+ cfg_kw)."""
    flags = [[h in r for h in range(8)] for r in RETRIEVAL]
    roles = HeadRoles(scores=[[float(x) for x in row] for row in flags], retrieval=flags, window=window, sinks=sinks)
    cfg = RTPurbo(window=window, sinks=sinks, top_p=top_p, block_size=block_size, indexer_dim=8, **cfg_kw)
    return roles, cfg


def rtpurbo_copy(model, *, window, sinks=2, top_p=1.0, block_size=8, **cfg_kw):
    m = copy.deepcopy(model)
    roles, cfg = rtpurbo_roles_cfg(window=window, sinks=sinks, top_p=top_p, block_size=block_size, **cfg_kw)
    torch.manual_seed(1)
    apply_rtpurbo(m, roles, cfg, check=False)
    return m.eval()


def prompt(n, seed):
    return torch.randint(0, 4096, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def greedy_by_forward(model, toks, n_new):
    toks = list(toks)
    out = []
    for _ in range(n_new):
        nxt = int(model(torch.tensor([toks]))[0, -1].argmax())
        out.append(nxt)
        toks.append(nxt)
    return out


@pytest.mark.parametrize("kind", ["dense", "rtpurbo"])
@pytest.mark.parametrize("chunk", [7, 64])
def test_chunked_prefill_matches_forward(dense, kind, chunk):
    model = dense if kind == "dense" else rtpurbo_copy(dense, window=5, sinks=2)
    toks = torch.tensor([prompt(37, 0), prompt(37, 1)])
    ref = model(toks)
    eng = InferenceEngine(model, max_len=64, chunk_size=chunk)
    got = eng.prefill(toks, [37, 37], all_logits=True)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    last = InferenceEngine(model, max_len=64, chunk_size=chunk).prefill(toks, [37, 37])
    torch.testing.assert_close(last, ref[:, -1], atol=1e-4, rtol=1e-4)


def test_dense_greedy_matches_full_forward(dense):
    p = prompt(11, 2)
    ref = greedy_by_forward(dense, p, 12)
    res = InferenceEngine(dense, max_len=32, chunk_size=4).generate([p], max_new_tokens=12)
    assert res.tokens[0] == ref
    assert res.decode_steps == 11 and res.mean_density is None


def test_rtpurbo_top_p_one_wide_window_equals_dense(dense):
    p = prompt(11, 3)
    ref = InferenceEngine(dense, max_len=64, chunk_size=4).generate([p], max_new_tokens=12).tokens[0]
    rt = rtpurbo_copy(dense, window=40, sinks=2, top_p=1.0)  # window + sinks < max_len: rings are used
    eng = InferenceEngine(rt, max_len=64, chunk_size=4)
    assert any(p_.ring_kv for p_ in RoleKVCache(rt, 1, 64).plans)
    res = eng.generate([p], max_new_tokens=12)
    assert res.tokens[0] == ref
    assert res.mean_density == pytest.approx(1.0)


def test_rtpurbo_small_window_matches_rtpurbo_forward(dense):
    """Local heads through sinks + ring (window 5 < context) decode like the model's own windowed forward."""
    rt = rtpurbo_copy(dense, window=5, sinks=2, top_p=1.0)
    p = prompt(13, 4)
    ref = greedy_by_forward(rt, p, 10)
    res = InferenceEngine(rt, max_len=48, chunk_size=3).generate([p], max_new_tokens=10)
    assert res.tokens[0] == ref


def test_rtpurbo_sparse_decode_matches_decode_rows_emulation(dense):
    """top_p < 1: decode logits equal the model's no-cache decode emulation (ctx.extras['decode_from'])."""
    rt = rtpurbo_copy(dense, window=4, sinks=2, top_p=0.5, block_size=4)
    p = prompt(30, 5)
    eng = InferenceEngine(rt, max_len=64, chunk_size=8)
    res = eng.generate([p], max_new_tokens=8)
    seq = p + res.tokens[0]
    ctx = AttentionContext(collect={})
    ctx.extras["decode_from"] = len(p)
    with torch.no_grad():
        ref = rt(torch.tensor([seq]), ctx=ctx)[0]
    # re-run the engine teacher-forced to get its decode logits
    eng2 = InferenceEngine(rt, max_len=64, chunk_size=8)
    logits = [eng2.prefill(torch.tensor([p]), [len(p)])[0]]
    for t in res.tokens[0][:-1]:
        logits.append(eng2.decode_step(torch.tensor([t]))[0])
    got = torch.stack(logits)
    torch.testing.assert_close(got, ref[len(p) - 1: len(seq) - 1], atol=1e-4, rtol=1e-4)
    assert 0.0 < res.mean_density < 1.0


@pytest.mark.parametrize("kind", ["dense", "rtpurbo"])
def test_batch_with_different_lengths_equals_one_at_a_time(dense, kind):
    model = dense if kind == "dense" else rtpurbo_copy(dense, window=5, sinks=2, top_p=0.6, block_size=4)
    prompts = [prompt(9, 6), prompt(23, 7)]
    eng = InferenceEngine(model, max_len=48, chunk_size=8)
    batch = eng.generate(prompts, max_new_tokens=9)
    for b, pr in enumerate(prompts):
        single = InferenceEngine(model, max_len=48, chunk_size=8).generate([pr], max_new_tokens=9)
        assert batch.tokens[b] == single.tokens[0]


def test_stop_tokens_and_sampling(dense):
    p = prompt(8, 8)
    ref = InferenceEngine(dense, max_len=32).generate([p], max_new_tokens=6).tokens[0]
    stop = ref[2]
    res = InferenceEngine(dense, max_len=32).generate([p], max_new_tokens=6, stop_tokens=[stop])
    assert res.tokens[0] == ref[: ref.index(stop) + 1] and res.finished == [True]
    a = InferenceEngine(dense, max_len=32).generate([p], max_new_tokens=5, temperature=0.8, top_k=50, top_p=0.9,
                                                    seed=3)
    b = InferenceEngine(dense, max_len=32).generate([p], max_new_tokens=5, temperature=0.8, top_k=50, top_p=0.9,
                                                    seed=3)
    assert a.tokens == b.tokens and len(a.tokens[0]) == 5
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0]])
    assert all(int(sample_next(logits, temperature=1.0, top_k=1)) == 1 for _ in range(5))
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, temperature=1.0, top_p=0.6, generator=g)) for _ in range(50)}
    assert picks <= {1, 2}


def test_memory_report_and_too_large_request(dense):
    rt = rtpurbo_copy(dense, window=8, sinks=2)
    d = RoleKVCache(dense, 2, 512).memory_report()
    r = RoleKVCache(rt, 2, 512).memory_report()
    assert r["bytes_per_token"] < d["bytes_per_token"] == d["dense_bytes_per_token"]
    assert r["total_bytes"] < r["dense_total_bytes"]
    assert d["total_bytes"] == 2 * 512 * d["dense_bytes_per_token"]
    with pytest.raises(KVCacheMemoryError) as e:
        RoleKVCache(dense, 4, 1 << 20, memory_limit_bytes=1 << 20)
    need = 4 * (1 << 20) * d["dense_bytes_per_token"]
    assert str(need) in str(e.value) and str(1 << 20) in str(e.value)
    with pytest.raises(ValueError, match="longer than max_len"):
        InferenceEngine(dense, max_len=8).generate([prompt(9, 0)], max_new_tokens=1)


# ---- scripts/generate.py: runs on the shipped tiny teacher; bad inputs are one error line, exit code 2 ----
ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "assets/tokenizer/stdlib_sp4096.model")
TEACHER = str(ROOT / "assets/teachers/tiny")


def _generate(argv, capsys):
    from scripts.generate import main

    rc = main(argv)
    return rc, capsys.readouterr()


def test_generate_script_runs(tmp_path, capsys):
    pf = tmp_path / "p.txt"
    pf.write_text("def main(argv=None):\n    ")
    rc, out = _generate(["--checkpoint", TEACHER, "--tokenizer", TOKENIZER, "--prompt-file", str(pf),
                         "--max-new-tokens", "8", "--max-len", "64", "--device", "cpu"], capsys)
    assert rc == 0, out.err
    assert "time to first token" in out.err and "tokens/s" in out.err and "KV cache" in out.err


def test_generate_script_errors(tmp_path, capsys):
    pf = tmp_path / "p.txt"
    pf.write_text("import os\n" * 40)
    base = ["--tokenizer", TOKENIZER, "--prompt-file", str(pf), "--device", "cpu", "--max-new-tokens", "2"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(open(f"{TEACHER}/config.json").read())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    small_vocab = tmp_path / "small_vocab"
    from models.hf_checkpoint import save_hf_checkpoint

    args = get_flavor("debug")
    args.vocab_size = 512
    save_hf_checkpoint(build_model(args), small_vocab)
    cases = [
        (["--checkpoint", str(tmp_path / "missing")], "no config.json"),
        (["--checkpoint", str(bad)], "cannot read config.json"),
        (["--checkpoint", str(corrupt)], "could not be loaded"),
        (["--checkpoint", str(small_vocab)], "exceeds the model's (512)"),
        (["--checkpoint", TEACHER, "--max-len", "16"], "longer than --max-len 16"),
    ]
    for extra, msg in cases:
        rc, out = _generate(base + extra, capsys)
        lines = out.err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], out.err


def test_moe_model_chunked_prefill_and_greedy():
    torch.manual_seed(0)
    moe = build_model(get_flavor("debug_moe")).eval()
    toks = torch.tensor([prompt(30, 9), prompt(30, 10)])
    with torch.no_grad():
        ref = moe(toks)
    got = InferenceEngine(moe, max_len=40, chunk_size=7).prefill(toks, [30, 30], all_logits=True)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    p = prompt(10, 11)
    assert InferenceEngine(moe, max_len=40).generate([p], max_new_tokens=5).tokens[0] == greedy_by_forward(moe, p, 5)


# ---- the graph-safe decode step (what a CUDA graph captures), run eagerly on CPU ----
def _teacher_forced(eng, prompts, forced):
    """Logits of the prefill and of each decode step fed forced[step] (one token per sequence)."""
    B = len(prompts)
    tok = torch.zeros(B, max(map(len, prompts)), dtype=torch.long)
    for b, p in enumerate(prompts):
        tok[b, : len(p)] = torch.tensor(p)
    out = [eng.prefill(tok, [len(p) for p in prompts])]
    for step in forced:
        out.append(eng.decode_step(torch.tensor(step)))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["dense", "rtpurbo", "moe"])
def test_static_decode_step_matches_eager_path(dense, kind):
    if kind == "moe":
        torch.manual_seed(0)
        model = build_model(get_flavor("debug_moe")).eval()
    elif kind == "rtpurbo":  # local heads on full and on ring KV heads, an all-local and an all-retrieval layer
        model = rtpurbo_copy(dense, window=5, sinks=2, top_p=0.6, block_size=4)
    else:
        model = dense
    prompts = [prompt(9, 12), prompt(23, 13)]
    # buckets 16 -> 32 -> 48 (= max_len): the view length changes during the run
    mk = lambda **kw: InferenceEngine(model, max_len=48, chunk_size=8, graph_min_bucket=16, **kw)  # noqa: E731
    eager, static = mk(), mk(static_decode=True)
    assert (eager.decode_path, static.decode_path) == ("eager", "static")
    a, b = eager.generate(prompts, max_new_tokens=12), static.generate(prompts, max_new_tokens=12)
    assert a.tokens == b.tokens and b.decode_path == "static"
    if kind == "rtpurbo":
        assert 0.0 < b.mean_density < 1.0 and b.mean_density == pytest.approx(a.mean_density, rel=1e-5)
    else:
        assert a.mean_density is None and b.mean_density is None
    forced = [[a.tokens[0][i], a.tokens[1][i]] for i in range(11)]
    la = _teacher_forced(mk(), prompts, forced)
    lb = _teacher_forced(mk(static_decode=True), prompts, forced)
    torch.testing.assert_close(lb, la, atol=2e-5, rtol=2e-5)


def test_decode_path_options_and_log_line(dense, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="models.inference.engine"):
        eng = InferenceEngine(dense, max_len=16)
    assert eng.decode_path == "eager" and not eng.cuda_graph
    assert eng.graph_status == "off: the model is on cpu, not CUDA"
    assert any("CUDA graphs off: the model is on cpu" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        InferenceEngine(dense, max_len=16, cuda_graph=True)
    off = InferenceEngine(dense, max_len=16, cuda_graph=False, static_decode=True)
    assert off.decode_path == "static" and off.graph_status == "off: cuda_graph=False was passed"
    # fused decode kernels: off on CPU (said in the log), required -> an error without Triton's interpreter
    assert not eng.fused and not off.fused
    assert off.fused_status == "the model's torch modules (fused kernels off: the model is on cpu, not CUDA)"
    assert any(r.getMessage() == "decode layers: the model's torch modules (fused kernels off: the eager decode path "
               "(fused kernels run in the static step only))" for r in caplog.records)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1 is not set"):
            InferenceEngine(dense, max_len=16, static_decode=True, fused_decode=True)
    with pytest.raises(ValueError, match="static step only"):
        InferenceEngine(dense, max_len=16, fused_decode=True)
    assert "fused_decode=False" in InferenceEngine(dense, max_len=16, fused_decode=False).fused_status


def test_bucket_lengths_and_cache_reuse(dense):
    from models.inference.cuda_graph import bucket_length

    assert [bucket_length(n, min_bucket=16, max_len=100) for n in (1, 16, 17, 33, 64, 65, 100)] == \
        [16, 16, 32, 64, 64, 100, 100]
    with pytest.raises(ValueError):
        bucket_length(101, min_bucket=16, max_len=100)
    eng = InferenceEngine(dense, max_len=40, static_decode=True, graph_min_bucket=8)
    p = prompt(7, 14)
    first = eng.generate([p], max_new_tokens=6)
    cache = eng.cache
    again = eng.generate([p], max_new_tokens=6)  # same batch size: cache (and static buffers) reused
    assert eng.cache is cache and again.tokens == first.tokens
    two = eng.generate([p, prompt(12, 15)], max_new_tokens=6)  # new batch size: a new cache
    assert eng.cache is not cache and two.tokens[0] == first.tokens[0]


_TRITON_STATIC_SCRIPT = r"""
import sys, torch
sys.path[:0] = [{root!r}, {tests!r}]
from kernels import sparse_decode as sd
from kernels import triton_decode as td
assert td.interpreter_ready(), "the Triton interpreter is not active"
torch.manual_seed(0)
# dense_decode (Triton split-K kernel) vs the reference: GQA, batch 2, NaN beyond the valid lengths, a view
for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
    q = torch.randn(2, 8, 32).to(dt)
    k, v = torch.randn(2, 2, 300, 32).to(dt), torch.randn(2, 2, 300, 32).to(dt)
    k[1, :, 77:] = float("nan"); v[1, :, 77:] = float("nan")
    for L, lens in ((300, [300, 77]), (200, [150, 1])):
        lens = torch.tensor(lens, dtype=torch.int32)
        got = sd.dense_decode(q, k[:, :, :L], v[:, :, :L], lens, impl="triton").float()
        ref = sd.dense_decode_reference(q.float(), k[:, :, :L].float(), v[:, :, :L].float(), lens)
        err = float((got - ref).abs().max())
        assert err < tol, (dt, L, err)
# the engine's static step with every kernel in Triton == the eager reference path
from test_inference import rtpurbo_copy, prompt
from models.inference import InferenceEngine
from models.qwen3 import build_model, get_flavor
torch.set_num_threads(1)
torch.manual_seed(0)
dense = build_model(get_flavor("debug")).eval()
for model in (dense, rtpurbo_copy(dense, window=5, sinks=2, top_p=0.6, block_size=4)):
    prompts = [prompt(9, 6), prompt(23, 7)]
    a = InferenceEngine(model, max_len=48, chunk_size=8, impl="torch").generate(prompts, max_new_tokens=3)
    b = InferenceEngine(model, max_len=48, chunk_size=8, impl="triton", static_decode=True,
                        graph_min_bucket=16).generate(prompts, max_new_tokens=3)
    assert a.tokens == b.tokens, (a.tokens, b.tokens)
    if a.mean_density is not None:
        assert abs(a.mean_density - b.mean_density) < 1e-5
print("TRITON-STATIC-OK")
"""


def test_static_step_with_triton_kernels_in_interpreter():
    """The exact kernels the GPU path runs (dense_decode + rtpurbo_decode in Triton), under the CPU
    interpreter (which must be enabled before triton's first import: a subprocess)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = _TRITON_STATIC_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"))
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "TRITON-STATIC-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
