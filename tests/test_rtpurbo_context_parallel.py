"""RTPurbo attention under context parallelism (models/rtpurbo/context_parallel.py).

The multi-process checks (outputs, gradients, collect statistics and byte counts against one process, every
mode, GQA with whole retrieval KV groups and with retrieval heads sharing KV heads with local heads, with and
without packed documents, windows shorter and longer than a chunk) run in tests/cp_rtpurbo_worker.py under
`torchrun --nproc_per_node 2|4` on gloo. The rest are single-process unit checks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.attention import AttentionContext
from models.rtpurbo.attention import RTPurboAttention, indexer_kl_stats
from models.rtpurbo.context_parallel import (
    SCENARIOS,
    QWEN3_30B_A3B,
    ContextParallelRTPurboAttention,
    comm_model_bytes,
    halo_needs,
    local_key_positions,
    local_mask,
    make_cp_aware,
)
from torchtitan_rtpurbo.distributed.context_parallel import CPContext, load_balanced_layout
from torchtitan_rtpurbo.distributed.halo import plan_exchange

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("nproc", [2, 4])
def test_cp_matches_single_process(nproc, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0",
           str(REPO / "tests" / "cp_rtpurbo_worker.py"), str(tmp_path)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    assert p.stdout.count("CP_WORKER_OK") == nproc, p.stdout[-3000:]
    for r in range(nproc):
        rep = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert len(rep["cases"]) == 64  # 2 head sets x 2 doc layouts x 8 modes (2 with the rotary indexer) x 2 windows
        hd = rep["halo_vs_dense"]
        assert 0 < 20 * hd["halo_sinks"] < hd["dense_kv"]


def _cp_ctx(T, cp, rank, doc_ids=None):
    layouts = [load_balanced_layout(T, cp, r) for r in range(cp)]
    return CPContext(group=None, layout=layouts[rank], layouts=layouts, doc_ids=doc_ids)


def test_halo_plan_spans_several_ranks_and_matches_sends():
    T, cp, window, sinks = 50, 4, 20, 2  # chunks of 6-7 tokens: a halo of 19 spans three ranks
    plans = [plan_exchange(c, halo_needs(c, window, sinks)) for c in (_cp_ctx(T, cp, r) for r in range(cp))]
    assert sorted(plans[3].recv) == [0, 1, 2]  # rank 3's head chunk [20, 26) needs [0, 20): ranks 0, 1, 2
    assert plans[3].recv_positions.tolist() == list(range(20))
    assert plans[3].recv_kind_rows == {"halo": 19, "sinks": 1}
    for s in range(cp):  # what s sends to d is what d expects from s
        for d, idx in plans[s].send.items():
            assert plans[d].recv[s] == idx.numel()
            lay = _cp_ctx(T, cp, s).layout
            assert lay.local_positions()[idx].tolist() == \
                plans[d].recv_positions[sum(n for p, n in plans[d].recv.items() if p < s):][:idx.numel()].tolist()


def test_local_key_positions_cover_the_window_sink_mask():
    from kernels.masks import document_segments, local_mask_dense

    T, window, sinks = 40, 6, 3
    doc_ids = torch.zeros(2, T, dtype=torch.long)
    doc_ids[0, 9:], doc_ids[0, 30:], doc_ids[1, 2:] = 1, 2, 1
    seg, doc_start = document_segments(doc_ids)
    dense = local_mask_dense(T, window, sinks, doc_ids=doc_ids)  # [B, T, T]
    for a, b in [(0, 5), (7, 13), (21, 40), (33, 34)]:
        kpos = local_key_positions(a, b, window, sinks, doc_start)
        m = local_mask(torch.arange(a, b), kpos, window, sinks, seg, doc_start)[:, 0]
        assert torch.equal(m, dense[:, a:b][:, :, kpos])
        outside = torch.ones(T, dtype=torch.bool)
        outside[kpos] = False
        assert not dense[:, a:b][:, :, outside].any()  # no visible key is left out


def test_make_cp_aware_keeps_keys_and_falls_back_without_cp():
    torch.manual_seed(0)
    att = RTPurboAttention(n_heads=8, n_kv_heads=4, head_dim=16, retrieval_heads=[1, 6], window=5, sinks=2,
                           indexer_dim=4)
    keys = list(att.state_dict())
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 8, 21, 16, generator=g), torch.randn(2, 4, 21, 16, generator=g), \
        torch.randn(2, 4, 21, 16, generator=g)
    ref = att(q, k, v, q_pre=q, k_pre=k, ctx=AttentionContext())
    same = make_cp_aware(att)
    assert same is att and isinstance(att, ContextParallelRTPurboAttention) and list(att.state_dict()) == keys
    assert make_cp_aware(att) is att
    assert torch.equal(att(q, k, v, q_pre=q, k_pre=k, ctx=AttentionContext()), ref)
    assert torch.equal(att(q, k, v, q_pre=q, k_pre=k, ctx=None), ref)

    class Wrapped(RTPurboAttention):  # like FSDP2's dynamic subclass: kept under the CP forward
        pass

    w = Wrapped(n_heads=8, n_kv_heads=4, head_dim=16, retrieval_heads=[1, 6], window=5, sinks=2, indexer_dim=4)
    make_cp_aware(w)
    assert isinstance(w, Wrapped) and isinstance(w, ContextParallelRTPurboAttention)
    with pytest.raises(TypeError, match="RTPurboAttention"):
        make_cp_aware(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("target", ["full", "topp"])
def test_indexer_kl_query_offset_slices_sum_to_whole(target):
    g = torch.Generator().manual_seed(3)
    B, H, T, D, r = 2, 3, 29, 8, 4
    q_r, k_r = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    qi0, ki0 = torch.randn(B, H, T, r, generator=g), torch.randn(B, H, T, r, generator=g)
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    doc_ids[0, 12:] = 1
    qi, ki = qi0.clone().requires_grad_(), ki0.clone().requires_grad_()
    whole = indexer_kl_stats(q_r, k_r, qi, ki, doc_ids=doc_ids, chunk=5, target=target)
    whole[0].sum().backward()
    qs, ks = qi0.clone().requires_grad_(), ki0.clone().requires_grad_()
    parts = [indexer_kl_stats(q_r[:, :, a:b], k_r[:, :, :b], qs[:, :, a:b], ks[:, :, :b], doc_ids=doc_ids, chunk=4,
                              target=target, q_offset=a, norm_rows=B * T) for a, b in [(0, 10), (10, 17), (17, 29)]]
    (sum(p[0] for p in parts)).sum().backward()
    for i in range(4):
        torch.testing.assert_close(sum(p[i] for p in parts), whole[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qs.grad, qi.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ks.grad, ki.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="need k_r / ki"):
        indexer_kl_stats(q_r[:, :, 10:17], k_r[:, :, :16], qi0[:, :, 10:17], ki0[:, :, :16], q_offset=10)


def test_comm_model_at_1m_tokens():
    shape = {k: v for k, v in QWEN3_30B_A3B.items() if k not in ("n_layers", "n_heads")}
    T = 1 << 20
    for cp in (8, 64):
        m = comm_model_bytes(T=T, cp=cp, **shape, **SCENARIOS["1 of 4 KV heads"], rank=1)
        assert m["dense_allgather"] == (T - T // cp) * 4 * 2 * 128 * 2  # K and V of 4 KV heads, bf16
        assert m["halo"] == 2 * (8192 - 1) * 3 * 2 * 128 * 2  # two chunks, window - 1 rows, 3 local KV heads
        # both chunks need the same sink rows (fetched once); at cp=64 the head chunk starts at 8192, so its
        # halo [1, 8192) holds sinks 1..3 and only position 0 is a sink row
        assert m["sinks"] == (4 if cp == 8 else 1) * 3 * 2 * 128 * 2
        for name, sc in SCENARIOS.items():
            r = comm_model_bytes(T=T, cp=cp, **shape, **sc)["ratio_dense"]
            assert (r <= 0.25) == (name == "kv-granular 15%"), (cp, name, r)
            rs = comm_model_bytes(T=T, cp=cp, **shape, **sc, selected_fraction=0.1)["ratio_sparse"]
            assert rs <= 0.25, (cp, name, rs)


def test_rotary_indexer_sparse_prefill_under_cp_is_refused():
    """rtpurbo.indexer_rope_periods + prefill="sparse" under context parallelism: a clear NotImplementedError
    before any communication (stage 1 / 2 and dense prefill run and match one process: the worker's cases)."""
    ref = RTPurboAttention(n_heads=8, n_kv_heads=4, head_dim=16, retrieval_heads=[2, 3], window=5, sinks=2,
                           block_size=4, q_block_size=8, prefill="sparse", indexer_dim=4,
                           indexer_rope_periods=[3.0, 40.0], layer_id=0)
    cpb = make_cp_aware(ref)
    x = torch.randn(1, 8, 19, 16)
    kv = torch.randn(1, 4, 19, 16)
    with pytest.raises(NotImplementedError, match="indexer_rope_periods"):
        cpb._cp_sparse(x, kv, kv, x, kv, _cp_ctx(37, 2, 0), None)
