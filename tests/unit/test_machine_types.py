"""`pyqvm.spec.machines`: one row per machine type, and VMSpec checks a spec against it."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from pyqvm.errors import SpecError
from pyqvm.spec import ConcreteMachine, Disk, Network, VMSpec
from pyqvm.spec.arches import ARCHES
from pyqvm.spec.machines import MACHINE_TYPES


def test_every_machine_type_has_a_row() -> None:
    assert set(MACHINE_TYPES) == set(get_args(ConcreteMachine))
    for arch in ARCHES.values():
        assert set(arch.machines) <= set(MACHINE_TYPES), arch.name
    for name, info in MACHINE_TYPES.items():
        assert info.name == name
        for refusal in info.refuses.values():
            # each names its field and says what to do instead
            assert refusal.field and any(w in refusal.message for w in ("use", "set", "leave"))


@pytest.mark.parametrize("machine", ["q35", "pc", "microvm"])
def test_a_spec_gets_what_its_machines_row_says(machine: str, tmp_path: Path) -> None:
    info = MACHINE_TYPES[machine]
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    base = {"machine": machine, "kernel": {"kernel": kernel}}
    for model in ("virtio", "e1000", "e1000e"):
        spec = dict(base, networks=(Network(model=model),))
        if model in info.nic_models:
            VMSpec(**spec)  # type: ignore[arg-type]
        else:
            with pytest.raises(SpecError, match=r"networks\[0\]\.model"):
                VMSpec(**spec)  # type: ignore[arg-type]
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 512)
    for iface in ("virtio-blk", "virtio-scsi", "ahci", "ide"):
        spec = dict(base, disks=(Disk(disk, format="raw", interface=iface),))
        if iface in info.interfaces:
            VMSpec(**spec)  # type: ignore[arg-type]
        else:
            with pytest.raises(SpecError, match=r"disks\[0\]"):
                VMSpec(**spec)  # type: ignore[arg-type]
    assert VMSpec(**base).has_vmgenid is info.acpi  # type: ignore[arg-type]
