"""UEFI firmware from QEMU's firmware descriptors (docs/interop/firmware.json): precedence,
matching, features, and what a launch does with them; fake descriptor trees, no QEMU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyqvm.errors import HostError
from pyqvm.host.accel import KvmStatus
from pyqvm.host.facts import HostFacts
from pyqvm.host.firmware import choose_firmware, read_firmware
from pyqvm.launch.resolve import resolve
from pyqvm.spec import Disk, VMSpec

SHARE = "usr/share/qemu/firmware"


def descriptor(
    root: Path,
    name: str,
    code: str,
    *,
    arch: str = "x86_64",
    machines: tuple[str, ...] = ("pc-i440fx-*", "pc-q35-*"),
    features: tuple[str, ...] = (),
    where: str = SHARE,
    interface: str = "uefi",
) -> Path:
    (root / code.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    (root / code.lstrip("/")).write_bytes(b"fd")
    d = root / where / name
    d.parent.mkdir(parents=True, exist_ok=True)
    d.write_text(
        json.dumps(
            {
                "description": name,
                "interface-types": [interface],
                "mapping": {
                    "device": "flash",
                    "executable": {"filename": code, "format": "raw"},
                    "nvram-template": {"filename": code.replace("CODE", "VARS"), "format": "raw"},
                },
                "targets": [{"architecture": arch, "machines": list(machines)}],
                "features": list(features),
                "tags": [],
            }
        )
    )
    return d


@pytest.fixture
def debian(tmp_path: Path) -> Path:
    """Debian 12's descriptors, as ovmf and qemu-efi-aarch64 install them."""
    ovmf, aavmf = "/usr/share/OVMF/OVMF_CODE_4M", "/usr/share/AAVMF/AAVMF_CODE"
    smm, secure, enrolled = "requires-smm", "secure-boot", "enrolled-keys"
    q35, virt = ("pc-q35-*",), ("virt-*",)
    for name, code, arch, machines, features in (
        ("40-edk2-x86_64-secure-enrolled", f"{ovmf}.ms.fd", "x86_64", q35, (enrolled, smm, secure)),
        ("50-edk2-x86_64-secure", f"{ovmf}.secboot.fd", "x86_64", q35, (smm, secure)),
        ("60-edk2-x86_64", f"{ovmf}.fd", "x86_64", ("pc-i440fx-*", *q35), ()),
        ("40-edk2-aarch64-secure-enrolled", f"{aavmf}.ms.fd", "aarch64", virt, (enrolled, secure)),
        ("50-edk2-aarch64-secure", f"{aavmf}.secboot.fd", "aarch64", virt, (secure,)),
        ("60-edk2-aarch64", f"{aavmf}.fd", "aarch64", virt, ()),
    ):
        descriptor(tmp_path, f"{name}.json", code, arch=arch, machines=machines, features=features)
    return tmp_path


def test_the_plain_build_for_each_arch_and_machine(debian: Path) -> None:
    found = read_firmware(debian, user_dir=None)
    assert [f.descriptor.name for f in found][:3] == [
        "40-edk2-aarch64-secure-enrolled.json", "40-edk2-x86_64-secure-enrolled.json",
        "50-edk2-aarch64-secure.json",
    ]  # fmt: skip
    for machine in ("q35", "pc"):
        fw = choose_firmware(found, "x86_64", machine)
        assert fw is not None and fw.code == debian / "usr/share/OVMF/OVMF_CODE_4M.fd"
        assert fw.vars_template == debian / "usr/share/OVMF/OVMF_VARS_4M.fd"
    arm = choose_firmware(found, "aarch64", "virt")
    assert arm is not None and arm.code == debian / "usr/share/AAVMF/AAVMF_CODE.fd"
    assert choose_firmware(found, "x86_64", "microvm") is None
    assert choose_firmware(found, "riscv64", "virt") is None


