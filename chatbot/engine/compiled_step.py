"""One conversation's decode step, compiled ahead of time (AOTInductor).

When one person chats alone, a token is every decoder layer's weight products plus
dozens of small torch calls around them (norms, the int8 activations' quantization,
attention's reshapes), and the calls take a large share of the step: 40% of a SmolLM2
int4 step (30 layers of about 35 calls), 28% of a Blenderbot-400M int8 step.
``torch.export`` plus AOTInductor turn a step's layers for one row
(``OneRowCompilable.one_row_layers``: ``LlamaStep``'s and ``EncoderDecoderStep``'s)
into one C++ function: measured 1.58x the eager step in int4 and 2.51x in int8 on
SmolLM2, 1.48x in int8, 1.24x in float32 and 1.17x in bfloat16 on Blenderbot-400M
(``benchmarks/aoti_probe.py``).
``torch.compile`` would pay its 100-210 s at every start; this package is built once
per model, precision, CPU and code version (SmolLM2: 48-58 s in int4, 83-98 s in int8;
Blenderbot-400M: 45-56 s; in a subprocess, while the eager step serves) and loads in
0.2-3 s from then on. It holds its own copy of the weights as the kernels take them
(Blenderbot-400M in int8: a 282 MB file, 540 MB more memory).

**Exact or not used.** The decode loop promises ``generate``'s replies, so the compiled
step must give the eager step's values to the bit. Inductor's own code for a few
operations computes them otherwise, so those stay ATen's (``ATENS_OWN``: the norms'
reductions and ``gelu``); attention is the engine's own kernel, which the package
calls back as an operator (``kernels.attention``); everything else (products,
rotation, quantizing activations, cache writes) is inductor's, and agrees. A package
is attached to a step only after it gave the eager layers' outputs and cache writes
bit for bit on random inputs (``verified``); a CPU, torch or code change that breaks
this leaves the eager step serving.

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

**Batches too.** Where decode attention is the engine's kernel (``kernels.attention``,
which takes each row's length as a tensor), a second package holds the layers for any
number of rows (2 to ``MAX_ROWS_PER_CALL``; ``OneRowCompilable.batch_layers``): every
row's length and prompt row are inputs, and each product's rows are padded to the
bucket the eager step pads them to (``padded_by``), so its kernel is the eager step's
and a row's values do not depend on the rows beside it. At 32 Blenderbot-400M
conversations in int8 a step took 81.0 ms instead of 91.6 (2-core EPYC); it is
verified like the one-row package, at 2, 9 and 33 rows, and built in the same
subprocess (about twice the build time; a second copy of the weights, 540 MB more for
Blenderbot-400M in int8). Compiled or eager, a step of any size gives every row the
same values, so a reply does not depend on whether it ran alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from transformers import PreTrainedModel

from chatbot.engine.cpu import cpu_isa
from chatbot.engine.kernels import attention, native
from chatbot.engine.kernels.rescored import Rescored
from chatbot.engine.kernels.rows import PackedLinear
from chatbot.engine.model_step import ModelStep, OneRowCompilable
from chatbot.settings import used_longest_ago

logger = logging.getLogger(__name__)

BUILD_LIMIT_S = 900
"""A build that takes longer (SmolLM2 or Blenderbot-400M: a minute to three on two
cores) is stopped; the eager step serves."""

BUILD_NICENESS = 10
"""The build yields the cores to the service, which serves eagerly meanwhile: a reply
should not wait on a compile that only makes later replies faster."""

SOURCES = Path(__file__).resolve().parent
"""The engine's code, part of every package's key: a code change builds anew."""


def export(step: OneRowCompilable) -> torch.export.ExportedProgram:
    """``step``'s one-row layers, for any width and buffer capacity."""
    with torch.no_grad():
        return torch.export.export(
            step.one_row_layers(), step.example_inputs(width=5, capacity=16),
            dynamic_shapes=step.dynamic_shapes(),
        )  # fmt: skip


def export_batch(step: OneRowCompilable) -> torch.export.ExportedProgram:
    """``step``'s layers for a batch, for any row count, width and buffer capacity
    (traced on 17 rows: padded by 3, a padding that a size of 0 or 1 would fix)."""
    with torch.no_grad():
        return torch.export.export(
            step.batch_layers(), step.batch_example_inputs(rows=17, width=5, capacity=16),
            dynamic_shapes=step.batch_dynamic_shapes(),
        )  # fmt: skip


def batches(step: ModelStep) -> bool:
    """Whether ``step``'s batches compile: they attend with ``kernels.attention`` only."""
    return attention.runs_on(step.model)


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


