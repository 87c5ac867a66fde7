"""``import_model.py``: local checkpoints go into the model store once; offline hub
ids stop with a one-paragraph explanation instead of a traceback."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import import_model, offline_env

from chatbot.models.checkpoint import gguf_read_once, gguf_weight_format
from chatbot.settings import DEFAULT_MODEL, store_name_for


@pytest.mark.server  # runs import_model.py
def test_a_local_checkpoint_is_imported_once(tiny_checkpoint: Path, tmp_path: Path):
    env = offline_env(tmp_path / "home", tiny_checkpoint)
    first = import_model(env)
    assert first.returncode == 0, first.stderr
    tag = first.stdout.strip()
    assert tag.startswith("tiny-blenderbot:")
    stored = tmp_path / "home" / "models" / "tiny-blenderbot" / tag.split(":")[1]
    assert (stored / "model.safetensors").exists()
    assert (stored / "tokenizer.json").exists()
    assert (stored / "generation_config.json").exists()
    again = import_model(env)
    assert again.stdout.strip() == tag


@pytest.mark.server  # runs import_model.py
def test_an_unreachable_hub_model_gets_a_clear_message(tmp_path: Path):
    result = import_model(offline_env(tmp_path / "home", DEFAULT_MODEL))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith(f"error: Cannot load the model '{DEFAULT_MODEL}'")
    assert "CHATBOT_MODEL" in message
    assert "\n" not in message


def test_store_names(tmp_path: Path):
    hub_id = "facebook/blenderbot-400M-distill"
    assert store_name_for(hub_id) == "facebook--blenderbot-400m-distill"
    (tmp_path / "My Model").mkdir()
    assert store_name_for(f"{tmp_path}/My Model/") == "my-model"


def test_a_gguf_file_is_parsed_once_while_importing_and_gguf_is_left_as_it_was(tmp_path: Path):
    """What transformers' GGUF loader and ``gguf_weight_format`` read meanwhile comes
    from one parse, and the tensor names from one map (``gguf_read_once``); afterwards
    gguf parses and maps afresh again."""
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with gguf_read_once():
        parsed = gguf.GGUFReader(str(path))  # as transformers asks for them
        assert gguf.GGUFReader(str(path)) is parsed
        assert gguf_weight_format(path) == "F32"
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is names
        assert names.get_name("model.layers.1.self_attn.q_proj") == "blk.1.attn_q"
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    assert gguf.GGUFReader(str(path)) is not parsed
    assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is not names
