import math

import pytest
import torch

from models.attention import AttentionContext
from models.qwen3 import build_model, get_flavor
from models.qwen3.rope import apply_rope, rope_cos_sin, rope_inv_freq
from models.rtpurbo import (
    apply_rtpurbo,
    calibrate_retrieval_scores,
    collect_qk_samples,
    freeze_for_stage,
    indexer_kl_loss,
    indexer_parameters,
    init_indexers,
    init_indexers_svd,
    iter_rtpurbo_backends,
    make_needle_sequences,
    roles_from_config,
    rtpurbo_density_report,
    set_rtpurbo_mode,
)
from models.rtpurbo.indexer import LayerIndexer, rope_average_rotation, svd_indexer_init
from torchtitan_rtpurbo.config.job_config import RTPurbo

from tests.test_rtpurbo_calibrate import corpus, planted_model


def test_rope_average_rotation_is_the_mean_post_rope_product():
    args = get_flavor("debug")
    inv, msc = rope_inv_freq(args)
    T, D = 40, args.head_dim
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(T)[None], inv, msc, torch.float64)
    qr = apply_rope(q.expand(1, 1, T, D), cos, sin)[0, 0]
    kr = apply_rope(k.expand(1, 1, T, D), cos, sin)[0, 0]
    dots = qr @ kr.T  # [m, n]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    ref = dots[causal].mean()
    M = rope_average_rotation(inv, T, msc, n_samples=T)
    assert torch.allclose(q @ M @ k, ref, atol=1e-9)


def test_svd_init_full_rank_recovers_target():
    g = torch.Generator().manual_seed(0)
    D = 8
    q = torch.randn(500, D, generator=g) @ torch.randn(D, D, generator=g)
    k = torch.randn(500, D, generator=g) + 3.0  # a mean key direction: ignored by the fit
    M = torch.randn(D, D, generator=g, dtype=torch.float64)
    Wq, Wk = svd_indexer_init(q, k, D, M)
    torch.testing.assert_close(Wq.T @ Wk, M / math.sqrt(D), atol=1e-8, rtol=1e-6)
    Wq, Wk = svd_indexer_init(q, k, 3)
    assert Wq.shape == (3, D) and torch.linalg.matrix_rank(Wq.T @ Wk) == 3


def test_layer_indexer_shapes_and_gqa():
    ix = LayerIndexer([1, 6], n_heads=8, n_kv_heads=2, head_dim=16, indexer_dim=4)
    assert ix.kv_heads.tolist() == [0, 1]
    q_pre, k_pre = torch.randn(2, 8, 10, 16), torch.randn(2, 2, 10, 16)
    qi, ki = ix(q_pre, k_pre)
    assert qi.shape == ki.shape == (2, 2, 10, 4)
    torch.testing.assert_close(ki[:, 1], k_pre[:, 1] @ ix.wk[1].T)
    torch.testing.assert_close(qi[:, 0], q_pre[:, 1] @ ix.wq[0].T)


def _setup(model, ratio, T=256):
    seqs = make_needle_sequences(corpus(), lengths=[T], n=2, needle_tokens=32, seed=1)
    cfg = RTPurbo(window=32, sinks=4, retrieval_ratio=ratio, indexer_dim=16, stage1_query_chunk=100)
    roles = roles_from_config(calibrate_retrieval_scores(model, seqs), model.args, cfg)
    apply_rtpurbo(model, roles, cfg)
    samples = collect_qk_samples(model, seqs, roles, max_tokens=1024)
    return cfg, roles, samples


def _stage1(model, x):
    ctx = AttentionContext(collect={})
    logits = model(x, ctx=ctx)
    return logits, indexer_kl_loss(ctx.collect), ctx.collect


