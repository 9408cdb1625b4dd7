"""Checkpoints: resolving, loading (safetensors, GGUF), adapters, tokenizer, the embedded model."""
