"""Where a start's time goes: each phase's seconds, logged at debug level, and JAX's compile and cache events.

`phase(name)` times a block (`recent_phases()` returns the last ones); `CompileStats` counts what XLA compiled and
what it loaded from the persistent compilation cache, from `jax.monitoring`'s events. `benchmarks/bench_startup.py`
reads both.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Iterator

from absl import logging

_phases: collections.deque[tuple[str, float]] = collections.deque(maxlen=256)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Times the block as start-up phase `name`."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - t0
        _phases.append((name, seconds))
        logging.debug("startup phase %s: %.3f s", name, seconds)


def recent_phases() -> list[tuple[str, float]]:
    """(name, seconds) of the phases timed in this process, oldest first (the last 256)."""
    return list(_phases)


_HITS, _MISSES = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
_COMPILE = "/jax/core/compile/backend_compile_duration"
_RETRIEVE = "/jax/compilation_cache/cache_retrieval_time_sec"
_TRACE = "/jax/core/compile/jaxpr_trace_duration"


class CompileStats:
    """Counts, from the moment it is made, XLA compiles and persistent-cache loads in this process.

    `cache_misses` are programs compiled because the persistent cache lacked them (or it is off: then `compiles`
    counts them); `cache_hits` were loaded from it. Durations are summed per kind. Call `close()` to stop counting.
    """

    def __init__(self):
        import jax.monitoring

        self._lock = threading.Lock()
        self.cache_hits = self.cache_misses = self.compiles = 0
        self.compile_s = self.cache_load_s = self.trace_s = 0.0
        self._on_event = self._event
        self._on_duration = self._duration
        jax.monitoring.register_event_listener(self._on_event)
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)

    def _event(self, event: str, **kwargs) -> None:
        with self._lock:
            if event == _HITS:
                self.cache_hits += 1
            elif event == _MISSES:
                self.cache_misses += 1

    def _duration(self, event: str, seconds: float, **kwargs) -> None:
        with self._lock:
            if event == _COMPILE:
                self.compiles += 1
                self.compile_s += seconds
            elif event == _RETRIEVE:
                self.cache_load_s += seconds
            elif event == _TRACE:
                self.trace_s += seconds

    def close(self) -> None:
        import jax.monitoring

        jax.monitoring.unregister_event_listener(self._on_event)
        jax.monitoring.unregister_event_duration_listener(self._on_duration)

    def as_dict(self) -> dict[str, float]:
        """The counts and seconds; `backend_compile_s` includes the loads from the cache (`cache_load_s`)."""
        with self._lock:
            return {
                "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses,
                "backend_compiles": self.compiles,
                "backend_compile_s": self.compile_s,
                "cache_load_s": self.cache_load_s,
                "trace_s": self.trace_s,
            }
