"""One engine over several processes (hosts) with `jax.distributed`: process 0 plans, every process runs each step.

    # one per host (or several processes on one machine, as the tests do), each with the same model and flags:
    novallm-serve --mesh=model=4 --coordinator_address=10.0.0.1:9876 --num_processes=2 --process_id=$I

`initialize` starts JAX's multi-controller runtime (with gloo collectives on CPU), so that one mesh spans the devices
of every process. Each process builds the same engine; process 0, the leader, also runs the HTTP/gRPC front and the
scheduler, and sends each step's plan (`StepPlan.to_dict`) to the other processes, the workers, before it runs the
step itself. A worker runs the same jitted step on its shards and the same sampler on its copy of the logits, so
every process holds the tokens that the next step feeds back; only the leader reads them out.

Plans travel over a `multiprocessing.connection` on the coordinator's port + 1, authenticated with
$NOVALLM_CLUSTER_KEY (default: derived from the coordinator address; set it when the port is reachable by others).
When a worker's connection drops, the leader marks its engine unavailable (requests get 503) and the front stops:
a step may be blocked for good in a collective with the lost process, so a cluster process ends with `exit_now`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from typing import Callable

import numpy as np
from absl import logging

from novallm_jax.engine.plan import StepPlan
from novallm_jax.errors import EngineUnavailableError, InvalidRequestError

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "NOVALLM_COORDINATOR_ADDRESS",
    "NOVALLM_NUM_PROCESSES",
    "NOVALLM_PROCESS_ID",
)
ENV_KEY = "NOVALLM_CLUSTER_KEY"
CONNECT_TIMEOUT_S = 600.0  # a worker waits this long for the leader to build its engine and listen


@dataclasses.dataclass(frozen=True)
class Cluster:
    coordinator_address: str  # host:port of process 0's jax.distributed coordinator
    num_processes: int
    process_id: int

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    @property
    def plan_address(self) -> tuple[str, int]:
        host, port = self.coordinator_address.rsplit(":", 1)
        return host, int(port) + 1

    @property
    def authkey(self) -> bytes:
        key = os.environ.get(ENV_KEY) or f"novallm-cluster:{self.coordinator_address}"
        return hashlib.sha256(key.encode()).digest()


def cluster_from(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> Cluster | None:
    """The cluster the flags (or else $NOVALLM_COORDINATOR_ADDRESS, $NOVALLM_NUM_PROCESSES, $NOVALLM_PROCESS_ID)
    describe; None for one process. Raises InvalidRequestError naming the flag at fault."""
    env = os.environ
    address = coordinator_address or env.get(ENV_COORDINATOR) or None
    count, pid = num_processes, process_id
    for name, value, var in (("num_processes", count, ENV_NUM_PROCESSES), ("process_id", pid, ENV_PROCESS_ID)):
        if value is None and env.get(var):
            try:
                value = int(env[var])
            except ValueError:
                raise InvalidRequestError(f"${var} must be an integer, got {env[var]!r}", param=name) from None
        if name == "num_processes":
            count = value
        else:
            pid = value
    if address is None and count in (None, 1) and pid in (None, 0):
        return None
    if address is None:
        raise InvalidRequestError("several processes need --coordinator_address=HOST:PORT", "coordinator_address")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise InvalidRequestError(
            f"--coordinator_address must be HOST:PORT (port below 65535), got {address!r}", "coordinator_address"
        )
    if count is None or count < 2:
        raise InvalidRequestError(
            f"--num_processes must be at least 2 with a coordinator, got {count}", "num_processes"
        )
    if pid is None or not 0 <= pid < count:
        raise InvalidRequestError(f"--process_id must be in [0, {count}), got {pid}", "process_id")
    return Cluster(address, count, pid)


def initialize(cluster: Cluster) -> None:
    """Starts JAX's multi-controller runtime; call it before anything asks JAX for its devices."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU meshes across processes; no-op elsewhere
    logging.info(
        "process %d of %d joining the cluster at %s",
        cluster.process_id,
        cluster.num_processes,
        cluster.coordinator_address,
    )
    jax.distributed.initialize(cluster.coordinator_address, cluster.num_processes, cluster.process_id)


