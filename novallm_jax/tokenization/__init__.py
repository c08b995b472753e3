"""Tokenizers (sentencepiece, HF tokenizer.json, GGUF), chat templates; `novallm_jax.tokenizer` is the entry point."""
