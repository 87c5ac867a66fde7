"""Runtime configuration, read once from environment variables.

Every knob of the service lives here with its default, so the README's configuration
table and the code cannot drift apart.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "facebook/blenderbot-400M-distill"

DEFAULT_KEEP_ALIVE_S = 620.0
"""Idle connections outlive every common balancer's and client pool's
(``chatbot.http.keep_alive``)."""

DEFAULT_TARGET_CONCURRENCY = 32
"""Conversations one replica takes before the autoscaler adds another (BentoML's
``traffic.concurrency``, KEDA's threshold): where the default model's throughput stops
growing, measured by ``benchmarks/scaling.py`` (README, Scaling)."""

_TAG_NAME_MAX = 63


def user_cache() -> str:
    """The project's folder in the user's cache folder (``XDG_CACHE_HOME``, ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.expanduser("~/.cache")
    return os.path.join(base, "chatbot")


def used_longest_ago(paths: Iterable[Path], keep: int) -> list[Path]:
    """All of ``paths`` but the ``keep`` used last (touched when used): what a cache
    in ``user_cache`` deletes so that it does not grow with every upgrade."""
    by_use = sorted(paths, key=lambda path: path.stat().st_mtime, reverse=True)
    return by_use[keep:]


def default_compile_cache() -> str:
    """Where compiled steps are kept between starts: the user's cache folder."""
    return os.path.join(user_cache(), "compiled-steps")


def store_name_for(source: str) -> str:
    """BentoML model-store name for a hub id or a local directory.

    Hub ids keep their organisation (``facebook/x`` -> ``facebook--x``) so two models
    with the same basename never collide; local directories use their folder name,
    GGUF files their file name without the extension.
    """
    if os.path.isdir(source) or os.path.isfile(source):
        source = os.path.basename(os.path.normpath(os.path.abspath(source)))
        source = source.removesuffix(".gguf")
    name = re.sub(r"[^a-z0-9._-]+", "-", source.lower().replace("/", "--"))
    return name.strip("-._")[:_TAG_NAME_MAX].rstrip("-._") or "chatbot-model"


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_QUANTIZATION = re.compile(r"[.-](q\d\w*|iq\d\w*|f16|f32|bf16)$", re.IGNORECASE)


def display_name(source: str) -> str:
    """The model's name in every answer (``/v1/models``, ``/info``, the chat page).

    A hub id is its own name. A local checkpoint is named by its folder, a GGUF file by
    its file name without extension and quantization (``SmolLM2-135M-Instruct.Q4_1.gguf``
    -> ``SmolLM2-135M-Instruct``): a path on the machine that imported the model means
    nothing to a client, and tells it how that machine is laid out. Decided by shape,
    since a Bento is served where that path does not exist.
    """
    if _HUB_ID.fullmatch(source) and not source.endswith(".gguf"):
        return source
    name = os.path.basename(os.path.normpath(source)).removesuffix(".gguf")
    return _QUANTIZATION.sub("", name) or "chatbot-model"


def _int(name: str, default: int, least: int | None = None, why: str = "") -> int:
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a whole number, not {raw!r}") from None
    if least is not None and value < least:
        raise ValueError(f"{name} must be at least {least}, not {value}{why}")
    return value


def _float(name: str, default: float, least: float | None = None) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None
    if least is not None and not value >= least:  # NaN too
        raise ValueError(f"{name} must be at least {least:g}, not {raw}")
    return value


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name} must be true or false, not {raw!r}")


def _choice(name: str, default: str, choices: frozenset[str]) -> str:
    raw = os.environ.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ValueError(f"{name} must be one of {', '.join(sorted(choices))}, not {raw!r}")
    return raw


BATCHING_CHOICES = frozenset({"continuous", "adaptive"})
"""How replies share the model (CHATBOT_BATCHING): the decode loop's per-step batches,
or BentoML's adaptive batching of whole replies (``service.py``)."""

DTYPE_CHOICES = frozenset({"auto", "float32", "bfloat16", "int8", "int4", "float16"})
"""Precisions (CHATBOT_DTYPE); ``auto`` picks by device (``chatbot.engine.precision``)."""
ATTENTION_CHOICES = frozenset({"auto", "sdpa"})
"""CHATBOT_ATTENTION, which ``chatbot.engine.kernels.attention`` reads in the workers:
checked here so that a typo stops the service at start."""


@dataclass(frozen=True)
class Settings:
    """Service settings; see the README's configuration table."""

    model: str
    model_tag: str
    model_name: str | None
    batching: str
    max_rows: int
    max_waiting: int
    max_batch_size: int
    max_latency_ms: int
    coalesce_ms: float
    timeout_s: float
    pack_weights: bool
    dtype: str
    attention: str
    compile_step: bool
    compile_batches: bool
    compile_cache: str
    max_concurrency: int
    max_body_bytes: int
    log_content: bool
    release_memory_every_s: float
    keep_alive_s: float
    target_concurrency: int
    external_queue: bool
    api_key: str | None = field(default=None, repr=False)  # never printed

    @classmethod
    def from_env(cls) -> Settings:
        model = os.environ.get("CHATBOT_MODEL", "").strip() or DEFAULT_MODEL
        return cls(
            model=model,
            model_tag=os.environ.get("CHATBOT_MODEL_TAG", "").strip()
            or f"{store_name_for(model)}:latest",
            model_name=os.environ.get("CHATBOT_MODEL_NAME", "").strip() or None,
            batching=_choice("CHATBOT_BATCHING", "continuous", BATCHING_CHOICES),
            max_rows=_int("CHATBOT_MAX_ROWS", 128, least=1),
            max_waiting=_int("CHATBOT_MAX_WAITING", 256, least=0),
            max_batch_size=_int(
                "CHATBOT_MAX_BATCH_SIZE", 8, least=2, why=": BentoML batches two or more"
            ),
            max_latency_ms=_int("CHATBOT_MAX_LATENCY_MS", 300_000, least=1),
            coalesce_ms=_float("CHATBOT_COALESCE_MS", 50, least=0),
            timeout_s=_float("CHATBOT_TIMEOUT_S", 600),
            pack_weights=_bool("CHATBOT_PACK_WEIGHTS", True),
            dtype=_choice("CHATBOT_DTYPE", "auto", DTYPE_CHOICES),
            attention=_choice("CHATBOT_ATTENTION", "auto", ATTENTION_CHOICES),
            compile_step=_bool("CHATBOT_COMPILE_STEP", True),
            compile_batches=_bool("CHATBOT_COMPILE_BATCHES", True),
            compile_cache=os.environ.get("CHATBOT_COMPILE_CACHE", "").strip()
            or default_compile_cache(),
            max_concurrency=_int("CHATBOT_MAX_CONCURRENCY", 64, least=1),
            max_body_bytes=_int("CHATBOT_MAX_BODY_BYTES", 1_048_576, least=1),
            log_content=_bool("CHATBOT_LOG_CONTENT", False),
            release_memory_every_s=_float("CHATBOT_RELEASE_MEMORY_EVERY_S", 5, least=0),
            keep_alive_s=_float("CHATBOT_KEEP_ALIVE_S", DEFAULT_KEEP_ALIVE_S),
            target_concurrency=_int(
                "CHATBOT_TARGET_CONCURRENCY", DEFAULT_TARGET_CONCURRENCY, least=1
            ),
            external_queue=_bool("CHATBOT_EXTERNAL_QUEUE", True),
            api_key=os.environ.get("CHATBOT_API_KEY", "").strip() or None,
        )
