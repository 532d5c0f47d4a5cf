"""Shared fixtures: small files for specs, a built guest image for e2e tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Stand-in kernel, initrd, raw and qcow2 disk files for specs that must point at real files."""
    out = {
        "kernel": tmp_path / "vmlinuz",
        "initrd": tmp_path / "initrd.gz",
        "raw": tmp_path / "disk.img",
        "qcow2": tmp_path / "disk.qcow2",
    }
    for p in out.values():
        p.write_bytes(b"\0" * 512)
    out["qcow2"].write_bytes(b"QFI\xfb" + b"\0" * 508)
    return out
