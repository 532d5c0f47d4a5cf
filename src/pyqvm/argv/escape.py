"""The one place where values are put into QEMU option strings.

QEMU parses ``-device``/``-chardev``/... arguments as ``key=value`` lists
separated by commas; a comma inside a value is written as two commas. A user
value that is not escaped can smuggle in options (``a,readonly=off.qcow2``).
So every value goes through `opts` (escaping) or `qjson` (JSON syntax, which
QEMU 7.2 accepts for ``-device``, ``-object``, ``-netdev`` and ``-blockdev``
but not for ``-chardev``, ``-machine``, ``-drive`` or ``-accel``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

OptValue = str | int | bool | None

_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


def escape(value: str) -> str:
    """Escape one value for QEMU's ``key=value,...`` syntax (commas doubled)."""
    return value.replace(",", ",,")


def _render(value: OptValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return escape(str(value))


def opts(first: str | None, props: Mapping[str, OptValue] | None = None) -> str:
    """Build ``first,key=value,...`` with every value escaped; ``None`` values are left out.

    ``first`` is the implied leading value (a driver or backend name) and is
    escaped too; keys are fixed by our code and checked, never escaped.
    """
    parts = [] if first is None else [escape(first)]
    for key, value in (props or {}).items():
        if not _KEY_RE.match(key):
            raise ValueError(f"bad QEMU option key {key!r}")
        if value is not None:
            parts.append(f"{key}={_render(value)}")
    return ",".join(parts)


def qjson(obj: Mapping[str, object]) -> str:
    """JSON option syntax (no escaping needed; ``None`` members are left out)."""
    return json.dumps({k: v for k, v in obj.items() if v is not None}, separators=(",", ":"))
