"""Inference: role-aware KV cache, a chunked-prefill / sparse-decode engine, CUDA graphs of the decode step."""

from models.inference.cuda_graph import DecodeGraphs, GraphCaptureError, bucket_length
from models.inference.engine import GenerationResult, InferenceEngine, sample_next
from models.inference.kv_cache import KVCacheMemoryError, RoleKVCache, plan_layers

__all__ = ["DecodeGraphs", "GenerationResult", "GraphCaptureError", "InferenceEngine", "KVCacheMemoryError",
           "RoleKVCache", "bucket_length", "plan_layers", "sample_next"]
