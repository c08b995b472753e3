"""One process of the two-process server that test_multihost.py starts (2 fake CPU devices each, `model=4`).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m tests.multihost_worker COORDINATOR N ID PORT READY

Builds the engine tests/engine_fixtures.py builds (the tiny random model, the real SmolLM2 tokenizer) on a mesh over
both processes' devices and serves it as `novallm-serve` does with the cluster flags; process 0 writes its REST port
to READY once it listens.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import logging

from novallm_jax import distributed


def main(coordinator: str, num_processes: str, process_id: str, port: str, ready: str) -> int:
    cluster = distributed.cluster_from(coordinator, int(num_processes), int(process_id))
    distributed.initialize(cluster)

    from novallm_jax.engine.engine import EngineConfig, LLMEngine
    from novallm_jax.llm import LLM
    from novallm_jax.loading import default_model_path
    from novallm_jax.serving.runner import serve_in_cluster
    from novallm_jax.tokenizer import load_tokenizer
    from tests.engine_fixtures import EXEC, TINY, tiny_params

    # 24 pages of 8 tokens: the test's concurrent requests need more than that, so the cluster preempts too.
    config = EngineConfig(executor=dataclasses.replace(EXEC, num_pages=24), mesh="model=4")
    llm = LLM.from_engine(LLMEngine(TINY, tiny_params(), load_tokenizer(default_model_path()), config), "tiny")
    distributed.check_engine(llm.engine)

    def on_ready(rest, grpc_port):
        with open(ready, "w") as f:
            f.write(str(rest[1]))

    return serve_in_cluster(llm, None, cluster, port=int(port), on_ready=on_ready)


def run_process(main, verbosity=logging.INFO) -> None:
    """Runs a cluster process's `main(*argv)` and ends the process with its code (1 on an exception, logged),
    without jax.distributed's shutdown barrier (`distributed.exit_now`)."""
    logging.set_verbosity(verbosity)
    code = 1
    try:
        code = main(*sys.argv[1:])
    except Exception:
        logging.exception("%s failed", sys.argv[0])
    finally:
        distributed.exit_now(code)


if __name__ == "__main__":
    run_process(main)
