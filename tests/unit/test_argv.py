from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pyqvm.argv import DiskFile, LaunchContext, RamFile, build_argv, escape, opts, qjson
from pyqvm.errors import SpecError
from pyqvm.launch.plan import FILE_RAM, QEMU_DEFAULTS, LaunchPlan, QemuMemory
from pyqvm.spec import Disk, HostDevice, KernelBoot, Network, PortForward, VMSpec


def ctx(tmp_path: Path, **kw: object) -> LaunchContext:
    base: dict[str, object] = {
        "qemu": Path("/usr/bin/qemu-system-x86_64"),
        "accel": "tcg",
        "qmp_fd": 5,
        "agent_fd": 6,
        "console_log": tmp_path / "console.log",
    }
    base.update(kw)
    return LaunchContext(**base)  # type: ignore[arg-type]


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def devices(argv: list[str]) -> list[dict[str, object]]:
    return [json.loads(v) for v in values(argv, "-device")]


def test_escape_and_opts() -> None:
    assert escape("a,b,,c") == "a,,b,,,,c"
    assert opts("file", {"id": "x", "path": "/t/a,readonly=on", "flag": True, "skip": None}) == (
        "file,id=x,path=/t/a,,readonly=on,flag=on"
    )
    with pytest.raises(ValueError):
        opts("x", {"bad key": "v"})
    assert json.loads(qjson({"a": "x,y", "b": None})) == {"a": "x,y"}


def test_baseline_is_locked_down(tmp_path: Path) -> None:
    argv = build_argv(VMSpec(guest_agent=False), ctx(tmp_path, agent_fd=None))
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert {"-nodefaults", "-no-user-config"} <= set(argv)
    assert values(argv, "-display") == ["none"]
    assert values(argv, "-sandbox") == [
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    ]
    assert not {"-vnc", "-spice", "-qmp", "-monitor"} & set(argv)
    assert values(argv, "-chardev")[0] == "socket,id=pq-qmp,fd=5"
    assert values(argv, "-mon") == ["chardev=pq-qmp,mode=control"]
    assert values(argv, "-accel") == ["tcg"]
    assert "-cpu" not in argv  # QEMU's default model under TCG
    assert "-sandbox" not in build_argv(VMSpec(sandbox=False, guest_agent=False), ctx(tmp_path))


def test_console_path_is_escaped(tmp_path: Path) -> None:
    log = tmp_path / "a,logfile=/etc/x"
    argv = build_argv(VMSpec(guest_agent=False), ctx(tmp_path, console_log=log))
    path = str(log).replace(",", ",,")
    assert f"file,id=pq-console,path={path},append=on" in values(argv, "-chardev")


