"""Running the REST (uvicorn) and gRPC fronts together on one event loop: in the foreground (the CLI) or on a
background thread (tests, benchmarks, notebooks).

    with BackgroundServer(llm, ServerConfig(), grpc=True) as srv:   # ephemeral ports on 127.0.0.1
        openai.OpenAI(base_url=srv.url + "/v1", api_key="-")...
"""

from __future__ import annotations

import asyncio
import threading
import time

import uvicorn
from absl import logging

from novallm_jax.llm import LLM
from novallm_jax.serving.app import Server, ServerConfig, build_app

DEFAULT_HOST = "127.0.0.1"
LOST_GRACE_S = 2.0  # after a cluster process is lost, how long the front answers 503 before it stops


async def serve(
    server: Server,
    host: str = DEFAULT_HOST,
    port: int = 8000,
    grpc_port: int | None = None,
    on_ready=None,
    uvicorn_server_out: list | None = None,
) -> None:
    """Serves REST on host:port and, if `grpc_port` is not None, gRPC on host:grpc_port, until uvicorn exits.

    `on_ready((rest_host, rest_port), grpc_port)` is called once both listen (ports resolved when 0 was asked for).
    """
    app = build_app(server.llm, server=server)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off", access_log=False, timeout_graceful_shutdown=5
    )
    rest = uvicorn.Server(config)
    if uvicorn_server_out is not None:
        uvicorn_server_out.append(rest)
    grpc_server, bound_grpc = None, None
    if grpc_port is not None:
        from novallm_jax.serving.grpc_server import build_grpc_server

        grpc_server, bound_grpc = build_grpc_server(server, f"{host}:{grpc_port}")
        await grpc_server.start()
    task = asyncio.create_task(rest.serve())
    try:
        while not rest.started:
            if task.done():  # failed to bind
                task.result()
                raise OSError(f"the REST server on {host}:{port} stopped before it started")
            await asyncio.sleep(0.01)
        bound_rest = rest.servers[0].sockets[0].getsockname()[:2]
        logging.info(
            "serving %s: REST on http://%s:%d%s",
            server.model_name,
            *bound_rest,
            f", gRPC on {host}:{bound_grpc}" if grpc_server else "",
        )
        if on_ready is not None:
            on_ready(bound_rest, bound_grpc)
        await task
    finally:
        if not task.done():
            rest.should_exit = True
            await asyncio.gather(task, return_exceptions=True)
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)


class BackgroundServer:
    """Both fronts on a daemon thread's event loop; `start()` returns once they listen."""

    def __init__(
        self,
        llm: LLM,
        config: ServerConfig | None = None,
        host: str = DEFAULT_HOST,
        port: int = 0,
        grpc: bool = False,
        grpc_port: int = 0,
    ):
        self.server = Server(llm, config)
        self.host, self.port, self.grpc_port = host, port, (grpc_port if grpc else None)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._uvicorn: list = []
        self._thread: threading.Thread | None = None
        self.rest_address: tuple[str, int] | None = None  # what the REST socket is bound to, once started

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        def ready(rest_address, grpc_port):
            self.rest_address = rest_address
            self.port, self.grpc_port = rest_address[1], grpc_port
            self._ready.set()

        try:
            asyncio.run(serve(self.server, self.host, self.port, self.grpc_port, ready, self._uvicorn))
        except BaseException as e:  # surfaced by start()
            self._error = e
        finally:
            self._ready.set()

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        self._thread = threading.Thread(target=self._run, name="novallm-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the server did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        if self._uvicorn:
            self._uvicorn[0].should_exit = True
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_cluster(
    llm: LLM,
    config: ServerConfig | None,
    cluster,
    host: str = DEFAULT_HOST,
    port: int = 8000,
    grpc_port: int | None = None,
    on_ready=None,
) -> int:
    """Serves as one process of a `novallm_jax.distributed.Cluster`; returns the exit code.

    Process 0 serves both fronts (as `serve`) and mirrors each step to the others; when one is lost, the front
    answers 503 for `LOST_GRACE_S` seconds, then stops (returns 1). The other processes run the plans they are sent
    until process 0 stops them (0) or is gone (1).
    """
    from novallm_jax.distributed import Leader, serve_worker

    if not cluster.is_leader:
        try:
            return serve_worker(llm.engine, cluster)
        except Exception:
            logging.exception("process %d stopped", cluster.process_id)
            return 1
    fronts: list = []

    def stop_later(reason: str) -> None:
        def stop() -> None:
            time.sleep(LOST_GRACE_S)
            if fronts:
                fronts[0].should_exit = True

        threading.Thread(target=stop, name="novallm-stop", daemon=True).start()

    leader = Leader(llm.engine, cluster, on_lost=stop_later)
    try:
        asyncio.run(serve(Server(llm, config), host, port, grpc_port, on_ready, fronts))
    finally:
        leader.close()
    return 1 if leader.lost else 0
