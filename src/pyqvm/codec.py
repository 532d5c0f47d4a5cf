"""One typed JSON codec for every value that leaves the process.

`to_json` and `from_json` are driven by a type annotation (as `typing.get_type_hints`
resolves it), so the JSON form needs no tags: ``bytes`` travel as base64 text, a `Path`
as its text, a `datetime` in ISO 8601, an enum as its value, a dataclass as an object of
its fields (built through its constructor, so its own checks run on the far side too),
and a class with ``to_json``/``from_json`` (a versioned record such as
`pyqvm.channels.devices.Plugged`) as it says. Unions are tried in their declared order.

Bad data is a `CodecError` naming where it sits (``disk.path``) and what was expected.
The named-VM protocol (`pyqvm.named`) carries every operation's arguments and result
through here; `codable` tells which annotations can travel at all (a callback cannot).
"""

from __future__ import annotations

import base64
import binascii
import collections.abc as cabc
import dataclasses
import datetime as _dt
import enum
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from pyqvm.errors import CodecError

JSON = Any
_SCALARS: tuple[type, ...] = (str, int, float, bool)
_SEQUENCES = (list, tuple, cabc.Sequence, cabc.Iterable, cabc.Collection)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)


def _is_union(tp: object) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_record(tp: object) -> bool:
    return (
        isinstance(tp, type)
        and callable(getattr(tp, "from_json", None))
        and callable(getattr(tp, "to_json", None))
    )


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_callback(tp: object) -> bool:
    """Whether ``tp`` is a callable type, or one or None (a progress callback, say)."""
    members = typing.get_args(tp) if _is_union(tp) else (tp,)
    called = [m for m in members if m is not type(None)]
    return len(called) == 1 and typing.get_origin(called[0]) is cabc.Callable


def callback_argument(tp: object) -> object:
    """The type a callback of type ``tp`` (`is_callback`) is called with."""
    members = typing.get_args(tp) if _is_union(tp) else (tp,)
    called = next(m for m in members if m is not type(None))
    params = typing.get_args(called)[0]
    return params[0] if params else type(None)


def codable(tp: object) -> bool:
    """Whether values of ``tp`` can make the trip (callables and live objects cannot)."""
    seen: set[int] = set()

    def ok(t: object) -> bool:
        if t in (Any, object, type(None), None, bytes, Path, _dt.datetime) or t in _SCALARS:
            return True
        if _is_record(t):
            return True
        if isinstance(t, type) and issubclass(t, enum.Enum):
            return True
        origin, args = typing.get_origin(t), typing.get_args(t)
        if origin is Literal:
            return True
        if _is_union(t):
            return all(ok(a) for a in args)
        if origin in _SEQUENCES or origin in _MAPPINGS:
            return all(ok(a) for a in args if a is not Ellipsis)
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            if id(t) in seen:
                return True
            seen.add(id(t))
            hints = _hints(t)
            return all(ok(hints[f.name]) for f in dataclasses.fields(t) if f.init)
        return False

    return ok(tp)


