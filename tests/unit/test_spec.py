from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyqvm.errors import SpecError
from pyqvm.spec import Disk, HostDevice, KernelBoot, Network, VMSpec
from pyqvm.spec.io import load_spec, spec_from_dict


def test_defaults_are_a_small_virtio_guest_on_an_automatic_machine() -> None:
    s = VMSpec()
    assert (s.machine, s.profile, s.accelerator, s.memory, s.smp) == (
        "auto",
        "virtio",
        "auto",
        512,
        1,
    )
    # Nothing to boot directly: firmware boot, which wants a PCI machine.
    assert s.effective_machine == "q35"


@pytest.mark.parametrize(
    ("kw", "machine"),
    [
        ({}, "microvm"),
        ({"networks": (Network(),), "smp": 2, "max_smp": 2}, "microvm"),
        ({"disks": ("auto",)}, "microvm"),
        ({"hotplug_slots": 1}, "q35"),
        ({"max_smp": 2}, "q35"),
        ({"max_memory": "1G", "memory_slots": 1}, "q35"),
        ({"profile": "emulated"}, "q35"),
        ({"guest_os": "windows"}, "q35"),
        ({"cdroms": ("cd.iso",)}, "q35"),
        ({"extra_args": ("-device", "virtio-gpu-pci")}, "q35"),
        ({"networks": (Network(model="e1000"),)}, "q35"),
        ({"disks": ("virtio-scsi",)}, "q35"),
        ({"disks": ("ide",)}, "pc"),
        ({"machine": "q35"}, "q35"),
        ({"machine": "pc"}, "pc"),
    ],
)
def test_auto_machine_is_microvm_only_when_nothing_needs_pci(
    kw: dict[str, Any], machine: str, tmp_path: Path
) -> None:
    """microvm boots fastest; q35 (or pc for IDE) whenever the spec asks for what it lacks."""
    f = tmp_path / "cd.iso"
    f.write_bytes(b"")
    if "disks" in kw:
        kw["disks"] = tuple(Disk(path=f, format="raw", interface=i) for i in kw["disks"])
    if "cdroms" in kw:
        kw["cdroms"] = (f,)
    s = VMSpec(image="default", **kw)
    assert s.effective_machine == machine


def test_auto_machine_validates_against_the_machine_it_picks(tmp_path: Path) -> None:
    f = tmp_path / "d.img"
    f.write_bytes(b"")
    s = VMSpec(image="default", disks=(Disk(path=f, format="raw", interface="ahci"),))
    assert s.effective_machine == "q35"
    # IDE makes auto pick pc, which reserves no hotplug ports.
    with pytest.raises(SpecError, match=r"hotplug_slots.*leave it 0"):
        VMSpec(
            image="default",
            hotplug_slots=1,
            disks=(Disk(path=f, format="raw", interface="ide"),),
        )


