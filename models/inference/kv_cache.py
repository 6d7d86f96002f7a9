"""KV cache laid out by head role, preallocated for (batch, max_len).

Per layer (models/inference/engine.py fills it):
  * dense layer (plain attention backend): full K/V [B, Hkv, max_len, D].
  * RTPurbo layer:
      - "full" KV heads (every KV head that serves at least one retrieval query head; also every KV head
        when the ring would not save anything, i.e. window + sinks >= max_len): full K/V [B, Hf, max_len, D];
      - indexer keys of the retrieval query heads: ki [B, Hr, max_len, r], in the model dtype or, with
        indexer_dtype=torch.float8_e4m3fn, in fp8 (stored unscaled, saturated to +-448: store_indexer_keys);
      - "local-only" KV heads (no retrieval query head reads them): sinks [B, Hl, S, D] (token t < sinks in
        slot t) + a ring buffer [B, Hl, W, D] (token t in slot t % W, W = window), the layout of
        kernels/sparse_decode.py.
    Local query heads whose KV head is "full" read the full cache with the window + sinks mask.

Sizes are checked BEFORE anything is allocated: on CUDA against torch.cuda.mem_get_info() (plus what
PyTorch's caching allocator holds unused), elsewhere
against `memory_limit_bytes` (None: no check). A request that does not fit raises KVCacheMemoryError,
naming the bytes asked for and the bytes free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn


class KVCacheMemoryError(RuntimeError):
    pass


FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value


def indexer_store_cast(ki: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ki as it is stored in an indexer-key cache of `dtype`. float8_e4m3fn: a saturating cast, unscaled
    (clamp to the finite range +-448 first, so that no value becomes NaN: torch's cast maps out-of-range values
    to NaN; NaN inputs stay NaN); any other dtype: a plain cast."""
    if dtype == getattr(torch, "float8_e4m3fn", None):
        return ki.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)
    return ki.to(dtype)