def test_the_console_is_a_socket_pair_that_qemu_also_logs(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    argv = build_argv(VMSpec(guest_agent=False), ctx(tmp_path, console_log=log, console_fd=7))
    assert f"socket,id=pq-console,fd=7,logfile={log},logappend=on" in values(argv, "-chardev")


def test_virtio_profile(files: dict[str, Path], tmp_path: Path) -> None:
    spec = VMSpec(
        kernel=KernelBoot(files["kernel"], files["initrd"], "console=ttyS0"),
        disks=(Disk(files["qcow2"]), Disk(files["raw"], interface="virtio-scsi", ephemeral=False)),
        networks=(Network(forwards=(PortForward(2222, 22),)),),
    )
    ov = tmp_path / "disk0.qcow2"
    argv = build_argv(spec, ctx(tmp_path, disk_files={"disk0": DiskFile(ov)}))
    drivers = [d["driver"] for d in devices(argv)]
    assert drivers == [
        "virtio-serial-pci",
        "virtserialport",
        "virtio-blk-pci",
        "virtio-scsi-pci",
        "scsi-hd",
        "virtio-net-pci",
        "virtio-rng-pci",
        "virtio-balloon-pci",
        "vmgenid",
        "pvpanic",  # QEMU pauses a guest that panics, and says so (GUEST_PANICKED)
    ]
    assert values(argv, "-action") == ["panic=pause"]
    port = devices(argv)[1]
    assert port["name"] == "org.qemu.guest_agent.0" and port["chardev"] == "pq-qga"
    blockdevs = [json.loads(v) for v in values(argv, "-blockdev")]
    assert blockdevs[0]["file"]["filename"] == str(ov)
    assert blockdevs[0]["backing"]["file"]["filename"] == str(files["qcow2"])
    assert blockdevs[0]["backing"]["read-only"] is True
    assert blockdevs[1] == {
        "driver": "raw",
        "node-name": "disk1",
        "read-only": False,
        "file": {"driver": "file", "filename": str(files["raw"])},
    }
    netdev = json.loads(values(argv, "-netdev")[0])
    assert netdev["hostfwd"] == [{"str": "tcp:127.0.0.1:2222-:22"}]
    # nothing uses the board's AHCI; RAM is always the named backend (migratable to a clone)
    assert values(argv, "-machine") == ["q35,memory-backend=pq-ram,sata=off,smbus=off"]
    assert next(d for d in devices(argv) if d["driver"] == "virtio-net-pci")["romfile"] == ""
    assert values(argv, "-kernel") == [str(files["kernel"])]
    assert values(argv, "-append") == ["console=ttyS0"]


@pytest.mark.parametrize(
    ("machine", "nic", "disk_props"),
    [("q35", "e1000e", {"bus": "ide.0"}), ("pc", "e1000", {"bus": "ide.0", "unit": 0})],
)
def test_emulated_profile(
    files: dict[str, Path], tmp_path: Path, machine: str, nic: str, disk_props: dict[str, object]
) -> None:
    spec = VMSpec(
        machine=machine,  # type: ignore[arg-type]
        profile="emulated",
        disks=(Disk(files["raw"], ephemeral=False),),
        cdroms=(files["raw"],),
        networks=(Network(),),
    )
    argv = build_argv(spec, ctx(tmp_path))
    assert values(argv, "-machine") == [f"{machine},memory-backend=pq-ram"]
    devs = devices(argv)
    assert "romfile" not in next(d for d in devs if d["driver"] == nic)  # firmware may PXE-boot
    disk = next(d for d in devs if d["driver"] == "ide-hd")
    assert {k: disk[k] for k in disk_props} == disk_props
    assert disk["bootindex"] == 0  # firmware boot from the first disk
    assert next(d for d in devs if d["driver"] == "ide-cd")["bus"] != disk["bus"] or machine == "pc"
    assert any(d["driver"] == nic for d in devs)
    assert not any(
        str(d["driver"]).startswith(("virtio-rng", "virtio-balloon", "virtio-net", "virtio-blk"))
        for d in devs
    )


def test_emulated_profile_under_kvm_hides_pv(tmp_path: Path) -> None:
    argv = build_argv(VMSpec(profile="emulated", guest_agent=False), ctx(tmp_path, accel="kvm"))
    assert values(argv, "-cpu") == ["host,kvm=off,kvmclock=off"]
    argv = build_argv(VMSpec(guest_agent=False), ctx(tmp_path, accel="kvm"))
    assert values(argv, "-cpu") == ["host,kvmclock=on,kvm-pv-eoi=on"]
    win = build_argv(VMSpec(guest_agent=False, guest_os="windows"), ctx(tmp_path, accel="kvm"))
    assert "hv-time=on" in values(win, "-cpu")[0]


def test_passthrough_profile(tmp_path: Path) -> None:
    spec = VMSpec(
        profile="passthrough",
        host_devices=(
            HostDevice("01:00.0", guest_address="05.0", rombar=False),
            HostDevice("0000:02:00.1"),
        ),
        guest_agent=False,
    )
    devs = devices(build_argv(spec, ctx(tmp_path)))
    vfio = [d for d in devs if d["driver"] == "vfio-pci"]
    assert vfio == [
        {
            "driver": "vfio-pci",
            "id": "hostdev0",
            "host": "0000:01:00.0",
            "addr": "05.0",
            "rombar": 0,
        },
        {"driver": "vfio-pci", "id": "hostdev1", "host": "0000:02:00.1"},
    ]
    assert any(d["driver"] == "virtio-rng-pci" for d in devs)


def test_microvm_uses_mmio_and_tsc(files: dict[str, Path], tmp_path: Path) -> None:
    spec = VMSpec(
        machine="microvm", kernel=KernelBoot(files["kernel"], append="quiet"), networks=(Network(),)
    )
    argv = build_argv(spec, ctx(tmp_path, tsc_khz=2100000))
    assert values(argv, "-append") == ["quiet tsc_early_khz=2100000"]
    drivers = {d["driver"] for d in devices(argv)}
    assert {"virtio-serial-device", "virtio-net-device", "virtio-rng-device"} <= drivers
    assert not any(str(d).endswith("-pci") for d in drivers)


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"machine": "q35"}, True),
        ({"machine": "pc", "profile": "emulated"}, True),
        ({"machine": "q35", "vmgenid": False}, False),
        ({"machine": "microvm"}, False),  # no ACPI tables to carry it
    ],
)
def test_vmgenid_goes_where_the_machine_has_acpi(
    files: dict[str, Path], tmp_path: Path, kw: dict[str, object], expected: bool
) -> None:
    spec = VMSpec(kernel=KernelBoot(files["kernel"]), **kw)  # type: ignore[arg-type]
    argv = build_argv(spec, ctx(tmp_path))
    genid = [d for d in devices(argv) if d["driver"] == "vmgenid"]
    # No guid: each QEMU makes its own, so a clone's differs from its template's.
    assert genid == ([{"driver": "vmgenid", "id": "pq-vmgenid"}] if expected else [])
    assert spec.has_vmgenid is expected


@pytest.mark.parametrize("kw", [{"machine": "microvm"}, {"arch": "aarch64"}])
def test_vmgenid_asked_for_where_there_is_no_acpi_names_the_machines(
    files: dict[str, Path], kw: dict[str, object]
) -> None:
    with pytest.raises(SpecError) as caught:
        VMSpec(kernel=KernelBoot(files["kernel"]), vmgenid=True, **kw)  # type: ignore[arg-type]
    assert caught.value.field == "vmgenid"
    assert "q35 or pc" in str(caught.value)


