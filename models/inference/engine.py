"""A decoding engine over a role-aware KV cache (models/inference/kv_cache.py).

It runs the model's own modules layer by layer (norms, wq/wk/wv/wo, q_norm/k_norm, RoPE, feed_forward or
moe); the model code is not changed and its attention backend is only read for the head roles and the
RTPurbo settings.

  * Prefill, two modes writing the same cache (prefill(mode="auto" | "chunked" | "one_shot")):
    - chunked (chunk_size tokens at a time, all sequences of the batch together, left-aligned): exact
      masked attention (SDPA with a boolean mask) over the cache + the chunk: dense (causal) for dense layers
      and retrieval heads (the paper's dense prefill), window + sinks for local heads. Cache writes past a
      sequence's own prompt length are masked for the ring buffer (padding never evicts real tokens).
      Activations bounded by the chunk; slow on long prompts on a GPU (no flash / cuDNN kernel takes a mask).
    - one_shot (models/inference/prefill.py): every layer over the whole prompt at once with the fast
      kernels (cuDNN causal SDPA, FlexAttention window + sinks on CUDA), projections / FFN in chunks of
      proj_chunk / ffn_chunk tokens. Activations grow with the prompt (estimated before running).
    - auto: one_shot on CUDA for one sequence or equal prompt lengths longer than one chunk when its
      estimate fits, else chunked.
  * Decode: one token per sequence per step, at per-sequence positions (cache_lens); attention through
    kernels/sparse_decode.py: dense_decode_reference for dense layers; for RTPurbo layers the indexer's
    dynamic top-p block selection + retrieval_decode for retrieval heads, local_decode (sinks + ring) for
    local heads, and retrieval_decode with an empty block mask (= sinks + window) for local heads whose KV
    head is kept in full. The dispatching versions pick Triton on CUDA and the references elsewhere.
  * Sampling: greedy (temperature 0) or temperature / top-k / top-p over the vocabulary; stop tokens.

Two decode paths, same results (tests/test_inference.py compares them token for token and logit by logit):
  * eager (`_decode_step_eager`): the original path. Caches are sliced to the used length rounded up to 64
    (shapes change every 64 tokens), positions come from a Python list, the density is read back per layer
    (a host sync), MoE layers run the model's own MoE module (torch.bincount syncs on CUDA).
  * static (`_decode_core`): graph-safe. Token ids and positions live in static device buffers, caches are
    passed as fixed views [:, :, :bucket] (bucket = power of two >= the used length, capped at max_len;
    see models/inference/cuda_graph.py for why buckets), nothing reads a tensor value on the host, head
    subsets are gathered with cached device index tensors (a Python-list index would be a host-to-device
    copy), the density is accumulated on the device, and MoE layers use `_moe_static` (expert counts by
    scatter_add, torch._grouped_mm on CUDA bf16, a gather + bmm elsewhere). On CUDA this function is what
    one CUDA graph per bucket captures (`cuda_graph=True`, the default there); on CPU it can run eagerly
    (`static_decode=True`) so the tests check the exact function the graph captures.
  Dense layers decode through kernels.sparse_decode.dense_decode (Triton split-K GQA kernel on CUDA, the
  reference on CPU) in the static path; the eager path keeps dense_decode_reference.
  Fused decode (`fused_decode`, default on CUDA): in the static step everything but the attention runs as a
  few Triton kernels (kernels/fused_decode.py, kernels/moe_decode.py; `_decode_core_fused`): per MoE layer
  7 launches instead of ~73 (norm + one QKV projection over the concatenated wq/wk/wv; QK-norm + RoPE +
  all KV-cache writes; wo + residual; norm + router logits; softmax top-k; experts read in place, 2 kernels).
  The CPU static path and the eager path keep the model's modules (the tests compare the two in Triton's
  CPU interpreter).

fp8 indexer keys (`indexer_cache_dtype="float8_e4m3fn"`): the cache stores the retrieval heads' indexer keys
in float8_e4m3fn (1 B instead of 2 per element in bf16), so decode scoring reads half the indexer bytes. The
keys are computed in the model dtype as before and stored unscaled by a saturating cast (clamp to +-448, then
cast: kv_cache.indexer_store_cast) at every write: chunked and one-shot prefill, eager and static decode
(the fused step too: its indexer projection and ki write are this engine's torch code, not a kernel).
Scoring upcasts the fp8 keys (Triton kernel and torch reference alike), the indexer queries stay in the model
dtype; selection is the same rule on the dequantised keys.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import sparse_decode as sd
from models.inference import prefill as pf
from models.inference.cuda_graph import DecodeGraphs, GraphCaptureError, bucket_length
from models.inference.kv_cache import FP8_E4M3_MAX, LayerPlan, RoleKVCache, indexer_store_cast
from models.qwen3.rope import apply_rope, rope_cos_sin

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated tokens per sequence (stop token included if hit)
    prompt_lens: list[int]
    finished: list[bool]  # True: a stop token ended the sequence
    ttft_s: float = 0.0  # prefill + first sampled token
    decode_s: float = 0.0
    decode_steps: int = 0  # forward decode steps (each produces one token per sequence)
    decode_tokens: int = 0  # tokens produced by decode steps (over live sequences)
    mean_density: float | None = None  # mean kept fraction of visible tokens, retrieval heads at decode
    memory: dict = field(default_factory=dict)
    decode_path: str = ""  # "graph" | "static" | "eager" (InferenceEngine.decode_path)
    graph_capture_s: float = 0.0  # part of decode_s spent capturing CUDA graphs (warm-ups and JIT included)
    graph_status: str = ""  # whether CUDA graphs were used, and why not
    decode_layers: str = ""  # fused Triton kernels or the model's torch modules, and why (fused_status)
    prefill_mode: str = ""  # "one_shot" | "chunked": the prefill that ran (InferenceEngine.last_prefill_mode)
    prefill_status: str = ""  # why that mode (InferenceEngine.prefill_status)
    indexer_cache_dtype: str = ""  # dtype of the cached indexer keys (InferenceEngine.indexer_cache_dtype)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature <= 0: greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if top_k and 0 < top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sx, order = torch.sort(x, dim=-1, descending=True)
        probs = sx.softmax(-1)
        before = probs.cumsum(-1) - probs
        drop = before >= top_p
        drop[..., 0] = False
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = x.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _attn_mask(qpos: torch.Tensor, kpos: torch.Tensor, kvalid: torch.Tensor, local: bool, window: int,
               sinks: int) -> torch.Tensor:
    """[C] query positions, [N] key positions / validity -> bool [C, N]."""
    m = kvalid[None, :] & (kpos[None, :] <= qpos[:, None])
    if local:
        m = m & ((qpos[:, None] - kpos[None, :] < window) | (kpos[None, :] < sinks))
    return m


def _index_or_none(idx: list[int], n: int, device) -> torch.Tensor | None:
    """None when idx is 0..n-1 (take everything, no gather), else a long index tensor on `device`."""
    if list(idx) == list(range(n)):
        return None
    return torch.tensor(list(idx), dtype=torch.long, device=device)


def _take(x: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x.index_select(dim, idx)


def _moe_static(moe, x: torch.Tensor) -> torch.Tensor:
    """Graph-safe Qwen3-MoE forward of x [N, dim] (no auxiliary loss, no host sync, shapes fixed by N).

    The model's MoE.forward counts tokens per expert with torch.bincount, which reads the maximum back to
    the host on CUDA (a sync: not capturable). Here the counts come from scatter_add_. With
    torch._grouped_mm (CUDA, bf16, sm90+) the sorted slots go through the model's GroupedExperts (on-device
    offsets); elsewhere each (token, expert) slot gathers its expert's weights and runs a bmm, which reads
    only the selected experts (decode has few tokens)."""
    from models.qwen3.moe import _can_grouped_mm

    N, D = x.shape
    weights, experts, _ = moe.router(x)
    k, E = moe.top_k, moe.num_experts
    flat_e = experts.reshape(-1)
    ex = moe.experts
    if _can_grouped_mm(x):
        order = torch.argsort(flat_e, stable=True)
        tok = order // k
        counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat_e, torch.ones_like(flat_e))
        y = ex(x[tok], counts) * weights.reshape(-1)[order, None]
        # back to (token, slot) order and a plain sum over the k slots: deterministic, unlike index_add_'s
        # atomics (a graph replay and an eager run of the step then give the same bits)
        return torch.empty_like(y).index_copy_(0, order, y).view(N, k, D).sum(1)
    # (the same ops as kernels/moe_decode.moe_decode_reference, inline so that torch-only use imports no triton)
    xs = x.repeat_interleave(k, dim=0)[:, :, None]  # [N*k, D, 1]
    h = F.silu(torch.bmm(ex.w1[flat_e], xs)) * torch.bmm(ex.w3[flat_e], xs)  # [N*k, H, 1]
    y = torch.bmm(ex.w2[flat_e], h)[:, :, 0].view(N, k, D)
    return (y * weights[:, :, None]).sum(1)


@dataclass
class _StaticLayer:
    """Device index tensors of one layer's head subsets (None: all heads, no gather)."""

    full_kv: torch.Tensor | None = None
    ring_kv: torch.Tensor | None = None
    sub: torch.Tensor | None = None  # retrieval + ring-local query heads, ascending
    sub_roles: list[bool] = field(default_factory=list)
    local_full: torch.Tensor | None = None
    ix_heads: torch.Tensor | None = None  # indexer: query heads and their KV heads
    ix_kv: torch.Tensor | None = None
    # fused path (kernels/fused_decode.qk_norm_rope): cache head of each KV head in the full cache / in the
    # sinks + ring (int32 [Hkv], -1: none); None when the layer has no such cache
    full_slot: torch.Tensor | None = None
    ring_slot: torch.Tensor | None = None