def check_mesh(mesh) -> None:
    """Refuses a mesh (a `--mesh` string or Mesh) that does not span every process's devices, naming the flag."""
    import jax

    from novallm_jax.sharding import parse_mesh

    mesh = parse_mesh(mesh)
    if mesh is None or set(mesh.devices.flat) != set(jax.devices()):
        raise InvalidRequestError(
            f"a cluster of {jax.process_count()} processes serves one model over the devices of all of them: give "
            f"--mesh with {jax.device_count()} devices in all (e.g. model={jax.device_count()})",
            param="mesh",
        )


def check_engine(engine) -> None:
    """Refuses an engine that cannot run as one of a cluster's processes, naming the setting."""
    if engine.drafter is not None:  # its drafts' logits, which sampling verifies against, exist on process 0 only
        raise InvalidRequestError(
            "a draft model drafts on process 0 alone, and a cluster's processes sample together: leave "
            "--draft_model unset (prompt-lookup drafts, --speculative, travel in the step plans)",
            param="draft_model",
        )
    check_mesh(engine.executor.mesh)


def apply_pool_ops(engine, ops, held: dict) -> None:
    """Repeats on this process's shards what process 0's scheduler did to page contents before a plan
    (`StepPlan.pool_ops`): swaps to the host (this process keeps its shards of the pages in `held`, by KV cache
    group and swap handle) and back, drops of swapped copies, and page copies."""
    for g, (op, *args) in ops:
        pool = engine.pools[g]
        if op == "swap_out":
            handle, owner, pages = args
            held[(g, handle)] = (owner, pool.read_pages(pages))
        elif op == "swap_in":
            handle, pages = args
            pool.write_pages(pages, held.pop((g, handle))[1])
        elif op == "drop":
            held.pop((g, args[0]), None)
        elif op == "drop_owner":
            for key in [k for k, (owner, _) in held.items() if k[0] == g and owner == args[0]]:
                del held[key]
        elif op == "copy":
            pool.copy_pages([tuple(p) for p in args[0]])
        else:
            raise ValueError(f"unknown pool operation {op!r}")


def _fingerprint(engine) -> str:
    """What must agree between the processes for the leader's plans to mean the same on every one."""
    e = engine
    text = repr((e.cfg, e.executor.exec_cfg, e.executor.dtype, e.executor.kv_dtype, e.num_slots, e.eos_token_ids))
    return hashlib.sha256(text.encode()).hexdigest()


def _send(conn: Connection, header: dict, arrays: list[np.ndarray] = ()) -> None:
    conn.send_bytes(json.dumps(header).encode())
    for a in arrays:
        conn.send_bytes(np.ascontiguousarray(a).tobytes())


