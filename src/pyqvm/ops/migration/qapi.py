"""Pure helpers between pyqvm's migration values and QEMU's QAPI: no I/O, no QEMU.

What goes to QEMU (capabilities and parameters, URIs, NBD addresses) and
what comes back (``query-migrate`` replies as `MigrationProgress` and
`MigrationStats`), and the one way a `MigrationError` is built from a cause.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyqvm.errors import MigrationError
from pyqvm.ops.migration.types import (
    MigrationProgress,
    MigrationStats,
    MigrationTLS,
    MigrationTuning,
    Side,
    Transport,
)

#: Migration statuses after which nothing more happens.
FINAL = frozenset({"completed", "failed", "cancelled"})
#: The name under which QEMU holds the fd of a saved state (``getfd``, ``fd:NAME`` URIs).
FD_NAME = "pq-migfd"
#: Prefix of the ids pyqvm gives its disk copies (NBD nodes, mirror jobs, exports).
MIG_PREFIX = "pq-mig-"


def configure_commands(tuning: MigrationTuning, side: Side) -> list[tuple[str, dict[str, object]]]:
    """The QMP commands (name, arguments) that apply ``tuning`` on one side, in order."""
    caps = tuning.capability_states(side)
    commands: list[tuple[str, dict[str, object]]] = [
        (
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
        )
    ]
    params = tuning.parameter_values(side)
    if params:
        commands.append(("migrate-set-parameters", params))
    return commands


def progress_from(
    info: Mapping[str, Any], elapsed: float, mirrors: Mapping[str, int]
) -> MigrationProgress:
    """A `MigrationProgress` from a ``query-migrate`` reply (QEMU's MigrationInfo).

    ``mirrors`` holds the disk copies' ``done``/``left`` bytes (copied storage).
    """
    ram = info.get("ram") or {}
    page = int(ram.get("page-size") or 4096)
    exp = info.get("expected-downtime")
    return MigrationProgress(
        status=str(info.get("status", "none")),
        elapsed=elapsed,
        transferred=int(ram.get("transferred", 0)),
        remaining=int(ram.get("remaining", 0)),
        total=int(ram.get("total", 0)),
        rate=float(ram.get("mbps", 0.0)) * 1e6 / 8,
        dirty_rate=float(ram.get("dirty-pages-rate", 0)) * page,
        expected_downtime=exp / 1000 if isinstance(exp, int) else None,
        passes=int(ram.get("dirty-sync-count", 0)),
        cpu_throttle=int(info.get("cpu-throttle-percentage", 0)),
        storage_transferred=mirrors.get("done", 0),
        storage_remaining=mirrors.get("left", 0),
    )


def stats_from(info: Mapping[str, Any], wall_time: float, storage_bytes: int) -> MigrationStats:
    """`MigrationStats` from the ``query-migrate`` reply of a completed migration."""
    ram = info.get("ram") or {}
    return MigrationStats(
        multifd_bytes=int(ram.get("multifd-bytes", 0)),
        total_time=int(info.get("total-time", 0)) / 1000,
        downtime=int(info.get("downtime", 0)) / 1000,
        setup_time=int(info.get("setup-time", 0)) / 1000,
        transferred=int(ram.get("transferred", 0)),
        passes=int(ram.get("dirty-sync-count", 0)),
        wall_time=wall_time,
        storage_transferred=storage_bytes,
    )


def parse_address(address: str | None, default_host: str) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST``, ``:PORT`` or ``[IPv6]:PORT`` -> (host, port); port 0: any."""
    if not address:
        return default_host, 0
    host, sep, port = address.rpartition(":")
    if not sep:
        host, port = address, "0"
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise MigrationError(f"address {address!r}: write an IPv6 address as [ADDR]:PORT")
    host = host.strip("[]") or default_host
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise MigrationError(f"address {address!r}: use HOST:PORT, e.g. 127.0.0.1:4444")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine's loopback (``localhost``, 127.0.0.0/8, ``::1``);
    the wildcard addresses are not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve anywhere


def refuse_cleartext(
    transport: str, host: str | None, tls: MigrationTLS | None, insecure: bool, what: str
) -> None:
    """`MigrationError` for a TCP migration that would carry guest memory in clear text
    over a network: to or on a non-loopback ``host`` without ``tls``, unless ``insecure``."""
    if transport != "tcp" or tls is not None or insecure or host is None or is_loopback(host):
        return
    raise MigrationError(
        f"{what} {host}: a migration over TCP to a non-loopback address sends the guest's "
        "memory and disks in clear text; give tls=MigrationTLS(directory) (certificates), "
        "or insecure=True if this network is trusted"
    )


def tls_objects(
    tls: MigrationTLS, side: Side, seq: int
) -> tuple[str, list[tuple[str, dict[str, object]]]]:
    """The id of the credentials object and the QMP commands that make it (and, on a
    destination that names its ``peer``, the authorization object) for one ``side``."""
    creds = f"{MIG_PREFIX}tls{seq}"
    commands: list[tuple[str, dict[str, object]]] = [
        (
            "object-add",
            {
                "qom-type": "tls-creds-x509",
                "id": creds,
                "dir": str(tls.directory),
                "endpoint": "server" if side == "destination" else "client",
                "verify-peer": True,
            },
        )
    ]
    if side == "destination" and tls.peer is not None:
        commands.append(
            (
                "object-add",
                {"qom-type": "authz-simple", "id": f"{creds}-authz", "identity": tls.peer},
            )
        )
    return creds, commands


def tls_parameters(tls: MigrationTLS | None, side: Side, creds: str) -> dict[str, object]:
    """``migrate-set-parameters`` for ``tls`` (or for none: QEMU's plain stream again)."""
    if tls is None:
        return {"tls-creds": ""}
    params: dict[str, object] = {"tls-creds": creds}
    if side == "source" and tls.hostname:
        params["tls-hostname"] = tls.hostname
    if side == "destination" and tls.peer is not None:
        params["tls-authz"] = f"{creds}-authz"
    return params


def uri_host(host: str) -> str:
    """A host as it goes into a URI (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host else host


def tcp_uri_host(uri: str) -> str | None:
    """The host of a ``tcp:HOST:PORT`` URI (None for any other kind)."""
    kind, _, rest = uri.partition(":")
    if kind != "tcp":
        return None
    return parse_address(rest, "127.0.0.1")[0]


def check_options(transport: str, storage: str, address: str | None) -> None:
    """Refuse a bad transport, storage or TCP address before any QEMU is started."""
    if transport not in ("unix", "tcp"):
        raise MigrationError(f"transport {transport!r}: use 'unix' or 'tcp'")
    if storage not in ("shared", "copied"):
        raise MigrationError(f"storage {storage!r}: use 'shared' or 'copied'")
    if transport == "tcp":
        parse_address(address, "127.0.0.1")


def incoming_uri(transport: Transport, runtime_dir: Path, address: str | None) -> str:
    """The ``migrate-incoming`` URI: a socket in ``runtime_dir`` (unix), or
    ``address`` (tcp; loopback and port 0, i.e. any free one, by default)."""
    if transport == "unix":
        return f"unix:{runtime_dir / 'migrate.sock'}"
    host, port = parse_address(address, "127.0.0.1")
    return f"tcp:{uri_host(host)}:{port}"


def listening_port(info: Mapping[str, Any]) -> int | None:
    """The TCP port an incoming migration listens on (``socket-address`` of ``query-migrate``)."""
    for addr in info.get("socket-address") or ():
        if addr.get("type") == "inet":
            return int(addr["port"])
    return None


def nbd_server(nbd: str) -> dict[str, object]:
    """``unix:PATH`` / ``tcp:HOST:PORT`` -> a QAPI SocketAddress for blockdev-add."""
    kind, _, rest = nbd.partition(":")
    if kind == "unix" and rest:
        return {"type": "unix", "path": rest}
    if kind == "tcp":
        host, port = parse_address(rest, "127.0.0.1")
        if port:
            return {"type": "inet", "host": host, "port": str(port)}
    raise MigrationError(f"nbd address {nbd!r}: use unix:PATH or tcp:HOST:PORT")


def migration_error(
    message: str, cause: BaseException, last: Mapping[str, Any] | None = None
) -> MigrationError:
    """A `MigrationError` saying ``message`` that keeps what ``cause`` (a
    `MigrationError`) knew of QEMU's status and reason, else takes them from
    ``last`` (a ``query-migrate`` reply)."""
    status = cause.status if isinstance(cause, MigrationError) else None
    qemu_error = cause.qemu_error if isinstance(cause, MigrationError) else None
    if last:
        status = status or last.get("status")
        qemu_error = qemu_error or last.get("error-desc")
    return MigrationError(message, status=status, qemu_error=qemu_error)
