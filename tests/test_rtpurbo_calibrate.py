import pytest
import torch

from models.qwen3 import build_model, get_flavor
from models.rtpurbo.calibrate import (
    calibrate_retrieval_scores,
    collect_qk_samples,
    make_needle_sequences,
    needle_attention_mass,
    plot_scores_heatmap,
    stability_overlap,
)
from models.rtpurbo.roles import build_roles, choose_roles

# Low-frequency rotary pairs of a head_dim-32 head (pairs 8..15, both halves): with rope_theta 1e6 they turn
# by < 0.3 rad over 300 tokens, so a query/key built only from them matches "the same token" at any distance.
CHANNELS = list(range(8, 16)) + list(range(24, 32))
PLANTED = [(0, 1), (0, 6), (2, 3)]  # (layer, query head): h // 4 != h % 2, so a wrong GQA mapping would show


def planted_model(planted=PLANTED, seed=0):
    """Debug Qwen3 where the planted heads are 'same-token' copy heads: q and k of the head are the same
    random projection of the token embedding, on low-frequency RoPE channels only. Such a head at a later
    needle token puts about half its mass on the earlier copy of that token (the other half on itself)."""
    args = get_flavor("debug").replace(rope_theta=1e6)
    torch.manual_seed(seed)
    m = build_model(args)
    Dh, g = args.head_dim, args.n_heads // args.n_kv_heads
    gen = torch.Generator().manual_seed(seed + 1)
    ch = torch.tensor(CHANNELS)
    with torch.no_grad():
        m.tok_embeddings.weight.mul_(10.0)  # keep the residual stream dominated by the token identity
        for l, h in planted:
            a = m.layers[str(l)].attention
            a.q_norm.weight[ch] = 2.0
            a.k_norm.weight[ch] = 2.0
            P = torch.randn(len(CHANNELS), args.dim, generator=gen)
            a.wq.weight[h * Dh:(h + 1) * Dh] = 0
            a.wq.weight[h * Dh + ch] = P
            a.wk.weight[(h // g) * Dh + ch] = P
    return m


def corpus(n_docs=4, length=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 4096, (length,), generator=g).tolist() for _ in range(n_docs)]


def test_make_needle_sequences_layout():
    docs = corpus()
    seqs = make_needle_sequences(docs, lengths=[200, 256], n=4, needle_tokens=24, seed=3, needle_offset=5)
    assert [s.tokens.numel() for s in seqs] == [200, 256, 200, 256]
    for s in seqs:
        T = s.tokens.numel()
        assert s.pre == (5, 29) and s.post == (T - 24, T)
        assert torch.equal(s.tokens[5:29], s.tokens[T - 24:])
        hay = torch.cat([s.tokens[:5], s.tokens[29:T - 24]]).tolist()
        # the haystack is a contiguous span of one document
        assert any(any(d[i:i + len(hay)] == hay for i in range(len(d) - len(hay) + 1)) for d in docs)
    again = make_needle_sequences(docs, lengths=[200, 256], n=4, needle_tokens=24, seed=3, needle_offset=5)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(seqs, again))
    # a flat stream and text + a tokenizer work too
    assert make_needle_sequences(torch.arange(1000), lengths=[100], n=1, needle_tokens=10)[0].tokens.numel() == 100

    class Tok:
        def encode(self, s):
            return [ord(c) for c in s]

    s = make_needle_sequences(["abcdefgh" * 40, "xyz" * 50], Tok(), lengths=[64], n=1, needle_tokens=8)[0]
    assert torch.equal(s.tokens[s.pre[0]:s.pre[1]], s.tokens[-8:])
    with pytest.raises(ValueError):
        make_needle_sequences(docs, lengths=[40], n=1, needle_tokens=24)


def test_needle_mass_probe_matches_full_attention():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 90, 16, generator=g)
    k = torch.randn(2, 2, 90, 16, generator=g)
    pre, post = (5, 15), (80, 90)
    got = needle_attention_mass(q, k, pre, post, max_elems=1000)  # forces one KV head per chunk
    kk = k.repeat_interleave(4, dim=1)
    A = (q @ kk.transpose(-1, -2) / 4.0).masked_fill(~torch.ones(90, 90, dtype=torch.bool).tril(), float("-inf"))
    A = A.softmax(-1)
    ref = A[:, :, 80:90, 5:15].sum(-1).mean(-1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_calibration_finds_planted_retrieval_heads(tmp_path):
    model = planted_model()
    seqs = make_needle_sequences(corpus(), lengths=[256, 320], n=4, needle_tokens=32, seed=0)
    per_seq = calibrate_retrieval_scores(model, seqs, batch_size=2, return_per_sequence=True)
    assert per_seq.shape == (4, 4, 8)
    scores = per_seq.mean(0)
    planted = set(PLANTED)
    for l in range(4):
        for h in range(8):
            if (l, h) in planted:
                assert scores[l, h] > 0.35, (l, h, scores[l, h])
            else:
                assert scores[l, h] < 0.25, (l, h, scores[l, h])
    # the model is restored: no probe left behind
    assert all(type(layer.attention.inner_attention).__name__ == "DenseAttention" for layer in model.layers.values())
    roles = build_roles(scores, model_args=model.args, ratio=3 / 32)
    assert {(l, h) for l in range(4) for h in roles.retrieval_heads(l)} == planted
    one = choose_roles(per_seq[0], ratio=3 / 32, granularity="query_head", n_kv_heads=2)
    assert stability_overlap(one, roles) == 1.0
    kv = build_roles(scores, model_args=model.args, granularity="kv_head", ratio=3 / 8)
    assert kv.retrieval_heads(0) == list(range(8)) and kv.retrieval_heads(2) == [0, 1, 2, 3]
    png = tmp_path / "heat.png"
    plot_scores_heatmap(scores, roles, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = collect_qk_samples(model, seqs, roles, max_tokens=100)
    assert sorted(samples) == [0, 2]
    assert samples[0]["heads"] == [1, 6] and samples[0]["q"].shape == (2, 100, 32)
    assert samples[2]["k"].shape == (1, 100, 32) and samples[2]["seq_len"] == 320


def test_stability_overlap():
    a = [[1, 0, 1, 0]]
    assert stability_overlap(a, a) == 1.0
    assert stability_overlap(a, [[1, 1, 0, 0]]) == 0.5
    assert stability_overlap([[0, 0]], [[0, 0]]) == 1.0


def test_random_model_has_no_planted_structure():
    """Control for the planted test: without planting, no head stands out the same way."""
    model = build_model(get_flavor("debug").replace(rope_theta=1e6))
    seqs = make_needle_sequences(corpus(), lengths=[256], n=2, needle_tokens=32)
    assert calibrate_retrieval_scores(model, seqs).max() < 0.25


def test_calibrate_heads_script_smoke(tmp_path):
    from scripts.calibrate_heads import main

    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(f"def f{i}(x): return x * {i} + {i % 7}" for i in range(400)))
    out = tmp_path / "roles.json"
    summary = main(["--flavor", "debug", "--corpus", str(text), "--split", "all", "--lengths", "256",
                    "--num-sequences", "2", "--needle-tokens", "16", "--window", "64", "--ratio", "0.25",
                    "--out", str(out), "--device", "cpu"])
    from models.rtpurbo.roles import HeadRoles

    roles = HeadRoles.load_json(out)
    assert roles.num_retrieval() == 8 and summary["retrieval_heads"] == 8 and roles.window == 64
    assert (tmp_path / "roles.png").read_bytes()[:4] == b"\x89PNG"
