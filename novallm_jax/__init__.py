"""NovaLLM-JAX: a functional LLM inference stack on JAX/XLA."""

__version__ = "0.1.0"
