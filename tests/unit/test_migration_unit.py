"""Migration without QEMU: tuning, the QMP arguments it becomes, addresses, refusals made
before QEMU is asked, ``query-migrate`` parsing, errors, and fd passing over QMP.

The ``query-migrate`` replies below follow QEMU 7.2's MigrationInfo / MigrationStats
(qapi/migration.json; field names checked against ``query-qmp-schema``).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from json_stream import JSONStream

from pyqvm import VM
from pyqvm.channels.qmp import QMPSession
from pyqvm.errors import (
    MigrationError,
    OperationError,
    PyqvmError,
    QMPCommandError,
    VMExitedError,
    VMStateError,
)
from pyqvm.ops import migration as m
from pyqvm.ops.migration import (
    QEMU_DEFAULT_BANDWIDTH,
    QEMU_DEFAULT_DOWNTIME_MS,
    UNLIMITED_BANDWIDTH,
    MigrationTLS,
    MigrationTuning,
    qapi,
)
from pyqvm.spec import HostDevice, VMSpec
from pyqvm.vm import AsyncVM, VMState

# --- tuning -----------------------------------------------------------------------------------


def caps(*names: str, **states: bool) -> dict[str, object]:
    """``migrate-set-capabilities`` arguments: ``names`` on, then ``states`` as given."""
    want = {"events": True, **dict.fromkeys(names, True), **states}
    return {"capabilities": [{"capability": k, "state": v} for k, v in want.items()]}


def test_pyqvm_defaults_lift_the_bandwidth_cap_on_the_source() -> None:
    tuning = MigrationTuning()
    assert qapi.configure_commands(tuning, "source") == [
        ("migrate-set-capabilities", caps()),
        (
            "migrate-set-parameters",
            {"max-bandwidth": UNLIMITED_BANDWIDTH, "downtime-limit": 300},
        ),
    ]
    # The destination takes capabilities only: bandwidth and downtime are the sender's.
    assert qapi.configure_commands(tuning, "destination") == [("migrate-set-capabilities", caps())]


def test_unlimited_bandwidth_is_a_value_qemu_takes() -> None:
    # libvirt's "unlimited": whole MiB, within QEMU's int64 limit, far above 7.2's 128 MiB/s.
    assert UNLIMITED_BANDWIDTH % 2**20 == 0
    assert QEMU_DEFAULT_BANDWIDTH * 2**20 < UNLIMITED_BANDWIDTH <= 2**63 - 1
    assert QEMU_DEFAULT_BANDWIDTH == 128 * 2**20 and QEMU_DEFAULT_DOWNTIME_MS == 300


def test_qemu_defaults_change_no_parameter() -> None:
    tuning = MigrationTuning.qemu_defaults()
    assert tuning.max_bandwidth is None and tuning.downtime_limit is None
    for side in ("source", "destination"):
        assert qapi.configure_commands(tuning, side) == [("migrate-set-capabilities", caps())]


def test_multifd_and_auto_converge() -> None:
    tuning = MigrationTuning(
        max_bandwidth=1 << 30, downtime_limit=50, multifd_channels=4, auto_converge=True
    )
    assert qapi.configure_commands(tuning, "source") == [
        ("migrate-set-capabilities", caps("multifd", "auto-converge")),
        (
            "migrate-set-parameters",
            {"multifd-channels": 4, "max-bandwidth": 1 << 30, "downtime-limit": 50},
        ),
    ]
    # Both sides need multifd and its channel count; auto-converge throttles the source only.
    assert qapi.configure_commands(tuning, "destination") == [
        ("migrate-set-capabilities", caps("multifd")),
        ("migrate-set-parameters", {"multifd-channels": 4}),
    ]


def test_postcopy_is_on_on_both_sides() -> None:
    tuning = MigrationTuning(postcopy=True)
    for side in ("source", "destination"):
        first = qapi.configure_commands(tuning, side)[0]
        assert first == ("migrate-set-capabilities", caps("postcopy-ram"))


def test_pass_through_parameters_and_capabilities() -> None:
    tuning = MigrationTuning(
        downtime_limit=None,
        parameters={"downtime-limit": 20, "xbzrle-cache-size": 1 << 26},
        capabilities={"xbzrle": True, "events": False},
    )
    assert qapi.configure_commands(tuning, "source") == [
        ("migrate-set-capabilities", caps("xbzrle", events=False)),
        (
            "migrate-set-parameters",
            {
                "max-bandwidth": UNLIMITED_BANDWIDTH,
                "downtime-limit": 20,
                "xbzrle-cache-size": 1 << 26,
            },
        ),
    ]
    # Parameters are the sender's; capabilities must match on both sides.
    assert qapi.configure_commands(tuning, "destination") == [
        ("migrate-set-capabilities", caps("xbzrle", events=False))
    ]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_bandwidth": -1}, "max_bandwidth"),
        ({"max_bandwidth": 1.5}, "max_bandwidth"),
        ({"max_bandwidth": "1G"}, "max_bandwidth"),
        ({"max_bandwidth": True}, "max_bandwidth"),
        ({"downtime_limit": -300}, "downtime_limit"),
        ({"downtime_limit": 0.3}, "downtime_limit"),
        ({"multifd_channels": -1}, "multifd_channels"),
        ({"multifd_channels": 256}, "multifd_channels"),
        ({"multifd_channels": True}, "multifd_channels"),
        ({"postcopy": True, "multifd_channels": 2}, "postcopy and multifd"),
    ],
)
def test_bad_tuning_is_refused_when_built(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(MigrationError, match=f"tuning[.:] ?{field}"):
        MigrationTuning(**kwargs)


def test_edge_tuning_values_are_fine() -> None:
    MigrationTuning(max_bandwidth=0, downtime_limit=0, multifd_channels=255)
    MigrationTuning(max_bandwidth=None, downtime_limit=None, multifd_channels=0, postcopy=True)


# --- addresses --------------------------------------------------------------------------------

RUNDIR = Path("/run/pyqvm/vm-1")


@pytest.mark.parametrize(
    ("address", "uri"),
    [
        (None, "tcp:127.0.0.1:0"),  # loopback, any free port: nothing listens beyond the host
        ("", "tcp:127.0.0.1:0"),
        (":4444", "tcp:127.0.0.1:4444"),
        ("0.0.0.0:4444", "tcp:0.0.0.0:4444"),
        ("192.0.2.7", "tcp:192.0.2.7:0"),
        ("dst-host:65535", "tcp:dst-host:65535"),
        ("[::1]:4444", "tcp:[::1]:4444"),
        ("[::]:0", "tcp:[::]:0"),
    ],
)
def test_tcp_incoming_uri(address: str | None, uri: str) -> None:
    assert qapi.incoming_uri("tcp", RUNDIR, address) == uri


def test_unix_incoming_uri_is_in_the_private_runtime_dir() -> None:
    assert qapi.incoming_uri("unix", RUNDIR, None) == "unix:/run/pyqvm/vm-1/migrate.sock"


@pytest.mark.parametrize("address", ["host:port", "1.2.3.4:65536", "1.2.3.4:", "::1", "::1:80"])
def test_bad_tcp_addresses(address: str) -> None:
    with pytest.raises(MigrationError, match=r"address .*(HOST:PORT|\[ADDR\]:PORT)"):
        qapi.incoming_uri("tcp", RUNDIR, address)


def test_listening_port_from_query_migrate() -> None:
    # A destination after `migrate-incoming tcp:127.0.0.1:0` (SocketAddress; its port is a str).
    info = {
        "status": "setup",
        "socket-address": [
            {"type": "unix", "path": "/x.sock"},
            {"type": "inet", "host": "127.0.0.1", "port": "38721"},
        ],
    }
    assert qapi.listening_port(info) == 38721
    assert qapi.listening_port({"status": "setup"}) is None
    assert qapi.listening_port({"socket-address": [{"type": "unix", "path": "/x"}]}) is None


@pytest.mark.parametrize(
    ("nbd", "server"),
    [
        ("unix:/run/pyqvm/vm-1/nbd.sock", {"type": "unix", "path": "/run/pyqvm/vm-1/nbd.sock"}),
        ("tcp:127.0.0.1:10809", {"type": "inet", "host": "127.0.0.1", "port": "10809"}),
        ("tcp:[::1]:10809", {"type": "inet", "host": "::1", "port": "10809"}),
    ],
)
def test_nbd_address_to_socket_address(nbd: str, server: dict[str, str]) -> None:
    assert qapi.nbd_server(nbd) == server


@pytest.mark.parametrize("nbd", ["unix:", "tcp:127.0.0.1", "tcp:host:x", "nbd://h:1/x", ""])
def test_bad_nbd_addresses(nbd: str) -> None:
    with pytest.raises(MigrationError, match="address"):
        qapi.nbd_server(nbd)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"transport": "udp"}, "transport 'udp'"),
        ({"storage": "nfs"}, "storage 'nfs'"),
        ({"transport": "tcp", "address": "nowhere:x"}, "address 'nowhere:x'"),
    ],
)
async def test_listen_refuses_bad_options_before_starting_qemu(
    kwargs: dict[str, Any], match: str
) -> None:
    dst = AsyncVM(VMSpec(name="dst"))
    with pytest.raises(MigrationError, match=match):
        await dst.listen(**kwargs)
    assert dst.state is VMState.CREATED and dst.pid is None and dst.runtime_dir is None


# --- refused up front: vfio ------------------------------------------------------------------

VFIO = VMSpec(name="gpu-vm", host_devices=(HostDevice("0000:01:00.0"),))


def running(spec: VMSpec) -> AsyncVM:
    """A VM that believes it runs but has no QEMU: any QMP call fails with VMStateError."""
    vm = AsyncVM(spec)
    vm.machine.move(VMState.STARTING)  # the moves a start makes
    vm.machine.move(VMState.RUNNING)
    return vm


def assert_says_why(err: pytest.ExceptionInfo[MigrationError]) -> None:
    text = str(err.value)
    assert "gpu-vm" in text and "0000:01:00.0" in text
    assert "vfio-pci" in text and "state lives in the hardware" in text
    assert err.value.status is None and err.value.qemu_error is None  # QEMU was not asked


def test_migration_blocker() -> None:
    assert m.migration_blocker(VMSpec()) is None
    reason = m.migration_blocker(VFIO)
    assert reason is not None and "0000:01:00.0" in reason


@pytest.mark.asyncio
async def test_migrating_a_vfio_vm_is_refused_before_any_qmp() -> None:
    src, dst = running(VFIO), AsyncVM(VFIO)
    with pytest.raises(MigrationError, match="cannot migrate VM") as err:
        await src.migrate(dst)
    assert_says_why(err)
    assert src.state is VMState.RUNNING  # not MIGRATING: nothing was begun
    assert dst.state is VMState.CREATED and dst.pid is None


@pytest.mark.asyncio
async def test_send_listen_save_refuse_a_vfio_vm(tmp_path: Path) -> None:
    src = running(VFIO)
    with pytest.raises(MigrationError, match="cannot migrate VM") as err:
        await src.send("unix:/nowhere.sock")
    assert_says_why(err)
    assert src.state is VMState.RUNNING

    dst = AsyncVM(VFIO)
    with pytest.raises(MigrationError, match="cannot migrate into VM") as err:
        await dst.listen()
    assert_says_why(err)
    assert dst.state is VMState.CREATED and dst.pid is None

    with pytest.raises(MigrationError, match="cannot save VM") as err:
        await src.save(tmp_path / "saved")
    assert_says_why(err)
    assert not (tmp_path / "saved").exists()


@pytest.mark.asyncio
async def test_restoring_into_a_vfio_vm_is_refused(tmp_path: Path) -> None:
    (tmp_path / "vmstate").write_bytes(b"QEVM")
    (tmp_path / "pyqvm-saved.json").write_text(json.dumps({"name": "x", "disks": []}))
    vm = AsyncVM(VFIO)
    with pytest.raises(MigrationError, match="cannot restore VM") as err:
        await vm.restore(tmp_path)
    assert_says_why(err)
    assert vm.state is VMState.CREATED and vm.pid is None


def test_sync_migrate_is_the_async_one_and_refuses_before_qemu() -> None:
    src, dst = VM(VMSpec(name="a")), VM(VMSpec(name="b"))
    with pytest.raises(VMStateError, match="'a' is created; migrating needs it running") as err:
        src.migrate(dst)
    assert err.value.state is VMState.CREATED and err.value.required == (VMState.RUNNING,)
    assert src.pid is None and dst.pid is None


def test_sync_vms_of_two_threads_do_not_share_a_migration() -> None:
    made: list[VM] = []
    t = threading.Thread(target=lambda: made.append(VM(VMSpec(name="other"))))
    t.start()
    t.join()
    with pytest.raises(PyqvmError, match="another thread"):
        VM(VMSpec(name="here")).migrate(made[0])


# --- query-migrate ----------------------------------------------------------------------------

# The source, mid-way through the second pass over a 512 MiB guest's RAM.
ACTIVE: dict[str, Any] = {
    "status": "active",
    "setup-time": 12,
    "total-time": 1534,
    "expected-downtime": 41,
    "ram": {
        "transferred": 157_286_400,
        "remaining": 402_653_184,
        "total": 554_237_952,
        "duplicate": 30_210,
        "skipped": 0,
        "normal": 38_200,
        "normal-bytes": 156_467_200,
        "dirty-pages-rate": 2_560,
        "mbps": 838.86,
        "dirty-sync-count": 2,
        "postcopy-requests": 0,
        "page-size": 4096,
        "multifd-bytes": 0,
        "pages-per-second": 25_600,
        "precopy-bytes": 157_286_400,
        "downtime-bytes": 0,
        "postcopy-bytes": 0,
        "dirty-sync-missed-zero-copy": 0,
    },
}

COMPLETED: dict[str, Any] = {
    "status": "completed",
    "setup-time": 12,
    "total-time": 1873,
    "downtime": 38,
    "ram": {**ACTIVE["ram"], "transferred": 571_000_000, "remaining": 0, "dirty-sync-count": 4},
}

FAILED: dict[str, Any] = {
    "status": "failed",
    "error-desc": "Unable to write to socket: Connection reset by peer",
    "total-time": 2210,
    "ram": {**ACTIVE["ram"], "transferred": 9_000_000},
}


def test_progress_from_an_active_migration() -> None:
    p = qapi.progress_from(ACTIVE, 1.25, {"done": 3 << 20, "left": 1 << 20})
    assert p == m.MigrationProgress(
        status="active",
        elapsed=1.25,
        transferred=157_286_400,
        remaining=402_653_184,
        total=554_237_952,
        rate=838.86e6 / 8,  # QEMU's mbps is megabits per second
        dirty_rate=2_560 * 4096,  # pages per second, times the page size
        expected_downtime=0.041,
        passes=2,
        cpu_throttle=0,
        storage_transferred=3 << 20,
        storage_remaining=1 << 20,
    )
    throttled = qapi.progress_from({**ACTIVE, "cpu-throttle-percentage": 90}, 1.25, {})
    assert throttled.cpu_throttle == 90


def test_progress_before_qemu_has_numbers() -> None:
    p = qapi.progress_from({"status": "setup"}, 0.0, {})
    assert (p.status, p.transferred, p.total, p.rate, p.dirty_rate) == ("setup", 0, 0, 0.0, 0.0)
    assert p.expected_downtime is None and p.passes == 0 and p.storage_transferred == 0
    assert qapi.progress_from({}, 0.0, {}).status == "none"


def test_stats_of_a_completed_migration() -> None:
    s = qapi.stats_from(COMPLETED, 2.5, 7 << 20)
    assert s == m.MigrationStats(
        total_time=1.873,
        downtime=0.038,
        setup_time=0.012,
        transferred=571_000_000,
        passes=4,
        wall_time=2.5,
        storage_transferred=7 << 20,
    )


# --- MigrationError ---------------------------------------------------------------------------


def test_migration_error_stays_constructible_from_a_message() -> None:
    e = MigrationError("it broke")
    assert str(e) == "it broke" and isinstance(e, OperationError)
    assert e.status is None and e.qemu_error is None


def test_migration_error_keeps_qemus_status_and_reason() -> None:
    cause = MigrationError("to unix:/x failed", status="failed", qemu_error="Connection reset")
    e = qapi.migration_error("to unix:/x failed; the guest runs on here", cause, {"status": "x"})
    assert (e.status, e.qemu_error) == ("failed", "Connection reset")
    assert str(e) == "to unix:/x failed; the guest runs on here"

    # Another error (QEMU went away mid-way): status and reason come from the last query-migrate.
    e = qapi.migration_error("failed", VMExitedError("gone"), FAILED)
    assert (e.status, e.qemu_error) == ("failed", FAILED["error-desc"])
    e = qapi.migration_error("failed", VMExitedError("gone"), {})
    assert (e.status, e.qemu_error) == (None, None)


# --- QMPSession.send_fd -----------------------------------------------------------------------


class FdQEMU(threading.Thread):
    """A QMP peer that receives descriptors (SCM_RIGHTS) and names them on ``getfd``, like QEMU:
    the last descriptor received waits for the next ``getfd``."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.named: dict[str, int] = {}
        self.commands: list[str] = []

    def run(self) -> None:
        version = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}
        self._send({"QMP": {"version": version, "capabilities": []}})
        stream = JSONStream()
        pending: int | None = None  # the last descriptor received, not yet named
        fd_size = struct.calcsize("@i")
        while True:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(4 * fd_size))
            if not data:
                break
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    if pending is not None:
                        os.close(pending)
                    pending = struct.unpack("@i", payload[:fd_size])[0]
            for msg in stream.feed(data):
                reply: dict[str, Any] = {"id": msg.get("id"), "return": {}}
                name = msg["execute"]
                if name != "qmp_capabilities":
                    self.commands.append(name)
                fdname = msg.get("arguments", {}).get("fdname")
                if name == "getfd" and (pending is None or fdname == "refused"):
                    desc = "No file descriptor supplied via SCM_RIGHTS"
                    reply = {"id": msg.get("id"), "error": {"class": "GenericError", "desc": desc}}
                elif name == "getfd":
                    assert pending is not None  # the branch above took the None case
                    self.named[fdname], pending = pending, None
                self._send(reply)
        if pending is not None:
            os.close(pending)

    def _send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def close(self) -> None:
        self.join(10)
        for fd in self.named.values():
            os.close(fd)
        self.sock.close()


