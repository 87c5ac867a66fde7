"""The engine's operators in C++ (``kernels/operators.cpp``, built by ``native``): a
compiled step calls them back with no Python, and they give what their Python kernels
(which serve without a C++ compiler) give, to the bit."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatbot.engine.kernels import attention, int8, native
from chatbot.settings import user_cache

pytestmark = pytest.mark.skipif(
    "fbgemm" not in torch.backends.quantized.supported_engines, reason="torch without fbgemm"
)


@pytest.fixture(autouse=True)
def operators_cpp() -> None:
    """(A fixture, not a mark: importing this module must not load the library.)"""
    if not native.operators():
        pytest.skip("no C++ compiler: Python kernels serve")


OPERATORS = ("chatbot::attend_rows", "chatbot::int8_fbgemm")


def operator_outputs() -> list[torch.Tensor]:
    """Each operator on the same seeded inputs (fbgemm's weights kept as on a CPU
    without VNNI, where it multiplies int8)."""
    generator = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 4, 16, 30, 40, generator=generator).unbind()
    query = torch.randn(6, 16, 1, 40, generator=generator)
    rows, lengths = torch.tensor([0, 3, 3, 1, 2, 0]), torch.tensor([1, 30, 9, 17, 8, 2])
    weights, scales = fbgemm_weights(generator)
    named = int8.FbgemmWeights.of(weights, scales)
    assert named is not None
    levels = torch.randint(-127, 128, (5, 200), generator=generator).float()
    return [
        attention.attend_rows(query, keys, values, rows, lengths, 0.2),
        torch.ops.chatbot.int8_fbgemm(levels, named.name),
    ]


def fbgemm_weights(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    weights = torch.randint(-63, 64, (96, 200), generator=generator, dtype=torch.int8)
    return weights, torch.rand(96, generator=generator) + 0.01


BY_PYTHON = """
import sys, torch
from chatbot.engine.kernels import int8, native
from test_operators import operator_outputs
int8.fbgemm_multiplies = lambda: True
assert native.library() is not None and not native.operators()
torch.save(operator_outputs(), sys.argv[1])
"""


def test_the_cpp_kernels_give_what_the_python_ones_give(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A machine whose C++ compiler fails (``CXX=false``) builds the C kernels alone and
    serves the operators from Python: the same values."""
    for name in OPERATORS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
    monkeypatch.setattr(int8, "fbgemm_multiplies", lambda: True)
    by_cpp = operator_outputs()
    saved = tmp_path / "by-python.pt"
    env = {
        **os.environ,
        "CXX": "false",
        "XDG_CACHE_HOME": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(Path.cwd()), str(Path(__file__).parent)]),
    }
    command = [sys.executable, "-c", BY_PYTHON, str(saved)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "operators.cpp did not compile, Python's kernels serve" in done.stderr
    for cpp, python in zip(by_cpp, torch.load(saved), strict=True):
        assert torch.equal(cpp, python)


def test_fbgemm_weights_leave_the_cpp_kernel_with_their_layers(monkeypatch: pytest.MonkeyPatch):
    """The C++ kernel finds a layer's weights by name while the layer lives, and lets
    them go with it (a service that loads another model does not keep the first's)."""
    monkeypatch.setattr(int8, "fbgemm_multiplies", lambda: True)
    generator = torch.Generator().manual_seed(11)
    named = int8.FbgemmWeights.of(*fbgemm_weights(generator))
    assert named is not None
    name, levels = named.name, torch.randint(-127, 128, (3, 200), generator=generator).float()
    assert torch.equal(torch.ops.chatbot.int8_fbgemm(levels, name), named.product(levels))
    del named
    gc.collect()
    with pytest.raises(RuntimeError, match="no fbgemm weights named"):
        torch.ops.chatbot.int8_fbgemm(levels, name)


def test_weights_kept_again_under_their_name_outlive_the_ones_they_replaced(
    monkeypatch: pytest.MonkeyPatch,
):
    """A layer of the same weights loaded while the first one dies keeps its own: the
    first one's end forgets only the weights it kept."""
    monkeypatch.setattr(int8, "fbgemm_multiplies", lambda: True)
    generator = torch.Generator().manual_seed(12)
    weights, scales = fbgemm_weights(generator)
    first, second = (int8.FbgemmWeights.of(weights, scales * k) for k in (1.0, 2.0))
    assert first is not None
    assert second is not None
    levels = torch.randint(-127, 128, (2, 200), generator=generator).float()
    torch.ops.chatbot.keep_fbgemm(first.name, second.packed)
    torch.ops.chatbot.forget_fbgemm(first.name, first.packed)
    assert torch.equal(torch.ops.chatbot.int8_fbgemm(levels, first.name), second.product(levels))
    torch.ops.chatbot.forget_fbgemm(first.name, second.packed)
    with pytest.raises(RuntimeError, match="no fbgemm weights named"):
        torch.ops.chatbot.int8_fbgemm(levels, first.name)


def test_both_libraries_are_built_once_into_the_users_cache():
    """About 10 s of C++ against torch's headers, once per machine, torch and source
    (every instruction set loads the same library); the C kernels' 0.7 s, once per
    instruction set, rather than at every start of every process."""
    assert native.library() is not None
    built = native.operators_library()
    assert built is not None
    assert built.parent == Path(user_cache()) / "kernels"
    mapped = Path("/proc/self/maps").read_text()
    assert str(built) in mapped
    assert [p for p in built.parent.glob("kernels-*.so") if str(p) in mapped]


IN_THE_BACKGROUND = """
import logging, sys, time, torch
logging.basicConfig(level=logging.INFO)
from chatbot.engine.kernels import int8, native
int8.fbgemm_multiplies = lambda: True
started = time.perf_counter()
assert native.library() is not None and not native.operators_loaded()
print(f"{time.perf_counter() - started:.3f}")
from test_operators import fbgemm_weights, operator_outputs
before = operator_outputs()  # Python's kernels
weights = int8.FbgemmWeights.of(*fbgemm_weights(torch.Generator().manual_seed(5)))
assert native.operators()
assert torch._C._dispatch_has_kernel_for_dispatch_key("chatbot::int8_fbgemm", "CPU")
for python, cpp in zip(before, operator_outputs(), strict=True):
    assert torch.equal(python, cpp)
levels = torch.ones(2, 200)  # weights made before the load, handed to its kernel
assert torch.equal(torch.ops.chatbot.int8_fbgemm(levels, weights.name), weights.product(levels))
"""


def test_a_start_with_an_empty_cache_builds_operators_cpp_in_the_background(tmp_path: Path):
    """A new replica (a Kubernetes pod's empty cache) needs not wait for operators.cpp's
    10 s: the C kernels serve at once, with the operators' Python kernels; the library
    loads where it is safe (``native.operators``), and fbgemm weights made before it
    are handed to it. The same values throughout; what a killed build left is cleared."""
    kernels = tmp_path / "chatbot" / "kernels"
    kernels.mkdir(parents=True)
    for built in (Path(user_cache()) / "kernels").glob("kernels-*.so"):
        shutil.copy2(built, kernels)  # the C kernels' 0.7 s is not what this measures
    killed = kernels / f"{native.BUILDING}killed"  # a replica stopped during its build
    killed.mkdir()
    (killed / "operators.o").write_bytes(b"half")
    env = {
        **os.environ,
        "XDG_CACHE_HOME": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(Path.cwd()), str(Path(__file__).parent)]),
    }
    command = [sys.executable, "-c", IN_THE_BACKGROUND]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "operators.cpp is built in the background" in done.stderr
    assert float(done.stdout) < 2  # what the build alone takes is about 10 s
    assert len(list(kernels.glob("operators-*.so"))) == 1
    assert not killed.exists()


