import os

import pytest

# Keep XLA:CPU from grabbing both cores per process for thread pools it does not need in tests.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_gguf() -> str:
    from novallm_jax.loading import default_model_path

    return default_model_path()