def test_tap_and_extra_args(tmp_path: Path) -> None:
    spec = VMSpec(
        networks=(Network(mode="tap", tap="tap0"),), extra_args=("-S",), guest_agent=False
    )
    argv = build_argv(spec, ctx(tmp_path, accel="kvm"))
    assert json.loads(values(argv, "-netdev")[0]) == {
        "id": "net0",
        "type": "tap",
        "ifname": "tap0",
        "script": "no",
        "downscript": "no",
        "vhost": True,
    }
    assert argv[-1] == "-S"


def test_hotplug_room(tmp_path: Path) -> None:
    spec = VMSpec(guest_agent=False, hotplug_slots=2, max_smp=4, max_memory="2G", memory_slots=3)
    argv = build_argv(spec, ctx(tmp_path, agent_fd=None))
    # Under TCG both sizes carry 8 KiB more (see test_tcg_ram_is_not_whole_256k_blocks).
    assert values(argv, "-m") == ["524296K,slots=3,maxmem=2097160K"]
    kvm = build_argv(spec, ctx(tmp_path, agent_fd=None, accel="kvm"))
    assert values(kvm, "-m") == ["524288K,slots=3,maxmem=2097152K"]
    assert values(argv, "-smp") == ["1,maxcpus=4"]
    ports = [d for d in devices(argv) if d["driver"] == "pcie-root-port"]
    assert ports == [
        {"driver": "pcie-root-port", "id": "pq-hp0", "bus": "pcie.0", "chassis": 1},
        {"driver": "pcie-root-port", "id": "pq-hp1", "bus": "pcie.0", "chassis": 2},
    ]
    plain = build_argv(VMSpec(guest_agent=False, max_smp=1), ctx(tmp_path, agent_fd=None))
    assert values(plain, "-m") == ["524296K"] and values(plain, "-smp") == ["1"]
    assert not [d for d in devices(plain) if d["driver"] == "pcie-root-port"]


def test_guest_ram_is_always_the_named_backend(tmp_path: Path) -> None:
    spec = VMSpec(guest_agent=False, memory="256M")
    anon = json.loads(values(build_argv(spec, ctx(tmp_path)), "-object")[0])
    assert anon == {"qom-type": "memory-backend-ram", "id": "pq-ram", "size": (256 << 20) + 8192}
    ram = RamFile(tmp_path / "mem,x", share=False)
    argv = build_argv(spec, dataclasses.replace(ctx(tmp_path), ram=ram))
    filed = json.loads(values(argv, "-object")[0])
    assert filed["qom-type"] == "memory-backend-file" and filed["share"] is False
    assert filed["mem-path"] == str(tmp_path / "mem,x")  # JSON: no escaping needed


def test_tb_size_caps_tcg_translation_cache_only(tmp_path: Path) -> None:
    spec = VMSpec(guest_agent=False)
    assert values(build_argv(spec, ctx(tmp_path, tb_size=32)), "-accel") == ["tcg,tb-size=32"]
    # KVM translates nothing: QEMU refuses tb-size there ("kvm-accel.tb-size not found").
    kvm = ctx(tmp_path, accel="kvm", tb_size=32)
    assert values(build_argv(spec, kvm), "-accel") == ["kvm"]


def test_templates_and_clones_trim_qemus_own_memory(tmp_path: Path) -> None:
    """RAM in a file: a smaller translation cache and no THP (plan.FILE_RAM); other
    launches keep QEMU's defaults."""
    assert LaunchPlan().qemu_memory == QEMU_DEFAULTS == QemuMemory(None, True)
    for share in (True, False):
        plan = LaunchPlan(ram=RamFile(tmp_path / "memory", share=share))
        assert plan.qemu_memory == FILE_RAM
    assert FILE_RAM.tb_size is not None and 16 < FILE_RAM.tb_size < 1024
    assert not FILE_RAM.transparent_hugepages


@pytest.mark.parametrize("ram", [None, "file"])
def test_tcg_ram_is_not_whole_256k_blocks(tmp_path: Path, ram: str | None) -> None:
    """Under TCG, QEMU before 9.0 loses guest writes in a live migration of a RAM block of
    whole 256 KiB (its fast dirty sync skips TCG's TLB): pyqvm's is 8 KiB past its MiB.
    Under KVM (its own dirty log) RAM is exactly the spec's."""
    plan = RamFile(tmp_path / "ram", share=False) if ram else None
    for accel, pad in (("tcg", 8192), ("kvm", 0)):
        argv = build_argv(
            VMSpec(memory="1G", guest_agent=False), ctx(tmp_path, accel=accel, ram=plan)
        )
        (obj,) = [json.loads(o) for o in values(argv, "-object") if '"pq-ram"' in o]
        assert obj["size"] == 2**30 + pad
        assert values(argv, "-m") == [f"{(2**30 + pad) >> 10}K"]
        if accel == "tcg":
            assert obj["size"] % (256 * 1024)