def package_name(family: str, source: str | Path, dtype: str, pack_weights: bool) -> str:
    """The package's file name: the step's family, and a digest of all it depends on
    (the model's files, how they are loaded, the CPU, torch and this engine's code)."""
    digest = hashlib.sha256()
    attending = "rows kernel" if attention.library() else "sdpa"  # ``kernels.attention``
    for part in (torch.__version__, str(cpu_isa()), dtype, str(pack_weights), attending):
        digest.update(part.encode() + b"\0")
    for file in sorted(Path(source).rglob("*")):
        if file.is_file():
            stat = file.stat()
            digest.update(
                f"{file.relative_to(source)} {stat.st_size} {stat.st_mtime_ns}\0".encode()
            )
    for file in sorted([*SOURCES.rglob("*.py"), *SOURCES.rglob("*.c")]):
        digest.update(file.read_bytes())
    return f"{family}-one-row-{digest.hexdigest()[:16]}.pt2"


ATENS_OWN = (
    torch.ops.aten.mean.dim,
    torch.ops.aten.native_layer_norm.default,
    torch.ops.aten.gelu.default,
)
"""Operations the package leaves to ATen's kernels, as the eager step runs them:
inductor's own code computes them otherwise. Its ``mean`` (in Llama's ``rms_norm``)
and ``layer_norm`` (Blenderbot's) sum in another order, and its ``gelu`` rounds
``erf`` otherwise: SmolLM2's logits changed from the third step on, and Blenderbot's
layers agreed to the bit only with all of these ATen's."""


def atens_own() -> None:
    """Have inductor call ATen for ``ATENS_OWN``. For the build's own process only: it
    changes inductor for the whole process."""
    from torch._inductor import decomposition, lowering

    for op in ATENS_OWN:
        decomposition.decompositions.pop(op, None)
        lowering.make_fallback(op, warn=False, override_decomp=True)


def sums_exactly(layers: nn.Module) -> bool:
    """Whether every product in ``layers`` gives the same floats in any exact kernel
    (``PackedLinear.sums_exactly``), so that inductor may pick its own kernels."""
    products = [m for m in layers.modules() if isinstance(m, PackedLinear | nn.Linear)]
    return bool(products) and all(getattr(m, "sums_exactly", False) for m in products)


def build(
    source: str | Path, dtype: str, pack_weights: bool, package: Path, with_batches: bool
) -> None:
    """Load the model as the service does, export its one-row layers (and its batch
    layers, ``with_batches``) and compile them into ``package`` (written whole or not
    at all; the batch layers' beside it, ``batch_package``)."""
    from chatbot.engine.chat_engine import ChatEngine  # the service's own loading

    engine = ChatEngine.load(source, "compiled step", pack_weights=pack_weights, dtype=dtype)
    step = engine.model_step()
    if not isinstance(step, OneRowCompilable):
        raise TypeError(f"{source} is not served by a step that compiles")
    atens_own()
    package.parent.mkdir(parents=True, exist_ok=True)
    head = exact_head(step.model)
    autotune = sums_exactly(step.decoder_layers())
    if head is not None:  # first: the layers' package, written last, says all are done
        compile_into(head_package(package), export_head(head), autotune=True)
    if with_batches and batches(step):
        compile_into(batch_package(package), export_batch(step), autotune=autotune)
    compile_into(package, export(step), autotune=autotune)


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


KEPT_PACKAGES = 6
"""Packages a cache keeps: each code, torch or model change builds another (270-540 MB
for Blenderbot-400M), and those of earlier versions are never used again."""


def prune(cache: Path, keep: int) -> None:
    """Delete all but the ``keep`` packages of ``cache`` used last (with their head's
    and batch's), so that it does not grow with every upgrade."""
    named = re.compile(r"-one-row-[0-9a-f]{16}\.pt2$")  # ``package_name``'s
    layers = (path for path in cache.glob("*.pt2") if named.search(path.name))
    for package in used_longest_ago(layers, keep):
        for file in (head_package(package), batch_package(package), package):
            file.unlink(missing_ok=True)


def batch_package(package: Path) -> Path:
    """Where the batch layers' package goes, beside the one-row layers' ``package``."""
    return package.with_name(f"{package.stem}-batch{package.suffix}")


WIDTHS = ((2, 16), (37, 64), (100, 128))
"""(width, buffer capacity) of the inputs a package is verified on."""
BATCH_ROWS = (2, 9, 33)
"""Row counts a batch package is verified on: padded to their bucket by 0, 1 and 7."""


def verified(step: OneRowCompilable, runner: Callable[..., torch.Tensor]) -> bool:
    """Whether ``runner`` (a package's, on ``step.one_row_layers``' inputs) gives the
    eager layers' outputs and key/value writes to the bit, at a few widths."""
    cases = [partial(step.example_inputs, *shape) for shape in WIDTHS]
    return _agrees(step.one_row_layers(), runner, cases)


def batch_verified(step: OneRowCompilable, runner: Callable[..., torch.Tensor]) -> bool:
    """``verified`` for a batch package (``step.batch_layers``' inputs), at a few row
    counts and widths."""
    cases = [
        partial(step.batch_example_inputs, rows, *shape)
        for rows, shape in zip(BATCH_ROWS, WIDTHS, strict=True)
    ]
    return _agrees(step.batch_layers(), runner, cases)


