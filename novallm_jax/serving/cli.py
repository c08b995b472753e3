"""`novallm-serve`: the OpenAI-compatible REST API (and optionally gRPC) over one model.

    novallm-serve                                   # SmolLM2-135M-Instruct on http://127.0.0.1:8000
    novallm-serve --model=/path/to/model --port=8080 --grpc_port=50051 --max_concurrent=64
    NOVALLM_API_KEY=sk-local novallm-serve          # then send "Authorization: Bearer sk-local"
    novallm-serve --mesh=model=4 --coordinator_address=HOST0:9876 --num_processes=2 --process_id=I  # on 2 hosts

It binds to 127.0.0.1 unless --host says otherwise: exposing a model server to a network is a choice to make on
purpose (and then with --api_key).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

from absl import app, flags, logging

from novallm_jax import cli_flags  # noqa: F401  (defines --model, --dtype, --weights, --activations, ...)

FLAGS = flags.FLAGS
flags.DEFINE_string("served_model_name", None, "The model id clients send (default: the model's file name).")
flags.DEFINE_string("host", "127.0.0.1", "Interface to bind; 0.0.0.0 exposes the server to the network.")
flags.DEFINE_integer("port", 8000, "REST port (0: any free port).")
flags.DEFINE_integer("grpc_port", None, "gRPC port; unset: no gRPC server.")
flags.DEFINE_string(
    "api_key",
    None,
    "Required bearer key on /v1/*, /tokenize and /detokenize (default: $NOVALLM_API_KEY; unset: no key).",
)
flags.DEFINE_integer("max_concurrent", 256, "Generation requests in flight before new ones get 429.", lower_bound=1)
flags.DEFINE_integer("max_queue", 1024, "Requests waiting in the engine before new ones get 503.", lower_bound=1)
flags.DEFINE_integer("max_model_len", None, "Context length (default: the engine's).")
flags.DEFINE_bool(
    "async_scheduling",
    True,
    "Dispatch each engine step before reading the previous step's tokens "
    "back, so that streaming and stop checks overlap the model; false: every step waits for its tokens.",
)
flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body accepted (413 beyond).", lower_bound=1)
flags.DEFINE_bool(
    "warmup",
    False,
    "Compile every shape bucket before serving (minutes on CPU; pair it with "
    "--compile_cache_dir so that later starts load them). Off: first requests compile.",
)
flags.DEFINE_enum(
    "tool_call_parser",
    None,
    ["hermes", "llama3_json", "mistral", "gemma4", "pythonic"],
    "How tool calls are read from answers (default: chosen from the chat template's call syntax).",
)

flags.DEFINE_string(
    "coordinator_address",
    None,
    "Several processes (hosts) serving one model: process 0's host:port for "
    "jax.distributed (default: $NOVALLM_COORDINATOR_ADDRESS); the plans go over port + 1. Process 0 serves the API.",
)
flags.DEFINE_integer("num_processes", None, "Processes in the cluster (default: $NOVALLM_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index in the cluster (default: $NOVALLM_PROCESS_ID).")

API_KEY_ENV = "NOVALLM_API_KEY"


def main(argv) -> None:
    del argv
    from novallm_jax import distributed
    from novallm_jax.engine.engine import EngineConfig
    from novallm_jax.errors import InvalidRequestError
    from novallm_jax.llm import LLM
    from novallm_jax.serving.app import Server, ServerConfig
    from novallm_jax.serving.runner import serve, serve_in_cluster

    try:
        cluster = distributed.cluster_from(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except InvalidRequestError as e:
        raise app.UsageError(str(e)) from None
    if cluster is not None:
        distributed.initialize(cluster)  # before anything asks JAX for its devices
        try:
            distributed.check_mesh(FLAGS.mesh)
        except InvalidRequestError as e:
            logging.error("%s", e)
            distributed.exit_now(2)

    api_key = FLAGS.api_key or os.environ.get(API_KEY_ENV) or None
    if FLAGS.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logging.warning("serving on %s without an API key: anyone who can reach it can use it", FLAGS.host)
    engine_config = dataclasses.replace(
        EngineConfig(),
        max_queue=FLAGS.max_queue,
        async_scheduling=FLAGS.async_scheduling,
    )
    llm = LLM(
        FLAGS.model,
        dtype=FLAGS.dtype,
        weights=FLAGS.weights,
        activations=FLAGS.activations,
        kv_cache_dtype=FLAGS.kv_cache_dtype,
        engine_config=engine_config,
        max_model_len=FLAGS.max_model_len,
        compile_cache_dir=FLAGS.compile_cache_dir or None,
        warmup=FLAGS.warmup,
        mesh=FLAGS.mesh,
        speculative=FLAGS.speculative,
        draft_model=FLAGS.draft_model,
    )
    llm.tool_call_parser = FLAGS.tool_call_parser
    config = ServerConfig(
        model_name=FLAGS.served_model_name,
        api_key=api_key,
        max_concurrent=FLAGS.max_concurrent,
        max_body_bytes=FLAGS.max_body_bytes,
    )
    if cluster is not None:
        code = 1
        try:
            distributed.check_engine(llm.engine)
            code = serve_in_cluster(llm, config, cluster, FLAGS.host, FLAGS.port, FLAGS.grpc_port)
        except InvalidRequestError as e:
            logging.error("%s", e)
            code = 2
        except KeyboardInterrupt:
            code = 130
        finally:
            distributed.exit_now(code)  # no llm.close(): a step may be blocked in a collective with a lost process
    try:
        asyncio.run(serve(Server(llm, config), FLAGS.host, FLAGS.port, FLAGS.grpc_port))
    finally:
        llm.close()


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
