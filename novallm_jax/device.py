"""Device abstraction: which platform we run on, which devices to use, and the dtype that is fast there."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from novallm_jax.errors import NovaLLMError

# XLA:CPU converts bfloat16 weights to float32 on every matmul (10-20x slower), so CPUs compute in float32.
_DEFAULT_DTYPE = {
    "cpu": jnp.float32,
    "gpu": jnp.bfloat16,
    "cuda": jnp.bfloat16,
    "rocm": jnp.bfloat16,
    "tpu": jnp.bfloat16,
}
_DTYPES = {
    "float32": jnp.float32,
    "f32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "f16": jnp.float16,
}


def platform() -> str:
    """The default backend's platform: "cpu", "gpu" or "tpu"."""
    return jax.default_backend()


def devices(platform_name: str | None = None) -> list[jax.Device]:
    """The devices of a platform (default: the default backend's), with a clear error if there are none."""
    try:
        return jax.devices(platform_name)
    except RuntimeError as e:
        raise NovaLLMError(f"no {platform_name} devices available: {e}") from None


def default_dtype(platform_name: str | None = None):
    """float32 on CPU, bfloat16 on accelerators."""
    return _DEFAULT_DTYPE.get(platform_name or platform(), jnp.float32)


def resolve_dtype(name):
    """A dtype from its name ("float32", "bf16", …); None or "auto" picks the platform default; a dtype passes."""
    if name is not None and not isinstance(name, str):
        return name
    if name in (None, "", "auto"):
        return default_dtype()
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise NovaLLMError(f"unknown dtype {name!r}; choose one of: auto, {', '.join(sorted(set(_DTYPES)))}") from None