@pytest_asyncio.fixture
async def fd_qemu() -> AsyncIterator[tuple[QMPSession, FdQEMU]]:
    ours, theirs = socket.socketpair()
    peer = FdQEMU(theirs)
    peer.start()
    session = QMPSession("fd-test")
    await session.connect(ours, timeout=10)
    try:
        yield session, peer
    finally:
        await session.close()
        ours.close()
        peer.close()


@pytest.mark.asyncio
async def test_send_fd_hands_over_the_very_descriptor(fd_qemu: tuple[QMPSession, FdQEMU]) -> None:
    session, peer = fd_qemu
    r, w = os.pipe()
    try:
        await session.send_fd(w, "pq-migfd")
        os.close(w)  # ours: the peer holds its own copy now
        w = -1
        assert peer.commands == ["getfd"]
        os.write(peer.named["pq-migfd"], b"through the fd")
        assert os.read(r, 100) == b"through the fd"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@pytest.mark.asyncio
async def test_send_fd_errors(fd_qemu: tuple[QMPSession, FdQEMU]) -> None:
    session, peer = fd_qemu
    r, w = os.pipe()
    try:
        for bad in ("", "4fd"):
            with pytest.raises(ValueError, match="fd name"):
                await session.send_fd(w, bad)
        assert peer.commands == []  # refused before anything went to QEMU
        with pytest.raises(ValueError, match="not an open file descriptor"):
            await session.send_fd(99_999, "pq-closed")
        with pytest.raises(QMPCommandError, match="getfd") as err:
            await session.send_fd(w, "refused")
        assert err.value.command == "getfd" and err.value.error_class == "GenericError"
        await session.close()
        with pytest.raises(VMExitedError, match="not connected"):
            await session.send_fd(w, "pq-late")
    finally:
        os.close(r)
        os.close(w)


