"""Probe: the Llama decode step compiled ahead of time (AOTInductor), against the eager
``LlamaStep``, for one conversation (SmolLM2 in int4, as the offline model is served).

At one conversation a SmolLM2 token is about 35 eager torch calls a layer beside its
weight products, and ``torch.compile`` removes them only at a cost paid at every start
(100-210 s here) or, one layer compiled and called 30 times, with guards that cost more
than they save. ``torch.export`` plus AOTInductor builds the whole 30-layer step once
into a package that loads in a fraction of a second, so it could be built when a model
enters the model store. This probe measures what that would give before anything is
built on it: the compile and load times, the step's time in turns with the eager step,
and whether 24 greedy steps come out bit-identical to the eager step's (the decode loop
promises ``generate``'s replies). Inductor's own reduction for ``rms_norm`` sums in
another order than ATen's, which changed logits from the third step on, so the norm
stays ATen's, behind an opaque custom op; the rest (products, rotation, attention,
cache writes) is inductor's. Rows are fixed at one; the replies' length is dynamic.

    python benchmarks/aoti_probe.py [--model SOURCE] [--steps 24]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import conversations  # noqa: E402
from benchmarks.quality import checkpoint_of  # noqa: E402
from benchmarks.step_variants import filled, load  # noqa: E402
from chatbot.engine import precision  # noqa: E402
from chatbot.engine.chat_engine import ChatEngine  # noqa: E402
from chatbot.engine.kernels.int4 import GROUP, Int4Linear  # noqa: E402
from chatbot.engine.llama_step import LlamaStep  # noqa: E402
from chatbot.engine.own_thread import in_own_thread  # noqa: E402
from chatbot.models.offline_model import offline_model_path  # noqa: E402
from chatbot.schemas import ChatRequest  # noqa: E402

MAX_WIDTH = 500  # the longest reply the exported step takes (the slots hold 512)


@torch.library.custom_op("chatbot_probe::rms_norm", mutates_args=())
def aten_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ATen's ``rms_norm``, opaque to inductor (which would sum in its own order)."""
    return functional.rms_norm(x, weight.shape, weight, eps)


@aten_rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


def int4(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    assert isinstance(layer, Int4Linear), "the probe serves int4"
    assert layer.bias is None, "Llama's projections have no bias"
    packed, scales = layer.packed, layer.scales_and_zeros
    return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, GROUP, scales)


