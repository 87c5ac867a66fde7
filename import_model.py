"""Put the model named by CHATBOT_MODEL into the local BentoML model store, once.

``make serve`` runs this before ``bentoml serve``: the service then declares the
stored model (``bentoml.models.BentoModel``), so ``bentoml build`` packs it into the
Bento and nothing is downloaded at serving time. Prints the model's tag.

    CHATBOT_MODEL=facebook/blenderbot-400M-distill python import_model.py
    CHATBOT_MODEL=/path/to/checkpoint python import_model.py
    CHATBOT_MODEL=/path/to/model.gguf python import_model.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import bentoml

from chatbot.engine.gc_freeze import frozen_after_loading
from chatbot.models.checkpoint import CheckpointUnavailable, fingerprint, save_checkpoint
from chatbot.models.offline_model import RECOMMENDED_DECODING, is_offline_model, note_for
from chatbot.settings import Settings


def ensure_model(settings: Settings) -> bentoml.Model:
    """The stored model for ``settings.model``, importing it if not there yet."""
    name = bentoml.Tag.from_taglike(settings.model_tag).name
    decoding = RECOMMENDED_DECODING if is_offline_model(settings.model) else {}
    wanted = fingerprint(settings.model, salt=str(decoding))
    try:
        stored = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:
        stored = []
    for model in sorted(stored, key=lambda m: m.info.creation_time, reverse=True):
        if model.info.labels.get("fingerprint") == wanted:
            return model
    with bentoml.models.create(
        name,
        labels={"fingerprint": wanted},
        metadata={"source": settings.model, "note": note_for(settings.model) or ""},
    ) as model:
        save_checkpoint(settings.model, Path(model.path), decoding)
    return model


def main() -> int:
    try:
        with frozen_after_loading():  # a short life: what it loads lives to the end
            model = ensure_model(Settings.from_env())
    except CheckpointUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(model.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
