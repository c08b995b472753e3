"""NovaLLM-JAX: a functional LLM inference stack on JAX/XLA.

`LLM` and `SamplingParams` are the SDK; the pure functions live in `novallm_jax.model`, `novallm_jax.sampling` and
`novallm_jax.kv_cache`. Imports are lazy so that `import novallm_jax` stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "ModelConfig", "load_model"]


def __getattr__(name):
    if name == "LLM":
        from novallm_jax.llm import LLM

        return LLM
    if name == "SamplingParams":
        from novallm_jax.sampling_params import SamplingParams

        return SamplingParams
    if name == "ModelConfig":
        from novallm_jax.config import ModelConfig

        return ModelConfig
    if name == "load_model":
        from novallm_jax.loading import load_model

        return load_model
    raise AttributeError(f"module 'novallm_jax' has no attribute {name!r}")