class Leader:
    """Process 0's side: accepts the workers, then mirrors each plan the engine core runs to all of them."""

    def __init__(self, engine, cluster: Cluster, on_lost: Callable[[str], None] | None = None):
        self.engine, self.cluster, self.on_lost = engine, cluster, on_lost
        self._lost = threading.Event()
        self._closing = False
        self._conns: dict[int, Connection] = {}
        fingerprint = _fingerprint(engine)
        with Listener(cluster.plan_address, authkey=cluster.authkey) as listener:
            logging.info("waiting for %d worker processes on %s:%d", cluster.num_processes - 1, *cluster.plan_address)
            while len(self._conns) < cluster.num_processes - 1:
                conn = listener.accept()
                hello = json.loads(conn.recv_bytes())
                if hello["fingerprint"] != fingerprint:
                    _send(conn, {"op": "stop", "error": "its model or engine settings differ from process 0's"})
                    raise InvalidRequestError(
                        f"process {hello['process_id']} built another model or engine configuration than process 0: "
                        "start every process with the same model and flags",
                        param="model",
                    )
                self._conns[hello["process_id"]] = conn
        for pid, conn in self._conns.items():
            threading.Thread(target=self._watch, args=(pid, conn), name=f"novallm-watch-{pid}", daemon=True).start()
        engine.core.mirror = self._mirror
        logging.info("all %d processes joined: serving", cluster.num_processes)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def _watch(self, pid: int, conn: Connection) -> None:
        # A worker sends nothing after its hello, unless a step failed there; EOF: it exited.
        try:
            reason = f"process {pid} of the engine failed: {json.loads(conn.recv_bytes()).get('error')}"
        except (EOFError, OSError):
            reason = f"process {pid} of the engine exited"
        if not self._closing:
            self._lose(reason)

    def _lose(self, reason: str) -> None:
        if self._lost.is_set():
            return
        self._lost.set()
        logging.error("%s: no more requests can be served", reason)
        self.engine.mark_unavailable(reason)
        if self.on_lost is not None:
            self.on_lost(reason)

    def _mirror(self, op: str, plan: StepPlan | None, bitmasks=None, forward: dict | None = None) -> None:
        if self._lost.is_set():
            raise EngineUnavailableError(self.engine.unavailable or "a process of the engine is gone")
        header: dict = {"op": op, "plan": None if plan is None else plan.to_dict()}
        if forward is not None:
            header["forward"] = forward
        arrays = []
        if op == "sample":
            header["bitmasks"] = [None if m is None else [list(m.shape), m.dtype.str] for m in bitmasks or ()]
            header["no_bitmasks"] = bitmasks is None
            arrays = [m for m in bitmasks or () if m is not None]
        for pid, conn in self._conns.items():
            try:
                _send(conn, header, arrays)
            except OSError:
                self._lose(f"process {pid} of the engine exited")
                raise EngineUnavailableError(self.engine.unavailable) from None

    def close(self) -> None:
        """Tells the workers to stop (they exit 0), unless they are gone."""
        self._closing = True
        self.engine.core.mirror = None
        for conn in self._conns.values():
            try:
                _send(conn, {"op": "stop"})
                conn.close()
            except OSError:
                pass


def _connect(cluster: Cluster, timeout: float = CONNECT_TIMEOUT_S) -> Connection:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(cluster.plan_address, authkey=cluster.authkey)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def serve_worker(engine, cluster: Cluster) -> int:
    """A worker's life: runs the leader's plans on this process's shards until told to stop (returns 0) or the leader
    is gone (returns 1)."""
    from novallm_jax.embeddings import run_forward

    conn = _connect(cluster)
    _send(conn, {"process_id": cluster.process_id, "fingerprint": _fingerprint(engine)})
    logging.info("process %d serving process 0's plans", cluster.process_id)
    core, logits = engine.core, None
    held: dict = {}  # this process's shards of swapped-out pages
    for pool in engine.pools:  # this process repeats process 0's pool operations; it notes none of its own
        pool.journal = None
    while True:
        try:
            header = json.loads(conn.recv_bytes())
            arrays = [
                np.frombuffer(conn.recv_bytes(), np.dtype(m[1])).reshape(m[0])
                for m in header.get("bitmasks", ())
                if m is not None
            ]
        except (EOFError, OSError):
            logging.error("process 0 (the leader) is gone; stopping")
            return 1
        op = header["op"]
        if op == "stop":
            if header.get("error"):
                logging.error("process 0 refused this process: %s", header["error"])
                return 1
            logging.info("process 0 stopped the cluster")
            return 0
        try:
            if op == "forward":  # a prefill-only forward between two steps (`LLMEngine.forward`)
                f = header["forward"]
                with engine._lock:
                    run_forward(engine.executor, f["kind"], f["ids"], f["arg"])
                continue
            plan = StepPlan.from_dict(header["plan"])
            with engine._lock:
                if op == "run":
                    apply_pool_ops(engine, plan.pool_ops, held)
                    logits, engine.kv_cache = core.run(plan, engine.kv_cache)
                else:
                    it = iter(arrays)
                    masks = (
                        None if header["no_bitmasks"] else [None if m is None else next(it) for m in header["bitmasks"]]
                    )
                    core.sample(plan, logits, masks)
        except Exception as e:
            step = (header.get("plan") or {}).get("step", op)
            logging.exception("step %s failed on process %d", step, cluster.process_id)
            try:
                _send(conn, {"error": f"{type(e).__name__}: {e}"})
            except OSError:
                pass
            return 1


def exit_now(code: int) -> None:
    """Ends a cluster process without `jax.distributed`'s shutdown barrier, which waits for every process and
    would hang when one is gone."""
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
