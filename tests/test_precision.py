"""Precision (CHATBOT_DTYPE): auto (int4 for a 4-bit GGUF, else bfloat16 on CPUs with
native bf16, else float32), int8, int4, bf16 or fp16 on request.

The GPU branch of ``auto`` needs a GPU; everything else runs here, the served
int8 and bfloat16 models included (bfloat16 where the CPU has AVX-512).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch
from conftest import ROOT, Served
from torch import nn
from transformers import EncoderDecoderCache, PretrainedConfig

from chatbot.engine import precision, precision_names
from chatbot.engine.chat_engine import ChatEngine
from chatbot.engine.cpu import at_least, cpu_isa
from chatbot.engine.kernels import BFloat16Linear, PackedLinear, attention
from chatbot.schemas import ChatRequest
from chatbot.settings import Settings
from devtools.processes import LOCAL, service_info, service_metrics

GREEDY = {"num_beams": 1, "max_new_tokens": 8}
needs_avx512 = pytest.mark.skipif(not at_least("avx512_core"), reason="bfloat16 needs AVX-512")


def test_auto_is_bfloat16_where_the_cpu_has_it_natively_else_float32():
    cpu = torch.device("cpu")
    native = cpu_isa() == "avx512_core_bf16"  # with AMX it would run below AMX: float32
    assert precision.resolve("auto", cpu).name == ("bfloat16" if native else "float32")
    assert precision.resolve("int8", cpu).load_dtype == torch.float32
    assert precision.resolve("float16", cpu).load_dtype == torch.float16


def test_auto_serves_a_4_bit_gguf_in_4_bits():
    cpu = torch.device("cpu")
    assert precision.resolve("auto", cpu, four_bit_source=True).name == "int4"
    assert precision.resolve("float32", cpu, four_bit_source=True).name == "float32"
    formats = {"Q4_1": True, "Q4_K": True, "IQ4_XS": True, "Q8_0": False, "": False}
    for stored, four_bits in formats.items():
        config = PretrainedConfig(source_weights=stored) if stored else PretrainedConfig()
        assert precision.stored_in_four_bits(config) is four_bits


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_integer_precisions_are_refused_on_a_gpu(dtype: str):
    with pytest.raises(precision_names.UnsupportedPrecision, match=f"{dtype} is a CPU precision"):
        precision.resolve(dtype, torch.device("cuda"))


SUPERVISOR = """
import sys
import service
assert "torch" not in sys.modules, "service.py imported torch"
from chatbot.engine import precision_names
try:
    precision_names.choose("bfloat16", on_gpu=False)
except precision_names.UnsupportedPrecision as refused:
    print(refused)
assert "torch" not in sys.modules, "the refusal imported torch"
"""


def test_the_supervisor_checks_the_precision_without_torch():
    """``bentoml serve``'s supervisor imports service.py, which checks CHATBOT_DTYPE:
    torch would cost it 2.7 s of CPU at every start, and the check needs none."""
    done = subprocess.run(
        [sys.executable, "-c", SUPERVISOR], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "CHATBOT_DTYPE": "float32"}, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    refused = not at_least("avx512_core")
    assert ("bfloat16 needs a CPU with AVX-512" in done.stdout) is refused


def test_a_misspelt_dtype_is_refused_with_the_choices(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CHATBOT_DTYPE", " BFloat16 ")
    assert Settings.from_env().dtype == "bfloat16"
    monkeypatch.setenv("CHATBOT_DTYPE", "fp8")
    with pytest.raises(ValueError, match="CHATBOT_DTYPE must be one of auto, bfloat16"):
        Settings.from_env()


@pytest.mark.parametrize("family", ["blenderbot", "chat"])
def test_int8_keeps_keys_and_values_in_bfloat16_in_the_loop_and_in_generate(
    family: str, tiny_checkpoint: Path, tiny_chat_checkpoint: Path
):
    """Half the bytes a many-row step reads (int8 only: ``precision.CACHE``);
    ``generate`` stores what the loop stores (the decode-loop identity tests then hold)."""
    checkpoint = tiny_checkpoint if family == "blenderbot" else tiny_chat_checkpoint
    kept = {"float32": torch.float32, "int8": torch.bfloat16, "int4": torch.float32}
    for dtype, stored in kept.items():
        engine = ChatEngine.load(checkpoint, "tiny", dtype=dtype)
        assert engine.model_step().slots.dtype == engine.cache_dtype == stored
        assert engine.info().kv_cache == str(stored).removeprefix("torch.")
        model = engine.model
        (cache,) = engine.family.cache_kwargs(model.config, 4, engine.cache_dtype).values()
        prompt = torch.tensor([[5, 6, 7]])
        with torch.inference_mode():
            if isinstance(cache, EncoderDecoderCache):  # a decode step of generate's
                model(input_ids=prompt, decoder_input_ids=prompt[:, :1], past_key_values=cache)
                caches = [cache.self_attention_cache, cache.cross_attention_cache]
            else:
                model(input_ids=prompt, past_key_values=cache)
                caches = [cache]
        assert {c.layers[0].keys.dtype for c in caches} == {stored}


@needs_avx512
def test_a_bfloat16_engine_multiplies_in_bfloat16_and_answers(tiny_checkpoint: Path):
    engine = ChatEngine.load(tiny_checkpoint, "tiny-bf16", dtype="bfloat16")
    assert engine.model.dtype == torch.float32  # norms, attention, the cache
    linears = [m for m in engine.model.modules() if isinstance(m, PackedLinear | nn.Linear)]
    assert sum(type(m) is BFloat16Linear for m in linears) == len(linears) - 1  # the LM head
    info = engine.info()
    assert (info.device, info.dtype) == ("cpu", "bfloat16")
    messages = [{"role": "user", "content": "Hello, how are you today?"}]
    (reply,) = engine.generate([ChatRequest(messages=messages, **GREEDY)])
    assert 1 <= reply.completion_tokens <= 8
    assert reply.model == "tiny-bf16"


def test_the_service_serves_the_precision_it_is_told(int8_served: Served):
    info = service_info(int8_served.url)
    assert (info["device"], info["dtype"], info["cpu_isa"]) == ("cpu", "int8", cpu_isa())
    assert info["kv_cache"] == "bfloat16"
    assert info["attention"] == ("rows" if attention.library() else "sdpa")
    answer = LOCAL.post(
        f"{int8_served.url}/respond",
        json={"messages": [{"role": "user", "content": "hi"}], **GREEDY},
        timeout=60,
    )
    assert answer.status_code == 200
    assert answer.json()["completion_tokens"] >= 1
    metrics = service_metrics(int8_served.url)
    assert 'dtype="int8"' in metrics
    assert f'cpu_isa="{cpu_isa()}"' in metrics


def test_int8_streams_with_log_probabilities_and_beams_answer(int8_served: Served):
    """Every decode-loop path in int8: a stream with log-probabilities adds up to the
    whole reply, and the model's beam-search default answers."""
    client = openai.OpenAI(base_url=f"{int8_served.url}/v1", api_key="unused")
    asked = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
             "temperature": 0, "logprobs": True}  # fmt: skip
    whole = client.chat.completions.create(**asked)
    chunks = list(client.chat.completions.create(**asked, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == whole.choices[0].message.content
    assert whole.choices[0].logprobs.content
    beams = LOCAL.post(
        f"{int8_served.url}/respond",
        json={"messages": [{"role": "user", "content": "hi"}], "num_beams": 4}, timeout=120,
    )  # fmt: skip
    assert beams.status_code == 200
