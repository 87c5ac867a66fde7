"""Linear-layer kernels: the maths of nn.Linear (exactly, or as quantized), and a
row's result independent of the rows beside it, under every instruction set this
CPU has (the attention kernel's too, ``test_attention.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from capped import levels_of_this_cpu, run_capped
from torch import nn

from chatbot.engine.chat_engine import ChatEngine
from chatbot.engine.continuous import ContinuousBatcher
from chatbot.engine.cpu import LEVELS, WITHOUT_AMX, at_least, capped, cpu_flags, cpu_isa, level_of
from chatbot.engine.kernels import (
    BFloat16Linear,
    Float32Linear,
    Int4Linear,
    Int8Linear,
    PackedLinear,
    RescoredBFloat16Linear,
    RescoredInt8Linear,
    replace_linear_layers,
    skip_redundant_rows,
)
from chatbot.engine.kernels.fused import ProjectionPart, SharedProduct, fuse_projections
from chatbot.engine.kernels.int4 import dequantize_groups, four_bits_throughout, quantize_groups
from chatbot.engine.kernels.int8 import absmax_scales, quantize_rows, scale_rows, weight_range
from chatbot.engine.kernels.native import library
from chatbot.engine.kernels.rows import MAX_ROWS_PER_CALL
from chatbot.schemas import ChatRequest

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN"
)


@pytest.mark.parametrize("level", levels_of_this_cpu())
def test_every_kernel_keeps_rows_independent_under_every_instruction_set(
    level: str, kernel_probes: Future[dict[str, list[dict]]]
):
    """What keeps a batched reply identical to the reply computed alone, on this CPU
    and on every older one it can pretend to be (oneDNN reads ONEDNN_MAX_CPU_ISA once,
    so each level runs in a fresh process). int8 sums must also be exact, to the bit of
    their float32 scaling: a kernel that saturates (16-bit pair sums without VNNI) would
    be far off. The bfloat16 kernels run as the service runs them: on AMX, capped below
    it first."""
    found, *bfloat16 = kernel_probes.result()[level]  # probed in the background
    assert found["isa"] == level
    assert (found["aten"] == "AVX2") == level.startswith("avx2")
    assert set(found["differ"]) == {
        "Float32Linear",
        "Int8Linear",
        "RescoredInt8Linear",
        "Int4Linear",
        "attention",
    }
    assert all(rows == [] for rows in found["differ"].values()), found["differ"]
    assert found["attention_flags"] == (  # the attention kernel's code for this level
        ["-march=x86-64-v3"] if level.startswith("avx2") else ["-march=x86-64-v4"]
    )
    for capped_below_amx in bfloat16:
        assert capped_below_amx["isa"] == min(level, WITHOUT_AMX, key=LEVELS.index)
        differ = capped_below_amx["differ"]
        assert set(differ) == {"BFloat16Linear", "RescoredBFloat16Linear"}
        assert all(rows == [] for rows in differ.values()), differ
    assert max(found["int8_error"].values()) == 0, found["int8_error"]


@pytest.mark.parametrize(
    ("cap", "expected"),
    [("", "avx512_core_bf16"), ("AVX2", "avx2"), ("avx512_core_vnni", "avx512_core_vnni"),
     ("AVX10_1_512_AMX", "avx512_core_bf16"), ("SSE41", None), ("ALL", "avx512_core_bf16")],
)  # fmt: skip
def test_the_instruction_set_is_capped_as_onednn_caps_it(cap: str, expected: str | None):
    assert capped("avx512_core_bf16", cap) == expected


def test_cpu_flags_name_the_levels():
    epyc = frozenset(
        ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"]
    )
    assert level_of(epyc) == "avx512_core_bf16"
    assert level_of(frozenset({"avx2", "fma", "avx_vnni"})) == "avx2_vnni"
    assert level_of(frozenset({"sse4_2"})) is None
    assert level_of(cpu_flags()) is not None or cpu_isa() is None


KERNELS = [
    Float32Linear, Int8Linear, RescoredInt8Linear, BFloat16Linear, RescoredBFloat16Linear,
    Int4Linear,
]  # fmt: skip
TOLERANCE = {
    Float32Linear: 1e-5,
    Int8Linear: 0.03,
    RescoredInt8Linear: 0.03,
    BFloat16Linear: 0.03,
    RescoredBFloat16Linear: 0.03,
    Int4Linear: 0.15,
}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 96), (7, 96), (3, 1, 96), (4, 9, 96)])
def test_a_kernel_computes_what_nn_linear_computes(kernel, shape, bias):
    """Exactly in float32; within quantization error (relative to the output's size)
    in the lower precisions."""
    if issubclass(kernel, BFloat16Linear) and "512" not in (cpu_isa() or ""):
        pytest.skip("bfloat16 needs AVX-512")
    torch.manual_seed(0)
    linear = nn.Linear(96, 160, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected, got = linear(x), kernel(linear)(x)
    assert got.shape == expected.shape
    assert got.dtype == torch.float32
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCE[kernel] * scale)


def test_int4_multiplies_by_its_4_bit_weights_and_gives_4_bit_weights_back():
    """int4's error is its weights' rounding, no more: the product is the dequantized
    weights' (to bfloat16's rounding of inputs and outputs), and quantizing weights that
    are already on a 4-bit grid (a dequantized Q4_1 GGUF's) gives back the same grid."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 160)
    x = torch.randn(5, 96)
    codes, scales_and_zeros = quantize_groups(linear.weight.detach())
    weights = dequantize_groups(codes, scales_and_zeros)
    with torch.inference_mode():
        expected = x.bfloat16().float() @ weights.T + linear.bias
        got = Int4Linear(linear)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0.01 * float(expected.abs().max()))
    assert torch.equal(dequantize_groups(*quantize_groups(weights)), weights)


