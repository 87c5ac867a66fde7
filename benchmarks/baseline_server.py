"""The original microservice design, as the baseline: FastAPI, no batching.

Each request runs its own ``generate`` inside the handler (FastAPI runs sync handlers
in its thread pool, so concurrent requests contend for the CPU instead of sharing a
forward pass). It runs PyTorch's stock CPU kernels, as the original design did (the
service's pre-packed oneDNN weights are part of what is measured against it). It takes
the same ``/respond`` payload as the service, so one load generator drives both.

    CHATBOT_MODEL=/path/to/checkpoint [CHATBOT_DTYPE=auto] uvicorn benchmarks.baseline_server:app
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

from fastapi import FastAPI

from chatbot.engine.chat_engine import ChatEngine
from chatbot.schemas import ChatReply, ChatRequest

engine: ChatEngine | None = None


@asynccontextmanager
async def lifespan(_: FastAPI):
    global engine
    engine = ChatEngine.load(
        os.environ["CHATBOT_MODEL"], "baseline", pack_weights=False,
        dtype=os.environ.get("CHATBOT_DTYPE", "auto"),
    )  # fmt: skip
    yield


app = FastAPI(title="Blenderbot baseline (no batching)", lifespan=lifespan)


@app.get("/readyz")
def readyz() -> dict[str, bool]:
    return {"ready": engine is not None}


@app.post("/respond")
def respond(request: ChatRequest) -> ChatReply:
    assert engine is not None
    engine.check(request)
    return engine.generate([request])[0]
