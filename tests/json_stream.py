"""Split a byte stream of back-to-back JSON objects, as QMP clients may write them: the fake
QMP servers of the unit tests read what pyqvm sends with the named-VM owner's own splitter."""

from __future__ import annotations

import json
from typing import Any

from pyqvm.named.wire import Splitter


class JSONStream:
    """Feed bytes in; get the complete JSON objects out (a partial one waits for more)."""

    def __init__(self) -> None:
        self._splitter = Splitter()

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self._splitter.feed(chunk)]