def test_int4_multiplies_prompts_in_bfloat16_where_native_and_decode_steps_in_4_bits():
    """A prompt (several positions per sequence) goes to a bfloat16 kernel of the same
    4-bit weights where the CPU multiplies bfloat16 natively, else to the 4-bit kernel;
    a decode step (one position) always to the 4-bit kernel; ``four_bits_throughout``
    sends prompts to the 4-bit kernel too."""
    torch.manual_seed(0)
    layer = Int4Linear(nn.Linear(96, 160))
    prompt, step = torch.randn(2, 7, 96), torch.randn(3, 1, 96)
    with torch.inference_mode():
        in_four_bits = layer._product(prompt)
        assert torch.equal(layer(step), layer._product(step))
        assert torch.equal(layer(step[:, 0]), layer._product(step[:, 0]))
        with four_bits_throughout():
            assert torch.equal(layer(prompt), in_four_bits)
        if not at_least("avx512_core_bf16"):
            assert layer.prompts is None
            assert torch.equal(layer(prompt), in_four_bits)
            return
        assert layer.prompts is not None
        assert torch.equal(layer(prompt), layer.prompts(prompt))
        scale = float(in_four_bits.abs().max())  # the same weights and inputs, summed apart
        torch.testing.assert_close(layer(prompt), in_four_bits, rtol=0, atol=0.01 * scale)


def test_a_long_input_goes_in_slices_with_the_same_result():
    torch.manual_seed(0)
    linear = nn.Linear(48, 80)
    x = torch.randn(3, MAX_ROWS_PER_CALL + 90, 48)  # slices of 256 and 90 rows (bucket 96)
    with torch.inference_mode():
        packed = Float32Linear(linear)
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(packed(x)[:, -5:], packed(x[:, -5:]))


def test_a_non_contiguous_input_is_handled():
    linear = nn.Linear(32, 8)
    x = torch.randn(32, 8).t()  # a transposed view
    assert not x.is_contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(Float32Linear(linear)(x), linear(x))


def test_the_engine_packs_every_linear_layer_and_keeps_the_logits(tiny_checkpoint: Path):
    stock = ChatEngine.load(tiny_checkpoint, "stock", pack_weights=False, dtype="float32")
    packed = ChatEngine.load(tiny_checkpoint, "packed", dtype="float32")
    assert not any(type(m) is nn.Linear for m in packed.model.modules())
    # Projections of one input share a product (kernels.fused): every weight is there.
    assert sum(m.out_features for m in packed.model.modules() if type(m) is Float32Linear) == sum(
        m.out_features for m in stock.model.modules() if type(m) is nn.Linear
    )
    assert any(type(m) is ProjectionPart for m in packed.model.modules())
    inputs = {
        "input_ids": torch.tensor([[5, 17, 42, 2]]),
        "decoder_input_ids": torch.tensor([[1, 9]]),
    }
    with torch.inference_mode():
        torch.testing.assert_close(
            packed.model(**inputs).logits, stock.model(**inputs).logits, rtol=1e-4, atol=1e-4
        )


