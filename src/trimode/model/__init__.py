"""The model: config, RoPE, layers, attention metadata and the KV cache."""
