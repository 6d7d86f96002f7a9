"""Worker for tests/test_rtpurbo_context_parallel.py, run by `torchrun --nproc_per_node N` on gloo.

Every rank builds the same RTPurboAttention (float64, random weights, fixed seeds) and the same full-length
inputs, runs the single-process forward + backward as the reference, then the context-parallel forward +
backward on its shard (models/rtpurbo/context_parallel.py), and checks, per case:
  * the output equals the reference sliced by shard_sequence,
  * the gradients of q, k, v (q_pre / k_pre: both None, the indexer never back-propagates into them) equal
    the sliced reference gradients (the loss is sum(out * w) + the stage-1 KL, whose sum over ranks is the
    reference loss),
  * indexer parameter gradients summed over ranks equal the reference, and the collect entries (indexer_kl,
    indexer_recall, density, teacher_density, keys_per_query) summed over ranks equal the reference,
  * the measured cp.comm_bytes equal models.rtpurbo.context_parallel.comm_model_bytes for the same shape
    (no documents), and the halo + sink bytes are far below the dense all-gather's at T >> window.
Failures are collected and printed; the exit status is 1 if any. argv[1]: a directory for per-rank JSON.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.attention import AttentionContext  # noqa: E402
from models.rtpurbo.attention import RTPurboAttention  # noqa: E402
from models.rtpurbo.context_parallel import comm_model_bytes, make_cp_aware  # noqa: E402
from torchtitan_rtpurbo.distributed.context_parallel import (  # noqa: E402
    build_cp_context,
    cp_dense_attention,
    shard_sequence,
)

B, HQ, HKV, D, R = 2, 8, 4, 16, 4
DT = torch.float64
MODES = {  # name: (mode, prefill, stage2_retrieval, stage1_target)
    "infer_dense": ("infer", "dense", "dense", "full"),
    "stage2_dense": ("stage2", "dense", "dense", "full"),
    "stage1_full": ("stage1", "dense", "dense", "full"),
    "stage1_topp": ("stage1", "dense", "dense", "topp"),
    "infer_sparse": ("infer", "sparse", "dense", "full"),
    "stage2_topp": ("stage2", "dense", "topp", "full"),
    # the rotary indexer: each rank rotates its rows by their GLOBAL positions
    "stage1_full_rope": ("stage1", "dense", "dense", "full", [3.0, 40.0]),
    "stage2_dense_rope": ("stage2", "dense", "dense", "full", [3.0, 40.0]),
}
HEADS = {"whole_group": [2, 3], "shared_kv": [1, 6]}  # KV group 1 / heads sharing KV 0 and 3 with local heads


def doc_ids_for(T: int) -> torch.Tensor:
    d = torch.zeros(B, T, dtype=torch.long)
    d[0, 11:] = 1
    d[0, 23:] = 2
    d[1, 4:] = 1  # a long document: its sinks lie far before later chunks' halos
    d[1, T - 5:] = 2
    return d


def build(mode_name: str, retrieval: list[int], window: int, tile: int) -> tuple[RTPurboAttention, RTPurboAttention]:
    mode, prefill, s2, target, *rope = MODES[mode_name]
    torch.manual_seed(1)
    ref = RTPurboAttention(n_heads=HQ, n_kv_heads=HKV, head_dim=D, retrieval_heads=retrieval, window=window,
                           sinks=2, top_p=0.6, block_size=4, q_block_size=8, prefill=prefill, indexer_dim=R,
                           indexer_rope_periods=rope[0] if rope else None,
                           stage1_target=target, stage1_query_chunk=5, stage2_retrieval=s2, layer_id=0, dtype=DT)
    ref.mode = mode
    cpb = make_cp_aware(copy.deepcopy(ref))
    cpb.cp_query_tile = tile
    assert list(cpb.state_dict()) == list(ref.state_dict())
    return ref, cpb


def inputs(T: int):
    g = torch.Generator().manual_seed(T)
    q, qp = (torch.randn(B, HQ, T, D, generator=g, dtype=DT) for _ in range(2))
    k, v, kp = (torch.randn(B, HKV, T, D, generator=g, dtype=DT) for _ in range(3))
    w = torch.randn(B, HQ, T, D, generator=g, dtype=DT)
    return dict(q=q, k=k, v=v, q_pre=qp, k_pre=kp), w


def run(backend, x: dict, w, ctx):
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in x.items()}
    out = backend(leaves["q"], leaves["k"], leaves["v"], q_pre=leaves["q_pre"], k_pre=leaves["k_pre"], ctx=ctx)
    loss = (out * w).sum()
    for kl in (ctx.collect or {}).get("indexer_kl", []):
        loss = loss + kl.sum()
    backend.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: t.grad for n, t in leaves.items()}
    pgrads = {n: p.grad for n, p in backend.named_parameters()}
    return out.detach(), grads, pgrads


def collected(collect: dict) -> dict[str, torch.Tensor]:
    """The additive statistics of a collect dict, flattened to tensors."""
    out = {}
    for key in ("indexer_kl", "indexer_recall"):
        for i, t in enumerate(collect.get(key, [])):
            out[f"{key}{i}"] = t.detach().double()
    for i, d in enumerate(collect.get("density", [])):
        for key in ("density", "teacher_density", "keys_per_query"):
            if d.get(key) is not None:
                out[f"{key}{i}"] = d[key].detach().double()
    return out


def allsum(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone().contiguous()
    dist.all_reduce(t)
    return t


class Checker:
    def __init__(self, rank: int):
        self.rank, self.failures = rank, []

    def close(self, name: str, a, b, tol: float) -> None:
        if a is None or b is None:
            if (a is None) != (b is None):
                self.failures.append(f"rank {self.rank} {name}: one side is None ({a is None}, {b is None})")
            return
        err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        scale = max(1.0, b.double().abs().max().item() if b.numel() else 0.0)
        if a.shape != b.shape or err > tol * scale:
            self.failures.append(f"rank {self.rank} {name}: shape {tuple(a.shape)} vs {tuple(b.shape)}, "
                                 f"max err {err:.3g} (tol {tol:g} x {scale:.3g})")

    def true(self, name: str, cond: bool, detail: str = "") -> None:
        if not cond:
            self.failures.append(f"rank {self.rank} {name}: {detail}")


def check_case(chk: Checker, mode_name: str, heads: str, T: int, window: int, docs: bool, tile: int) -> dict:
    name = f"{mode_name}/{heads}/T{T}/w{window}/{'docs' if docs else 'nodocs'}/tile{tile}"
    ref, cpb = build(mode_name, HEADS[heads], window, tile)
    x, w = inputs(T)
    doc_ids = doc_ids_for(T) if docs else None
    ref_ctx = AttentionContext(doc_ids=doc_ids, collect={})
    out_ref, g_ref, p_ref = run(ref, x, w, ref_ctx)

    cp = build_cp_context(dist.group.WORLD, T, doc_ids)
    lay = cp.layout
    xl = {n: shard_sequence(t, lay, dim=2) for n, t in x.items()}
    ctx = AttentionContext(doc_ids=None if doc_ids is None else shard_sequence(doc_ids, lay, dim=1), collect={},
                           extras={"cp": cp})
    out, g, pg = run(cpb, xl, shard_sequence(w, lay, dim=2), ctx)

    sparse = mode_name in ("infer_sparse", "stage2_topp")
    tol = 1e-5 if sparse else 1e-9  # the single-process sparse path on CPU runs in float32 (reference kernel)
    chk.close(f"{name} out", out, shard_sequence(out_ref, lay, dim=2), tol)
    for n in x:
        gr = None if g_ref[n] is None else shard_sequence(g_ref[n], lay, dim=2)
        chk.close(f"{name} grad {n}", g[n], gr, tol)
    for n, gr in p_ref.items():
        chk.close(f"{name} param grad {n}", None if pg[n] is None else allsum(pg[n]), gr, 1e-5)
    s_ref, s_cp = collected(ref_ctx.collect), collected(ctx.collect)
    chk.true(f"{name} collect keys", sorted(s_ref) == sorted(s_cp), f"{sorted(s_ref)} vs {sorted(s_cp)}")
    for key in s_ref:
        if key in s_cp:
            chk.close(f"{name} collect {key} (sum over ranks)", allsum(s_cp[key]), s_ref[key], 1e-5)
    return {"case": name, "comm_bytes": dict(cp.comm_bytes)}


def check_bytes_model(chk: Checker, T: int, window: int) -> dict:
    """Measured cp.comm_bytes (no documents) == comm_model_bytes for the same tiny shape, exactly."""
    rec = {}
    for mode_name in ("infer_dense", "stage1_full"):
        rec[mode_name] = check_case(chk, mode_name, "shared_kv", T, window, False, 1 << 30)["comm_bytes"]
    cpn, me = dist.get_world_size(), dist.get_rank()
    kvs_r = sorted({h // (HQ // HKV) for h in HEADS["shared_kv"]})
    local = sorted({h // (HQ // HKV) for h in range(HQ) if h not in HEADS["shared_kv"]})
    m = comm_model_bytes(T=T, cp=cpn, n_kv_heads=HKV, head_dim=D, window=window, sinks=2,
                         local_kv_heads=len(local), retrieval_kv_heads=len(kvs_r),
                         retrieval_q_heads=len(HEADS["shared_kv"]), batch=B, dtype_bytes=8, indexer_dim=R,
                         rank=me)
    got = rec["infer_dense"]
    for kind, model_kind in (("halo", "halo"), ("sinks", "sinks"), ("retrieval_kv", "retrieval_kv"),
                             ("halo_grad", "halo_bwd"), ("sinks_grad", "sinks_bwd")):
        chk.true(f"bytes {kind}", got.get(kind, 0) == m[model_kind],
                 f"measured {got.get(kind, 0)} vs model {m[model_kind]}")
    s1 = rec["stage1_full"]
    chk.true("bytes dense_kv", s1.get("dense_kv", 0) == m["dense_allgather"],
             f"measured {s1.get('dense_kv', 0)} vs model {m['dense_allgather']}")
    chk.true("bytes indexer_keys", s1.get("indexer_keys", 0) == m["indexer_keys"],
             f"measured {s1.get('indexer_keys', 0)} vs model {m['indexer_keys']}")
    return {"T": T, "window": window, "measured": rec, "model": m}


def check_halo_vs_dense(chk: Checker, T: int, window: int) -> dict:
    """Only local heads at T >> window: the halo + sinks bytes vs a dense all-gather of the same K/V."""
    torch.manual_seed(2)
    local_only = make_cp_aware(RTPurboAttention(n_heads=HQ, n_kv_heads=HKV, head_dim=D, retrieval_heads=[],
                                                window=window, sinks=2, dtype=DT))
    x, w = inputs(T)
    ref_out, g_ref, _ = run(copy.deepcopy(local_only), x, w, AttentionContext(collect={}))
    cp = build_cp_context(dist.group.WORLD, T)
    xl = {n: shard_sequence(t, cp.layout, dim=2) for n, t in x.items()}
    out, g, _ = run(local_only, xl, shard_sequence(w, cp.layout, dim=2),
                    AttentionContext(collect={}, extras={"cp": cp}))
    chk.close(f"local-only T{T} out", out, shard_sequence(ref_out, cp.layout, dim=2), 1e-9)
    chk.close(f"local-only T{T} grad k", g["k"], shard_sequence(g_ref["k"], cp.layout, dim=2), 1e-9)
    dense = build_cp_context(dist.group.WORLD, T)
    cp_dense_attention(xl["q"], xl["k"], xl["v"], dense)
    halo = cp.comm_bytes.get("halo", 0) + cp.comm_bytes.get("sinks", 0)
    chk.true(f"halo bytes << dense T{T}", 0 < 20 * halo < dense.comm_bytes["dense_kv"],
             f"halo+sinks {halo} vs dense all-gather {dense.comm_bytes['dense_kv']}")
    return {"T": T, "window": window, "halo_sinks": halo, "dense_kv": dense.comm_bytes["dense_kv"]}


def main() -> int:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    chk = Checker(rank)
    T = 37 if world == 2 else 50  # never a multiple of 2 * cp
    report = {"world": world, "cases": []}
    try:
        for heads in HEADS:
            for docs in (False, True):
                for mode_name in MODES:
                    for window in (5, 9):
                        tile = 4 if window == 9 else 1 << 30  # tiles shorter than a chunk on half the cases
                        report["cases"].append(check_case(chk, mode_name, heads, T, window, docs, tile))
        report["bytes_model"] = check_bytes_model(chk, T, 9)
        report["halo_vs_dense"] = check_halo_vs_dense(chk, 200 * world, 5)
    except Exception:  # a crash on one rank: report it (the others may then time out in a collective)
        chk.failures.append(f"rank {rank} crashed:\n{traceback.format_exc()}")
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=1, default=str))
    for f in chk.failures[:40]:
        print("FAIL", f, flush=True)
    if not chk.failures:
        print(f"CP_WORKER_OK rank {rank} of {world}: {len(report['cases'])} cases", flush=True)
    dist.destroy_process_group()
    return 1 if chk.failures else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rc = main()
    # Exit without the interpreter's C++ teardown (gloo threads were seen to abort there on a loaded box).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
