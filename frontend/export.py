"""Conversation downloads: CSV for spreadsheets, JSON for programs."""

from __future__ import annotations

import json

import pandas as pd

from frontend.store import StoredMessage

COLUMNS = ["turn", "role", "text", "timestamp"]


def to_frame(messages: list[StoredMessage]) -> pd.DataFrame:
    rows = [
        {"turn": i + 1, "role": m.role, "text": m.content, "timestamp": m.created_at}
        for i, m in enumerate(messages)
    ]
    return pd.DataFrame(rows, columns=COLUMNS)


def to_csv(messages: list[StoredMessage]) -> bytes:
    """UTF-8 with a byte-order mark, so spreadsheets show accents and emoji right."""
    return to_frame(messages).to_csv(index=False).encode("utf-8-sig")


def to_json(messages: list[StoredMessage]) -> bytes:
    records = to_frame(messages).to_dict(orient="records")
    return json.dumps(records, ensure_ascii=False, indent=2).encode("utf-8")