def attention_projections(inputs: int = 32) -> nn.Module:
    attention = nn.Module()
    attention.q_proj, attention.k_proj, attention.v_proj = (
        nn.Linear(inputs, outputs) for outputs in (32, 16, 16)
    )
    return attention


def test_stacked_projections_each_give_their_own_product_and_keep_nothing():
    torch.manual_seed(0)
    attention, x, y = attention_projections(), torch.randn(3, 32), torch.randn(2, 32)
    names = ("q_proj", "k_proj", "v_proj")
    with torch.inference_mode():
        expected = {name: getattr(attention, name)(x) for name in names}
        k_of_y = attention.k_proj(y)
        assert fuse_projections(attention) == 1
        assert {type(getattr(attention, name)) for name in names} == {ProjectionPart}
        shared: SharedProduct = attention.q_proj.shared
        for name in names:
            torch.testing.assert_close(getattr(attention, name)(x), expected[name])
        assert shared._last.parts is None  # every part taken: a long prompt's is not kept
        torch.testing.assert_close(attention.k_proj(y), k_of_y)  # another input: anew
        torch.testing.assert_close(attention.k_proj(x), expected["k_proj"])  # asked again


def test_cross_attention_stacks_only_the_keys_and_values():
    """Its queries read the decoder's state, its keys and values the encoded prompt."""
    model = nn.Module()
    model.encoder_attn, model.self_attn = attention_projections(), attention_projections()
    assert fuse_projections(model) == 2
    assert type(model.encoder_attn.q_proj) is nn.Linear
    assert type(model.encoder_attn.k_proj) is ProjectionPart
    assert type(model.self_attn.q_proj) is ProjectionPart


def test_packing_leaves_other_dtypes_alone():
    model = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 8))
    assert replace_linear_layers(model, Float32Linear) == 1
    assert type(model[0]) is nn.Linear
    assert type(model[1]) is Float32Linear


@pytest.mark.parametrize(
    ("dtype", "body", "head"),
    [("int8", Int8Linear, RescoredInt8Linear), ("int4", Int4Linear, RescoredInt8Linear)],
)  # fmt: skip
def test_the_lm_head_keeps_float32_logits(tiny_checkpoint: Path, dtype, body, head):
    """A lower-precision head would round the logits themselves (precision.LM_HEAD)."""
    engine = ChatEngine.load(tiny_checkpoint, dtype, dtype=dtype)
    kinds = {name: type(m) for name, m in engine.model.named_modules()}
    assert kinds["lm_head"] is head
    assert {kind for name, kind in kinds.items() if name.endswith(".product")} == {body}
    assert {kind for name, kind in kinds.items() if name.endswith("out_proj")} == {body}
    assert not any(kind is nn.Linear for kind in kinds.values())
    assert (engine.info().dtype, engine.info().cpu_isa) == (dtype, cpu_isa())


def test_packing_governs_only_the_layers_left_in_float32(tiny_checkpoint: Path):
    unpacked = ChatEngine.load(tiny_checkpoint, "int8", dtype="int8", pack_weights=False)
    assert type(unpacked.model.lm_head) is RescoredInt8Linear
    assert type(unpacked.model.model.encoder.layers[0].fc1) is Int8Linear
    assert not any(type(m) is Float32Linear for m in unpacked.model.modules())
    stock = ChatEngine.load(tiny_checkpoint, "float32", dtype="float32", pack_weights=False)
    assert not any(isinstance(m, (PackedLinear, ProjectionPart)) for m in stock.model.modules())


