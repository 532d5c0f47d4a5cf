"""Checks and parsers for single spec values (sizes, ids, PCI addresses, paths), each raising
`SpecError` with the field's name and the fix."""

from __future__ import annotations

import ipaddress
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

from pyqvm.errors import SpecError

# QEMU's id rule (util/id.c id_wellformed): a letter, then letters, digits, '-', '.', '_'.
ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")
PCI_RE = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{4}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<slot>[0-1][0-9a-fA-F])\.(?P<fn>[0-7])\Z"
)
GUEST_PCI_RE = re.compile(r"[0-1]?[0-9a-fA-F](?:\.[0-7])?\Z")
MAC_RE = re.compile(r"(?:[0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}\Z")
# ASCII digits only, and few enough that int() never meets Python's 4300-digit limit.
# ASCII: a control character such as "\x1f" is Unicode whitespace, not a separator here.
SIZE_RE = re.compile(r"\s*([0-9]{1,30})\s*([KMGT]?)(?:i?B)?\s*\Z", re.IGNORECASE | re.ASCII)
QCOW2_MAGIC = b"QFI\xfb"


def show(value: object) -> str:
    """``repr(value)`` for a message, short even for a huge int (whose repr would fail past
    Python's 4300-digit limit) or a long string."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def boolean(value: object, field_name: str) -> None:
    """Raise unless ``value`` is true or false (``"false"``, a string, is not)."""
    if not isinstance(value, bool):
        raise SpecError(field_name, f"{show(value)} is not true or false")


def text(value: object, field_name: str, what: str = "a string") -> str:
    """``value`` if it is a string QEMU can be given (no NUL, valid UTF-8); else `SpecError`."""
    if not isinstance(value, str):
        raise SpecError(field_name, f"{show(value)} is not {what}")
    if "\0" in value:
        raise SpecError(field_name, f"{show(value)} holds a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError(field_name, f"{show(value)} is not valid UTF-8") from None
    return value


#: The largest memory QEMU's size options take, in MiB (2**63 bytes).
MAX_MEMORY_MIB = 2**63 // 2**20 - 1


def parse_size_mib(value: int | str, field_name: str) -> int:
    """Parse a memory size (``512``, ``"512M"``, ``"2G"``, ``"1GiB"``) into MiB, at most
    :data:`MAX_MEMORY_MIB`."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SpecError(field_name, f"{show(value)} is not a size; use e.g. 512M or 2G")
    if isinstance(value, int):
        mib = value
    else:
        m = SIZE_RE.match(value)
        if not m:
            raise SpecError(field_name, f"{show(value)} is not a size; use e.g. 512M or 2G")
        number, unit = int(m.group(1)), m.group(2).upper()
        if unit == "K":
            if number % 1024:
                raise SpecError(field_name, f"{value!r} is not a whole number of MiB")
            mib = number // 1024
        else:
            mib = number * {"": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    if mib <= 0:
        raise SpecError(field_name, f"{show(value)} must be positive; use e.g. 512M or 2G")
    if mib > MAX_MEMORY_MIB:
        raise SpecError(field_name, f"{show(value)} is more than QEMU takes ({MAX_MEMORY_MIB} MiB)")
    return mib


def check_id(value: str, field_name: str) -> None:
    """Raise unless ``value`` is a well-formed QEMU id (device, node, chardev names)."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise SpecError(
            field_name,
            f"{value!r} is not a valid QEMU id; start with a letter, then use only "
            "letters, digits, '-', '.' and '_'",
        )


def normalize_pci_address(value: str, field_name: str) -> str:
    """``01:00.0`` or ``0000:01:00.0`` -> ``0000:01:00.0`` (lower case)."""
    m = PCI_RE.match(value.strip()) if isinstance(value, str) else None
    if not m:
        raise SpecError(
            field_name,
            f"{value!r} is not a PCI address; use DDDD:BB:SS.F, e.g. 0000:01:00.0 (see `lspci -D`)",
        )
    domain = m.group("domain") or "0000"
    return f"{domain}:{m.group('bus')}:{m.group('slot')}.{m.group('fn')}".lower()


def choice(value: object, choices: Sequence[str], field_name: str) -> None:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise SpecError(field_name, f"{value!r} is not one of: {', '.join(choices)}")


def absolute_path(path: Path | str, field_name: str, *, must_exist: bool = True) -> Path:
    """``path`` made absolute (relative to the working directory); it must be a file unless
    ``must_exist`` is false."""
    if not isinstance(path, (str, Path)) or str(path) == "":
        raise SpecError(field_name, f"{show(path)} is not a path")
    # QEMU takes file names in JSON (UTF-8) and C strings: no NUL, no undecodable bytes.
    text(str(path), field_name, "a path")
    try:
        p = Path(path).expanduser()
    except RuntimeError as e:  # ~user of a user this host does not have
        raise SpecError(field_name, f"'{path}': {e}") from None
    p = p if p.is_absolute() else Path.cwd() / p
    if must_exist and not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "no such file"
        raise SpecError(field_name, f"{what}: '{p}'; check the path")
    return p


def writable_file(path: Path, field_name: str) -> None:
    """Raise unless a file can be made at ``path`` (its directory exists; it is no directory)."""
    if path.is_dir():
        raise SpecError(field_name, f"'{path}' is a directory; name a file in it")
    if not path.parent.is_dir():
        raise SpecError(field_name, f"'{path.parent}' does not exist; create it or pick another")


def set_field(obj: object, name: str, value: object) -> None:
    # Normalising inside __post_init__ of a frozen dataclass.
    object.__setattr__(obj, name, value)


def slirp_address(text: str) -> bool:
    """Whether slirp binds exactly ``text``: empty (any address) or a dotted IPv4 address
    written as Python writes it (``127.1`` and ``010.0.0.1`` mean other things to it)."""
    if text == "":
        return True
    try:
        return str(ipaddress.IPv4Address(text)) == text
    except ValueError:
        return False


SSH_USER_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
PRIVATE_NET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


def private_subnet(name: str) -> ipaddress.IPv4Network:
    """The subnet of private network ``name`` when its VMs give no address: a /24 in
    10.200-249.x, the same for every VM that names it (never QEMU's user net 10.0.2.0/24)."""
    h = zlib.crc32(name.encode())
    return ipaddress.IPv4Network(f"10.{200 + h % 50}.{(h >> 8) % 256}.0/24")


def private_address(name: str, value: object) -> ipaddress.IPv4Interface:
    """``address`` of a private NIC: an IPv4 host address with its prefix, e.g. 10.9.0.5/24."""
    try:
        iface = ipaddress.IPv4Interface(value) if isinstance(value, str) and "/" in value else None
    except ValueError:
        iface = None
    if (
        iface is None
        or iface.network.prefixlen > 30
        or iface.ip
        in (
            iface.network.network_address,
            iface.network.broadcast_address,
        )
    ):
        raise SpecError(
            "network.address",
            f"{show(value)} is not a host address with its prefix for network {name!r}; "
            'use e.g. "10.9.0.5/24" (or leave it out: pyqvm leases one)',
        )
    return iface


def gdb_tcp_address(value: object) -> tuple[str, int]:
    """``"HOST:PORT"`` of ``gdb``'s TCP form (IPv6 in brackets), or `SpecError` naming ``gdb``."""
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SpecError(
            "gdb",
            f'{show(value)}: use true (a unix socket in the runtime dir) or "HOST:PORT" '
            'for TCP, e.g. "127.0.0.1:1234"',
        )
    return host, int(port)
