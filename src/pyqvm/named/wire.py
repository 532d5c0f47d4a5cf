"""What travels between a named VM's owner process and its clients.

The protocol is QMP's own (the QEMU Machine Protocol: JSON objects, one a
line; a greeting; ``qmp_capabilities``; ``execute``/``id`` answered by
``return`` or ``error``; asynchronous ``event``\\ s), so that

- clients are `qemu.qmp.QMPClient` unchanged: framing, request ids, replies
  to concurrent commands and event delivery are the library's, not ours;
- a command the owner does not know is QEMU's: ``pyqvm qmp NAME query-status``
  goes through the owner (which holds the only connection to QEMU) as is;
- the owner's own commands are ``pyqvm-*`` and their errors are QMP errors whose
  ``class`` is the `PyqvmError` subclass raised in the owner, re-raised here
  as that same type with the same message and data (`error_from_json`).

No library serves QMP, so the owner's side is the small part written here:
`Splitter` cuts the byte stream into JSON objects (a QMP client need not end
a message with a newline, and ``qemu.qmp`` does not), ``json`` parses them.
This module holds the pure translations, unit-tested without QEMU.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import re
from collections.abc import Mapping
from typing import Any

import pyqvm.errors as errors
from pyqvm.errors import PyqvmError
from pyqvm.host.facts import pyqvm_version
from pyqvm.state import VMState

#: The version of the owner's protocol, in its greeting; a client refuses another.
PROTOCOL = 2
#: This pyqvm's version, in the greeting (a refusal says both sides').
VERSION = pyqvm_version()
#: The owner's command that runs one of AsyncVM's operations (`pyqvm.faces.operations`):
#: ``{"operation", "arguments", "callbacks", "call"}`` in, ``{"result", "ended"}`` out.
OP_COMMAND = "pyqvm-op"
#: The event that carries one call of a callback argument back to the client.
CALLBACK_EVENT = "PYQVM_CALLBACK"
#: A JSON line may carry a whole file (``pyqvm-write-file``): allow 256 MiB.
LINE_LIMIT = 256 * 2**20
#: Enums an error's data may hold, by name (the only non-JSON values errors carry).
_ENUMS: dict[str, type[enum.Enum]] = {"VMState": VMState}


class Splitter:
    """Cuts a stream of JSON objects into one ``bytes`` each, as QEMU's own streamer does:
    by counting braces outside strings (whitespace between objects is skipped)."""

    def __init__(self, limit: int = LINE_LIMIT) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._start = 0  # where the object being scanned began
        self._pos = 0  # how far it has been scanned
        self._depth = 0
        self._in_string = False

    def feed(self, data: bytes) -> list[bytes]:
        """The objects ``data`` completes; `ValueError` for a non-object or an object past
        ``limit`` bytes."""
        self._buf += data
        out = []
        buf = self._buf
        while self._pos < len(buf):
            if self._in_string:  # skip to the next quote or backslash (a file's base64)
                m = _IN_STRING.search(buf, self._pos)
                if m is None:
                    self._pos = len(buf)
                    break
                self._pos = m.end()
                if m.group() == b"\\":
                    if self._pos == len(buf):  # the escaped byte has not come yet
                        self._pos -= 1
                        break
                    self._pos += 1
                else:
                    self._in_string = False
                continue
            if self._depth == 0:
                m = _BETWEEN.match(buf, self._pos)  # whitespace up to the next object
                assert m is not None
                self._pos = m.end()
                if self._pos == len(buf):
                    break
                if buf[self._pos] != 0x7B:
                    raise ValueError(f"expected a JSON object, got {chr(buf[self._pos])!r}")
                self._start = self._pos
            m = _STRUCTURE.search(buf, self._pos)
            if m is None:
                self._pos = len(buf)
                break
            self._pos = m.end()
            c = m.group()
            if c == b'"':
                self._in_string = True
            elif c == b"{":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    out.append(bytes(buf[self._start : self._pos]))
        if self._depth == 0 and not self._in_string:
            del buf[: self._pos]
            self._pos = self._start = 0
        elif self._pos - self._start > self.limit:
            raise ValueError(f"a message longer than {self.limit} bytes")
        return out


_IN_STRING = re.compile(rb'["\\]')  # a quote or a backslash
_BETWEEN = re.compile(rb"[ \t\r\n]*")
_STRUCTURE = re.compile(rb'[{}"]')


def greeting(name: str) -> dict[str, Any]:
    return {
        "QMP": {
            "version": {"pyqvm": {"protocol": PROTOCOL, "version": VERSION, "name": name}},
            "capabilities": [],
        }
    }


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: object, what: str = "data") -> bytes:
    if not isinstance(text, str):
        raise PyqvmError(f"{what}: expected base64 text, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as e:
        raise PyqvmError(f"{what}: bad base64 ({e})") from None


def _encode(value: object) -> object:
    if isinstance(value, bytes):
        return {"$bytes": b64(value)}
    if isinstance(value, enum.Enum):
        return {"$enum": type(value).__name__, "value": value.value}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # a Path, say: its text is what a message would show


def _decode(value: object) -> object:
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return unb64(value["$bytes"])
        if set(value) == {"$enum", "value"} and value["$enum"] in _ENUMS:
            return _ENUMS[str(value["$enum"])](value["value"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value


def error_to_json(e: PyqvmError) -> dict[str, Any]:
    """A QMP error object for ``e``: its class name, message and attributes."""
    return {
        "class": type(e).__name__,
        "desc": str(e),
        "data": {k: _encode(v) for k, v in vars(e).items() if not k.startswith("_")},
    }


def error_from_json(error: Mapping[str, Any]) -> PyqvmError:
    """The `PyqvmError` an owner sent: the same class (`PyqvmError` for one this pyqvm
    does not have), message and attributes."""
    cls = getattr(errors, str(error.get("class", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, PyqvmError)):
        cls = PyqvmError
    e = cls.__new__(cls)
    Exception.__init__(e, str(error.get("desc", "")))
    data = error.get("data")
    for k, v in data.items() if isinstance(data, dict) else ():
        with contextlib.suppress(AttributeError):  # a read-only property of the class
            setattr(e, k, _decode(v))
    return e


__all__ = [
    "CALLBACK_EVENT",
    "LINE_LIMIT",
    "OP_COMMAND",
    "PROTOCOL",
    "VERSION",
    "Splitter",
    "b64",
    "error_from_json",
    "error_to_json",
    "greeting",
    "unb64",
]
