"""Named VMs without QEMU: the wire translations and the registry's locking and pruning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqvm.errors import (
    GuestExecError,
    HostError,
    LaunchError,
    NamedVMError,
    PyqvmError,
    SpecError,
    VMStateError,
)
from pyqvm.named import registry, wire
from pyqvm.named.registry import Record
from pyqvm.state import VMState


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pq-unit-"))
    d.chmod(0o700)
    monkeypatch.setenv("PYQVM_RUNTIME_DIR", str(d))
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


# --- wire -----------------------------------------------------------------------------------


def test_splitter_cuts_objects_wherever_the_bytes_break() -> None:
    messages = [
        {"execute": "a", "arguments": {"s": 'with } and { and \\" inside'}},
        {"execute": "b", "id": 2},
        {"execute": "c", "arguments": {"nested": {"x": [1, {"y": "}"}]}}},
    ]
    stream = b"  ".join(json.dumps(m).encode() for m in messages) + b"\n"
    for chunk in (1, 3, 7, len(stream)):
        splitter, out = wire.Splitter(), []
        for i in range(0, len(stream), chunk):
            out += splitter.feed(stream[i : i + chunk])
        assert [json.loads(o) for o in out] == messages, chunk


@pytest.mark.parametrize("bad", [b"[1, 2]", b'"text"', b"}", b"x{}"])
def test_splitter_refuses_what_is_not_an_object(bad: bytes) -> None:
    with pytest.raises(ValueError):
        wire.Splitter().feed(bad)


def test_splitter_refuses_a_message_past_its_limit() -> None:
    s = wire.Splitter(limit=100)
    with pytest.raises(ValueError, match="longer than 100"):
        s.feed(b'{"execute": "x", "arguments": {"data": "' + b"a" * 200)


@pytest.mark.parametrize(
    "error",
    [
        SpecError("memory", "'lots' is not a size"),
        LaunchError(
            "QEMU exited", argv=["qemu", "-x"], exitcode=1, stderr="bad -x", console="boot"
        ),
        VMStateError("not now", state=VMState.PAUSED, required=(VMState.RUNNING,)),
        GuestExecError(["false"], 1, b"\xff err", None),
        NamedVMError("gone", name="web"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_come_back_as_the_same_type_message_and_data(error: PyqvmError) -> None:
    msg = json.loads(json.dumps(wire.error_to_json(error)))  # as it crosses the socket
    back = wire.error_from_json(msg)
    assert type(back) is type(error) and str(back) == str(error)
    for k, v in vars(error).items():
        want = tuple(v) if isinstance(v, list) else v
        assert getattr(back, k) == want, k


def test_an_error_class_this_pyqvm_lacks_comes_back_as_pyqvm_error() -> None:
    back = wire.error_from_json({"class": "FutureError", "desc": "from a newer owner"})
    assert type(back) is PyqvmError and str(back) == "from a newer owner"


# --- registry -------------------------------------------------------------------------------


def record(name: str, runtime_dir: Path) -> Record:
    return Record(
        name=name,
        owner_pid=os.getpid(),
        qemu_pid=2**22 + 1,  # no such process
        started=0.0,
        accelerator="tcg",
        machine="microvm",
        memory=512,
        smp=1,
        runtime_dir=str(runtime_dir),
        console_log=str(runtime_dir / "console.log"),
        console_socket=None,
    )


HOLDER = "import os, sys, time; os.read(0, 1); time.sleep(60)"


def hold(reservation: registry.Reservation) -> subprocess.Popen[bytes]:
    """A stand-in owner: a process that inherits the reservation's lock and holds it."""
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, pass_fds=(reservation.lock_fd,)
    )
    reservation.close()
    return p


def test_a_name_is_taken_while_its_owner_lives_and_pruned_once_it_dies(
    runtime: Path, tmp_path: Path
) -> None:
    r = registry.reserve("web")
    rundir = tmp_path / "rundir"
    rundir.mkdir()
    registry.write_record(r.entry, record("web", rundir))
    owner = hold(r)
    try:
        with pytest.raises(NamedVMError, match="'web' is taken by a running VM"):
            registry.reserve("web")
        assert [e.name for e in registry.scan()[0]] == ["web"]
        assert registry.find("web").record().memory == 512
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert owner.stdin is not None
        owner.stdin.close()
    live, notes = registry.scan()
    assert live == [] and len(notes) == 1 and "web: its owner process" in notes[0]
    assert not rundir.exists()  # the dead VM's runtime dir goes with it
    assert registry.scan() == ([], [])  # said once
    again = registry.reserve("web")  # the name is free again
    again.release()


def test_a_dead_entry_found_by_name_is_pruned_and_said_so(runtime: Path, tmp_path: Path) -> None:
    r = registry.reserve("old")
    registry.write_record(r.entry, record("old", tmp_path / "gone"))
    r.close()  # nobody holds the lock: its owner died
    with pytest.raises(NamedVMError, match="'old' is gone: its owner process"):
        registry.find("old")
    with pytest.raises(NamedVMError, match="no VM named 'old'"):
        registry.find("old")


def test_a_broken_record_is_named_with_the_fix(runtime: Path) -> None:
    r = registry.reserve("b")
    (r.entry.directory / "record.json").write_text("{no")
    with pytest.raises(NamedVMError, match=r"record .* is unreadable.*pyqvm stop b"):
        r.entry.record()
    (r.entry.directory / "record.json").write_text('{"format": 99}')
    with pytest.raises(NamedVMError, match="another pyqvm version"):
        r.entry.record()
    r.release()


def test_an_unsafe_runtime_dir_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    monkeypatch.setenv("PYQVM_RUNTIME_DIR", str(open_dir))
    with pytest.raises(HostError, match="closed to others"):
        registry.root()


def test_bad_names_are_refused_before_anything_is_made(runtime: Path) -> None:
    for bad in ("", "a/b", "..", "-x", "a b"):
        with pytest.raises(SpecError):
            registry.reserve(bad)
    with pytest.raises(HostError, match="too long for a unix socket"):
        registry.reserve("n" * 100)
    assert list((runtime / "vms").iterdir()) == []
