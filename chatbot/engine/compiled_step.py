"""The Llama step for one conversation, compiled ahead of time (AOTInductor).

When one person chats alone, a SmolLM2 token is 30 layers of about 35 small torch
calls each beside the weight products, and the calls take about 40% of the step (the
int4 products 4.7 ms of 12). ``torch.export`` plus AOTInductor turn ``LlamaLayers``
for one row into one C++ function: measured 1.58x the eager step in int4 and 2.51x in
int8 (``benchmarks/aoti_probe.py``).
``torch.compile`` would pay its 100-210 s at every start; this package is built once
per model, precision, CPU and code version (SmolLM2: 48-58 s in int4, 83-98 s in int8,
in a subprocess, while the eager step serves) and loads in 0.2 s from then on.

**Exact or not used.** The decode loop promises ``generate``'s replies, so the compiled
step must give the eager step's values to the bit. Inductor's own reduction for
``rms_norm``'s mean sums in another order than ATen's, so that one reduction stays
ATen's (``atens_mean``); everything else (products, rotation, attention, cache
writes) is inductor's, and agrees. A package is attached to a step only after it gave the eager
layers' outputs and cache writes bit for bit on random inputs (``verified``); a CPU,
torch or code change that breaks this leaves the eager step serving.

**Kernels chosen by measurement where that stays exact.** Where every product of the
layers sums in integers and is scaled without a zero point (``int8`` with AMX,
``PackedLinear.sums_exactly``), every exact kernel gives the same floats, so inductor
may replace oneDNN's with its own, chosen by timing both (max-autotune): its AMX int8
kernel multiplies one row 3-6x faster than oneDNN's, which streams the weights at
about 9 GB/s here. Float products (int4's bfloat16 sums, float32) would change with
the kernel's order of summing: they keep ATen's and oneDNN's, and the build skips the
autotuning minute. The LM head of ``int4`` and ``int8`` is such an int8 product (its
best candidates rescored in float32 after it, ``kernels.rescored``), and the largest
matrix a step reads: its product of one row is a second package, always autotuned
(``HeadProduct``), verified against the head's own kernel like the layers.

Only steps of one row use it: a batch's rows take the eager step, whose values per
row are the same (every kernel computes each row alone), so a reply does not depend
on whether it ran alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel

from chatbot.engine.kernels.cpu import cpu_isa
from chatbot.engine.kernels.rescored import Rescored
from chatbot.engine.kernels.rows import PackedLinear
from chatbot.engine.llama_step import LlamaLayers, LlamaStep, Rotation, StepRows
from chatbot.engine.model_step import ModelStep, _Run
from chatbot.engine.slots import RowSlots

logger = logging.getLogger(__name__)

BUILD_LIMIT_S = 900
"""A build that takes longer (SmolLM2: under a minute) is stopped; the eager step serves."""

BUILD_NICENESS = 10
"""The build yields the cores to the service, which serves eagerly meanwhile: a reply
should not wait on a compile that only makes later replies faster."""

SOURCES = Path(__file__).resolve().parent
"""The engine's code, part of every package's key: a code change builds anew."""


class OneRowLayers(nn.Module):
    """``layers`` for one row, with the step's state as inputs: what is exported.

    Inputs: the row's (1, hidden) embedding, its rotation, its (1,) position, a tensor
    as long as the reply so far (its length is the attention's width, dynamic), and each
    layer's (1, heads, capacity, head_dim) key and value buffers (written in place)."""

    def __init__(self, model: PreTrainedModel, layers: LlamaLayers) -> None:
        super().__init__()
        self.model = model  # a submodule: its weights are the program's parameters
        self.layers = layers

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        signed_sin: torch.Tensor,
        position: torch.Tensor,
        width_of: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> torch.Tensor:
        width = width_of.shape[0]
        at = (torch.zeros(1, dtype=torch.long, device=position.device), position)
        step = StepRows(at, Rotation(cos, signed_sin), [_Run(slice(0, 1), width)], width)
        return self.layers(hidden, step, RowSlots.over(keys, values))


def inputs_of(
    hidden: torch.Tensor, rotation: Rotation, position: torch.Tensor, width: int, slots: RowSlots
) -> tuple:
    """``OneRowLayers``' inputs for row 0 of ``slots`` at ``position``."""
    width_of = torch.empty(width, device=hidden.device)  # only its length is read
    keys, values = [k[:1] for k in slots.keys], [v[:1] for v in slots.values]
    return hidden, rotation.cos, rotation.signed_sin, position, width_of, keys, values


def random_inputs(step: LlamaStep, width: int, capacity: int) -> tuple:
    """Inputs of a row that has ``width - 1`` random keys and values, in fresh slots:
    the same for the same arguments."""
    generator = torch.Generator().manual_seed(0)
    slots = step.slots
    scratch = RowSlots(
        len(slots.keys), slots.heads, capacity, slots.head_dim, slots.dtype, step.device
    )
    scratch.reserve(1, capacity)
    for buffer in (*scratch.keys, *scratch.values):
        buffer.copy_(torch.randn(buffer.shape, generator=generator))
    hidden_size = step.embed.weight.shape[1]
    hidden = torch.randn(1, hidden_size, generator=generator).to(step.device)
    position = torch.tensor([width - 1], device=step.device)
    return inputs_of(hidden, step.rotation.at(position), position, width, scratch)


def export(step: LlamaStep) -> torch.export.ExportedProgram:
    """``OneRowLayers`` of ``step``'s model, for any width and buffer capacity."""
    most = step.slots.max_positions
    width = torch.export.Dim("width", min=2, max=most)
    capacity = torch.export.Dim("capacity", min=2, max=most)
    example = random_inputs(step, width=5, capacity=16)
    buffers = [{2: capacity}] * len(step.slots.keys)
    dynamic = (None, None, None, None, {0: width}, buffers, buffers)
    with torch.no_grad():
        exported = OneRowLayers(step.model, step.layers)
        return torch.export.export(exported, example, dynamic_shapes=dynamic)


class HeadProduct(nn.Module):
    """A rescored LM head's cheap product of one row (``Rescored.cheap_product``): what
    is exported for the head. Its best candidates are computed again in float32 after
    it, eagerly, as for any row count."""

    def __init__(self, head: Rescored) -> None:
        super().__init__()
        self.head = head

    def forward(self, row: torch.Tensor) -> torch.Tensor:
        return self.head.cheap_product(row)


def exact_head(model: PreTrainedModel) -> Rescored | None:
    """``model``'s LM head, if it is rescored after a product that any exact kernel
    computes alike (int4's and int8's int8 head, with AMX): inductor may pick one."""
    head = model.get_output_embeddings()
    return head if isinstance(head, Rescored) and head.sums_exactly else None


def export_head(head: Rescored) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(HeadProduct(head), (torch.randn(1, head.in_features),))


def package_name(source: str | Path, dtype: str, pack_weights: bool) -> str:
    """The package's file name: a digest of all it depends on (the model's files, how
    they are loaded, the CPU, torch and this engine's code)."""
    digest = hashlib.sha256()
    for part in (torch.__version__, str(cpu_isa()), dtype, str(pack_weights)):
        digest.update(part.encode() + b"\0")
    for file in sorted(Path(source).rglob("*")):
        if file.is_file():
            stat = file.stat()
            digest.update(
                f"{file.relative_to(source)} {stat.st_size} {stat.st_mtime_ns}\0".encode()
            )
    for file in sorted(SOURCES.rglob("*.py")):
        digest.update(file.read_bytes())
    return f"llama-one-row-{digest.hexdigest()[:16]}.pt2"


def atens_mean() -> None:
    """Have inductor call ATen's ``mean`` (the reduction in ``rms_norm``) rather than
    generate its own loop, which sums in another order: SmolLM2's logits changed from
    its third step on. The norm's pointwise operations are inductor's, and agree. For
    the build's own process only: it changes inductor for the whole process."""
    from torch._inductor import lowering

    lowering.make_fallback(torch.ops.aten.mean.dim, warn=False)


def sums_exactly(layers: nn.Module) -> bool:
    """Whether every product in ``layers`` gives the same floats in any exact kernel
    (``PackedLinear.sums_exactly``), so that inductor may pick its own kernels."""
    products = [m for m in layers.modules() if isinstance(m, PackedLinear | nn.Linear)]
    return bool(products) and all(getattr(m, "sums_exactly", False) for m in products)


def build(source: str | Path, dtype: str, pack_weights: bool, package: Path) -> None:
    """Load the model as the service does, export its one-row layers and compile them
    into ``package`` (written whole or not at all)."""
    from chatbot.engine.chat_engine import ChatEngine  # the service's own loading

    engine = ChatEngine.load(source, "compiled step", pack_weights=pack_weights, dtype=dtype)
    step = engine.model_step()
    if not isinstance(step, LlamaStep):
        raise TypeError(f"{source} is not served by the Llama step")
    atens_mean()
    package.parent.mkdir(parents=True, exist_ok=True)
    head = exact_head(step.model)
    if head is not None:  # first: the layers' package, written last, says both are done
        compile_into(head_package(package), export_head(head), autotune=True)
    compile_into(package, export(step), autotune=sums_exactly(step.model.model.layers))


def compile_into(package: Path, program: torch.export.ExportedProgram, autotune: bool) -> None:
    """AOTInductor's package of ``program``, written whole or not at all; ``autotune``:
    inductor picks each product's kernel by timing its own against ATen's and oneDNN's."""
    options = {"max_autotune": autotune, "max_autotune_gemm_backends": "CPP,ATEN"}
    with tempfile.TemporaryDirectory(dir=package.parent) as building:
        built = torch._inductor.aoti_compile_and_package(
            program, package_path=str(Path(building) / package.name), inductor_configs=options
        )
        os.replace(built, package)


def head_package(package: Path) -> Path:
    """Where the LM head's package goes, beside the layers' ``package``."""
    return package.with_name(f"{package.stem}-head{package.suffix}")


class CompiledOneRow:
    """A loaded package, called as ``LlamaStep`` calls its one-row layers."""

    def __init__(self, package: Path) -> None:
        self.runner = torch._inductor.aoti_load_package(str(package))

    def __call__(
        self,
        hidden: torch.Tensor,
        rotation: Rotation,
        position: torch.Tensor,
        width: int,
        slots: RowSlots,
    ) -> torch.Tensor:
        return self.runner(*inputs_of(hidden, rotation, position, width, slots))


def verified(step: LlamaStep, runner: Callable[..., torch.Tensor]) -> bool:
    """Whether ``runner`` (a package's, on ``OneRowLayers``' inputs) gives ``step``'s
    eager layers' outputs and key/value writes to the bit, at a few widths."""
    with torch.inference_mode():
        for width, capacity in ((2, 16), (37, 64), (100, 128)):
            eager_inputs = random_inputs(step, width, capacity)
            compiled_inputs = random_inputs(step, width, capacity)
            eager = OneRowLayers(step.model, step.layers)(*eager_inputs)
            out = runner(*compiled_inputs)
            eager_buffers = [*eager_inputs[5], *eager_inputs[6]]
            compiled_buffers = [*compiled_inputs[5], *compiled_inputs[6]]
            if not torch.equal(eager, out) or not all(
                map(torch.equal, eager_buffers, compiled_buffers)
            ):
                return False
    return True


def head_verified(head: Rescored, runner: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``runner`` (the head package's) gives ``head``'s cheap product of a row to
    the bit, on a few random rows."""
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(3):
            row = torch.randn(1, head.in_features, generator=generator)
            if not torch.equal(runner(row), head.cheap_product(row)):
                return False
    return True


def attach(step: LlamaStep, source: str | Path, dtype: str, pack_weights: bool, cache: Path) -> str:
    """Give ``step`` its compiled one-row layers, building the package first if
    ``cache`` has none for this model and machine; what happened, in words."""
    package = cache / package_name(source, dtype, pack_weights)
    started = time.perf_counter()
    if not package.exists():
        command = [
            sys.executable,
            "-m",
            __name__,
            str(source),
            dtype,
            str(pack_weights),
            str(package),
        ]
        try:
            done = subprocess.run(
                command,
                cwd=SOURCES.parent.parent,
                capture_output=True,
                text=True,
                timeout=BUILD_LIMIT_S,
            )
        except subprocess.TimeoutExpired:
            return f"could not compile the one-row step in {BUILD_LIMIT_S} s"
        if done.returncode != 0:
            return f"could not compile the one-row step: {done.stderr.strip()[-2000:]}"
    compiled = CompiledOneRow(package)
    if not verified(step, compiled.runner):
        return f"{package} does not give the eager step's values: not used"
    head = exact_head(step.model)
    if head is not None:
        head_runner = torch._inductor.aoti_load_package(str(head_package(package)))
        if not head_verified(head, head_runner):
            return f"{head_package(package)} does not give the eager head's values: not used"
        head.one_row = head_runner
    step.one_row = compiled
    return f"one-row step compiled ({package.name}, ready in {time.perf_counter() - started:.1f} s)"


class Compilation:
    """How a decode step's compilation stands: ``eager`` (nothing to compile, or it
    failed), ``compiling`` (in the background; the eager step serves meanwhile) or
    ``compiled`` (steps of one row run the package)."""

    def __init__(self, step: ModelStep | None = None, thread: threading.Thread | None = None):
        self.step, self.thread = step, thread

    @property
    def state(self) -> Literal["eager", "compiling", "compiled"]:
        if isinstance(self.step, LlamaStep) and self.step.one_row is not None:
            return "compiled"
        return "compiling" if self.thread is not None and self.thread.is_alive() else "eager"


def attach_in_background(
    step: ModelStep, source: str | Path, dtype: str, pack_weights: bool, cache: Path
) -> Compilation:
    """``attach`` in a thread of its own, for a Llama step on the CPU, while the step
    serves eagerly; it logs what happened."""
    if not isinstance(step, LlamaStep) or step.device.type != "cpu":
        return Compilation(step)

    def attach_and_say() -> None:
        try:
            logger.info(attach(step, source, dtype, pack_weights, cache))
        except Exception:  # the eager step serves on; say why the compiled one won't
            logger.exception("the one-row step could not be compiled; the eager step serves")

    thread = threading.Thread(target=attach_and_say, name="compile-one-row", daemon=True)
    thread.start()
    return Compilation(step, thread)


if __name__ == "__main__":
    os.nice(BUILD_NICENESS)
    source, dtype, pack, target = sys.argv[1:]
    build(source, dtype, pack == "True", Path(target))
