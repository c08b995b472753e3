"""A FastAPI app of your own with the model inside it: `LLM` serves concurrent requests from one engine.

    pip install "novallm-jax[serve]"
    python examples/fastapi_app.py --port 8080        # or: uvicorn examples.fastapi_app:app --port 8080
    curl -s localhost:8080/summarize -H 'content-type: application/json' -d '{"text": "JAX is ..."}'
    curl -sN "localhost:8080/stream?prompt=Once%20upon%20a%20time"

For an OpenAI-compatible API use `novallm-serve` instead; this is for endpoints shaped like your application.
"""

import argparse
import contextlib
import os

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from novallm_jax import LLM, SamplingParams

MODEL = os.environ.get("NOVALLM_MODEL")  # None: the default model
state = {}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    with LLM(MODEL) as llm:  # loaded once at start-up; its engine thread stops at shutdown
        state["llm"] = llm
        yield
        state.clear()


app = FastAPI(lifespan=lifespan)


class SummarizeRequest(BaseModel):
    text: str = Field(max_length=8000)
    max_tokens: int = Field(default=64, ge=1, le=512)


@app.get("/health")
async def health():
    return {"ok": True}


@app.post("/summarize")
async def summarize(body: SummarizeRequest):
    messages = [
        {"role": "system", "content": "Summarize the user's text in one sentence."},
        {"role": "user", "content": body.text},
    ]
    result = await state["llm"].achat(messages, SamplingParams(temperature=0.0, max_tokens=body.max_tokens))
    return {"summary": result.text, "tokens": len(result.outputs[0].token_ids)}


@app.get("/stream")
async def stream(prompt: str, max_tokens: int = 64):
    params = SamplingParams(temperature=0.8, seed=0, max_tokens=min(max_tokens, 512))
    return StreamingResponse(state["llm"].astream(prompt, params), media_type="text/plain")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port)