class WrittenOutLayers(nn.Module):
    """``LlamaStep.decode``'s layers and final norm, for one row, as one graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        attention = model.model.layers[0].self_attn
        self.head_dim = attention.head_dim
        query_heads = attention.q_proj.out_features // self.head_dim
        self.heads = (query_heads, query_heads // attention.num_key_value_groups)

    def forward(self, hidden, cos, signed_sin, position, width_of, keys, values):
        body, (query_heads, kv_heads), head_dim = self.model.model, self.heads, self.head_dim
        width, row, kv = width_of.shape[0], torch.zeros(1, 1, dtype=torch.long), slice(None)
        for index, layer in enumerate(body.layers):
            norm, attention, mlp = layer.input_layernorm, layer.self_attn, layer.mlp
            states = aten_rms_norm(hidden, norm.weight, norm.variance_epsilon)
            qkv = attention.q_proj.shared.product
            projected = int4(states, qkv).float().view(1, -1, 1, head_dim)
            x = projected[:, : query_heads + kv_heads]
            rotated = x * cos + x.roll(head_dim // 2, dims=-1) * signed_sin
            query, new_keys = rotated.split_with_sizes(self.heads, dim=1)
            keys[index][row, kv, position] = new_keys[:, :, 0]
            values[index][row, kv, position] = projected[:, query_heads + kv_heads :, 0]
            out = functional.scaled_dot_product_attention(
                query, keys[index][:1, :, :width], values[index][:1, :, :width],
                scale=attention.scaling, enable_gqa=True,
            )  # fmt: skip
            hidden = hidden + int4(out.reshape(1, -1), attention.o_proj)
            norm = layer.post_attention_layernorm
            states = aten_rms_norm(hidden, norm.weight, norm.variance_epsilon)
            gate, up = int4(states, mlp.gate_proj.shared.product).float().chunk(2, dim=-1)
            hidden = hidden + int4(functional.silu(gate) * up, mlp.down_proj)
        return aten_rms_norm(hidden, body.norm.weight, body.norm.variance_epsilon)


def compiled_step(model: nn.Module, example: tuple) -> Callable:
    """The package's runner, and how long export, compile and load took."""
    width = torch.export.Dim("width", min=2, max=MAX_WIDTH)
    layers = len(example[-1])
    dynamic = (None, None, None, None, {0: width}, [None] * layers, [None] * layers)
    started = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(WrittenOutLayers(model), example, dynamic_shapes=dynamic)
    exported_at = time.perf_counter()
    package = torch._inductor.aoti_compile_and_package(
        exported, package_path=str(Path(tempfile.mkdtemp()) / "step.pt2")
    )
    compiled_at = time.perf_counter()
    runner = torch._inductor.aoti_load_package(package)
    print(f"export {exported_at - started:.1f} s, compile {compiled_at - exported_at:.1f} s, "
          f"load {time.perf_counter() - compiled_at:.2f} s", flush=True)  # fmt: skip
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(offline_model_path() or ""))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    path = checkpoint_of(args.model)
    engine = ChatEngine.load(path, "prompts", dtype="float32", pack_weights=False)
    prompt = list(engine.encode(ChatRequest(messages=conversations(1)[0])).input_ids)
    model = load(path, precision.resolve("int4", torch.device("cpu")), fuse=True)

    def fresh() -> LlamaStep:
        step = filled(LlamaStep(model, positions=1024), [prompt])
        step.slots.reserve(1, MAX_WIDTH + 12)
        return step

    def inputs(step: LlamaStep, token: torch.Tensor, position: torch.Tensor) -> tuple:
        rotation = step.rotation.at(position)
        width_of = torch.empty(int(position[0]) + 1)
        hidden = model.model.embed_tokens(token)
        slots = step.slots
        return (hidden, rotation.cos, rotation.signed_sin, position[:, None], width_of,
                list(slots.keys), list(slots.values))  # fmt: skip

    token, position = torch.full((1,), 200), torch.tensor([len(prompt)])
    example_step = fresh()
    example = tuple(
        [t.clone() for t in x] if isinstance(x, list) else x.clone()
        for x in inputs(example_step, token, position)
    )  # outside inference mode: export traces with autograd's tensors
    runner = compiled_step(model, example)
    ways = {
        "eager": lambda step, t, p: step.decode(t, p, [1]),
        "aoti": lambda step, t, p: model.lm_head(runner(*inputs(step, t, p))),
    }
    with torch.inference_mode():
        logits = {}
        for way, decode in ways.items():  # each way alone, from the same prompt
            step, t, p, logits[way] = fresh(), token, position, []
            for _ in range(args.steps):
                logits[way].append(decode(step, t, p))
                t, p = logits[way][-1].argmax(-1), p + 1
        same = sum(map(torch.equal, logits["eager"], logits["aoti"]))
        print(f"{same} of {args.steps} greedy steps' logits bit-identical to the eager step's")
        steps = {way: fresh() for way in ways}
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(args.rounds):
            for way, decode in ways.items():
                started = time.perf_counter()
                for _ in range(10):
                    decode(steps[way], token, position)
                times[way].append((time.perf_counter() - started) / 10 * 1e3)
    eager, aoti = (statistics.median(times[way]) for way in ways)
    print(f"one row: eager step {eager:.2f} ms, AOTInductor {aoti:.2f} ms ({eager / aoti:.2f}x)")


if __name__ == "__main__":
    asyncio.run(in_own_thread(main))  # a thread that ends: one OpenMP team (own_thread)
