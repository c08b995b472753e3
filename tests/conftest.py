import os

import pytest

# Keep XLA:CPU from grabbing both cores per process for thread pools it does not need in tests.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_gguf() -> str:
    from novallm_jax.loading import default_model_path

    return default_model_path()


def pytest_configure(config):
    # One persistent compilation cache for the session (in a new directory, so a run is as cold as CI's): the many
    # engines that tests build over the same tiny models compile each identical step program once, not per engine.
    import tempfile

    from novallm_jax.engine.executor import enable_compilation_cache

    enable_compilation_cache(tempfile.mkdtemp(prefix="novallm-test-xla-"))
