"""The model in plain torch: `Transformer` (weights, config, forward / prefill / decode over a static KV cache)
and weight-only quantisation of its linear layers (`quant`). Reaches the kernels only through fastsolar.ops."""
from fastsolar.model.transformer import CacheView, KVCache, Transformer, check_token_ids

__all__ = ["CacheView", "KVCache", "Transformer", "check_token_ids"]
