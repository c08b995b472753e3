"""Many concurrent requests from one asyncio program, with the openai client, against a NovaLLM-JAX server.

    python examples/async_clients.py --url http://127.0.0.1:8000/v1 --requests 64 --concurrency 16
    python examples/async_clients.py --start_server --requests 8     # starts novallm-serve itself, then stops it

The server batches whatever is in flight, so concurrent requests finish far sooner than the same ones one by one.
"""

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from openai import AsyncOpenAI


@contextlib.contextmanager
def local_server(model: str | None, timeout_s: float = 300):
    """Runs `novallm-serve` on a free port until the block ends; yields its /v1 URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "novallm_jax.serving.cli", f"--port={port}"] + (
        [f"--model={model}"] if model else []
    )
    log_path = os.path.join(tempfile.mkdtemp(), "server.log")
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"novallm-serve exited with {server.returncode}; its log: {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"novallm-serve did not start in {timeout_s} s; its log: {log_path}")
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            server.terminate()
            server.wait(timeout=60)


async def fan_out(url: str, api_key: str, n: int, concurrency: int, max_tokens: int) -> None:
    client = AsyncOpenAI(base_url=url, api_key=api_key)
    model = (await client.models.list()).data[0].id
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> int:
        async with limit:
            reply = await client.chat.completions.create(
                model=model,
                max_tokens=max_tokens,
                temperature=0.7,
                seed=i,
                messages=[{"role": "user", "content": f"Give me fun fact number {i} about space."}],
            )
            return reply.usage.completion_tokens

    start = time.monotonic()
    tokens = await asyncio.gather(*(one(i) for i in range(n)))
    elapsed = time.monotonic() - start
    print(f"{n} requests, {sum(tokens)} tokens in {elapsed:.1f} s: {sum(tokens) / elapsed:.1f} tokens/s")
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the server's /v1 base URL")
    parser.add_argument("--api_key", default=os.environ.get("NOVALLM_API_KEY", "unused"))
    parser.add_argument("--start_server", action="store_true", help="start novallm-serve here instead of --url")
    parser.add_argument("--model", default=None, help="with --start_server: the model to serve")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=48)
    args = parser.parse_args()
    with local_server(args.model) if args.start_server else contextlib.nullcontext(args.url) as url:
        asyncio.run(fan_out(url, args.api_key, args.requests, args.concurrency, args.max_tokens))


if __name__ == "__main__":
    main()
