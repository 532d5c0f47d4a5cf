"""Split a byte stream of back-to-back JSON objects, as QMP clients may write them."""

from __future__ import annotations

import json
from typing import Any


class JSONStream:
    """Feed bytes in; get the complete JSON objects out (a partial one waits for more)."""

    def __init__(self) -> None:
        self._decoder = json.JSONDecoder()
        self._buf = ""

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        self._buf += chunk.decode()
        out: list[dict[str, Any]] = []
        while self._buf.strip():
            text = self._buf.lstrip()
            try:
                msg, end = self._decoder.raw_decode(text)
            except ValueError:
                break
            self._buf = text[end:]
            out.append(msg)
        return out
