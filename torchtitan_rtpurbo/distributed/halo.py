"""Point-to-point exchange of sequence rows between the ranks of a context-parallel group.

Under context parallelism (torchtitan_rtpurbo/distributed/context_parallel.py) rank r holds the global
positions of its two chunks. A window head needs, besides its own keys, the `window - 1` keys before each
chunk (the "halo", which may span several chunks / ranks when the window is longer than a chunk) and the
`sinks` first keys of the document; sparse retrieval needs the key blocks its indexer selected. Both are
"rank d needs these global positions": `plan_exchange` turns that into who-sends-what (every rank computes
the same plan from the layouts, so no request message is needed), and `exchange_rows` moves the rows with
one batch of isend / irecv, differentiably: its backward sends each received row's gradient back to the
owner, which adds it to its local gradient.

Bytes RECEIVED by this rank are counted with cp.count(kind, ...) in forward and cp.count(kind + "_grad", ...)
in backward (the rows this rank sent come back as gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from torchtitan_rtpurbo.distributed.context_parallel import CPContext, CPLayout, chunk_bounds


# ----------------------------------------------------------------------------------------------------------
# where a global position lives
# ----------------------------------------------------------------------------------------------------------
def position_owner(pos: torch.Tensor, layouts: list[CPLayout]) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner rank, local row index on the owner) of each global position (int64 tensors like pos)."""
    lay0 = layouts[0]
    cp = lay0.cp
    bounds = chunk_bounds(lay0.T, 2 * cp)
    starts = torch.tensor([s for s, _ in bounds], dtype=torch.int64, device=pos.device)
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= lay0.T):
        raise ValueError(f"position_owner: positions must lie in [0, {lay0.T}), got "
                         f"[{int(pos.min())}, {int(pos.max())}]")
    chunk = torch.searchsorted(starts, pos, right=True) - 1  # global chunk index of each position
    is_tail = chunk >= cp
    owner = torch.where(is_tail, 2 * cp - 1 - chunk, chunk)
    # a tail chunk follows its owner's head chunk in the local order
    head_len = torch.tensor([b[1] - b[0] for b in bounds[:cp]], dtype=torch.int64, device=pos.device)
    local = pos - starts[chunk] + torch.where(is_tail, head_len[owner], torch.zeros_like(pos))
    return owner, local


# ----------------------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ExchangePlan:
    """This rank's side of one exchange.

    send[peer]: local row indices (int64) to send to `peer` (cp-group rank), in the order peer expects;
    recv[peer]: number of rows received from `peer`; peers are visited in ascending rank order, so the
    received rows are concatenated by peer and, within a peer, in ascending global position;
    recv_positions: global position of each received row (that concatenation order);
    recv_kind_rows / sent_kind_rows: rows per byte-counter kind (forward receive / backward receive).
    """

    send: dict[int, torch.Tensor]
    recv: dict[int, int]
    recv_positions: torch.Tensor
    recv_kind_rows: dict[str, int]
    sent_kind_rows: dict[str, int]

    @property
    def n_recv(self) -> int:
        return int(self.recv_positions.numel())