@dataclass
class LayerPlan:
    """Head layout of one layer (all lists are Python ints, in ascending order)."""

    layer: int
    rtpurbo: bool
    n_heads: int
    n_kv_heads: int
    retrieval: list[int] = field(default_factory=list)  # query heads
    full_kv: list[int] = field(default_factory=list)  # KV heads kept in full
    ring_kv: list[int] = field(default_factory=list)  # KV heads kept as sinks + ring
    local_full: list[int] = field(default_factory=list)  # local query heads reading a full KV head
    local_ring: list[int] = field(default_factory=list)  # local query heads reading a ring KV head
    window: int = 0
    sinks: int = 0
    top_p: float = 1.0
    block_size: int = 64
    indexer_dim: int = 0

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def full_index(self, heads: list[int]) -> list[int]:
        """Slot in the full cache of the KV head of each query head in `heads`."""
        return [self.full_kv.index(h // self.group) for h in heads]

    def ring_index(self, heads: list[int]) -> list[int]:
        return [self.ring_kv.index(h // self.group) for h in heads]


def plan_layers(model: nn.Module, max_len: int) -> list[LayerPlan]:
    """One LayerPlan per model layer, from each layer's attention backend."""
    from models.rtpurbo.attention import RTPurboAttention

    args = model.args
    plans = []
    for name, layer in model.layers.items():
        i = int(name)
        be = layer.attention.inner_attention
        Hq, Hkv = args.n_heads, args.n_kv_heads
        if not isinstance(be, RTPurboAttention):
            plans.append(LayerPlan(i, False, Hq, Hkv, full_kv=list(range(Hkv))))
            continue
        g = Hq // Hkv
        retr = list(be.retrieval_list)
        full = sorted({h // g for h in retr})
        if be.window + be.sinks >= max_len:  # a ring would be as large as the full cache: keep it full
            full = list(range(Hkv))
        ring = [kv for kv in range(Hkv) if kv not in full]
        local = list(be.local_list)
        plans.append(LayerPlan(
            i, True, Hq, Hkv, retrieval=retr, full_kv=full, ring_kv=ring,
            local_full=[h for h in local if h // g in full], local_ring=[h for h in local if h // g in ring],
            window=be.window, sinks=be.sinks, top_p=be.top_p, block_size=be.block_size,
            indexer_dim=be.indexer.indexer_dim if be.indexer is not None else 0))
    return plans


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


class RoleKVCache:
    """Preallocated role-aware cache. Attributes per layer l (lists indexed by layer):
    k[l], v[l]: full K/V [B, Hf, max_len, D] or None; ki[l]: [B, Hr, max_len, r] or None;
    sink_k/sink_v[l]: [B, Hl, S, D] or None; ring_k/ring_v[l]: [B, Hl, W, D] or None.
    dtype: of K/V, sinks and rings (default: the model's); indexer_dtype: of the indexer keys ki (default:
    dtype; torch.float8_e4m3fn halves their bytes, written through store_indexer_keys)."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, memory_limit_bytes: int | None = None,
                 indexer_dtype: torch.dtype | None = None):
        self._setup(model, batch_size, max_len, dtype, device, indexer_dtype)
        need = self.total_bytes()
        free = self._free_bytes(memory_limit_bytes)
        if free is not None and need > free:
            raise KVCacheMemoryError(
                f"KV cache for batch {self.B} x max_len {self.max_len} needs {need} bytes ({_fmt(need)}) but "
                f"only {free} bytes ({_fmt(free)}) are free on {self.device}; lower --max-len or the batch")
        B, L, D = self.B, self.max_len, self.head_dim
        z = dict(dtype=self.dtype, device=self.device)
        self.k, self.v, self.ki, self.sink_k, self.sink_v, self.ring_k, self.ring_v = ([] for _ in range(7))
        for p in self.plans:
            nf, nr = len(p.full_kv), len(p.ring_kv)
            self.k.append(torch.zeros(B, nf, L, D, **z) if nf else None)
            self.v.append(torch.zeros(B, nf, L, D, **z) if nf else None)
            self.ki.append(torch.zeros(B, len(p.retrieval), L, p.indexer_dim, dtype=self.indexer_dtype,
                                       device=self.device) if p.retrieval else None)
            S, W = self._sink_ring(p)
            self.sink_k.append(torch.zeros(B, nr, S, D, **z) if nr else None)
            self.sink_v.append(torch.zeros(B, nr, S, D, **z) if nr else None)
            self.ring_k.append(torch.zeros(B, nr, W, D, **z) if nr else None)
            self.ring_v.append(torch.zeros(B, nr, W, D, **z) if nr else None)

    def _setup(self, model, batch_size, max_len, dtype, device, indexer_dtype=None) -> None:
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
        args = model.args
        w = model.tok_embeddings.weight
        self.dtype = dtype or w.dtype
        self.device = torch.device(device) if device is not None else w.device
        self.B, self.max_len, self.head_dim = int(batch_size), int(max_len), args.head_dim
        self.n_kv_heads = args.n_kv_heads
        self.plans = plan_layers(model, self.max_len)
        self.elem = torch.empty((), dtype=self.dtype).element_size()
        self.indexer_dtype = indexer_dtype or self.dtype
        self.ki_elem = torch.empty((), dtype=self.indexer_dtype).element_size()

    def store_indexer_keys(self, li: int, index, ki: torch.Tensor) -> None:
        """self.ki[li][index] = ki, cast as the cache stores it (indexer_store_cast: saturating for fp8).
        1-byte dtypes are written through uint8 views (the same bits; index_put on uint8 runs on every device
        and torch version, index_put on float8 may not)."""
        val = indexer_store_cast(ki, self.indexer_dtype)
        if self.ki_elem == 1 and self.indexer_dtype.is_floating_point:
            self.ki[li].view(torch.uint8)[index] = val.view(torch.uint8)
        else:
            self.ki[li][index] = val

    @classmethod
    def estimate(cls, model: nn.Module, batch_size: int, max_len: int, *,
                 dtype: torch.dtype | None = None, indexer_dtype: torch.dtype | None = None) -> dict[str, float]:
        """memory_report() of the cache that RoleKVCache(model, batch_size, max_len) would allocate,
        without allocating anything (sizes follow from the layer plans alone)."""
        self = cls.__new__(cls)
        self._setup(model, batch_size, max_len, dtype, None, indexer_dtype)
        return self.memory_report()

    @staticmethod
    def _sink_ring(p: LayerPlan) -> tuple[int, int]:
        return max(p.sinks, 1), max(p.window, 1)

    def _free_bytes(self, limit: int | None) -> int | None:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # memory PyTorch's caching allocator holds but does not use (e.g. a dropped cache) is free too
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            return int(free) if limit is None else min(int(free), int(limit))
        return None if limit is None else int(limit)

    # ---- sizes (computed from the plan alone, so they can be checked before allocating) ----
    def per_token_bytes(self) -> int:
        """Bytes that grow with every cached token of one sequence (full K/V + indexer keys)."""
        return self.kv_per_token_bytes() + self.indexer_per_token_bytes()

    def kv_per_token_bytes(self) -> int:
        """Full K/V part of per_token_bytes()."""
        return sum(2 * len(p.full_kv) * self.head_dim * self.elem for p in self.plans)

    def indexer_per_token_bytes(self) -> int:
        """Indexer-key part of per_token_bytes() (in the indexer dtype: 1 B per element in fp8)."""
        return sum(len(p.retrieval) * p.indexer_dim * self.ki_elem for p in self.plans)

    def fixed_bytes_per_sequence(self) -> int:
        """Bytes of the sinks + ring buffers of one sequence (independent of the context length)."""
        D = self.head_dim
        tot = 0
        for p in self.plans:
            S, W = self._sink_ring(p)
            tot += 2 * len(p.ring_kv) * (S + W) * D * self.elem
        return tot

    def dense_per_token_bytes(self) -> int:
        return len(self.plans) * 2 * self.n_kv_heads * self.head_dim * self.elem

    def total_bytes(self) -> int:
        return self.B * (self.max_len * self.per_token_bytes() + self.fixed_bytes_per_sequence())

    def memory_report(self) -> dict[str, float]:
        total = self.total_bytes()
        dense_total = self.B * self.max_len * self.dense_per_token_bytes()
        return dict(
            batch_size=self.B, max_len=self.max_len,
            dense_bytes_per_token=self.dense_per_token_bytes(),
            bytes_per_token=self.per_token_bytes(),
            indexer_bytes_per_token=self.indexer_per_token_bytes(),
            indexer_element_bytes=self.ki_elem,
            fixed_bytes_per_sequence=self.fixed_bytes_per_sequence(),
            effective_bytes_per_token=total / (self.B * self.max_len),
            total_bytes=total, dense_total_bytes=dense_total,
            ratio_vs_dense=total / max(dense_total, 1),
        )

    def memory_summary(self) -> str:
        r = self.memory_report()
        ix = "" if self.indexer_dtype == self.dtype else ", " + str(self.indexer_dtype).replace("torch.", "")
        return (f"KV cache {_fmt(r['total_bytes'])} for {self.B} x {self.max_len} tokens "
                f"(dense would be {_fmt(r['dense_total_bytes'])}, x{r['ratio_vs_dense']:.3f}); "
                f"{r['bytes_per_token']} B/token (indexer keys {r['indexer_bytes_per_token']}{ix}) + "
                f"{r['fixed_bytes_per_sequence']} B/seq fixed vs dense {r['dense_bytes_per_token']} B/token")
