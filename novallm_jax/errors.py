"""Every exception NovaLLM-JAX raises on purpose; messages say what was wrong and what to do."""


class NovaLLMError(Exception):
    """Base class of all NovaLLM-JAX errors."""


class ModelLoadError(NovaLLMError):
    """A model path, file or checkpoint could not be loaded as asked."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint names an architecture no model family here implements."""


class TensorError(ModelLoadError):
    """A tensor is missing, unexpected, or of the wrong shape."""


class TokenizerError(NovaLLMError):
    """A tokenizer could not be built or used."""


class InvalidRequestError(NovaLLMError, ValueError):
    """A request (prompt, sampling parameters, messages) is invalid.

    `param` names the offending field when there is one.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class OutOfPagesError(NovaLLMError):
    """The memory pool has no free page for the request; the scheduler may preempt and retry."""


class PoolError(NovaLLMError):
    """Misuse of the memory pool: a double free, or freeing what the caller does not own."""


class EngineClosedError(NovaLLMError):
    """The engine was closed while the request was pending."""


class EngineUnavailableError(NovaLLMError):
    """The engine cannot serve any more: a process of its cluster is gone (see `novallm_jax.distributed`).

    The requests it was running fail with an error that starts with `PREFIX`."""

    PREFIX = "the engine is unavailable"
