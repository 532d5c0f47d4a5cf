"""The spec as plain data: `VMSpec` from a dict or a TOML file, and back to a dict.

Relative paths in the data are taken from a base directory (the TOML file's, when loaded
from TOML); unknown keys and wrongly shaped values fail with a `SpecError` naming the field.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyqvm.errors import SpecError
from pyqvm.spec import Disk, HostDevice, KernelBoot, Network, PortForward, Share, VMSpec
from pyqvm.spec.cloudinit import CloudInit
from pyqvm.spec.fields import show


def spec_from_dict(data: Mapping[str, Any], *, base_dir: Path | None = None) -> VMSpec:
    """Build a `VMSpec` from plain data (as parsed from TOML).

    Unknown keys are errors naming the key. Relative paths are taken
    relative to ``base_dir`` (default: the working directory).
    """
    spec: VMSpec = _build(VMSpec, data, "", base_dir or Path.cwd())
    return spec


def load_spec(path: Path | str, **overrides: Any) -> VMSpec:
    """Load a `VMSpec` from a TOML file; keyword ``overrides`` replace top-level keys."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError("", f"no such spec file: '{p}'") from None
    except IsADirectoryError:
        raise SpecError("", f"'{p}' is a directory; give the spec file in it") from None
    except OSError as e:
        raise SpecError("", f"cannot read spec file '{p}': {e.strerror}") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8
        raise SpecError(
            "", f"{p}: not valid TOML: not UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    except (tomllib.TOMLDecodeError, ValueError) as e:  # ValueError: an integer too long
        raise SpecError("", f"{p}: not valid TOML: {e}") from None
    data.update(overrides)
    return spec_from_dict(data, base_dir=p.resolve().parent)


def spec_to_dict(spec: VMSpec) -> dict[str, Any]:
    """The spec as plain data (paths as strings, tuples as lists), e.g. for TOML or JSON."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    out: dict[str, Any] = conv(spec)
    return out


_NESTED: dict[str, type] = {
    "KernelBoot": KernelBoot,
    "Disk": Disk,
    "Network": Network,
    "PortForward": PortForward,
    "HostDevice": HostDevice,
    "Share": Share,
    "CloudInit": CloudInit,
}


def _build(cls: type[Any], data: Mapping[str, Any], where: str, base: Path) -> Any:
    if not isinstance(data, Mapping):
        raise SpecError(where or "spec", f"expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise SpecError(path, f"unknown field; known fields: {', '.join(sorted(known))}")
        kwargs[key] = _convert(hints[key], value, path, base)
    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and f.name not in kwargs:
            path = f"{where}.{f.name}" if where else f.name
            raise SpecError(path, "is required")
    try:
        return cls(**kwargs)
    except SpecError as e:
        # Re-anchor nested field names ("disk.path" -> "disks[1].path").
        if where and e.field.split(".", 1)[0] in {
            "disk",
            "network",
            "forward",
            "host_device",
            "kernel",
            "share",
        }:
            rest = e.field.split(".", 1)[1] if "." in e.field else ""
            raise SpecError(f"{where}.{rest}" if rest else where, e.message) from None
        raise


def _convert(hint: Any, value: Any, where: str, base: Path) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None:
            return None
        hint = non_none[0] if len(non_none) == 1 else hint
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise SpecError(where, f"expected a list, got {value!r}")
        return tuple(_convert(args[0], v, f"{where}[{i}]", base) for i, v in enumerate(value))
    if isinstance(hint, type) and hint.__name__ in _NESTED:
        if isinstance(value, str | Path) and hint is KernelBoot:
            value = {"kernel": value}
        return _build(hint, value, where, base)
    if hint is Path:
        if not isinstance(value, str):
            raise SpecError(where, f"expected a path string, got {show(value)}")
        try:
            p = Path(value).expanduser()
        except RuntimeError as e:  # ~user of a user this host does not have
            raise SpecError(where, f"'{value}': {e}") from None
        return p if p.is_absolute() else base / p
    return value


__all__ = ["load_spec", "spec_from_dict", "spec_to_dict"]
