"""The tiny test models are built once and shared (``tiny_model.built_once``), which is
only sound because a build gives the same bytes every time."""

from __future__ import annotations

import hashlib
from pathlib import Path

from chatbot.models.tiny_model import built_once


def digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_a_build_gives_the_same_bytes_is_kept_and_replaces_an_outdated_one(
    tiny_chat_checkpoint: Path, tmp_path: Path
):
    outdated = tmp_path / "decoder-only-0000000000000000" / "tiny-chat"
    outdated.mkdir(parents=True)

    built = built_once("decoder-only", tmp_path)  # another cache: built afresh
    assert digests(built) == digests(tiny_chat_checkpoint)
    assert built.name == "tiny-chat"  # a served model is named after its folder
    assert not outdated.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == [".lock", built.parent.name]

    written = {path: path.stat().st_mtime_ns for path in built.rglob("*")}
    assert built_once("decoder-only", tmp_path) == built
    assert {path: path.stat().st_mtime_ns for path in built.rglob("*")} == written