@pytest.mark.parametrize("kind", ["random_model", "planted_model"])
def test_svd_init_beats_random_init_at_step0(kind):
    model = build_model(get_flavor("debug")) if kind == "random_model" else planted_model()
    cfg, roles, samples = _setup(model, 0.25 if kind == "random_model" else 3 / 32)
    set_rtpurbo_mode(model, "stage1")
    for _, b in iter_rtpurbo_backends(model):
        b.stage1_stats = False
    x = torch.randint(0, 4096, (1, 256), generator=torch.Generator().manual_seed(5))
    kls = {}
    with torch.no_grad():
        torch.manual_seed(0)
        init_indexers(model, RTPurbo(indexer_init="random"))
        kls["random"] = _stage1(model, x)[1].item()
        init_indexers_svd(model, samples, rope_aware=False)
        kls["svd_plain"] = _stage1(model, x)[1].item()
        init_indexers(model, cfg, samples)  # cfg.indexer_init == "svd" (RoPE-aware)
        kls["svd"] = _stage1(model, x)[1].item()
    assert kls["svd"] < 0.6 * kls["random"], kls
    assert kls["svd"] <= kls["svd_plain"] + 1e-4, kls


def test_stage1_training_lowers_kl_and_only_touches_indexers():
    model = build_model(get_flavor("debug"))
    dense = build_model(get_flavor("debug"))
    dense.load_state_dict(model.state_dict())
    cfg = RTPurbo(window=32, sinks=4, retrieval_ratio=0.25, indexer_dim=16, stage1_query_chunk=50)
    roles = roles_from_config(torch.rand(4, 8, generator=torch.Generator().manual_seed(0)), model.args, cfg)
    apply_rtpurbo(model, roles, cfg)
    set_rtpurbo_mode(model, "stage1")
    freeze_for_stage(model, "stage1")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".indexer." in n}
    for p in model.parameters():
        p.requires_grad_(True)  # even with the backbone trainable, the KL must not reach it
    x = torch.randint(0, 4096, (1, 160), generator=torch.Generator().manual_seed(2))
    params = indexer_parameters(model)
    assert len(params) == 2 * sum(1 for l in range(4) if roles.retrieval_heads(l))
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.01)
    losses = []
    for step in range(10):
        for _, b in iter_rtpurbo_backends(model):
            b.stage1_stats = step == 9  # recall / density only once (two top-p sorts per chunk)
        opt.zero_grad(set_to_none=True)
        logits, loss, collect = _stage1(model, x)
        loss.backward()
        if step == 0:
            with torch.no_grad():
                torch.testing.assert_close(logits, dense(x))  # stage 1 runs the frozen dense backbone
            idx = {id(p) for p in params}
            for name, p in model.named_parameters():
                assert (p.grad is not None) == (id(p) in idx), name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    rep = rtpurbo_density_report(collect)
    assert 0 < rep["rtpurbo/density_mean"] <= 1 and 0 < rep["rtpurbo/indexer_recall_mean"] <= 1
    assert set(rep) >= {"rtpurbo/indexer_kl_mean", "rtpurbo/teacher_density_mean"}


def test_converted_model_with_huge_window_equals_dense():
    model = build_model(get_flavor("debug"))
    dense = build_model(get_flavor("debug"))
    dense.load_state_dict(model.state_dict())
    x = torch.randint(0, 4096, (2, 100))
    docs = torch.zeros(2, 100, dtype=torch.long)
    docs[1, 40:] = 1
    cfg = RTPurbo(window=1000, sinks=4, retrieval_ratio=0.25, prefill="sparse", top_p=1.0, block_size=16)
    roles = roles_from_config(torch.rand(4, 8), model.args, cfg)
    apply_rtpurbo(model, roles, cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x, doc_ids=docs), dense(x, doc_ids=docs), atol=1e-5, rtol=1e-5)
        set_rtpurbo_mode(model, "stage2")
        torch.testing.assert_close(model(x), dense(x), atol=1e-5, rtol=1e-5)
        # a small window changes the local heads' output
        for layer in model.layers.values():
            layer.attention.inner_attention.window = 8
        assert not torch.allclose(model(x), dense(x), atol=1e-3)
    with pytest.raises(ValueError):
        set_rtpurbo_mode(model, "train")
