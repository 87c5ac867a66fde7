"""Weight precision (CHATBOT_DTYPE): float32 on CPU by default, bf16/fp16 on request.

The GPU branch of ``auto`` needs a GPU; everything else runs here, the served
bfloat16 model included.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from conftest import ROOT, ModelStore, Served
from torch import nn

from chatbot.engine.chat_engine import ChatEngine, pick_dtype
from chatbot.engine.packed_linear import PackedLinear
from chatbot.schemas import ChatRequest
from chatbot.settings import Settings

GREEDY = {"num_beams": 1, "max_new_tokens": 8}


def test_auto_is_float32_on_a_cpu_and_names_map_to_torch_dtypes():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("bfloat16", cpu) == torch.bfloat16
    assert pick_dtype("float16", cpu) == torch.float16


def test_a_misspelt_dtype_is_refused_with_the_choices(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CHATBOT_DTYPE", " BFloat16 ")
    assert Settings.from_env().dtype == "bfloat16"
    monkeypatch.setenv("CHATBOT_DTYPE", "fp8")
    with pytest.raises(ValueError, match="CHATBOT_DTYPE must be one of auto, bfloat16"):
        Settings.from_env()


def test_a_bfloat16_engine_keeps_its_layers_unpacked_and_answers(tiny_checkpoint: Path):
    engine = ChatEngine.load(tiny_checkpoint, "tiny-bf16", dtype="bfloat16")
    assert engine.model.dtype == torch.bfloat16
    assert not any(isinstance(m, PackedLinear) for m in engine.model.modules())
    assert any(type(m) is nn.Linear for m in engine.model.modules())
    info = engine.info()
    assert (info.device, info.dtype) == ("cpu", "bfloat16")
    messages = [{"role": "user", "content": "Hello, how are you today?"}]
    (reply,) = engine.generate([ChatRequest(messages=messages, **GREEDY)])
    assert 1 <= reply.completion_tokens <= 8
    assert reply.model == "tiny-bf16"


def test_the_service_serves_the_precision_it_is_told(bfloat16_served: Served):
    info = httpx.post(f"{bfloat16_served.url}/info", json={}, timeout=30).json()
    assert (info["device"], info["dtype"]) == ("cpu", "bfloat16")
    answer = httpx.post(
        f"{bfloat16_served.url}/respond",
        json={"messages": [{"role": "user", "content": "hi"}], **GREEDY},
        timeout=60,
    )
    assert answer.status_code == 200
    assert answer.json()["completion_tokens"] >= 1


def test_the_service_refuses_to_start_on_a_bad_dtype(model_store: ModelStore):
    started = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service:Chatbot",
         "--host", "127.0.0.1", "--port", "1"],
        cwd=ROOT, env={**model_store.env, "CHATBOT_DTYPE": "half"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode != 0
    assert "CHATBOT_DTYPE must be one of auto, bfloat16, float16, float32, not 'half'" in (
        started.stdout + started.stderr
    )
