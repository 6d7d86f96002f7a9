"""Inference: role-aware KV cache and a chunked-prefill / sparse-decode engine."""

from models.inference.engine import GenerationResult, InferenceEngine, sample_next
from models.inference.kv_cache import KVCacheMemoryError, RoleKVCache, plan_layers

__all__ = ["GenerationResult", "InferenceEngine", "KVCacheMemoryError", "RoleKVCache", "plan_layers", "sample_next"]
