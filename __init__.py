"""kvjax: LLM inference in JAX with the KV cache as an explicit value."""

__version__ = "0.2.0"