@pytest.mark.parametrize(
    ("value", "mib"), [(512, 512), ("512M", 512), ("2G", 2048), ("1GiB", 1024), ("1048576K", 1024)]
)
def test_memory_sizes(value: int | str, mib: int) -> None:
    assert VMSpec(memory=value).memory == mib


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"memory": "512X"}, "memory", "use e.g. 512M"),
        ({"memory": 0}, "memory", "positive"),
        ({"memory": "-1G"}, "memory", "not a size"),
        ({"machine": "sun4m"}, "machine", "auto, q35, pc, microvm, virt"),
        ({"machine": "virt"}, "machine", "not a machine of x86_64; use microvm, q35, pc"),
        ({"profile": "fast"}, "profile", "virtio, emulated, passthrough"),
        ({"accelerator": "hvf"}, "accelerator", "auto, kvm, tcg"),
        ({"smp": 0}, "smp", "1 to 255"),
        # Checked before machine = "auto" looks at them (a string once raised TypeError).
        ({"max_smp": "4"}, "max_smp", "whole number from 1 to 255"),
        ({"max_memory": "1X", "memory_slots": 1}, "max_memory", "not a size"),
        ({"disks": [{"path": "missing.qcow2"}]}, "disks[0].path", "no such file"),
        ({"kernel": {"kernel": "nope"}}, "kernel.kernel", "no such file"),
        ({"host_devices": [{"address": "1:2:3"}]}, "host_devices[0].address", "DDDD:BB:SS.F"),
        ({"profile": "passthrough"}, "host_devices", "at least one host device"),
        ({"networks": [{"id": "9net"}]}, "networks[0].id", "valid QEMU id"),
        ({"networks": [{"id": "a"}, {"id": "a"}]}, "networks[1].id", "already used"),
        ({"networks": [{"mode": "tap"}]}, "networks[0].tap", "tap interface"),
        ({"networks": [{"mac": "zz"}]}, "networks[0].mac", "MAC"),
        ({"bogus": 1}, "bogus", "unknown field"),
        ({"disks": [{"path": "x", "size": 1}]}, "disks[0].size", "unknown field"),
        ({"ready": "console"}, "ready_pattern", "ready_pattern"),
    ],
)
def test_bad_input_names_the_field(data: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        spec_from_dict(data)
    assert err.value.field == field
    assert words in str(err.value)
    assert str(err.value).startswith(f"{field}: ")


def test_machine_profile_conflicts(files: dict[str, Path]) -> None:
    k = KernelBoot(files["kernel"])
    with pytest.raises(SpecError, match="microvm has no emulated"):
        VMSpec(machine="microvm", profile="emulated", kernel=k)
    with pytest.raises(SpecError, match=r"ahci.*q35"):
        VMSpec(machine="pc", disks=(Disk(files["raw"], interface="ahci"),))
    with pytest.raises(SpecError, match="microvm boots only a kernel"):
        VMSpec(machine="microvm")
    with pytest.raises(SpecError, match="either image"):
        VMSpec(image="default", kernel=k)


def test_duplicate_host_device_refused() -> None:
    with pytest.raises(SpecError, match="listed twice"):
        VMSpec(host_devices=(HostDevice("01:00.0"), HostDevice("0000:01:00.0")))


def test_normalises_paths_ids_and_formats(files: dict[str, Path], tmp_path: Path) -> None:
    s = VMSpec(
        disks=(Disk(files["qcow2"]), Disk(files["raw"])),
        networks=(Network(), Network(mode="none")),
        host_devices=(HostDevice("01:00.0"),),
    )
    assert [d.id for d in s.disks] == ["disk0", "disk1"]
    assert [d.format for d in s.disks] == ["qcow2", "raw"]
    assert [n.id for n in s.networks] == ["net0", "net1"]
    assert s.host_devices[0].address == "0000:01:00.0"


def test_load_toml_relative_to_file(files: dict[str, Path], tmp_path: Path) -> None:
    toml = tmp_path / "vm.toml"
    toml.write_text(
        """
name = "web"
memory = "1G"
machine = "pc"
profile = "emulated"
kernel = { kernel = "vmlinuz", initrd = "initrd.gz", append = "console=ttyS0" }
[[disks]]
path = "disk.qcow2"
[[networks]]
forwards = [{ host_port = 8080, guest_port = 80 }]
"""
    )
    s = load_spec(toml)
    assert s.memory == 1024 and s.machine == "pc" and s.name == "web"
    assert s.kernel is not None and s.kernel.kernel == files["kernel"]
    assert s.disks[0].path == files["qcow2"] and s.disks[0].format == "qcow2"
    assert s.networks[0].forwards[0].host_port == 8080


def test_load_toml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("memory = [")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "none.toml")


def test_ide_ports_and_cdroms_checked_when_built(files: dict[str, Path]) -> None:
    disks = tuple(Disk(files["raw"], ephemeral=False, id=f"d{i}") for i in range(4))
    with pytest.raises(SpecError, match=r"cdroms\[0\]: machine 'pc' has only 4"):
        VMSpec(machine="pc", profile="emulated", disks=disks, cdroms=(files["raw"],))
    VMSpec(machine="pc", profile="emulated", disks=disks)  # exactly four fit
    with pytest.raises(SpecError, match="microvm has no AHCI/IDE"):
        VMSpec(machine="microvm", image="default", cdroms=(files["raw"],))
    with pytest.raises(SpecError, match=r"disks\[0\]\.id: 'root' is the built-in image"):
        VMSpec(image="default", disks=(Disk(files["raw"], id="root"),))


def test_hotplug_room_fields() -> None:
    s = VMSpec(hotplug_slots=4, smp=2, max_smp=8, memory="1G", max_memory="4G", memory_slots=2)
    assert (s.hotplug_slots, s.max_smp, s.max_memory, s.memory_slots) == (4, 8, 4096, 2)
    assert VMSpec().max_memory is None and VMSpec().max_smp is None
    assert VMSpec(machine="pc", max_smp=2, max_memory=1024, memory_slots=1).max_memory == 1024


@pytest.mark.parametrize(
    ("kw", "field", "words"),
    [
        ({"hotplug_slots": -1}, "hotplug_slots", "0 to 16"),
        ({"hotplug_slots": 17}, "hotplug_slots", "0 to 16"),
        ({"hotplug_slots": True}, "hotplug_slots", "whole number"),
        ({"hotplug_slots": 2, "machine": "pc"}, "hotplug_slots", "pci.0"),
        ({"smp": 4, "max_smp": 2}, "max_smp", "below smp"),
        ({"max_smp": 256}, "max_smp", "1 to 255"),
        ({"memory_slots": 2}, "memory_slots", "needs max_memory"),
        ({"max_memory": "256M"}, "max_memory", "below memory"),
        ({"max_memory": "2X"}, "max_memory", "not a size"),
        ({"memory_slots": 257, "max_memory": "2G"}, "memory_slots", "0 to 256"),
    ],
)
def test_hotplug_room_is_checked(kw: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(SpecError) as err:
        VMSpec(**kw)  # type: ignore[arg-type]
    assert err.value.field == field and words in err.value.message


def test_hotplug_room_from_toml_data() -> None:
    s = spec_from_dict({"max_memory": "1G", "memory_slots": 1, "max_smp": 2, "hotplug_slots": 1})
    assert (s.max_memory, s.memory_slots, s.max_smp, s.hotplug_slots) == (1024, 1, 2, 1)
