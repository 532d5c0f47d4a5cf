"""aarch64 guests: the spec's checks, the argv for QEMU's virt board, arm64 kernels."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from pyqvm.argv import LaunchContext, build_argv
from pyqvm.errors import SpecError
from pyqvm.host.kernel import inspect_kernel
from pyqvm.launch.resolve import check_kernel
from pyqvm.spec import Disk, KernelBoot, Network, VMSpec
from pyqvm.spec.arches import ARCHES, cross_compiler, host_arch


def arm64_image(path: Path, *, gzipped: bool = False) -> Path:
    """The start of an arm64 Image: its header has "ARM\\x64" at offset 56."""
    head = bytearray(4096)
    head[0:2] = b"MZ"
    head[56:60] = b"ARM\x64"
    path.write_bytes(gzip.compress(bytes(head)) if gzipped else bytes(head))
    return path


def ctx(tmp_path: Path, accel: str = "tcg") -> LaunchContext:
    return LaunchContext(
        qemu=Path("/usr/bin/qemu-system-aarch64"),
        accel=accel,  # type: ignore[arg-type]
        qmp_fd=5,
        agent_fd=6,
        console_log=tmp_path / "console.log",
    )


def values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def spec(tmp_path: Path, **kw: object) -> VMSpec:
    kernel = KernelBoot(kernel=arm64_image(tmp_path / "Image"), append="console=ttyAMA0")
    return VMSpec(arch="aarch64", kernel=kernel, **kw)  # type: ignore[arg-type]


def test_virt_board_with_gicv3_and_a_64_bit_cpu_under_tcg(tmp_path: Path) -> None:
    s = spec(tmp_path)
    assert s.effective_machine == "virt"
    argv = build_argv(s, ctx(tmp_path))
    assert values(argv, "-machine") == ["virt,memory-backend=pq-ram,gic-version=3"]
    assert values(argv, "-cpu") == ["cortex-a72"]
    kvm = build_argv(s, ctx(tmp_path, "kvm"))
    assert values(kvm, "-machine") == ["virt,memory-backend=pq-ram,gic-version=host"]
    assert values(kvm, "-cpu") == ["host"]


def test_virtio_devices_are_pci_on_virt(tmp_path: Path) -> None:
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(b"QFI\xfb" + bytes(508))
    s = spec(tmp_path, disks=(Disk(path=disk, ephemeral=False),), networks=(Network(),))
    drivers = {json.loads(d)["driver"] for d in values(build_argv(s, ctx(tmp_path)), "-device")}
    assert {"virtio-blk-pci", "virtio-net-pci", "virtio-serial-pci", "virtio-rng-pci"} <= drivers
    assert not {d for d in drivers if "mmio" in d or d.endswith("-device")}


@pytest.mark.parametrize(
    ("kw", "field", "words"),
    [
        ({"profile": "emulated"}, "profile", 'profile "emulated" means PC hardware'),
        ({"machine": "q35"}, "machine", "'q35' is not a machine of aarch64; use virt"),
        ({"networks": (Network(model="e1000"),)}, "networks[0].model", "PC hardware"),
        ({"hotplug_slots": 2}, "hotplug_slots", "not supported on aarch64 yet"),
        ({"max_smp": 4}, "max_smp", "vCPU hotplug is not supported on aarch64"),
    ],
)
def test_what_virt_has_no_use_for_is_refused(
    tmp_path: Path, kw: dict[str, object], field: str, words: str
) -> None:
    with pytest.raises(SpecError) as err:
        spec(tmp_path, **kw)
    assert err.value.field == field and words in str(err.value)


def test_a_disk_boot_on_aarch64_needs_uefi_and_names_aavmf(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="SeaBIOS is PC firmware") as err:
        VMSpec(arch="aarch64")
    assert err.value.field == "firmware" and 'firmware = "ovmf"' in str(err.value)
    # The code image comes from QEMU's firmware descriptors when the launch is resolved.
    assert VMSpec(arch="aarch64", firmware="ovmf").ovmf_code is None
    code = tmp_path / "AAVMF_CODE.fd"
    code.write_bytes(b"")
    spec = VMSpec(arch="aarch64", firmware="ovmf", ovmf_code=code)
    assert spec.effective_machine == "virt" and spec.kernel is None


def test_arm64_images_plain_and_gzipped_are_recognised(tmp_path: Path) -> None:
    for gz in (False, True):
        info = inspect_kernel(arm64_image(tmp_path / f"Image{gz}", gzipped=gz))
        assert (info.format, info.arch, info.compression) == (
            "image",
            "aarch64",
            "gzip" if gz else None,
        )


def test_a_kernel_of_the_other_arch_is_refused(tmp_path: Path) -> None:
    x86 = VMSpec(kernel=KernelBoot(kernel=arm64_image(tmp_path / "Image")))
    with pytest.raises(SpecError, match="is an aarch64 kernel; arch is x86_64"):
        check_kernel(x86)


def test_the_arch_table_names_what_a_host_needs() -> None:
    arm = ARCHES["aarch64"]
    assert (arm.debian, arm.qemu_package, arm.console) == ("arm64", "qemu-system-arm", "ttyAMA0")
    if host_arch() == "x86_64":
        assert cross_compiler(arm) == (
            "aarch64-linux-gnu-gcc",
            "gcc-aarch64-linux-gnu libc6-dev-arm64-cross",
        )
        assert cross_compiler(ARCHES["x86_64"]) == ("cc", "gcc libc6-dev")