def _dedup_kinds(needs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sorted unique positions per kind; a position already listed under an earlier kind is dropped."""
    seen = None
    out = {}
    for kind, pos in needs.items():
        p = torch.unique(pos.to(torch.int64))
        if seen is not None and p.numel():
            p = p[~torch.isin(p, seen)]
        out[kind] = p
        seen = p if seen is None else torch.cat([seen, p])
    return out


def plan_exchange(cp: CPContext, needs_by_rank: list[dict[str, torch.Tensor]]) -> ExchangePlan:
    """needs_by_rank[d][kind]: global positions rank d needs (any order, duplicates allowed, its own positions
    allowed: they are skipped). Every rank must pass the same needs_by_rank (computed from the layouts and
    the global doc ids, or all-gathered), so the sends and receives match without a request message."""
    if len(needs_by_rank) != cp.cp:
        raise ValueError(f"plan_exchange: needs for {len(needs_by_rank)} ranks, the cp group has {cp.cp}")
    me = cp.rank
    send: dict[int, list[torch.Tensor]] = {}
    recv: dict[int, int] = {}
    recv_pos: list[torch.Tensor] = []
    recv_kind_rows: dict[str, int] = {}
    sent_kind_rows: dict[str, int] = {}
    for d, needs in enumerate(needs_by_rank):
        per_kind = _dedup_kinds(needs)
        kinds = list(per_kind)
        pos = torch.cat([per_kind[k] for k in kinds]) if kinds else torch.zeros(0, dtype=torch.int64)
        kind_id = torch.cat([torch.full((per_kind[k].numel(),), i, dtype=torch.int64) for i, k in enumerate(kinds)]) \
            if kinds else torch.zeros(0, dtype=torch.int64)
        order = torch.argsort(pos)
        pos, kind_id = pos[order], kind_id[order]
        owner, local = position_owner(pos, cp.layouts)
        remote = owner != d
        pos, kind_id, owner, local = pos[remote], kind_id[remote], owner[remote], local[remote]
        if d == me:
            for s in range(cp.cp):
                sel = owner == s
                n = int(sel.sum())
                if n:
                    recv[s] = n
                    recv_pos.append(pos[sel])
                    for i, k in enumerate(kinds):
                        recv_kind_rows[k] = recv_kind_rows.get(k, 0) + int((kind_id[sel] == i).sum())
        else:
            sel = owner == me
            if bool(sel.any()):
                send[d] = local[sel]
                for i, k in enumerate(kinds):
                    sent_kind_rows[k] = sent_kind_rows.get(k, 0) + int((kind_id[sel] == i).sum())
    recv_positions = torch.cat(recv_pos) if recv_pos else torch.zeros(0, dtype=torch.int64)
    return ExchangePlan(send=send, recv=recv, recv_positions=recv_positions, recv_kind_rows=recv_kind_rows,
                        sent_kind_rows=sent_kind_rows)


# ----------------------------------------------------------------------------------------------------------
# the exchange
# ----------------------------------------------------------------------------------------------------------
def _p2p(cp: CPContext, sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor]) -> None:
    """One batch of isend / irecv (peers are cp-group ranks), then wait for all of it."""
    ops = []
    for peer in sorted(set(sends) | set(recvs)):
        gpeer = dist.get_global_rank(cp.group, peer)
        if peer in sends:
            ops.append(dist.P2POp(dist.isend, sends[peer], gpeer, cp.group))
        if peer in recvs:
            ops.append(dist.P2POp(dist.irecv, recvs[peer], gpeer, cp.group))
    if not ops:
        return
    for req in dist.batch_isend_irecv(ops):
        req.wait()


def _row_bytes(x: torch.Tensor, dim: int) -> int:
    return (x.numel() // max(x.shape[dim], 1)) * x.element_size()


def _count(cp: CPContext, kind_rows: dict[str, int], row_bytes: int, suffix: str) -> None:
    for kind, n in kind_rows.items():
        if n:
            cp.count(kind + suffix, n * row_bytes)


class _ExchangeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan: ExchangePlan, cp: CPContext, dim: int):
        ctx.plan, ctx.cp, ctx.dim, ctx.local_len = plan, cp, dim, x.shape[dim]
        sends = {p: x.index_select(dim, idx.to(x.device)).contiguous() for p, idx in plan.send.items()}
        recvs = {}
        for p, n in plan.recv.items():
            shape = list(x.shape)
            shape[dim] = n
            recvs[p] = torch.empty(shape, dtype=x.dtype, device=x.device)
        _p2p(cp, sends, recvs)
        _count(cp, plan.recv_kind_rows, _row_bytes(x, dim), "")
        if recvs:
            return torch.cat([recvs[p] for p in sorted(recvs)], dim=dim)
        shape = list(x.shape)
        shape[dim] = 0
        return x.new_empty(shape)

    @staticmethod
    def backward(ctx, g):
        plan, cp, dim = ctx.plan, ctx.cp, ctx.dim
        g = g.contiguous()
        # the gradient of the rows received from peer p goes back to p ...
        back_sends, off = {}, 0
        for p in sorted(plan.recv):
            back_sends[p] = g.narrow(dim, off, plan.recv[p]).contiguous()
            off += plan.recv[p]
        # ... and the rows this rank sent come back as gradients, added to the local rows they came from
        back_recvs = {}
        for p, idx in plan.send.items():
            shape = list(g.shape)
            shape[dim] = idx.numel()
            back_recvs[p] = torch.empty(shape, dtype=g.dtype, device=g.device)
        _p2p(cp, back_sends, back_recvs)
        shape = list(g.shape)
        shape[dim] = ctx.local_len
        grad = g.new_zeros(shape)
        for p, idx in plan.send.items():
            grad.index_add_(dim, idx.to(g.device), back_recvs[p])
        _count(cp, plan.sent_kind_rows, _row_bytes(g, dim), "_grad")
        return grad, None, None, None


def exchange_rows(x: torch.Tensor, plan: ExchangePlan, cp: CPContext, dim: int = 2) -> torch.Tensor:
    """Rows of the local shard x (x.shape[dim] == local_len) that other ranks need go to them; returns the rows
    this rank needs from others, [.., plan.n_recv (dim), ..], at global positions plan.recv_positions.
    Differentiable (backward returns the gradients to the owners). Every rank of the group must call it."""
    if x.shape[dim] != cp.layout.local_len:
        raise ValueError(f"exchange_rows: dim {dim} of {tuple(x.shape)} has {x.shape[dim]} rows, the local shard "
                         f"has {cp.layout.local_len}")
    return _ExchangeRows.apply(x, plan, cp, dim)