def to_json(value: object, tp: object = Any, where: str = "value") -> JSON:
    """``value`` (of type ``tp``) as JSON data; `CodecError` if it does not fit ``tp``."""
    if tp in (Any, object):
        return _plain(value, where)
    if tp is None or tp is type(None):
        if value is not None:
            raise _wrong(where, "None", value)
        return None
    if _is_union(tp):
        for member in typing.get_args(tp):
            try:
                return to_json(value, member, where)
            except CodecError:
                continue
        raise _wrong(where, _name(tp), value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise _wrong(where, " or ".join(repr(a) for a in args), value)
        return value
    if origin in _MAPPINGS:
        key, val = args or (str, Any)
        if not isinstance(value, cabc.Mapping):
            raise _wrong(where, "a mapping", value)
        return {
            str(to_json(k, key, f"{where} key")): to_json(v, val, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if origin in _SEQUENCES:
        if isinstance(value, (str, bytes)) or not isinstance(value, cabc.Iterable):
            raise _wrong(where, "a sequence", value)
        items = list(value)
        return [to_json(v, _item(args, i), f"{where}[{i}]") for i, v in enumerate(items)]
    if not isinstance(tp, type):
        raise CodecError(where, f"{_name(tp)} cannot travel as JSON")
    widened = tp is float and isinstance(value, int) and not isinstance(value, bool)
    if not widened and (
        not isinstance(value, tp) or (tp in (int, float) and isinstance(value, bool))
    ):
        raise _wrong(where, _name(tp), value)
    if tp in _SCALARS:
        return value
    if tp is bytes:
        return base64.b64encode(value).decode("ascii")  # type: ignore[arg-type]
    if issubclass(tp, Path):
        return str(value)
    if tp is _dt.datetime:
        return value.isoformat()  # type: ignore[attr-defined]
    if issubclass(tp, enum.Enum):
        return value.value  # type: ignore[attr-defined]
    if _is_record(tp):
        return value.to_json()  # type: ignore[attr-defined]
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        return {
            f.name: to_json(getattr(value, f.name), hints[f.name], f"{where}.{f.name}")
            for f in dataclasses.fields(tp)
            if f.init
        }
    raise CodecError(where, f"{_name(tp)} cannot travel as JSON")


def from_json(data: JSON, tp: Any, where: str = "value") -> Any:
    """The value of type ``tp`` that `to_json` made ``data`` from; `CodecError` (naming
    ``where`` and what was expected) if ``data`` is not one; a dataclass's own check
    raises its own error."""
    if tp in (Any, object):
        return data
    if tp is None or tp is type(None):
        if data is not None:
            raise _wrong(where, "null", data)
        return None
    if _is_union(tp):
        members = typing.get_args(tp)
        if data is None and type(None) in members:
            return None
        for member in members:
            try:
                return from_json(data, member, where)
            except CodecError:
                continue
        raise _wrong(where, _name(tp), data)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if data not in args:
            raise _wrong(where, " or ".join(repr(a) for a in args), data)
        return data
    if origin in _MAPPINGS:
        key, val = args or (str, Any)
        if not isinstance(data, dict):
            raise _wrong(where, "an object", data)
        return {
            from_json(k, key, f"{where} key"): from_json(v, val, f"{where}[{k!r}]")
            for k, v in data.items()
        }
    if origin in _SEQUENCES:
        if not isinstance(data, list):
            raise _wrong(where, "an array", data)
        if origin is tuple and args and args[-1] is not Ellipsis and len(args) != len(data):
            raise _wrong(where, f"an array of {len(args)}", data)
        items = [from_json(v, _item(args, i), f"{where}[{i}]") for i, v in enumerate(data)]
        return items if origin is list else tuple(items)
    if not isinstance(tp, type):
        raise CodecError(where, f"{_name(tp)} cannot travel as JSON")
    if tp is bool:
        if not isinstance(data, bool):
            raise _wrong(where, "true or false", data)
        return data
    if tp is int or tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float) if tp is float else int):
            raise _wrong(where, "a number" if tp is float else "a whole number", data)
        return tp(data)
    if tp is str:
        if not isinstance(data, str):
            raise _wrong(where, "a string", data)
        return data
    if tp is bytes:
        if not isinstance(data, str):
            raise _wrong(where, "base64 text", data)
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise CodecError(where, f"bad base64 ({e})") from None
    if issubclass(tp, Path):
        if not isinstance(data, str):
            raise _wrong(where, "a path", data)
        return tp(data)
    if tp is _dt.datetime:
        try:
            return _dt.datetime.fromisoformat(data)
        except (TypeError, ValueError):
            raise _wrong(where, "an ISO 8601 time", data) from None
    if issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            raise _wrong(where, " or ".join(repr(m.value) for m in tp), data) from None
    if _is_record(tp):
        if not isinstance(data, dict):
            raise _wrong(where, "an object", data)
        return tp.from_json(data)  # type: ignore[attr-defined]
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise _wrong(where, f"an object ({tp.__name__})", data)
        hints = _hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        if unknown := sorted(set(data) - set(fields)):
            raise CodecError(where, f"{tp.__name__} has no field {unknown[0]!r}")
        kwargs = {name: from_json(v, hints[name], f"{where}.{name}") for name, v in data.items()}
        return tp(**kwargs)
    raise CodecError(where, f"{_name(tp)} cannot travel as JSON")


def _item(args: tuple[Any, ...], i: int) -> Any:
    if not args:
        return Any
    if (len(args) == 2 and args[1] is Ellipsis) or len(args) == 1:
        return args[0]
    return args[i] if i < len(args) else Any


def _plain(value: object, where: str) -> JSON:
    """Data already made of JSON's own types (a QMP command's arguments, say)."""
    if value is None or isinstance(value, _SCALARS):
        return value
    if isinstance(value, cabc.Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise CodecError(where, f"{type(value).__name__} is not JSON data")


def _name(tp: object) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("collections.abc.", "")


def _wrong(where: str, expected: str, got: object) -> CodecError:
    shown = repr(got)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return CodecError(where, f"expected {expected}, got {shown}")


__all__ = ["JSON", "callback_argument", "codable", "from_json", "is_callback", "to_json"]