def test_secure_boot_is_chosen_only_when_asked_and_smm_only_for_it(
    debian: Path,
) -> None:
    found = read_firmware(debian, user_dir=None)
    arm = choose_firmware(found, "aarch64", "virt", secure_boot=True)
    assert arm is not None and arm.code.name == "AAVMF_CODE.secboot.fd"
    arm = choose_firmware(found, "aarch64", "virt", secure_boot=True, enrolled_keys=True)
    assert arm is not None and arm.code.name == "AAVMF_CODE.ms.fd"
    # x86's Secure Boot builds need SMM, which pyqvm turns on for Secure Boot only
    pc = choose_firmware(found, "x86_64", "q35", secure_boot=True)
    assert pc is not None and "requires-smm" in pc.features
    plain = choose_firmware(found, "x86_64", "q35")
    assert plain is not None and not plain.features & {"requires-smm", "secure-boot"}


def test_etc_and_the_user_override_and_mask_by_file_name(debian: Path, tmp_path: Path) -> None:
    # the administrator's own build, under the same name as the distribution's
    descriptor(debian, "60-edk2-x86_64.json", "/opt/edk2/CODE.fd", where="etc/qemu/firmware")
    fw = choose_firmware(read_firmware(debian, user_dir=None), "x86_64", "q35")
    assert fw is not None and fw.code == debian / "opt/edk2/CODE.fd"
    # the user masks it with an empty file: nothing plain is left for x86_64
    user = tmp_path / "user-fw"
    user.mkdir()
    (user / "60-edk2-x86_64.json").write_text("")
    assert choose_firmware(read_firmware(debian, user_dir=user), "x86_64", "q35") is None


def test_broken_descriptors_and_missing_code_files_are_passed_over(tmp_path: Path) -> None:
    (tmp_path / SHARE).mkdir(parents=True)
    (tmp_path / SHARE / "10-broken.json").write_text("{not json")
    descriptor(tmp_path, "20-bios.json", "/usr/share/seabios/bios.bin", interface="bios")
    gone = descriptor(tmp_path, "30-gone.json", "/usr/share/gone/CODE.fd")
    (tmp_path / "usr/share/gone/CODE.fd").unlink()
    descriptor(tmp_path, "40-ok.json", "/usr/share/ok/CODE.fd")
    found = read_firmware(tmp_path, user_dir=None)
    assert [f.descriptor.name for f in found] == ["30-gone.json", "40-ok.json"]
    fw = choose_firmware(found, "x86_64", "q35")
    assert fw is not None and fw.descriptor != gone and fw.code.parent.name == "ok"


def test_a_launch_takes_its_code_image_from_the_descriptors(debian: Path) -> None:
    facts = HostFacts(
        kvm=KvmStatus(False, "no vmx/svm"),
        tsc_khz=2596132,
        qemu_binaries={"x86_64": Path("/usr/bin/true"), "aarch64": Path("/usr/bin/true")},
        firmware=read_firmware(debian, user_dir=None),
    )
    disk = debian / "boot.qcow2"
    disk.write_bytes(b"")
    got = resolve(VMSpec(firmware="ovmf", disks=(Disk(path=disk),)), facts=facts)
    assert got.spec.ovmf_code == debian / "usr/share/OVMF/OVMF_CODE_4M.fd"
    assert got.spec.effective_machine == "q35"
    arm = resolve(VMSpec(arch="aarch64", firmware="ovmf", disks=(Disk(path=disk),)), facts=facts)
    assert arm.spec.ovmf_code == debian / "usr/share/AAVMF/AAVMF_CODE.fd"
    # a code image the spec names is kept
    mine = debian / "mine.fd"
    mine.write_bytes(b"")
    kept = resolve(VMSpec(firmware="ovmf", ovmf_code=mine, disks=(Disk(path=disk),)), facts=facts)
    assert kept.spec.ovmf_code == mine
    # no descriptor fits: a HostError with this host's install command
    bare = HostFacts(kvm=facts.kvm, tsc_khz=facts.tsc_khz, qemu_binaries=facts.qemu_binaries)
    with pytest.raises(HostError, match=r"no UEFI firmware for x86_64 on q35 .* install it \("):
        resolve(VMSpec(firmware="ovmf", disks=(Disk(path=disk),)), facts=bare)
