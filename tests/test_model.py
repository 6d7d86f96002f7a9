import torch

from models.qwen3 import build_model, get_flavor
from models.qwen3.moe import MoE, load_balancing_loss
from models.qwen3.rope import rope_inv_freq
from models.qwen3.args import RopeScaling


def test_flavour_param_counts_match_published_sizes():
    # Published totals (incl. embeddings): 0.6B ~0.60B, 8B ~8.19B, 30B-A3B ~30.5B total / ~3.3B active.
    assert abs(get_flavor("0.6B").num_params() / 1e9 - 0.596) < 0.01
    assert abs(get_flavor("8B").num_params() / 1e9 - 8.19) < 0.02
    a = get_flavor("30B-A3B")
    assert abs(a.num_params() / 1e9 - 30.53) < 0.05
    assert abs(a.num_params(active_only=True) / 1e9 - 3.35) < 0.05
    c = get_flavor("Coder-30B-A3B")
    assert c.rope_theta == 1e7 and c.n_kv_heads == 4 and c.n_heads == 32


def test_meta_init_and_forward_backward():
    torch.manual_seed(0)
    for fl in ("debug", "debug_moe"):
        args = get_flavor(fl)
        m = build_model(args)
        assert m.output.weight is m.tok_embeddings.weight  # tying survives meta init
        x = torch.randint(0, args.vocab_size, (2, 33))
        y = m(x)
        assert y.shape == (2, 33, args.vocab_size) and torch.isfinite(y).all()
        y.logsumexp(-1).mean().backward()
        assert all(p.grad is not None for p in m.parameters())


def test_causality_and_document_mask():
    torch.manual_seed(0)
    args = get_flavor("debug")
    m = build_model(args).eval()
    x = torch.randint(0, args.vocab_size, (1, 40))
    y1 = m(x)
    x2 = x.clone()
    x2[0, 30:] = torch.randint(0, args.vocab_size, (10,))
    y2 = m(x2)
    torch.testing.assert_close(y1[0, :30], y2[0, :30])  # future tokens do not leak
    # Packed: second document with its own positions equals running it alone.
    doc_ids = torch.tensor([[0] * 15 + [1] * 25])
    pos = torch.cat([torch.arange(15), torch.arange(25)])[None]
    y_packed = m(x, positions=pos, doc_ids=doc_ids)
    y_alone = m(x[:, 15:])
    torch.testing.assert_close(y_packed[:, 15:], y_alone, rtol=1e-4, atol=1e-4)


def _moe_reference(moe, x):
    """Per-token loop: softmax over experts, top-k, renormalise, weighted SwiGLU experts."""
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(moe.router.gate(flat).float(), -1)
    w, e = probs.topk(moe.top_k, -1)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    ex = moe.experts
    for t in range(flat.shape[0]):
        for j in range(moe.top_k):
            i = e[t, j]
            h = torch.nn.functional.silu(flat[t] @ ex.w1[i].T) * (flat[t] @ ex.w3[i].T)
            out[t] += w[t, j] * (h @ ex.w2[i].T)
    return out.reshape(x.shape)


def test_moe_grouped_matches_per_token_reference_and_routing_properties():
    torch.manual_seed(0)
    moe = MoE(dim=16, hidden_dim=24, num_experts=6, top_k=2, norm_topk_prob=True)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 7, 16)
    out, aux = moe(x)
    torch.testing.assert_close(out, _moe_reference(moe, x), rtol=1e-5, atol=1e-5)
    w, e, probs = moe.router(x.reshape(-1, 16))
    torch.testing.assert_close(w.sum(-1), torch.ones(21))  # normalised top-k weights
    assert (e[:, 0] != e[:, 1]).all()  # distinct experts per token
    assert torch.equal(e[:, 0], probs.argmax(-1))
    # Aux loss (HF's formula): top_k for perfectly uniform routing, larger when routing collapses.
    n, E = 600, 6
    uniform_probs = torch.full((n, E), 1 / E)
    uniform_experts = torch.arange(n * 2).reshape(n, 2) % E
    assert abs(load_balancing_loss(uniform_probs, uniform_experts, E).item() - 2.0) < 1e-5
    skew = torch.zeros(n, E)
    skew[:, 0], skew[:, 1] = 0.9, 0.1
    collapsed = torch.tensor([[0, 1]]).expand(n, 2)
    assert load_balancing_loss(skew, collapsed, E).item() > 2 * 2.5


def test_yarn_changes_only_low_frequencies():
    args = get_flavor("debug")
    base, _ = rope_inv_freq(args)
    yarn, mscale = rope_inv_freq(args.replace(rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=1024)))
    assert mscale > 1.0
    torch.testing.assert_close(yarn[0], base[0])  # highest frequency kept (extrapolated)
    torch.testing.assert_close(yarn[-1], base[-1] / 4.0)  # lowest frequency interpolated


def test_logits_mask_equals_full_logits_at_those_positions():
    torch.manual_seed(0)
    model = build_model(get_flavor("debug"))
    tokens = torch.randint(0, model.args.vocab_size, (2, 33))
    mask = torch.rand(2, 33) < 0.3
    mask[1, -1] = True
    full = model(tokens)
    part = model(tokens, logits_mask=mask)
    assert part.shape == (int(mask.sum()), model.args.vocab_size)
    torch.testing.assert_close(part, full[mask])
