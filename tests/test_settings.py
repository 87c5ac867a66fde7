"""Settings read from the environment: a value the service cannot use stops it at
start with a message that names the variable, not with a traceback from deep inside."""

from __future__ import annotations

import pytest

from chatbot.settings import Settings


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("eight", "CHATBOT_MAX_BATCH_SIZE must be a whole number, not 'eight'"),
        ("1", "CHATBOT_MAX_BATCH_SIZE must be at least 2, not 1: BentoML batches two or more"),
    ],
)
def test_a_batch_size_bentoml_cannot_take_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
):
    monkeypatch.setenv("CHATBOT_MAX_BATCH_SIZE", value)
    with pytest.raises(ValueError, match=message):
        Settings.from_env()
    monkeypatch.setenv("CHATBOT_MAX_BATCH_SIZE", " 2 ")
    assert Settings.from_env().max_batch_size == 2
