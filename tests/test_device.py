import jax
import jax.numpy as jnp
import pytest

from novallm_jax import device
from novallm_jax.errors import NovaLLMError


def test_platform_and_default_dtype_follow_the_backend():
    assert device.platform() == jax.default_backend()
    assert device.devices() == jax.devices()
    assert device.default_dtype("cpu") == jnp.float32
    assert device.default_dtype("gpu") == jnp.bfloat16
    assert device.resolve_dtype("auto") == device.default_dtype()


@pytest.mark.parametrize("name, dtype", [("float32", jnp.float32), ("bf16", jnp.bfloat16), ("F16", jnp.float16)])
def test_resolve_dtype_names(name, dtype):
    assert device.resolve_dtype(name) == dtype
    assert device.resolve_dtype(dtype) is dtype  # a dtype passes through


def test_unknown_dtype_and_missing_platform_are_clear_errors():
    with pytest.raises(NovaLLMError, match=r"unknown dtype 'int3'; choose one of: auto, bf16, bfloat16"):
        device.resolve_dtype("int3")
    with pytest.raises(NovaLLMError, match=r"no tpu devices available"):
        device.devices("tpu")