@pytest.mark.parametrize("kernel", [RescoredInt8Linear, RescoredBFloat16Linear])
def test_a_rescored_head_gives_its_best_candidates_float32_logits(kernel):
    if issubclass(kernel, BFloat16Linear) and "512" not in (cpu_isa() or ""):
        pytest.skip("bfloat16 needs AVX-512")
    torch.manual_seed(0)
    head, x = nn.Linear(64, 500, bias=False), torch.randn(3, 64)
    with torch.inference_mode():
        exact, got = head(x), kernel(head)(x)
    best = got.topk(kernel.RESCORED, dim=1).indices
    torch.testing.assert_close(got.gather(1, best), exact.gather(1, best), rtol=1e-6, atol=1e-5)
    assert torch.equal(got.argmax(dim=1), exact.argmax(dim=1))


def test_int4_takes_only_layers_of_whole_blocks():
    """Groups of 32 inputs, blocks of 16 outputs; precision.apply gives other layers
    the head's kernel."""
    model = nn.Sequential(nn.Linear(64, 16), nn.Linear(40, 16), nn.Linear(64, 8))
    assert replace_linear_layers(model, Int4Linear) == 1
    assert [type(m) for m in model] == [Int4Linear, nn.Linear, nn.Linear]


@pytest.mark.parametrize(("level", "auto"), [("avx2", "float32"), ("avx512_core_vnni", "float32"),
                                             ("avx512_core_bf16", "bfloat16"),
                                             ("avx512_core_amx", "float32")])  # fmt: skip
def test_auto_is_bfloat16_only_where_the_cpu_multiplies_it_natively(level: str, auto: str):
    """Natively and at full speed: with AMX, bfloat16 must run below it (batch
    invariance), where float32 measured faster."""
    if level not in levels_of_this_cpu():
        pytest.skip(f"this CPU cannot run {level}")
    code = "import torch; from chatbot.engine import precision; "
    code += "print(precision.resolve('auto', torch.device('cpu')).name)"
    resolved = run_capped(level, "-c", code)
    assert resolved.stdout.strip() == auto, resolved.stderr


@pytest.mark.skipif("avx2" not in levels_of_this_cpu(), reason="needs an AVX2 CPU")
def test_bfloat16_without_avx512_is_refused_with_the_reason():
    code = "import torch; from chatbot.engine import precision; "
    code += "precision.resolve('bfloat16', torch.device('cpu'))"
    refused = run_capped("avx2", "-c", code)
    assert refused.returncode != 0
    assert "CHATBOT_DTYPE=bfloat16 needs a CPU with AVX-512 (this one runs avx2)" in refused.stderr


def test_skipping_padding_keeps_every_real_positions_output(engine: ChatEngine):
    """The encoder of a padded batch gives real positions the same states with or
    without computing the padding, and generate's beam copies are covered too."""
    texts = ["hi", "a much longer message than hi"]
    ids = [engine.encode(request).input_ids for request in _requests(texts)]
    inputs = engine.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    real = inputs["attention_mask"].bool()
    assert not real.all()
    encoder = engine.model.get_encoder()
    with torch.inference_mode():
        padded = encoder(**inputs).last_hidden_state
        with skip_redundant_rows(inputs["attention_mask"], copies=3):
            skipped = encoder(**inputs).last_hidden_state
            beams = {k: v.repeat_interleave(3, dim=0) for k, v in inputs.items()}
            skipped_beams = encoder(**beams).last_hidden_state
    assert torch.equal(skipped[real], padded[real])
    assert not torch.equal(skipped, padded)  # the padding really was skipped
    real_beams = real.repeat_interleave(3, dim=0)
    assert torch.equal(skipped_beams[real_beams], padded.repeat_interleave(3, dim=0)[real_beams])


def _requests(texts: list[str], **options) -> list[ChatRequest]:
    return [ChatRequest(messages=[{"role": "user", "content": t}], **options) for t in texts]


def kernels_built(capfd: pytest.CaptureFixture[str], work: Callable[[], object]) -> list[str]:
    """The oneDNN products (inner_product) whose kernel ``work`` had to build: oneDNN's
    verbose mode prints a ``cache_miss`` line for each one it creates."""
    capfd.readouterr()
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
        work()
    printed = capfd.readouterr().out.splitlines()
    return [line for line in printed if "cache_miss" in line and "inner_product" in line]


