"""Throw-away overlays: made by qemu-img once per base, copied after that."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pyqvm.errors import HostError
from pyqvm.launch.overlays import make_overlay


def info(path: Path) -> str:
    out = subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], check=True, capture_output=True
    )
    return out.stdout.decode()


@pytest.mark.asyncio
async def test_the_second_overlay_of_a_base_is_a_copy_and_a_changed_base_gets_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * (1 << 20))
    first = await make_overlay(base, "raw", tmp_path / "a.qcow2")
    # No qemu-img from here on: a second overlay of the same base must not need it.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    second = await make_overlay(base, "raw", tmp_path / "b.qcow2")
    assert second.read_bytes() == first.read_bytes()
    assert (second.stat().st_mode & 0o777) == 0o600
    monkeypatch.undo()
    assert '"virtual-size": 1048576' in info(second) and str(base) in info(second)
    # The base grew: its overlay must say so, so qemu-img makes it again.
    with open(base, "ab") as f:
        f.write(b"\0" * (1 << 20))
    os.utime(base, ns=(base.stat().st_atime_ns, base.stat().st_mtime_ns + 1_000_000))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(HostError, match="qemu-img not found"):
        await make_overlay(base, "raw", tmp_path / "c.qcow2")
    monkeypatch.undo()
    third = await make_overlay(base, "raw", tmp_path / "c.qcow2")
    assert '"virtual-size": 2097152' in info(third)