@dataclass
class _StaticState:
    """Static device buffers of the graph-safe decode step (tied to one cache)."""

    B: int
    tok: torch.Tensor  # [B] long, token ids of the step
    pos: torch.Tensor  # [B] long, position of the new token = tokens already cached
    ar: torch.Tensor  # [B] arange
    dens: torch.Tensor  # [] float32, sum over steps and retrieval layers of the mean kept density
    layers: list[_StaticLayer]
    ffn_ids: torch.Tensor | None = None  # fused path, dense FFN layers as one "expert": ids 0, weights 1 [B, 1]
    ffn_w: torch.Tensor | None = None


@dataclass
class _FusedLayer:
    """Weights of one layer for the fused decode kernels (built once from the model's modules)."""

    wqkv: torch.Tensor  # [(Hq + 2 Hkv) * D, dim] = cat(wq, wk, wv): one projection for q, k and v
    bqkv: torch.Tensor | None  # cat of the biases (qkv_bias models), else None



def _write_ring_and_sinks(cache, li: int, sinks: int, kr, vr, pos, ar) -> None:
    """One decode token per sequence into layer li's ring buffer (slot pos % window) and, while pos < sinks,
    its sink slot. Graph-safe: no branch on tensor values (torch.where keeps the old sink otherwise)."""
    W, S = cache.ring_k[li].shape[2], cache.sink_k[li].shape[2]
    slot = torch.remainder(pos, W)
    cache.ring_k[li][ar, :, slot] = kr
    cache.ring_v[li][ar, :, slot] = vr
    is_sink = (pos < sinks)[:, None, None]
    ss = pos.clamp(max=S - 1)
    cache.sink_k[li][ar, :, ss] = torch.where(is_sink, kr, cache.sink_k[li][ar, :, ss])
    cache.sink_v[li][ar, :, ss] = torch.where(is_sink, vr, cache.sink_v[li][ar, :, ss])

INDEXER_CACHE_DTYPES = ("float8_e4m3fn",)  # InferenceEngine(indexer_cache_dtype=...) besides None


def fp8_capability_reason(capability: tuple[int, int]) -> str | None:
    """Why the Triton indexer-scoring kernel cannot load float8_e4m3fn keys on a GPU of this compute
    capability (None: it can). Triton's tl.float8e4nv needs sm_89+ (Ada, Hopper and later)."""
    if tuple(capability) < (8, 9):
        return (f"the Triton indexer-scoring kernel loads the keys as float8e4nv, which needs compute capability "
                f">= 8.9 (this GPU is sm_{capability[0]}{capability[1]}); impl='torch' scores fp8 keys with the "
                f"torch reference instead")
    return None


def resolve_indexer_cache_dtype(option, device, impl: str = "auto") -> torch.dtype | None:
    """InferenceEngine(indexer_cache_dtype=option) -> the cache's indexer-key dtype (None: the model dtype).
    option: None or "float8_e4m3fn" (or torch.float8_e4m3fn). Raises ValueError naming the option when the
    name is unknown, this torch has no such dtype, the device cannot store / cast it, or (CUDA, impl != "torch")
    the GPU's Triton cannot load it."""
    if option is None:
        return None
    name = option.replace("torch.", "") if isinstance(option, str) else str(option).replace("torch.", "")
    if name not in INDEXER_CACHE_DTYPES:
        raise ValueError(f"indexer_cache_dtype must be None (the model dtype) or one of {INDEXER_CACHE_DTYPES}, "
                         f"got {option!r}")
    dt = getattr(torch, name, None)
    if dt is None:
        raise ValueError(f"indexer_cache_dtype={name!r}: this torch ({torch.__version__}) has no torch.{name}")
    device = torch.device(device)
    why = None
    try:  # a store and a read-back of saturated values on the device itself
        x = torch.tensor([1.0, -1000.0, 3.0], device=device)
        back = indexer_store_cast(x, dt).float().cpu().tolist()
        if back != [1.0, -FP8_E4M3_MAX, 3.0]:
            why = f"a saturating cast to {name} on {device} read back {back}, not [1.0, -448.0, 3.0]"
    except Exception as e:  # noqa: BLE001 - reported
        why = f"{device.type} cannot store / cast {name} ({type(e).__name__}: {str(e)[:200]})"
    if why is None and device.type == "cuda" and impl != "torch":
        why = fp8_capability_reason(torch.cuda.get_device_capability(device))
    if why is not None:
        raise ValueError(f"indexer_cache_dtype={name!r} is not supported here: {why}; use indexer_cache_dtype=None "
                         f"(indexer keys in the model dtype)")
    return dt


