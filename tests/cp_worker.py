"""Worker for tests/test_context_parallel.py, run under torchrun (gloo, CPU, float64):

    torchrun --nproc_per_node N tests/cp_worker.py primitives

Every rank builds the same random full-sequence inputs, computes the single-process reference itself, runs
its context-parallel share, and checks its share of the outputs and gradients against the reference.
Prints "CP_WORKER_OK <checks>" on rank 0 when every check passed (any mismatch raises).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.attention import sdpa_attention  # noqa: E402
from torchtitan_rtpurbo.distributed.context_parallel import (  # noqa: E402
    all_gather_sequence,
    build_cp_context,
    cp_dense_attention,
    shard_batch,
    shard_sequence,
    unshard_sequence,
)

TOL = dict(rtol=1e-10, atol=1e-10)


def packed_doc_ids(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """[B, T] doc ids with a few random boundaries per row (different per row)."""
    rows = []
    for _ in range(B):
        cuts = torch.randperm(T - 1, generator=gen)[:3] + 1
        row = torch.zeros(T, dtype=torch.int64)
        for c in cuts.tolist():
            row[c:] += 1
        rows.append(row)
    return torch.stack(rows)


def check_layout_round_trip(world: int) -> int:
    n = 0
    for T in (2 * world, 2 * world + 1, 23, 64):
        x = torch.randn(2, T, 3, dtype=torch.float64)
        cp = build_cp_context(dist.group.WORLD, T)
        parts = [shard_sequence(x, lay, dim=1) for lay in cp.layouts]
        assert sum(p.shape[1] for p in parts) == T
        torch.testing.assert_close(unshard_sequence(parts, cp.layouts, dim=1), x, rtol=0, atol=0)
        # global positions of the local tokens are the layout's chunks
        torch.testing.assert_close(shard_sequence(torch.arange(T)[None], cp.layout, dim=1)[0],
                                   cp.layout.local_positions())
        n += 1
    return n


def check_all_gather(world: int, gen: torch.Generator) -> int:
    T = 2 * world * 3 + 1  # not a multiple of 2 * cp: local lengths differ between ranks
    cp = build_cp_context(dist.group.WORLD, T)
    x = torch.randn(2, 3, T, 4, dtype=torch.float64, generator=gen) + 0.5
    w = torch.randn(2, 3, T, 4, dtype=torch.float64, generator=gen)
    local = shard_sequence(x, cp.layout, dim=2).requires_grad_(True)
    full = all_gather_sequence(local, cp, dim=2, kind="test")
    torch.testing.assert_close(full, x, rtol=0, atol=0)
    (full * w).sum().backward()
    # every rank's loss uses the full gathered tensor: the gradient of a local token sums over the ranks
    torch.testing.assert_close(local.grad, world * shard_sequence(w, cp.layout, dim=2), **TOL)
    assert cp.comm_bytes["test"] > 0 and cp.comm_bytes["test_grad"] > 0
    return 1


def check_dense_attention(world: int, gen: torch.Generator, T: int, docs: bool, impl: str) -> int:
    B, Hq, Hkv, D = 2, 4, 2, 8  # GQA 2:1, batch 2
    q = torch.randn(B, Hq, T, D, dtype=torch.float64, generator=gen)
    k = torch.randn(B, Hkv, T, D, dtype=torch.float64, generator=gen)
    v = torch.randn(B, Hkv, T, D, dtype=torch.float64, generator=gen)
    g = torch.randn(B, Hq, T, D, dtype=torch.float64, generator=gen)
    doc_ids = packed_doc_ids(B, T, gen) if docs else None
    # single-process reference
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref = sdpa_attention(qr, kr, vr, doc_ids)
    (ref * g).sum().backward()
    # context parallel
    cp = build_cp_context(dist.group.WORLD, T, doc_ids)
    ql, kl, vl = (shard_sequence(t, cp.layout, dim=2).requires_grad_(True) for t in (q, k, v))
    out = cp_dense_attention(ql, kl, vl, cp, impl=impl)
    (out * shard_sequence(g, cp.layout, dim=2)).sum().backward()
    for name, got, want in (("out", out, ref), ("dq", ql.grad, qr.grad), ("dk", kl.grad, kr.grad),
                            ("dv", vl.grad, vr.grad)):
        torch.testing.assert_close(got, shard_sequence(want, cp.layout, dim=2), **TOL,
                                   msg=lambda m: f"{name} T={T} docs={docs} impl={impl}: {m}")
    return 1


def check_shard_batch(world: int, gen: torch.Generator) -> int:
    T = 4 * world + 3
    batch = {"input": torch.randint(0, 100, (2, T), generator=gen), "labels": torch.randint(0, 100, (2, T)),
             "positions": torch.arange(T).expand(2, T), "doc_ids": packed_doc_ids(2, T, gen),
             "t_vals": torch.randn(5, 3)}
    local = shard_batch(batch, dist.group.WORLD, use_doc_ids=True)
    cp = local["cp"]
    assert local["input"].shape == (2, cp.layout.local_len)
    torch.testing.assert_close(local["positions"][0], cp.layout.local_positions())
    assert local["t_vals"] is batch["t_vals"]  # not sequence-shaped: passed through
    torch.testing.assert_close(cp.doc_ids, batch["doc_ids"])  # the global ids, for the masks
    bad = dict(batch, labels=batch["labels"][:, :-1])
    try:
        shard_batch(bad, dist.group.WORLD, use_doc_ids=True)
    except ValueError as e:
        assert "labels" in str(e)
    else:
        raise AssertionError("shard_batch accepted labels of the wrong length")
    return 1


def primitives() -> int:
    world = dist.get_world_size()
    gen = torch.Generator().manual_seed(1234)  # same stream on every rank: same full inputs
    n = check_layout_round_trip(world)
    n += check_all_gather(world, gen)
    n += check_shard_batch(world, gen)
    for T in (2 * world, 4 * world + 3, 37):  # the shortest allowed, and lengths not a multiple of 2 cp
        for docs in (False, True):
            n += check_dense_attention(world, gen, T, docs, "auto")
    n += check_dense_attention(world, gen, 37, True, "flex")  # BlockMask path (CPU: its dense view)
    return n


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    n = {"primitives": primitives}[sys.argv[1]]()
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"CP_WORKER_OK {n}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Exit without the interpreter's C++ teardown: on a loaded 2-core box gloo's threads were seen to abort
    # there ("terminate called without an active exception", SIGABRT) after the work and the OK line.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