NO_CACHE = """
from chatbot.engine.kernels import native
assert native.library() is not None
assert not native.operators()
"""


def test_without_a_cache_folder_the_c_kernels_are_built_for_the_start(tmp_path: Path):
    """A cache folder that cannot be made (a file is in its way): the C kernels serve,
    built in a temporary folder; the operators' Python kernels serve; the log says so."""
    (tmp_path / "chatbot").write_text("not a folder")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": str(Path.cwd())}
    command = [sys.executable, "-c", NO_CACHE]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "the C kernels' cache failed, built for this start" in done.stderr
    assert "no cache folder for operators.cpp, Python's kernels serve" in done.stderr


def test_the_cache_keeps_the_libraries_used_last(tmp_path: Path):
    """Each source or torch change builds another library; the oldest go (the one in
    use was touched when it was found), each library's own: the C kernels' stay."""
    for age, name in enumerate(["a", "b", "c", "d", "e"]):
        library = tmp_path / f"operators-{name}.so"
        library.write_bytes(b"")
        os.utime(library, (1e9 - age * 100, 1e9 - age * 100))  # "a" used last
    (tmp_path / ".lock").write_text("")
    (tmp_path / "kernels-z.so").write_bytes(b"")
    os.utime(tmp_path / "kernels-z.so", (1e8, 1e8))
    native.prune_libraries(tmp_path, "operators", 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock", "kernels-z.so", "operators-a.so", "operators-b.so", "operators-c.so",
    ]  # fmt: skip
    in_use = native.operators_library()
    assert in_use is not None
    newest = max(in_use.parent.glob("operators-*.so"), key=lambda p: p.stat().st_mtime)
    assert newest == in_use