# --- TLS and clear text -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.5.6.7", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.213.0.2", False),
        ("example.org", False),
    ],
)
def test_only_loopback_counts_as_loopback(host: str, loopback: bool) -> None:
    assert qapi.is_loopback(host) is loopback


def test_clear_text_off_loopback_is_refused_unless_tls_or_insecure(tmp_path: Path) -> None:
    (tmp_path / "ca-cert.pem").write_text("x")
    tls = MigrationTLS(tmp_path)
    qapi.refuse_cleartext("tcp", "127.0.0.1", None, False, "migrating to")
    qapi.refuse_cleartext("unix", None, None, False, "migrating to")
    qapi.refuse_cleartext("tcp", "10.0.0.2", tls, False, "migrating to")
    qapi.refuse_cleartext("tcp", "10.0.0.2", None, True, "migrating to")
    with pytest.raises(MigrationError, match=r"migrating to 10\.0\.0\.2: .*clear text"):
        qapi.refuse_cleartext("tcp", "10.0.0.2", None, False, "migrating to")
    assert qapi.tcp_uri_host("tcp:[::]:4444") == "::"
    assert qapi.tcp_uri_host("unix:/x") is None


def test_tls_objects_and_parameters_per_side(tmp_path: Path) -> None:
    (tmp_path / "ca-cert.pem").write_text("x")
    tls = MigrationTLS(tmp_path, hostname="dst.example", peer="O=o,CN=src")
    creds, cmds = qapi.tls_objects(tls, "destination", 3)
    assert creds == "pq-mig-tls3"
    assert cmds[0] == (
        "object-add",
        {
            "qom-type": "tls-creds-x509",
            "id": "pq-mig-tls3",
            "dir": str(tmp_path),
            "endpoint": "server",
            "verify-peer": True,
        },
    )
    assert cmds[1][1] == {
        "qom-type": "authz-simple",
        "id": "pq-mig-tls3-authz",
        "identity": "O=o,CN=src",
    }
    assert qapi.tls_parameters(tls, "destination", creds) == {
        "tls-creds": creds,
        "tls-authz": "pq-mig-tls3-authz",
    }
    _, src_cmds = qapi.tls_objects(tls, "source", 4)
    assert [c[1]["endpoint"] for c in src_cmds] == ["client"]  # no authz on the source
    assert qapi.tls_parameters(tls, "source", "c") == {
        "tls-creds": "c",
        "tls-hostname": "dst.example",
    }
    assert qapi.tls_parameters(None, "source", "") == {"tls-creds": ""}  # back to clear text
    with pytest.raises(MigrationError, match=r"client-cert\.pem is missing"):
        tls.check("source")
