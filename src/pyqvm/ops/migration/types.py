"""The values of a migration: tuning in, progress and results out, and where a destination waits."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pyqvm.errors import MigrationError

Side = Literal["source", "destination"]
Transport = Literal["unix", "tcp"]
Storage = Literal["shared", "copied"]

#: ``max-bandwidth`` meaning "no cap" (bytes/s), the value libvirt sets for "unlimited".
UNLIMITED_BANDWIDTH = (2**63 - 1) // 2**20 * 2**20
#: QEMU 7.2's own defaults, for reference: 128 MiB/s and 300 ms.
QEMU_DEFAULT_BANDWIDTH = 128 * 2**20
QEMU_DEFAULT_DOWNTIME_MS = 300

#: A saved state's files in its directory: QEMU's migration stream, and pyqvm's record.
STATE_FILE = "vmstate"
MANIFEST = "pyqvm-saved.json"


# --- tuning, progress, results ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MigrationTLS:
    """TLS for a migration stream and its disk copy (QEMU's ``tls-creds-x509``).

    ``directory`` holds ``ca-cert.pem`` and, as the side needs them,
    ``server-cert.pem``/``server-key.pem`` (the destination) and
    ``client-cert.pem``/``client-key.pem`` (the source; the destination
    verifies it). ``hostname`` is the name the source expects in the
    destination's certificate (default: the host in the address it dials, which
    the certificate must then carry as an IP or DNS subject alternative name).
    ``peer`` makes a destination accept only the source certificate with that
    distinguished name, as GnuTLS writes it (``O=org,CN=name``).
    """

    directory: Path
    hostname: str | None = None
    peer: str | None = None

    def __post_init__(self) -> None:
        ca = Path(self.directory) / "ca-cert.pem"
        if not ca.is_file():
            raise MigrationError(
                f"tls.directory: {ca} is missing; put the CA certificate there (PEM), with "
                "server-cert.pem/server-key.pem for a destination and "
                "client-cert.pem/client-key.pem for a source"
            )

    def check(self, side: Side) -> None:
        """`MigrationError` naming the file a ``side`` lacks (before QEMU reads them)."""
        role = "server" if side == "destination" else "client"
        for name in (f"{role}-cert.pem", f"{role}-key.pem"):
            if not (Path(self.directory) / name).is_file():
                raise MigrationError(
                    f"tls.directory: {Path(self.directory) / name} is missing; the {side} of a "
                    f"TLS migration needs its {role} certificate and key there"
                )


@dataclass(frozen=True, slots=True)
class MigrationTuning:
    """Migration parameters and capabilities; the defaults are pyqvm's.

    ``max_bandwidth`` (bytes/s) lifts QEMU's 128 MiB/s cap by default, as
    libvirt does; ``downtime_limit`` is in milliseconds. None leaves QEMU's
    own value. ``multifd_channels`` > 0 turns multifd on (both sides);
    ``postcopy`` switches to postcopy after the first full RAM pass.
    ``parameters`` and ``capabilities`` pass anything else through, by QEMU's
    names (``migrate-set-parameters`` / ``migrate-set-capabilities``).
    """

    max_bandwidth: int | None = UNLIMITED_BANDWIDTH
    downtime_limit: int | None = QEMU_DEFAULT_DOWNTIME_MS
    multifd_channels: int = 0
    auto_converge: bool = False
    postcopy: bool = False
    parameters: Mapping[str, object] = field(default_factory=dict)
    capabilities: Mapping[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_bandwidth", "downtime_limit"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise MigrationError(f"tuning.{name}: {v!r} must be a whole number >= 0 or None")
        n = self.multifd_channels
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 255:
            raise MigrationError(f"tuning.multifd_channels: {n!r} must be 0 (off) to 255")
        if self.postcopy and n:
            raise MigrationError(
                "tuning: postcopy and multifd together are not supported by QEMU 7.2"
            )

    @classmethod
    def qemu_defaults(cls) -> MigrationTuning:
        """Change nothing: QEMU's own parameters (the baseline for benchmarks)."""
        return cls(max_bandwidth=None, downtime_limit=None)

    def capability_states(self, side: Side) -> dict[str, bool]:
        caps = {"events": True}
        if self.multifd_channels:
            caps["multifd"] = True
        if self.postcopy:
            caps["postcopy-ram"] = True
        if side == "source" and self.auto_converge:
            caps["auto-converge"] = True
        caps.update(self.capabilities)
        return caps

    def parameter_values(self, side: Side) -> dict[str, object]:
        params: dict[str, object] = {}
        if self.multifd_channels:
            params["multifd-channels"] = self.multifd_channels
        if side == "source":
            if self.max_bandwidth is not None:
                params["max-bandwidth"] = self.max_bandwidth
            if self.downtime_limit is not None:
                params["downtime-limit"] = self.downtime_limit
            params.update(self.parameters)
        return params


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    """One look at a running migration (``query-migrate`` on the source).

    Sizes in bytes, rates in bytes/s, times in seconds. ``expected_downtime``
    is QEMU's estimate (None before it has one); ``passes`` counts RAM dirty
    syncs; ``cpu_throttle`` is the percentage auto-converge holds the vCPUs
    back by (0 unthrottled); ``storage_*`` cover the disk mirrors of copied storage.
    """

    status: str
    elapsed: float
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    rate: float = 0.0
    dirty_rate: float = 0.0
    expected_downtime: float | None = None
    passes: int = 0
    cpu_throttle: int = 0
    storage_transferred: int = 0
    storage_remaining: int = 0


#: What `send`, `migrate` and `save` call with each look at a running migration.
ProgressCallback = Callable[[MigrationProgress], object]


@dataclass(frozen=True, slots=True)
class MigrationStats:
    """A finished migration as QEMU measured it (times in seconds).

    ``total_time`` and ``downtime`` are QEMU's (``query-migrate``; the guest
    is paused for ``downtime``); ``wall_time`` is pyqvm's whole operation,
    destination start and storage copy included.
    """

    total_time: float
    downtime: float
    setup_time: float
    transferred: int
    passes: int
    wall_time: float
    storage_transferred: int = 0
    postcopy: bool = False  # switched to postcopy (the destination ran before RAM was all there)
    multifd_bytes: int = 0  # RAM sent over the multifd channels
    cpu_throttle: int = 0  # the highest auto-converge throttle seen, in percent


@dataclass(frozen=True, slots=True)
class Incoming:
    """Where a destination waits: give ``uri`` (and ``nbd``) to the source's `send`."""

    uri: str
    storage: Storage
    nbd: str | None = None  # ``unix:PATH`` or ``tcp:HOST:PORT`` of the disk export (copied)
    exports: tuple[str, ...] = ()  # exported disk node names


@dataclass(frozen=True, slots=True)
class SavedState:
    """A VM's state on disk: ``directory`` holds the vmstate and one overlay per disk."""

    directory: Path
    disks: tuple[str, ...]
    size: int  # bytes of the vmstate file

    @property
    def state_file(self) -> Path:
        return self.directory / STATE_FILE
