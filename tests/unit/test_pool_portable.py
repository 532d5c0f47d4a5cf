"""Pools' arithmetic (memory check, size) and portable saves' records, without QEMU."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from pyqvm import KernelBoot, MigrationError, PoolError, Template, VMSpec
from pyqvm.ops.migration.portable import PORTABLE, check_portable, portable_spec
from pyqvm.pool import OVERHEAD_MIB, auto_size, check_memory


def _template(memory: int = 512) -> Template:
    return Template(
        name="t",
        directory=Path("/nonexistent/t"),
        spec=VMSpec(name="t", image="default", memory=memory),
        spec_hash="0" * 16,
        machine="microvm",
        accelerator="tcg",
        qemu="/usr/bin/qemu-system-x86_64",
        qemu_version="7.2.0",
        created=0.0,
        stamps={},
    )


def test_a_pool_the_memory_cannot_hold_is_refused_with_the_numbers() -> None:
    each = 512 + OVERHEAD_MIB
    check_memory(_template(), 4, available_mib=4 * each)  # fits exactly
    with pytest.raises(PoolError) as e:
        check_memory(_template(), 5, available_mib=4 * each + 1)
    assert (e.value.size, e.value.needed_mib, e.value.available_mib) == (5, 5 * each, 4 * each + 1)
    assert "ask for at most 4" in str(e.value)


@pytest.mark.parametrize(
    ("cores", "workers", "available", "size"),
    [
        (2, 1, 24_000, 2),  # a spare per core
        (2, 2, 24_000, 1),  # xdist: the cores are shared between workers
        (64, 1, 240_000, 4),  # never more than 4
        (8, 1, 1300, 1),  # half of the memory holds one VM
        (8, 1, 600, 0),  # not even one: no pool
    ],
)
def test_the_automatic_size_follows_cores_workers_and_memory(
    cores: int, workers: int, available: int, size: int
) -> None:
    assert auto_size(_template(), workers, cores=cores, available_mib=available) == size


def _fake_qemu(tmp_path: Path, version: str) -> Path:
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text(f"#!/bin/sh\necho '{version}'\necho 'Copyright (c)'\n")
    qemu.chmod(qemu.stat().st_mode | stat.S_IXUSR)
    return qemu


def _portable(directory: Path, qemu: str, *, fmt: int = 1) -> None:
    (directory / "image").mkdir(parents=True)
    for name in ("vmlinux", "initrd.img"):
        (directory / "image" / name).write_bytes(b"x")
    spec = {
        "name": "old",
        "memory": 256,
        "kernel": {"kernel": "image/vmlinux", "initrd": "image/initrd.img", "append": ""},
    }
    record = {"format": fmt, "pyqvm": "0.1.0", "qemu": qemu, "spec": spec}
    (directory / PORTABLE).write_text(json.dumps(record))


def test_a_portable_save_names_its_files_relative_to_where_it_is_now(tmp_path: Path) -> None:
    _portable(tmp_path / "saved", "QEMU emulator version 7.2.0")
    moved = tmp_path / "moved"
    (tmp_path / "saved").rename(moved)
    spec = portable_spec(moved, "back")
    assert spec is not None and spec.name == "back" and spec.memory == 256
    assert spec.kernel == KernelBoot(
        kernel=moved / "image/vmlinux", initrd=moved / "image/initrd.img"
    )
    assert portable_spec(tmp_path, "x") is None  # not a portable save


def test_another_qemu_version_or_format_is_refused_naming_both(tmp_path: Path) -> None:
    _portable(tmp_path / "a", "QEMU emulator version 6.2.0")
    qemu = _fake_qemu(tmp_path, "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)")
    with pytest.raises(MigrationError) as e:
        check_portable(tmp_path / "a", qemu)
    assert "'QEMU emulator version 6.2.0'" in str(e.value)
    assert "'QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)'" in str(e.value)
    _portable(tmp_path / "b", "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)")
    check_portable(tmp_path / "b", qemu)  # the same version: fine
    _portable(tmp_path / "c", "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)", fmt=99)
    with pytest.raises(MigrationError, match="format 99"):
        portable_spec(tmp_path / "c", "x")


def test_the_blocking_pool_takes_what_the_async_one_takes() -> None:
    """The twins' constructors are written twice (a signature, no logic): kept equal here."""
    import inspect

    from pyqvm import AsyncPool, Pool

    blocking = inspect.signature(Pool.__init__).parameters
    async_ = inspect.signature(AsyncPool.__init__).parameters
    assert list(blocking.items()) == list(async_.items())
    for name in ("open", "acquire", "close"):
        b = inspect.signature(getattr(Pool, name)).parameters
        a = inspect.signature(getattr(AsyncPool, name)).parameters
        assert list(b.items()) == list(a.items()), name
