"""Settings read from the environment: a value the service cannot use stops it at
start with a message that names the variable, not with a traceback from deep inside
(or, worse, a service that starts and refuses or holds every request)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, ModelStore

from chatbot.settings import Settings


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CHATBOT_MAX_BATCH_SIZE", "eight", "must be a whole number, not 'eight'"),
        ("CHATBOT_MAX_BATCH_SIZE", "1", "must be at least 2, not 1: BentoML batches two or more"),
        ("CHATBOT_MAX_ROWS", "0", "must be at least 1, not 0"),
        ("CHATBOT_MAX_CONCURRENCY", "-1", "must be at least 1, not -1"),
        ("CHATBOT_COALESCE_MS", "-5", "must be at least 0, not -5"),
        ("CHATBOT_RELEASE_MEMORY_EVERY_S", "nan", "must be at least 0, not nan"),
        ("CHATBOT_TIMEOUT_S", "ten", "must be a number, not 'ten'"),
        ("CHATBOT_ATTENTION", "flash", "must be one of auto, sdpa, not 'flash'"),
    ],
)
def test_a_value_the_service_cannot_use_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} {message}"):
        Settings.from_env()


def test_the_smallest_useful_values_are_taken(monkeypatch: pytest.MonkeyPatch):
    for name, value in [("CHATBOT_MAX_BATCH_SIZE", " 2 "), ("CHATBOT_MAX_WAITING", "0"),
                        ("CHATBOT_COALESCE_MS", "0"), ("CHATBOT_MAX_ROWS", "1")]:  # fmt: skip
        monkeypatch.setenv(name, value)
    settings = Settings.from_env()
    assert (settings.max_batch_size, settings.max_waiting, settings.coalesce_ms) == (2, 0, 0.0)
    assert settings.max_rows == 1


def test_the_service_refuses_to_start_on_a_bad_dtype(model_store: ModelStore):
    started = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service:Chatbot",
         "--host", "127.0.0.1", "--port", "1"],
        cwd=ROOT, env={**model_store.env, "CHATBOT_DTYPE": "half"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode != 0
    choices = "auto, bfloat16, float16, float32, int4, int8"
    assert f"CHATBOT_DTYPE must be one of {choices}, not 'half'" in started.stdout + started.stderr