@pytest.mark.parametrize("family", ["engine", "chat_engine"], ids=["blenderbot", "decoder-only"])
def test_after_loading_no_batch_or_prompt_size_builds_a_kernel(family, request, capfd):
    """Kernels are built per row count and kept: all of them are built at load, so a
    service's memory does not creep up as new prompt and batch sizes arrive."""
    engine: ChatEngine = request.getfixturevalue(family)
    sentence = "so what do you like to do on weekends with your friends "
    conversations = [sentence[: 3 + 5 * n] * (1 + n // 4) for n in range(24)]  # 3 to 600 chars

    def varied_traffic() -> None:
        for size, beams in ((1, 1), (3, 4), (7, 1), (24, 1), (5, 10)):
            options = {"num_beams": beams, "max_new_tokens": 6}
            engine.generate(_requests(conversations[:size], **options))

        async def decode_loop() -> None:  # rows come and go at every step
            batcher = ContinuousBatcher(engine, 128, 256)
            try:
                await asyncio.gather(*(batcher.reply(r) for r in _requests(conversations)))
            finally:
                batcher.close()

        asyncio.run(decode_loop())

    assert kernels_built(capfd, varied_traffic) == []


def test_a_kernel_being_built_is_seen(capfd):
    """What the test above relies on: a layer of a shape not packed before builds one."""
    new_shape = Float32Linear(nn.Linear(24, 40))
    assert len(kernels_built(capfd, lambda: new_shape(torch.randn(5, 24)))) == 1


@pytest.mark.skipif(library() is None, reason="no C compiler: torch's operations serve")
@pytest.mark.parametrize("zero_point", [0, 128])
@pytest.mark.parametrize(("rows", "features"), [(1, 1280), (7, 40), (32, 5120), (3, 17)])
def test_int8_activations_are_torchs_to_the_bit_in_one_pass(
    rows: int, features: int, zero_point: int
):
    """``quantize.c`` replaces eight torch operations around each int8 product; a
    compiled step still traces those operations, so both must give the same bytes and
    floats (ties round to even, zero rows get the smallest scale)."""
    generator = torch.Generator().manual_seed(rows * features)
    x = torch.randn(rows, features, generator=generator) * 10
    x[0, :3] = torch.tensor([0.5, -2.5, 1e-30])
    x[-1] = 0.0
    quantized, scales = quantize_rows(x, zero_point)
    expected_scales = absmax_scales(x)
    expected = x.div(expected_scales).round_()
    expected = expected.add_(zero_point).to(torch.uint8) if zero_point else expected.to(torch.int8)
    assert torch.equal(quantized, expected)
    assert torch.equal(scales, expected_scales)
    products, bias = torch.randn(rows, 300, generator=generator), torch.randn(300)
    for added in (bias, None):
        by_torch = products.clone().mul_(scales)
        by_torch = by_torch if added is None else by_torch.add_(added)
        assert torch.equal(scale_rows(products.clone(), scales, added), by_torch)


FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines


@pytest.mark.skipif(not FBGEMM, reason="this torch has no fbgemm")
@pytest.mark.parametrize("fbgemm", [False, True], ids=["onednn", "fbgemm"])
def test_int8_products_are_the_exact_sums_by_either_library(
    fbgemm: bool, monkeypatch: pytest.MonkeyPatch
):
    """oneDNN multiplies int8 on CPUs with VNNI, fbgemm on the others (faster there);
    both must give every row the integer sums times the two scales, to the bit, alone
    or beside other rows, so a reply does not depend on which library this CPU has."""
    generator = torch.Generator().manual_seed(5)
    linear = nn.Linear(1280, 320)
    x = torch.randn(48, 1280, generator=generator) * 3
    monkeypatch.setattr("chatbot.engine.kernels.int8.fbgemm_multiplies", lambda: fbgemm)
    layer = Int8Linear(linear)
    assert ("fbgemm" in layer.kernel) is fbgemm
    weight_scales = absmax_scales(linear.weight.detach(), weight_range()).squeeze(1)
    weights = (linear.weight.detach() / weight_scales[:, None]).round().long()
    levels, scales = quantize_rows(x, 0)
    exact = (levels.long() @ weights.T).float().mul_(weight_scales).mul_(scales).add_(linear.bias)
    together = layer(x)
    assert torch.equal(together, exact)
    assert all(torch.equal(layer(x[i : i + 1])[0], together[i]) for i in (0, 17, 47))