def _agrees(
    layers: nn.Module, runner: Callable[..., torch.Tensor], cases: Sequence[Callable[[], tuple]]
) -> bool:
    """Whether ``runner`` gives ``layers``' outputs and buffer writes to the bit on each
    case's inputs (made twice: the same values each time)."""
    with torch.inference_mode():
        for inputs in cases:
            eager_inputs, compiled_inputs = inputs(), inputs()
            eager, out = layers(*eager_inputs), runner(*compiled_inputs)
            written = zip(tree_leaves(eager_inputs), tree_leaves(compiled_inputs), strict=True)
            if not torch.equal(eager, out) or not all(torch.equal(*pair) for pair in written):
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


def attach(
    step: OneRowCompilable,
    source: str | Path,
    dtype: str,
    pack_weights: bool,
    cache: Path,
    with_batches: bool = True,
    niceness: int = BUILD_NICENESS,
) -> str:
    """Give ``step`` its compiled one-row layers, and its batch layers ``with_batches``
    where batches compile (``batches``), building the packages first (in a subprocess,
    at ``niceness``) if ``cache`` lacks one for this model and machine; what happened,
    in words."""
    package = cache / package_name(step.compiled_name, source, dtype, pack_weights)
    with_batches = with_batches and batches(step)
    started = time.perf_counter()
    if package.exists() and (batch_package(package).exists() or not with_batches):
        package.touch()  # used: the last to go (``prune``)
    else:
        prune(cache, KEPT_PACKAGES - 1)
        command = [
            sys.executable,
            "-m",
            __name__,
            str(source),
            dtype,
            str(pack_weights),
            str(package),
            str(with_batches),
            str(niceness),
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
    native.operators()  # loaded before a package runs: the packages call them back
    compiled = load(package)
    if not verified(step, compiled):
        return f"{package} does not give the eager step's values: not used"
    head = exact_head(step.model)
    if head is not None:
        head_runner = load(head_package(package))
        if not head_verified(head, head_runner):
            return f"{head_package(package)} does not give the eager head's values: not used"
        head.one_row = head_runner
    batched = _attach_batch(step, batch_package(package)) if with_batches else ""
    step.one_row = compiled  # last: ``Compilation`` says "compiled" once all is in
    ready = time.perf_counter() - started
    return f"one-row step compiled ({package.name}, ready in {ready:.1f} s){batched}"


_EXTRACTING = threading.Lock()


def load(package: Path) -> Callable[..., torch.Tensor]:
    """``package``'s program, loaded. AOTInductor's loader unpacks a package into a
    folder of its own under the system's temporary folder and never removes it, not
    even when loading fails: every start of the service left 0.3-1.1 GB there per
    package, and a day of tests filled this machine's disk. So the loader unpacks
    into a folder of ours (``TMPDIR``, which it reads), removed once the program is
    loaded: its library and weights stay mapped, as files removed on Linux do."""
    with _EXTRACTING, tempfile.TemporaryDirectory(prefix="aoti-", dir=package.parent) as folder:
        before = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = folder
        try:
            return torch._inductor.aoti_load_package(str(package))
        finally:
            if before is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = before


def _attach_batch(step: OneRowCompilable, package: Path) -> str:
    """Give ``step`` the batch layers of ``package`` if they give the eager layers'
    values; what happened, as a clause of ``attach``'s words."""
    batch = load(package)
    if not batch_verified(step, batch):
        return f"; {package} differs: not used"
    step.batch = batch
    return "; batches compiled"


class Compilation:
    """How a decode step's compilation stands: ``eager`` (nothing to compile, or it
    failed), ``compiling`` (in the background; the eager step serves meanwhile) or
    ``compiled`` (steps of one row run the package, and batches theirs where built)."""

    def __init__(self, step: ModelStep | None = None, thread: threading.Thread | None = None):
        self.step, self.thread = step, thread

    @property
    def state(self) -> Literal["eager", "compiling", "compiled"]:
        if isinstance(self.step, OneRowCompilable) and self.step.one_row is not None:
            return "compiled"
        return "compiling" if self.thread is not None and self.thread.is_alive() else "eager"


def attach_in_background(
    step: ModelStep,
    source: str | Path,
    dtype: str,
    pack_weights: bool,
    cache: Path,
    with_batches: bool = True,
) -> Compilation:
    """``attach`` in a thread of its own, for a step that compiles, on the CPU, while
    the step serves eagerly; it logs what happened."""
    if not isinstance(step, OneRowCompilable) or step.device.type != "cpu":
        return Compilation(step)

    def attach_and_say() -> None:
        try:
            logger.info(attach(step, source, dtype, pack_weights, cache, with_batches))
        except Exception:  # the eager step serves on; say why the compiled one won't
            logger.exception("the one-row step could not be compiled; the eager step serves")

    thread = threading.Thread(target=attach_and_say, name="compile-one-row", daemon=True)
    thread.start()
    return Compilation(step, thread)


if __name__ == "__main__":
    source, dtype, pack, target, with_batches, niceness = sys.argv[1:]
    os.nice(int(niceness))
    build(source, dtype, pack == "True", Path(target), with_batches == "True")
