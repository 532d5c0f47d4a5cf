"""`pyqvm.codec`: values cross to JSON and back by their type annotations, and bad data is
refused with where it sits."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import pytest

from pyqvm import Disk, ExecResult, Network, Plugged, PortForward, SnapshotInfo, VMSpec
from pyqvm.codec import callback_argument, codable, from_json, is_callback, to_json
from pyqvm.errors import CodecError, SpecError
from pyqvm.faces.operations import CARRIED, OPERATIONS
from pyqvm.ops.migration import Incoming, MigrationProgress, MigrationTuning, ProgressCallback
from pyqvm.vm import AsyncVM


def trip(value: object, tp: object) -> object:
    return from_json(json.loads(json.dumps(to_json(value, tp))), tp)


def test_the_values_operations_take_and_give_come_back_equal(tmp_path: Path) -> None:
    disk = tmp_path / "d.qcow2"
    disk.touch()
    spec = VMSpec(
        name="x", memory="1G", disks=(Disk(disk, id="d1", readonly=True),),
        networks=(Network(mac="52:54:00:12:34:56", forwards=(PortForward(2222, 22),)),),
    )  # fmt: skip
    cases: list[tuple[object, object]] = [
        (spec, VMSpec),
        (ExecResult(-9, b"\x00\xffout", b"err", signal=9, argv=("x",)), ExecResult),
        (
            SnapshotInfo("s", "1", dt.datetime(2026, 12, 7, tzinfo=dt.UTC), 1.5, 10, ("vda",)),
            SnapshotInfo,
        ),
        ([SnapshotInfo("a", "2", dt.datetime(2026, 1, 1), 0.0, 0, ())], list[SnapshotInfo]),
        (Incoming(uri="unix:/x", storage="copied", nbd="unix:/y"), Incoming | str),
        ("tcp:1.2.3.4:5", Incoming | str),
        (MigrationTuning(multifd_channels=2, parameters={"x": 1}), MigrationTuning | None),
        (None, MigrationTuning | None),
        ({"a": [1, 2]}, Mapping[str, object] | None),
        (Plugged(backends=(("netdev", "n1"),), commands=(("device_add", {"id": "n1"}),)), Plugged),
        ("256M", int | str),
        (256, int | str),
        (Path("/a/b"), Path | str | None),
        (b"\x00" * 3, bytes),
        (("a", "b"), Sequence[str]),
    ]
    for value, tp in cases:
        assert trip(value, tp) == value, (value, tp)  # a Sequence comes back a tuple


@pytest.mark.parametrize(
    ("data", "tp", "message"),
    [
        ({"path": 3}, Disk, "disk: path: expected a path, got 3"),
        ({"tag": "t", "color": 1}, SnapshotInfo, "disk: SnapshotInfo has no field 'color'"),
        ("sideways", Literal["unix", "tcp"], "disk: expected 'unix' or 'tcp', got 'sideways'"),
        ("not base64!", bytes, "disk: bad base64"),
        (True, int, "disk: expected a whole number, got True"),
        ("x", list[str], "disk: expected an array, got 'x'"),
        ([1, "x"], list[int], "disk[1]: expected a whole number, got 'x'"),
        ("yesterday", dt.datetime, "disk: expected an ISO 8601 time"),
        (None, str, "disk: expected a string, got None"),
    ],
)
def test_bad_data_is_refused_naming_where(data: object, tp: object, message: str) -> None:
    with pytest.raises(CodecError) as e:
        from_json(data, tp, "disk")
    assert str(e.value).startswith(message.replace("disk: path", "disk.path")), str(e.value)


def test_a_dataclass_check_runs_on_the_far_side(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no such file"):
        from_json({"path": str(tmp_path / "missing.qcow2")}, Disk, "disk")


def test_values_that_do_not_fit_their_type_are_not_sent() -> None:
    with pytest.raises(CodecError, match=r"timeout: expected float \| None"):
        to_json("soon", float | None, "timeout")
    with pytest.raises(CodecError, match="argv: expected a sequence"):
        to_json("ls -l", Sequence[str], "argv")  # a string is not a list of words
    with pytest.raises(CodecError, match=r"args\['a'\]: object is not JSON data"):
        to_json({"a": object()}, Any, "args")


def test_callbacks_and_live_objects_cannot_travel() -> None:
    assert not codable(AsyncVM) and not codable(ProgressCallback)
    assert is_callback(ProgressCallback | None) and is_callback(Callable[[int], None])
    assert not is_callback(int | None)
    assert callback_argument(ProgressCallback | None) is MigrationProgress


def test_every_carried_operation_has_only_codable_types() -> None:
    assert CARRIED, "no operation travels"
    for name, op in CARRIED.items():
        for p, tp in op.hints.items():
            assert codable(tp) or (p in op.callbacks and is_callback(tp)), (name, p)
    # and those that do not travel say why (or cannot: a VM object, a context manager)
    assert not OPERATIONS["migrate"].carried and OPERATIONS["migrate"].callbacks == ("progress",)
