"""Shared helpers for the benchmark scripts: timing, machine info and load, memory bandwidth, JSON and tables.

Benchmarks run on shared machines, where a busy neighbour can slow a run several times over: every figure is the
best (and median) of several repeats, and the load average is recorded before and after.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np

GIB = 1 << 30


@dataclasses.dataclass
class Timing:
    """Seconds per repeat of a timed function: best, median and every sample."""

    best: float
    median: float
    samples: list[float]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def time_repeats(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
    """Times `fn()` `repeats` times after `warmup` untimed calls. `fn` must block until its work is done."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing(best=min(samples), median=statistics.median(samples), samples=samples)


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def cpu_times() -> dict[str, float] | None:
    """Cumulative CPU seconds of the whole machine by kind (Linux /proc/stat), to diff over a run."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    hz = os.sysconf("SC_CLK_TCK")
    return {n: int(v) / hz for n, v in zip(names, fields)}


def cpu_share(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """Fractions of machine CPU time between two `cpu_times()`: busy, idle, and stolen by the hypervisor."""
    if not before or not after:
        return None
    d = {k: after[k] - before[k] for k in before}
    total = sum(d.values()) or 1.0
    return {
        "busy": (total - d["idle"] - d["iowait"] - d["steal"]) / total,
        "idle": d["idle"] / total,
        "steal": d["steal"] / total,
    }


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(
    packages: Sequence[str] = ("jax", "jaxlib", "torch", "transformers", "numpy", "llama_cpp_python"),
) -> dict[str, Any]:
    """CPU, OS and package versions (None for packages that are not installed)."""
    return {
        "cpu_count": cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p.replace("_", "-")) for p in packages},
        "loadavg": loadavg(),
        "native_int8_dot": _int8_dot_isa(),
    }


def _int8_dot_isa() -> str | None:
    """Which int8-dot tiles the native kernels run here ("avx512-vnni", "avx2"; None: none)."""
    try:
        from novallm_jax.kernels import native
    except ImportError:
        return None
    return native.int8_dot_isa()


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Streaming-read bandwidth in GB/s (1e9 bytes/s), three ways, over an array of `gib` GiB of float32.

    - `jax_sum`: a jitted float32 reduction (reads each byte once);
    - `jax_matvec`: a jitted float32 matrix-vector product, the access pattern of a batch-1 decode step;
    - `numpy_copy`: `np.copyto` between two arrays, counted as read + write bytes.
    `roofline` is the highest: the best rate this machine is shown to reach.
    """
    import jax
    import jax.numpy as jnp

    n = max(1024, int(gib * GIB) // 4)
    cols = 4096
    rows = max(1, n // cols)
    n = rows * cols
    nbytes = n * 4
    out: dict[str, float] = {"array_bytes": float(nbytes)}

    x = jax.random.normal(jax.random.key(0), (rows, cols), jnp.float32)
    v = jnp.ones((1, rows), jnp.float32)  # [1, in] @ [in, out], as in decode
    jsum = jax.jit(jnp.sum)
    matvec = jax.jit(lambda v, w: v @ w)
    out["jax_sum"] = nbytes / time_repeats(lambda: jsum(x).block_until_ready(), repeats).best / 1e9
    out["jax_matvec"] = nbytes / time_repeats(lambda: matvec(v, x).block_until_ready(), repeats).best / 1e9
    x = v = None  # frees the arrays (a `del` of names the lambdas above close over reads as undefined)

    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    out["numpy_copy"] = 2 * nbytes / time_repeats(lambda: np.copyto(dst, src), repeats).best / 1e9
    src = dst = None
    out["roofline"] = max(out["jax_sum"], out["jax_matvec"], out["numpy_copy"])
    return out


class BandwidthProbe:
    """A quick streaming-read sample (~0.3 s) to take around each timed run: on a shared machine the bandwidth drifts
    (25-50 GB/s within minutes here), and a roofline sampled at another moment than the run can flatter its fraction
    past 100%. A sample is the faster of a jitted float32 sum over `gib` GiB and, where the native CPU kernels run,
    a batch-1 matvec of the packed-weight kernel over the same bytes (XLA's sum streamed ~10% slower than it at
    times). `samples` keeps every rate, in GB/s."""

    def __init__(self, gib: float = 1.0, repeats: int = 3):
        import jax
        import jax.numpy as jnp

        from novallm_jax.kernels import native

        k = 4096
        cols = max(native.PANEL, int(gib * GIB) // 4 // k // native.PANEL * native.PANEL)
        x = jax.random.normal(jax.random.key(1), (cols * k,), jnp.float32)
        self._reads = [(jax.jit(jnp.sum), (x,))]
        if jax.default_backend() == "cpu" and native.available():
            # Packed panels of a [4096, cols] weight: the same bytes again, read as a batch-1 decode step reads.
            panels = jnp.reshape(x, (cols // native.PANEL, k, native.PANEL))
            matvec = jax.jit(lambda v, w: native.packed_matmul(v, w, cols))
            self._reads.append((matvec, (jnp.ones((1, k), jnp.float32), panels)))
        self._bytes = x.nbytes
        for f, args in self._reads:
            f(*args).block_until_ready()
        self._repeats = repeats
        self.samples: list[float] = []

    def __call__(self) -> float:
        best = min(
            time_repeats(lambda: f(*args).block_until_ready(), self._repeats, warmup=0).best for f, args in self._reads
        )
        self.samples.append(self._bytes / best / 1e9)
        return self.samples[-1]


def write_json(path: str, data: Any) -> None:
    """Writes `data` as indented JSON, creating the folder; non-JSON leaves (numpy scalars) become floats/str."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        return str(o)

    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=default)
        f.write("\n")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of `rows` (dicts) in `columns` order; floats get 3 significant digits, None is '-'."""

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    line = lambda cells: "  ".join(s.rjust(w) for s, w in zip(cells, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(b) for b in body])