class InferenceEngine:
    """model: a Qwen3Model (dense or RTPurbo-converted), in eval mode, on its device and dtype.

    cuda_graph: None (default) = CUDA graphs for the decode step when the model is on CUDA, else not
        (one log line says which and why); True = required (raises on a non-CUDA device, and if a capture
        fails); False = off. With graphs on, a failed capture under the default (None) logs a warning with
        the cause and continues with the same graph-safe step run eagerly.
    static_decode: run the graph-safe decode step (static buffers, fixed-shape cache views) without
        capturing it; default = whether graphs are on. The CPU tests use it to check the captured function.
    graph_min_bucket: smallest cache-view length of the static step (buckets double up to max_len).
    track_density: accumulate the retrieval heads' kept density per decode step (GenerationResult).
    fused_decode: the non-attention part of the graph-safe step through the fused Triton kernels
        (kernels/fused_decode.py, kernels/moe_decode.py: norm + fused QKV projection, QK-norm + RoPE + cache
        writes, output projection + residual, norm + router, MoE / FFN experts read in place, final norm +
        head) instead of the model's torch modules. None (default) = on iff the model is on CUDA, the step is
        the static one and impl != "torch" (a CUDA model whose tensors Triton cannot run on logs a warning and
        stays on the modules); True = required (raises if Triton cannot run, e.g. on CPU without
        TRITON_INTERPRET=1); False = off. One INFO log line says which and why (`fused_status`).
        The fused QKV weight is a concatenated copy of wq/wk/wv (built here; reset() rebuilds it after a
        weight change): (Hq + 2 Hkv) * head_dim * dim elements per layer more memory.
    indexer_cache_dtype: None (default) = the retrieval heads' indexer keys are cached in the model dtype;
        "float8_e4m3fn" = cached in fp8, stored unscaled with a saturating cast (clamp to +-448), read back by
        upcasting (see the module doc). Raises ValueError when the device (or, on CUDA with impl != "torch",
        the GPU's Triton: sm_89+) cannot handle it. No effect on layers without retrieval heads.
    The cache is kept between calls with the same batch size (so are the graphs, which point into it);
    reset() drops both (needed after changing the model's RTPurbo settings, e.g. top_p)."""

    def __init__(self, model: nn.Module, *, max_len: int, chunk_size: int = 256,
                 memory_limit_bytes: int | None = None, impl: str = "auto", cuda_graph: bool | None = None,
                 static_decode: bool | None = None, graph_min_bucket: int = 2048, track_density: bool = True,
                 fused_decode: bool | None = None, prefill_mode: str = "auto", proj_chunk: int = 65536,
                 ffn_chunk: int = 16384, indexer_cache_dtype: str | torch.dtype | None = None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if proj_chunk < 1 or ffn_chunk < 1:
            raise ValueError(f"proj_chunk and ffn_chunk must be >= 1, got {proj_chunk}, {ffn_chunk}")
        if prefill_mode not in pf.MODES:
            raise ValueError(f"prefill_mode must be one of {pf.MODES}, got {prefill_mode!r}")
        self.prefill_mode = prefill_mode
        self.proj_chunk, self.ffn_chunk = int(proj_chunk), int(ffn_chunk)
        self.last_prefill_mode: str = ""  # "one_shot" | "chunked": what the last prefill() ran
        self.prefill_status: str = ""  # and why
        if graph_min_bucket < 1:
            raise ValueError(f"graph_min_bucket must be >= 1, got {graph_min_bucket}")
        self.model = model.eval()
        self.args = model.args
        self.max_len, self.chunk_size = int(max_len), int(chunk_size)
        self.memory_limit_bytes = memory_limit_bytes
        self.impl = impl
        self.cache: RoleKVCache | None = None
        self.layers = list(model.layers.values())
        self.device = model.tok_embeddings.weight.device
        self.indexer_dtype = resolve_indexer_cache_dtype(indexer_cache_dtype, self.device, impl)
        if self.indexer_dtype is not None:
            log.info("indexer keys cached in %s (unscaled, saturated to +-%g)", self.indexer_cache_dtype,
                     FP8_E4M3_MAX)
        self.graph_min_bucket = int(graph_min_bucket)
        self.track_density = bool(track_density)
        self._density_sum = 0.0
        self._density_n = 0
        self._st: _StaticState | None = None
        self._graphs: DecodeGraphs | None = None
        self.lens: list[int] = []
        self.record_indexer_queries: dict[int, torch.Tensor] | None = None  # see _decode_attention_static
        self.cuda_graph_requested = cuda_graph
        on_cuda = self.device.type == "cuda"
        if cuda_graph is None:
            use, why = on_cuda, (None if on_cuda else f"the model is on {self.device.type}, not CUDA")
        elif cuda_graph:
            if not on_cuda:
                raise ValueError(f"cuda_graph=True needs the model on a CUDA device; it is on {self.device}")
            use, why = True, None
        else:
            use, why = False, "cuda_graph=False was passed"
        if static_decode is None:
            static_decode = use
        if use and not static_decode:
            raise ValueError("CUDA graphs capture the static decode step: static_decode=False contradicts "
                             "cuda_graph")
        self.cuda_graph = use
        self.static_decode = bool(static_decode)
        if use:
            self.graph_status = (f"on (one graph per cache-view bucket: {self.graph_min_bucket} doubling up to "
                                 f"max_len {self.max_len}, captured on first use)")
        else:
            self.graph_status = f"off: {why}"
        path = "graph" if use else ("static (graph-safe step, run eagerly)" if self.static_decode else "eager")
        log.info("decode: CUDA graphs %s; decode path: %s", self.graph_status, path)
        self.fused, self.fused_status = self._choose_fused(fused_decode)
        log.info("decode layers: %s", self.fused_status)
        self.skip_attention = False  # benchmarks only: the static step without its attention (see _attend_static)
        self._fused_w: list[_FusedLayer] | None = None
        if self.fused:
            self._fused_weights()

    def _choose_fused(self, fused_decode: bool | None) -> tuple[bool, str]:
        """(use the fused Triton kernels in the static step, the status line)."""
        what = ("fused Triton kernels (norm + fused QKV, QK-norm + RoPE + cache writes, wo + residual, "
                "norm + router, MoE / FFN experts in place, norm + head)")
        if fused_decode is False:
            return False, "the model's torch modules (fused_decode=False was passed)"
        why = None
        if not self.static_decode:
            why = "the eager decode path (fused kernels run in the static step only)"
        elif fused_decode is None and self.device.type != "cuda":
            why = f"the model is on {self.device.type}, not CUDA"
        elif fused_decode is None and self.impl == "torch":
            why = "impl='torch' (pure-torch references)"
        elif self.model.tok_embeddings.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            why = f"dtype {self.model.tok_embeddings.weight.dtype} is not supported by the fused kernels"
        else:
            why = sd.triton_unavailable_reason(self.model.tok_embeddings.weight)
            if why is None:
                try:
                    from kernels import fused_decode, moe_decode  # noqa: F401
                except Exception as e:  # noqa: BLE001 - reported
                    why = f"the fused kernels cannot be imported ({type(e).__name__}: {e})"
        if why is None:
            return True, what
        if fused_decode:
            raise ValueError(f"fused_decode=True but the fused decode kernels cannot run: {why}")
        if self.device.type == "cuda" and self.static_decode and self.impl != "torch":
            log.warning("fused decode kernels off on CUDA: %s; the decode step runs the model's torch modules", why)
        return False, f"the model's torch modules (fused kernels off: {why})"

    def _fused_weights(self) -> list[_FusedLayer]:
        """Concatenated q/k/v weights per layer (built once; dropped by reset())."""
        if self._fused_w is None:
            out = []
            with torch.no_grad():
                for layer in self.model.layers.values():
                    a = layer.attention
                    w = torch.cat([a.wq.weight, a.wk.weight, a.wv.weight], 0).contiguous()
                    b = (torch.cat([a.wq.bias, a.wk.bias, a.wv.bias], 0).contiguous()
                         if a.wq.bias is not None else None)
                    out.append(_FusedLayer(w, b))
            self._fused_w = out
        return self._fused_w

    @property
    def indexer_cache_dtype(self) -> str:
        """Dtype name of the cached indexer keys ("float8_e4m3fn", or the model dtype's, e.g. "bfloat16")."""
        dt = self.indexer_dtype or self.model.tok_embeddings.weight.dtype
        return str(dt).replace("torch.", "")

    @property
    def decode_path(self) -> str:
        """"graph", "static" (the graph-safe step run eagerly) or "eager"."""
        if self.static_decode:
            return "graph" if self.cuda_graph else "static"
        return "eager"

    # ------------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int) -> RoleKVCache:
        """The cache for `batch_size` sequences: the existing one when the batch size matches (no decode
        step reads a position its sequence has not written, so stale entries are harmless), else a new one
        (graphs and static buffers of the old one are dropped first, and so is the old cache)."""
        if self.cache is not None and self.cache.B == int(batch_size):
            return self.cache
        self._drop_state()
        self.cache = RoleKVCache(self.model, batch_size, self.max_len, memory_limit_bytes=self.memory_limit_bytes,
                                 indexer_dtype=self.indexer_dtype)
        return self.cache

    def reset(self) -> None:
        """Drop the cache, the static buffers, the CUDA graphs and the fused QKV weights (rebuilt from the
        model's current weights when next needed)."""
        self._drop_state()
        self._fused_w = None

    def _drop_state(self) -> None:
        if self._graphs is not None:
            self._graphs.clear()
        self._graphs = None
        self._st = None
        self.cache = None
        self.lens = []

    def _qkv(self, attn, h, positions, cos_sin=None):
        """cos_sin: rope_cos_sin(positions, ...) when the caller shares it between layers."""
        B, T, _ = h.shape
        q = attn.wq(h).view(B, T, attn.n_heads, attn.head_dim)
        k = attn.wk(h).view(B, T, attn.n_kv_heads, attn.head_dim)
        v = attn.wv(h).view(B, T, attn.n_kv_heads, attn.head_dim)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q_pre, k_pre, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = cos_sin if cos_sin is not None else self._rope(positions, h.dtype)
        return apply_rope(q_pre, cos, sin), apply_rope(k_pre, cos, sin), v, q_pre, k_pre

    def _rope(self, positions, dtype):
        return rope_cos_sin(positions, self.model.rope_inv_freq, self.model.rope_mscale, dtype)

    def _ffn(self, layer, x):
        h = layer.ffn_norm(x)
        if layer.moe_enabled:
            out, _ = layer.moe(h)
            return x + out
        return x + layer.feed_forward(h)

    # ---- prefill ------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, lens: Sequence[int], *, all_logits: bool = False,
                mode: str = "auto") -> torch.Tensor:
        """tokens [B, T] left-aligned prompts (entries past lens[b] are padding). Fills the cache (new_cache).
        Returns the logits of each sequence's last prompt token [B, V], or all positions [B, T, V].

        mode: "chunked" = exact masked attention chunk by chunk (chunk_size tokens; activations bounded by the
        chunk); "one_shot" = every layer over the whole prompt with the fast kernels (models/inference/
        prefill.py; projections / FFN in chunks of proj_chunk / ffn_chunk tokens; activations grow with the
        prompt; raises PrefillMemoryError on CUDA when its estimate exceeds the free memory); "auto" = one_shot
        iff the model is on CUDA, the batch is one sequence or prompts of equal length, the prompt is longer
        than chunk_size and the one-shot estimate fits in the free memory after the cache, else chunked (a
        fallback for memory is logged as a warning; PrefillMemoryError when not even the chunked path fits). Both write the same cache and give
        the same logits up to the kernels' rounding. One INFO line per call says which mode ran and why
        (also in self.last_prefill_mode / self.prefill_status)."""
        if mode not in pf.MODES:
            raise ValueError(f"prefill mode must be one of {pf.MODES}, got {mode!r}")
        B = tokens.shape[0]
        lens = [int(n) for n in lens]
        if len(lens) != B:
            raise ValueError(f"prefill got {len(lens)} lengths for a batch of {B}")
        if min(lens) < 1:
            raise ValueError("every prompt needs at least one token")
        if max(lens) > self.max_len:
            raise ValueError(f"prompt of {max(lens)} tokens is longer than max_len={self.max_len}")
        T = max(lens)
        tokens = tokens[:, :T]
        self.new_cache(B)
        free = pf.free_device_bytes(self.device) if mode != "chunked" else None
        need1 = pf.one_shot_activation_bytes(self, B, T, all_logits=all_logits) if mode != "chunked" else 0
        needc = pf.chunked_activation_bytes(self, B, T, all_logits=all_logits) if mode == "auto" else 0
        run, why = pf.choose_mode(mode, B=B, lens=lens, device_type=self.device.type, need_one_shot=need1,
                                  need_chunked=needc, free=free, chunk_size=self.chunk_size)
        self.last_prefill_mode, self.prefill_status = run, why
        if mode == "auto" and run == "chunked" and free is not None and need1 > free:  # a fallback for memory
            log.warning("prefill: chunked (%s)", why)
        else:
            log.info("prefill: %s (%s)", run, why)
        if run == "one_shot":
            return pf.one_shot_prefill(self, tokens, lens, all_logits=all_logits, proj_chunk=self.proj_chunk,
                                       ffn_chunk=self.ffn_chunk)
        return self._prefill_chunked(tokens, lens, all_logits)

    def _prefill_chunked(self, tokens: torch.Tensor, lens: list[int], all_logits: bool) -> torch.Tensor:
        """The exact chunked prefill (tokens already cut to T = max(lens), cache allocated)."""
        B, T = tokens.shape
        cache = self.new_cache(B)
        dev = tokens.device
        lens_t = torch.tensor(lens, device=dev)
        last_h = None
        outs = []
        for c0 in range(0, T, self.chunk_size):
            c1 = min(c0 + self.chunk_size, T)
            pos = torch.arange(c0, c1, device=dev)
            x = self.model.tok_embeddings(tokens[:, c0:c1])
            for li, layer in enumerate(self.layers):
                h = layer.attention_norm(x)
                a = self._prefill_attention(li, layer.attention, h, pos, lens)
                x = self._ffn(layer, x + layer.attention.wo(a.transpose(1, 2).reshape(B, c1 - c0, -1)))
            x = self.model.norm(x)
            if all_logits:
                outs.append(self.model.output(x))
            else:
                inside = (lens_t - 1 >= c0) & (lens_t - 1 < c1)
                idx = (lens_t - 1 - c0).clamp(0, c1 - c0 - 1)
                hl = x[torch.arange(B, device=dev), idx]
                last_h = hl if last_h is None else torch.where(inside[:, None], hl, last_h)
        self.lens = list(lens)
        return torch.cat(outs, dim=1) if all_logits else self.model.output(last_h)

    def _prefill_attention(self, li: int, attn, h, pos, lens):
        cache, p = self.cache, self.cache.plans[li]
        B, C = h.shape[0], h.shape[1]
        c0, c1 = int(pos[0]), int(pos[-1]) + 1
        q, k, v, q_pre, k_pre = self._qkv(attn, h, pos.expand(B, C))
        if not p.rtpurbo:
            cache.k[li][:, :, c0:c1] = k
            cache.v[li][:, :, c0:c1] = v
            kpos = torch.arange(c1, device=h.device)
            mask = _attn_mask(pos, kpos, torch.ones_like(kpos, dtype=torch.bool), False, 0, 0)
            return F.scaled_dot_product_attention(q, cache.k[li][:, :, :c1], cache.v[li][:, :, :c1],
                                                  attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
        out = torch.empty_like(q)
        if p.full_kv:
            cache.k[li][:, :, c0:c1] = k[:, p.full_kv]
            cache.v[li][:, :, c0:c1] = v[:, p.full_kv]
        if p.retrieval:
            _, ki = attn.inner_attention.indexer(q_pre, k_pre, positions=pos)
            cache.store_indexer_keys(li, (slice(None), slice(None), slice(c0, c1)), ki)
        heads_f = p.retrieval + p.local_full
        if heads_f:
            kidx = p.full_index(heads_f)
            kpos = torch.arange(c1, device=h.device)
            ok = torch.ones_like(kpos, dtype=torch.bool)
            dense_m = _attn_mask(pos, kpos, ok, False, 0, 0)
            local_m = _attn_mask(pos, kpos, ok, True, p.window, p.sinks)
            mask = torch.stack([dense_m] * len(p.retrieval) + [local_m] * len(p.local_full))[None]
            out[:, heads_f] = F.scaled_dot_product_attention(
                q[:, heads_f], cache.k[li][:, kidx, :c1], cache.v[li][:, kidx, :c1], attn_mask=mask)
        if p.local_ring:
            S, W = cache.sink_k[li].shape[2], cache.ring_k[li].shape[2]
            dev = h.device
            spos = torch.arange(S, device=dev)
            svalid = spos < min(p.sinks, c0)
            rpos = c0 - W + torch.arange(W, device=dev)
            rvalid = (rpos >= 0) & (rpos >= p.sinks)
            slots = torch.remainder(rpos, W)
            kpos = torch.cat([spos, rpos, pos])
            kvalid = torch.cat([svalid, rvalid, torch.ones_like(pos, dtype=torch.bool)])
            mask = _attn_mask(pos, kpos, kvalid, True, p.window, p.sinks)
            ridx = p.ring_index(p.local_ring)
            kk = torch.cat([cache.sink_k[li], cache.ring_k[li][:, :, slots], k[:, p.ring_kv]], dim=2)
            vv = torch.cat([cache.sink_v[li], cache.ring_v[li][:, :, slots], v[:, p.ring_kv]], dim=2)
            # masked keys may hold uninitialised garbage: zero them so nothing non-finite leaks
            kk = torch.where(kvalid[None, None, :, None], kk, 0)
            vv = torch.where(kvalid[None, None, :, None], vv, 0)
            out[:, p.local_ring] = F.scaled_dot_product_attention(
                q[:, p.local_ring], kk[:, ridx], vv[:, ridx], attn_mask=mask)
            # write the chunk's tokens that belong to each sequence's prompt (padding never evicts)
            kr, vr = k[:, p.ring_kv], v[:, p.ring_kv]
            for b in range(B):
                end = min(c1, lens[b])
                if end <= c0:
                    continue
                s_end = min(end, p.sinks)
                if s_end > c0:
                    cache.sink_k[li][b, :, c0:s_end] = kr[b, :, : s_end - c0]
                    cache.sink_v[li][b, :, c0:s_end] = vr[b, :, : s_end - c0]
                lo = max(c0, end - W)
                sl = torch.remainder(torch.arange(lo, end, device=dev), W)
                cache.ring_k[li][b, :, sl] = kr[b, :, lo - c0: end - c0]
                cache.ring_v[li][b, :, sl] = vr[b, :, lo - c0: end - c0]
        return out

    # ---- decode -------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] at positions self.lens (one per sequence) -> logits [B, V]; advances the cache.
        Runs the CUDA graph of the static step, the static step eagerly, or the eager step (decode_path)."""
        if self.static_decode:
            return self._decode_step_static(tokens)
        return self._decode_step_eager(tokens)

    @torch.no_grad()
    def _decode_step_eager(self, tokens: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        dev = tokens.device
        pos = torch.tensor(self.lens, device=dev)
        if max(self.lens) >= self.max_len:
            raise ValueError(f"KV cache full (max_len={self.max_len})")
        lens1 = (pos + 1).to(torch.int32)
        bs = 64
        L_used = min(self.max_len, -(-(max(self.lens) + 1) // bs) * bs)
        x = self.model.tok_embeddings(tokens[:, None])
        for li, layer in enumerate(self.layers):
            h = layer.attention_norm(x)
            a = self._decode_attention(li, layer.attention, h, pos, lens1, L_used)
            x = self._ffn(layer, x + layer.attention.wo(a.reshape(B, 1, -1)))
        self.lens = [n + 1 for n in self.lens]
        return self.model.output(self.model.norm(x))[:, 0]

    def _decode_attention(self, li, attn, h, pos, lens1, L):
        cache, p = self.cache, self.cache.plans[li]
        B = h.shape[0]
        ar = torch.arange(B, device=h.device)
        q, k, v, q_pre, k_pre = self._qkv(attn, h, pos[:, None])
        q1 = q[:, :, 0]
        if not p.rtpurbo:
            cache.k[li][ar, :, pos] = k[:, :, 0]
            cache.v[li][ar, :, pos] = v[:, :, 0]
            return sd.dense_decode_reference(q1, cache.k[li][:, :, :L], cache.v[li][:, :, :L], lens1)
        out = torch.empty_like(q1)
        if p.full_kv:
            cache.k[li][ar, :, pos] = k[:, p.full_kv, 0]
            cache.v[li][ar, :, pos] = v[:, p.full_kv, 0]
        K = cache.k[li][:, :, :L] if p.full_kv else None
        V = cache.v[li][:, :, :L] if p.full_kv else None
        if p.retrieval:
            qi, ki = attn.inner_attention.indexer(q_pre, k_pre, positions=pos[:, None])
            cache.store_indexer_keys(li, (ar, slice(None), pos), ki[:, :, 0])
            mask = sd.select_decode_blocks(qi[:, :, 0], cache.ki[li][:, :, :L], lens1, top_p=p.top_p,
                                           block_size=p.block_size, window=p.window, sinks=p.sinks, impl=self.impl)
            out[:, p.retrieval] = sd.retrieval_decode(
                q1[:, p.retrieval], K, V, p.full_index(p.retrieval), mask, lens1, window=p.window, sinks=p.sinks,
                block_size=p.block_size, impl=self.impl)
            kept = sd.kept_tokens_per_head(mask, lens1, window=p.window, sinks=p.sinks, block_size=p.block_size)
            self._density_sum += float((kept.float() / lens1[:, None].float()).mean())
            self._density_n += 1
        if p.local_full:
            nb = -(-L // p.block_size)
            empty = torch.zeros(B, len(p.local_full), nb, dtype=torch.bool, device=h.device)
            out[:, p.local_full] = sd.retrieval_decode(
                q1[:, p.local_full], K, V, p.full_index(p.local_full), empty, lens1, window=p.window,
                sinks=p.sinks, block_size=p.block_size, impl=self.impl)
        if p.local_ring:
            _write_ring_and_sinks(cache, li, p.sinks, k[:, p.ring_kv, 0], v[:, p.ring_kv, 0], pos, ar)
            out[:, p.local_ring] = sd.local_decode(
                q1[:, p.local_ring], cache.sink_k[li], cache.sink_v[li], cache.ring_k[li], cache.ring_v[li], lens1,
                window=p.window, sinks=p.sinks, kv_head_of_l=p.ring_index(p.local_ring), impl=self.impl)
        return out

    # ---- graph-safe decode (static buffers; what a CUDA graph captures) ------------------------------
    def _static_state(self) -> _StaticState:
        cache = self.cache
        if self._st is not None and self._st.B == cache.B:
            return self._st
        dev = self.device
        B = cache.B
        layers = []
        for p, layer in zip(cache.plans, self.layers):
            Hkv = p.n_kv_heads
            slots = dict(
                full_slot=(torch.tensor([p.full_kv.index(h) if h in p.full_kv else -1 for h in range(Hkv)],
                                        dtype=torch.int32, device=dev) if p.full_kv else None),
                ring_slot=(torch.tensor([p.ring_kv.index(h) if h in p.ring_kv else -1 for h in range(Hkv)],
                                        dtype=torch.int32, device=dev) if p.ring_kv else None))
            if not p.rtpurbo:
                layers.append(_StaticLayer(**slots))
                continue
            H = p.n_heads
            sub = sorted(p.retrieval + p.local_ring)
            retr = set(p.retrieval)
            ixm = layer.attention.inner_attention.indexer if p.retrieval else None
            layers.append(_StaticLayer(
                full_kv=_index_or_none(p.full_kv, Hkv, dev) if p.full_kv else None,
                ring_kv=_index_or_none(p.ring_kv, Hkv, dev) if p.ring_kv else None,
                sub=_index_or_none(sub, H, dev) if sub else None, sub_roles=[h in retr for h in sub],
                local_full=_index_or_none(p.local_full, H, dev) if p.local_full else None,
                ix_heads=_index_or_none(ixm.head_list, H, dev) if ixm is not None else None,
                ix_kv=_index_or_none(ixm.kv_head_list, Hkv, dev) if ixm is not None else None, **slots))
        dt = self.model.tok_embeddings.weight.dtype
        self._st = _StaticState(
            B=B, tok=torch.zeros(B, dtype=torch.long, device=dev), pos=torch.zeros(B, dtype=torch.long, device=dev),
            ar=torch.arange(B, device=dev), dens=torch.zeros((), dtype=torch.float32, device=dev), layers=layers,
            ffn_ids=torch.zeros(B, 1, dtype=torch.int32, device=dev), ffn_w=torch.ones(B, 1, dtype=dt, device=dev))
        self._graphs = (DecodeGraphs(self._decode_core, dev, restore=[self._st.dens])
                        if self.cuda_graph else None)
        return self._st

    def view_length(self, n_tokens: int) -> int:
        """Cache-view length (bucket) of a static step whose longest sequence holds n_tokens tokens."""
        return bucket_length(n_tokens, min_bucket=self.graph_min_bucket, max_len=self.max_len)

    @torch.no_grad()
    def _decode_step_static(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("decode_step before prefill: there is no cache")
        B = tokens.shape[0]
        if B != self.cache.B:
            raise ValueError(f"decode_step got {B} tokens for a cache of batch {self.cache.B}")
        if max(self.lens) >= self.max_len:
            raise ValueError(f"KV cache full (max_len={self.max_len})")
        Lv = self.view_length(max(self.lens) + 1)
        st = self._static_state()
        st.tok.copy_(tokens.reshape(B))
        st.pos.copy_(torch.tensor(self.lens, dtype=torch.long))
        logits = None
        if self._graphs is not None:
            try:
                logits = self._graphs.run(Lv).clone()
            except GraphCaptureError as e:
                if self.cuda_graph_requested:
                    raise
                log.warning("CUDA graphs off from now on: %s. Decoding continues with the same graph-safe step "
                            "run eagerly.", e)
                self.graph_status = f"off: capture failed ({e})"
                self._graphs = None
                self.cuda_graph = False
        if logits is None:
            logits = self._decode_core(Lv)
        if self.track_density:
            self._density_n += sum(1 for p in self.cache.plans if p.retrieval)
        self.lens = [n + 1 for n in self.lens]
        return logits

    @property
    def last_graph(self):
        """The CUDA graph replayed by the last decode step (None without graphs); benchmarks replay it."""
        return self._graphs.last if self._graphs is not None else None

    def _decode_core(self, Lv: int) -> torch.Tensor:
        """One decode step from the static buffers (tokens st.tok at positions st.pos) over cache views of
        length Lv -> logits [B, V]. No host syncs, no shape that depends on tensor values: CUDA-graph safe.
        self.fused: the fused Triton kernels for everything but the attention (_decode_core_fused)."""
        st = self._st
        B = st.B
        pos = st.pos
        lens1 = (pos + 1).to(torch.int32)
        x = self.model.tok_embeddings(st.tok[:, None])
        cs = self._rope(pos[:, None], x.dtype)  # the same for every layer: computed once per step
        if self.fused:
            return self._decode_core_fused(Lv, x.view(B, -1), cs, lens1)
        for li, layer in enumerate(self.layers):
            h = layer.attention_norm(x)
            a = self._decode_attention_static(li, layer.attention, h, pos, lens1, Lv, cs)
            x = x + layer.attention.wo(a.reshape(B, 1, -1))
            hf = layer.ffn_norm(x)
            if layer.moe_enabled:
                x = x + _moe_static(layer.moe, hf.reshape(B, -1)).view_as(x)
            else:
                x = x + layer.feed_forward(hf)
        return self.model.output(self.model.norm(x))[:, 0]

    def _decode_core_fused(self, Lv: int, x: torch.Tensor, cs, lens1) -> torch.Tensor:
        """_decode_core's layers through the fused kernels; x [B, dim] embeddings. Per layer: norm + QKV
        projection (1 launch), QK-norm + RoPE + every KV-cache write (1), attention (as the unfused step),
        wo + residual (1), then MoE: norm + router logits (1), softmax top-k (1), experts (2); or a dense FFN
        as a 1-expert MoE (2)."""
        from kernels import fused_decode as fd
        from kernels import moe_decode as md

        st, cache = self._st, self.cache
        B = st.B
        pos = st.pos
        fw = self._fused_weights()
        cos, sin = cs[0][:, 0], cs[1][:, 0]  # [B, head_dim]
        for li, layer in enumerate(self.layers):
            attn, p, ix = layer.attention, cache.plans[li], st.layers[li]
            an = layer.attention_norm
            qkv = fd.norm_linear(x, fw[li].wqkv, norm_weight=an.weight, eps=an.eps, bias=fw[li].bqkv)
            ring = dict(ring_k=cache.ring_k[li], ring_v=cache.ring_v[li], sink_k=cache.sink_k[li],
                        sink_v=cache.sink_v[li], ring_slot=ix.ring_slot, sinks=p.sinks) if p.ring_kv else {}
            full = dict(k_cache=cache.k[li], v_cache=cache.v[li], full_slot=ix.full_slot) if p.full_kv else {}
            qn = attn.q_norm
            q1, _, _, q_pre, k_pre = fd.qk_norm_rope(
                qkv, n_heads=attn.n_heads, n_kv_heads=attn.n_kv_heads, head_dim=attn.head_dim,
                q_norm_weight=qn.weight if qn is not None else None,
                k_norm_weight=attn.k_norm.weight if qn is not None else None, eps=qn.eps if qn is not None else 0.0,
                cos=cos, sin=sin, pos=pos, want_pre=bool(p.retrieval), **full, **ring)
            if q_pre is not None:
                q_pre, k_pre = q_pre[:, :, None], k_pre[:, :, None]  # [B, H, 1, D] as in the unfused step
            a = self._attend_static(li, attn, q1, q_pre, k_pre, pos, lens1, Lv)
            x = fd.norm_linear(a.reshape(B, -1), attn.wo.weight, bias=attn.wo.bias, residual=x)
            fn = layer.ffn_norm
            if layer.moe_enabled:
                moe = layer.moe
                logits = fd.norm_linear(x, moe.router.gate.weight, norm_weight=fn.weight, eps=fn.eps,
                                        bias=moe.router.gate.bias)
                w, ids = fd.router_topk(logits, moe.top_k, moe.router.norm_topk_prob)
                ex = moe.experts
                x = md.moe_decode(x, ids, w, ex.w1, ex.w3, ex.w2, norm_weight=fn.weight, eps=fn.eps, residual=x)
            else:
                ff = layer.feed_forward
                x = md.moe_decode(x, st.ffn_ids, st.ffn_w, ff.w1.weight[None], ff.w3.weight[None],
                                  ff.w2.weight[None], norm_weight=fn.weight, eps=fn.eps, residual=x)
        nm = self.model.norm
        return fd.norm_linear(x, self.model.output.weight, norm_weight=nm.weight, eps=nm.eps,
                              bias=self.model.output.bias)

    def _decode_attention_static(self, li, attn, h, pos, lens1, Lv, cos_sin):
        """Unfused static step: projections, QK-norm, RoPE and the KV-cache writes with the model's modules
        and torch indexing, then _attend_static."""
        cache, p, st = self.cache, self.cache.plans[li], self._st
        ix = st.layers[li]
        ar = st.ar
        q, k, v, q_pre, k_pre = self._qkv(attn, h, pos[:, None], cos_sin)
        q1, k1, v1 = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        if not p.rtpurbo:
            cache.k[li][ar, :, pos] = k1
            cache.v[li][ar, :, pos] = v1
            return self._attend_static(li, attn, q1, q_pre, k_pre, pos, lens1, Lv)
        if p.full_kv:
            cache.k[li][ar, :, pos] = _take(k1, 1, ix.full_kv)
            cache.v[li][ar, :, pos] = _take(v1, 1, ix.full_kv)
        if p.local_ring:
            _write_ring_and_sinks(cache, li, p.sinks, _take(k1, 1, ix.ring_kv), _take(v1, 1, ix.ring_kv), pos, ar)
        return self._attend_static(li, attn, q1, q_pre, k_pre, pos, lens1, Lv)

    def _attend_static(self, li, attn, q1, q_pre, k_pre, pos, lens1, Lv):
        """Decode attention of layer li for q1 [B, Hq, D] (post-RoPE), the new token's K/V already in the
        cache: the indexer (queries from q_pre, keys from k_pre [B, H, 1, D], written to the cache) and the
        dense / RTPurbo kernels over cache views of length Lv. With self.skip_attention (benchmarks: the
        step's cost without its attention) all of this is skipped and q1 is returned as the output."""
        if self.skip_attention:
            return q1
        cache, p, st = self.cache, self.cache.plans[li], self._st
        ix = st.layers[li]
        ar = st.ar
        if not p.rtpurbo:
            return sd.dense_decode(q1, cache.k[li][:, :, :Lv], cache.v[li][:, :, :Lv], lens1, impl=self.impl)
        K = V = None
        if p.full_kv:
            K, V = cache.k[li][:, :, :Lv], cache.v[li][:, :, :Lv]
        qi1 = ki_view = None
        if p.retrieval:
            ixm = attn.inner_attention.indexer
            qh = _take(q_pre, 1, ix.ix_heads).to(ixm.wq.dtype)
            kh = _take(k_pre, 1, ix.ix_kv).to(ixm.wk.dtype)
            qi = torch.einsum("bhtd,hrd->bhtr", qh, ixm.wq)  # = LayerIndexer.forward, without list indexing
            ki = torch.einsum("bhtd,hrd->bhtr", kh, ixm.wk)
            if ixm.rope_periods is not None:  # the rotary indexer: both at the new token's position
                qi, ki = ixm.rotate(qi, pos[:, None]), ixm.rotate(ki, pos[:, None])
            cache.store_indexer_keys(li, (ar, slice(None), pos), ki[:, :, 0])  # (fp8: saturating cast)
            qi1, ki_view = qi[:, :, 0], cache.ki[li][:, :, :Lv]
            if self.record_indexer_queries is not None:  # benchmarks (eager steps only, never in a graph)
                self.record_indexer_queries[li] = qi1.detach().clone()
        out = None
        if p.retrieval or p.local_ring:
            dec = sd.rtpurbo_decode(
                _take(q1, 1, ix.sub), lens1, is_retrieval=ix.sub_roles, top_p=p.top_p, block_size=p.block_size,
                window=p.window, sinks=p.sinks, sink_k=cache.sink_k[li], sink_v=cache.sink_v[li],
                ring_k=cache.ring_k[li], ring_v=cache.ring_v[li],
                kv_head_of_l=p.ring_index(p.local_ring) if p.local_ring else None, k_cache=K, v_cache=V,
                kv_head_of_r=p.full_index(p.retrieval) if p.retrieval else None, qi=qi1, ki_cache=ki_view,
                impl=self.impl)
            if ix.sub is None:
                out = dec.out
            else:
                out = torch.empty_like(q1).index_copy_(1, ix.sub, dec.out)
            if self.track_density and dec.block_mask is not None:
                kept = sd.kept_tokens_per_head(dec.block_mask, lens1, window=p.window, sinks=p.sinks,
                                               block_size=p.block_size)
                st.dens.add_((kept.float() / lens1[:, None].float()).mean())
        if p.local_full:
            nb = -(-Lv // p.block_size)
            empty = torch.zeros(q1.shape[0], len(p.local_full), nb, dtype=torch.bool, device=q1.device)
            o = sd.retrieval_decode(
                _take(q1, 1, ix.local_full), K, V, p.full_index(p.local_full), empty, lens1, window=p.window,
                sinks=p.sinks, block_size=p.block_size, impl=self.impl)
            if ix.local_full is None:
                out = o
            else:
                out = (torch.empty_like(q1) if out is None else out).index_copy_(1, ix.local_full, o)
        return out

    def _reset_density(self) -> None:
        self._density_sum, self._density_n = 0.0, 0
        if self._st is not None:
            self._st.dens.zero_()

    def mean_density(self) -> float | None:
        """Mean kept density of the retrieval heads over the decode steps since the last generate() start."""
        if not self._density_n:
            return None
        total = self._density_sum + (float(self._st.dens) if self._st is not None else 0.0)
        return total / self._density_n

    # ---- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (), seed: int | None = None,
                 on_tokens: Callable[[list[int | None]], None] | None = None,
                 prefill_mode: str | None = None) -> GenerationResult:
        """Generate for a batch of prompts (token lists of any lengths). Each sequence stops at a stop token
        (kept in its output), after max_new_tokens, or when the cache (max_len) is full.
        on_tokens(list) is called after every step with the new token of each sequence (None: finished).
        prefill_mode: prefill()'s mode (default: the engine's prefill_mode, "auto" unless set)."""
        dev = self.model.tok_embeddings.weight.device
        prefill_mode = self.prefill_mode if prefill_mode is None else prefill_mode
        lens = [len(pr) for pr in prompts]
        B = len(prompts)
        tok = torch.zeros(B, max(lens), dtype=torch.long, device=dev)
        for b, pr in enumerate(prompts):
            tok[b, : len(pr)] = torch.tensor(list(pr), dtype=torch.long)
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        stops = set(int(t) for t in stop_tokens)
        self._reset_density()
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        logits = self.prefill(tok, lens, mode=prefill_mode)
        capture0 = self._graphs.capture_s if self._graphs is not None else 0.0  # (after prefill: a new cache
        # drops the old graphs; a reused one keeps them and their capture time)
        out: list[list[int]] = [[] for _ in range(B)]
        finished = [False] * B
        live = [True] * B
        self._reset_density()  # the static buffers may be new (a new cache)
        res = GenerationResult(out, lens, finished, memory=self.cache.memory_report(), decode_path=self.decode_path,
                               prefill_mode=self.last_prefill_mode, prefill_status=self.prefill_status,
                               indexer_cache_dtype=self.indexer_cache_dtype)
        steps = 0
        while max_new_tokens > 0:
            nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
            vals = nxt.tolist()
            if steps == 0:
                sync()
                res.ttft_s = time.perf_counter() - t0
                t1 = time.perf_counter()
            emitted: list[int | None] = []
            for b in range(B):
                if not live[b]:
                    emitted.append(None)
                    continue
                out[b].append(vals[b])
                emitted.append(vals[b])
                if vals[b] in stops:
                    finished[b] = True
                    live[b] = False
                elif len(out[b]) >= max_new_tokens or self.lens[b] >= self.max_len:
                    live[b] = False
            if on_tokens is not None:
                on_tokens(emitted)
            if not any(live):
                break
            # finished sequences keep stepping on their last token (their cache position is clamped)
            feed = torch.tensor([vals[b] if live[b] else 0 for b in range(B)], device=dev)
            self.lens = [n if live[b] else min(n, self.max_len - 1) for b, n in enumerate(self.lens)]
            n_live = sum(live)
            logits = self.decode_step(feed)
            steps += 1
            res.decode_tokens += n_live
        sync()
        if steps:
            res.decode_s = time.perf_counter() - t1
        res.decode_steps = steps
        res.mean_density = self.mean_density()
        res.graph_status = self.graph_status
        res.decode_layers = self.fused_status
        if self._graphs is not None:
            res.graph_capture_s = self._graphs.capture_s - capture0
        return res
