"""host/doctor.py and `pyqvm doctor`: fake hosts for each mode, and this very machine."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fixtures.sysfs import FakeHost, standard_host

from pyqvm.cli import doctor as cli_doctor
from pyqvm.cli import main, parse_args
from pyqvm.host.accel import kvm_status
from pyqvm.host.claims import ClaimStore
from pyqvm.host.doctor import run_checks
from pyqvm.host.vfio import MemlockStatus, iommu_status, vfio_pci_loaded
from pyqvm.spec import VMSpec

ROOT_OK = MemlockStatus(limit=None, ipc_lock=True)
DEAD_PID = (1 << 22) + 1  # above the largest pid_max Linux allows: never a live process


def _exe(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def add_qemu(root: Path) -> None:
    _exe(
        root / "usr/bin/qemu-system-x86_64",
        "#!/bin/sh\necho 'QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)'\n",
    )
    _exe(root / "usr/bin/qemu-img", "#!/bin/sh\n")


@pytest.fixture
def path_usr_bin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")


def checks_by_name(report: Any, mode: str) -> dict[str, Any]:
    return {c.name: c for c in report.for_mode(mode)}


@pytest.mark.usefixtures("path_usr_bin")
def test_kvm_host(tmp_path: Path) -> None:
    add_qemu(tmp_path)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kvm").touch()
    for m in ("kvm", "kvm_intel"):
        (tmp_path / "sys/module" / m).mkdir(parents=True)
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("vendor_id\t: GenuineIntel\nflags\t\t: fpu vmx\n")
    report = run_checks(["tcg", "kvm"], tmp_path)
    assert report.usable("tcg") and report.usable("kvm")
    kvm = checks_by_name(report, "kvm")
    assert (
        kvm["qemu"].reason == f"qemu-system-x86_64 7.2.22 ({tmp_path}/usr/bin/qemu-system-x86_64)"
    )
    assert kvm["cpu"].reason == "the CPU advertises vmx"
    assert kvm["module"].reason == "modules loaded: kvm, kvm_intel"


OS_RELEASES = {
    "debian": ('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n',
               "apt-get install -y qemu-system-x86", "apt-get install -y qemu-utils"),
    "ubuntu": ('PRETTY_NAME="Ubuntu 24.04.1 LTS"\nID=ubuntu\nID_LIKE=debian\n',
               "apt-get install -y qemu-system-x86", "apt-get install -y qemu-utils"),
    "fedora": ('NAME="Fedora Linux"\nID=fedora\nPRETTY_NAME="Fedora Linux 41"\n',
               "dnf install -y qemu-system-x86", "dnf install -y qemu-img"),
    "rocky": ('ID="rocky"\nID_LIKE="rhel centos fedora"\nPRETTY_NAME="Rocky Linux 9.4"\n',
              "dnf install -y qemu-system-x86", "dnf install -y qemu-img"),
    "opensuse": ('NAME="openSUSE Tumbleweed"\nID="opensuse-tumbleweed"\n'
                 'ID_LIKE="opensuse suse"\n', "zypper install -y qemu-x86",
                 "zypper install -y qemu-tools"),
    "arch": ("NAME=\"Arch Linux\"\nID=arch\n", "pacman -S --needed qemu-system-x86",
             "pacman -S --needed qemu-img"),
    "alpine": ("ID=alpine\n", "install qemu-system-x86 (Debian's package names) with your "
               "package manager", "install qemu-utils (Debian's package names) with your "
               "package manager"),
}  # fmt: skip


@pytest.mark.parametrize("distro", OS_RELEASES)
@pytest.mark.usefixtures("path_usr_bin")
def test_missing_qemu_names_this_hosts_install_command(tmp_path: Path, distro: str) -> None:
    text, qemu_fix, img_fix = OS_RELEASES[distro]
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text(text)
    tcg = checks_by_name(run_checks(["tcg"], tmp_path), "tcg")
    assert tcg["qemu"].status == "fail" and tcg["qemu"].fix == qemu_fix
    # nothing of the image builder either: one command for all of it, in this host's words
    builder = tcg["image-builder"]
    assert builder.status == "warn" and "a static libc" in builder.reason
    assert builder.fix.split(" kmod ")[0] == qemu_fix.split(" qemu")[0]
    if distro == "fedora":
        assert builder.fix == (
            "dnf install -y kmod e2fsprogs qemu-img lz4 dosfstools mtools util-linux gcc "
            "glibc-static"
        )
    # QEMU there, qemu-img not: its fix names this host's package for it
    bin_dir = tmp_path / "usr/bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 7.2.22'\n")
    fake.chmod(0o755)
    tcg = checks_by_name(run_checks(["tcg"], tmp_path), "tcg")
    assert tcg["qemu-img"].status == "warn" and tcg["qemu-img"].fix == img_fix


@pytest.mark.usefixtures("path_usr_bin")
def test_no_qemu_no_kvm(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text(OS_RELEASES["debian"][0])
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("vendor_id\t: AuthenticAMD\nflags\t\t: fpu\n")
    report = run_checks(["tcg", "kvm"], tmp_path)
    assert not report.usable("tcg")
    tcg = checks_by_name(report, "tcg")
    assert tcg["qemu"].fix == "apt-get install -y qemu-system-x86"
    kvm = checks_by_name(report, "kvm")
    assert (kvm["module"].status, kvm["/dev/kvm"].status, kvm["usable"].status) == (
        "fail",
        "fail",
        "fail",
    )
    assert "modprobe kvm_amd" in kvm["module"].fix
    assert "/dev/kvm does not exist" in kvm["usable"].reason


def test_vfio_ready_host(tmp_path: Path) -> None:
    fake = standard_host(tmp_path / "root")
    fake.add_vfio_dev_dir()
    claims = ClaimStore(tmp_path / "claims")
    report = run_checks(["vfio"], fake.root, memlock=ROOT_OK, claims=claims)
    assert report.usable("vfio"), report
    vfio = checks_by_name(report, "vfio")
    assert vfio["iommu"].reason.startswith("6 IOMMU groups")
    assert vfio["kernel-parameter"].reason == "intel_iommu=on iommu=pt"
    assert vfio["sr-iov"].reason == "SR-IOV PFs: 0000:03:00.0 (0/7 VFs)"


def test_vfio_off_host_lists_every_reason(tmp_path: Path) -> None:
    fake = FakeHost(tmp_path / "root", iommu=False, vfio_loaded=False, cmdline="ro quiet")
    low = MemlockStatus(limit=8 << 20, ipc_lock=False)
    report = run_checks(["vfio"], fake.root, memory_mib=2048, memlock=low)
    assert not report.usable("vfio")
    vfio = checks_by_name(report, "vfio")
    failed = {n for n, c in vfio.items() if c.status == "fail"}
    assert failed == {"iommu", "kernel-parameter", "vfio_pci", "/dev/vfio", "memlock"}
    assert "intel_iommu=on" in vfio["kernel-parameter"].fix
    assert "a 2048 MiB guest needs 3072 MiB" in vfio["memlock"].reason
    assert all(c.fix for c in vfio.values() if c.status == "fail")


def test_iommu_turned_off_on_the_command_line(tmp_path: Path) -> None:
    fake = FakeHost(tmp_path / "root", iommu=False, cmdline="intel_iommu=off")
    vfio = checks_by_name(run_checks(["vfio"], fake.root, memlock=ROOT_OK), "vfio")
    assert "turns the IOMMU off (intel_iommu=off)" in vfio["kernel-parameter"].reason


def test_stale_claims_are_reported(tmp_path: Path) -> None:
    fake = standard_host(tmp_path / "root")
    claims = ClaimStore(tmp_path / "claims")
    claims.directory.mkdir()
    (claims.directory / "0000:01:00.0.json").write_text(
        json.dumps({"address": "0000:01:00.0", "vm": "gone", "pid": DEAD_PID, "start_time": "0"})
    )
    vfio = checks_by_name(run_checks(["vfio"], fake.root, memlock=ROOT_OK, claims=claims), "vfio")
    assert vfio["claims"].status == "warn"
    assert f"0000:01:00.0 (VM 'gone', pid {DEAD_PID})" in vfio["claims"].reason
    assert vfio["claims"].fix.startswith("pyqvm doctor --fix")


def test_xen_dom0(tmp_path: Path) -> None:
    (tmp_path / "sys/hypervisor").mkdir(parents=True)
    (tmp_path / "sys/hypervisor/type").write_text("xen\n")
    (tmp_path / "proc/xen").mkdir(parents=True)
    (tmp_path / "proc/xen/capabilities").write_text("control_d\n")
    _exe(tmp_path / "usr/libexec/xen-qemu-system-i386", "#!/bin/sh\n")
    report = run_checks(["xen"], tmp_path)
    assert report.usable("xen")
    (tmp_path / "proc/xen/capabilities").write_text("\n")
    xen = checks_by_name(run_checks(["xen"], tmp_path), "xen")
    assert xen["dom0"].status == "fail" and "domU" in xen["dom0"].reason


@pytest.mark.parametrize(
    ("distro", "fix"),
    [
        ("debian", "apt-get install -y qemu-system-xen"),
        ("fedora", "Fedora Linux 41 does not package"),
    ],
)
def test_not_xen(tmp_path: Path, distro: str, fix: str) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text(OS_RELEASES[distro][0])
    xen = checks_by_name(run_checks(["xen"], tmp_path), "xen")
    assert xen["dom0"].status == "fail"
    assert "not a Xen dom0 (no /sys/hypervisor/type, no /proc/xen)" in xen["dom0"].reason
    assert "xen-system-amd64" in xen["dom0"].fix
    assert xen["device-model"].fix.startswith(fix)  # this host's package manager


def _cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = cli_doctor.run(parse_args(["doctor", *argv]), out)
    return code, out.getvalue()


def test_cli_json_on_a_fake_vfio_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYQVM_CLAIMS_DIR", str(tmp_path / "claims"))
    fake = standard_host(tmp_path / "root")
    code, text = _cli(["--for", "vfio", "--json", "--root", str(fake.root)])
    data = json.loads(text)
    assert (code, data["asked"], data["ok"]) == (1, "vfio", False)
    assert list(data["modes"]) == ["vfio"]
    (dev,) = [c for c in data["modes"]["vfio"]["checks"] if c["name"] == "/dev/vfio"]
    assert dev["status"] == "fail" and dev["fix"]
    fake.add_vfio_dev_dir()
    code, text = _cli(["--for", "vfio", "--json", "--root", str(fake.root)])
    assert (code, json.loads(text)["ok"]) == (0, True)


def test_cli_fix_recovers_stale_claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYQVM_CLAIMS_DIR", str(tmp_path / "claims"))
    claims = ClaimStore(tmp_path / "claims")
    claims.directory.mkdir()
    # A dead owner's claim on a device that was never rebound: --fix just drops it.
    (claims.directory / "0000:01:00.0.json").write_text(
        json.dumps({"address": "0000:01:00.0", "vm": "gone", "pid": DEAD_PID, "start_time": "0"})
    )
    code, text = _cli(["--fix", "--for", "tcg", "--json"])
    data = json.loads(text)
    assert code == 0 and data["ok"] is True
    assert data["fixed"] == [
        {
            "address": "0000:01:00.0",
            "vm": "gone",
            "pid": DEAD_PID,
            "restored_to": None,
            "error": None,
        }
    ]
    assert claims.records() == []
    _, text = _cli(["--fix", "--for", "tcg"])
    assert text.startswith("fixed: nothing to fix")


def test_this_machine(tmp_path: Path) -> None:
    """`pyqvm doctor --json` as a user runs it, checked against the host facts it reports on."""
    env = dict(os.environ, PYQVM_CLAIMS_DIR=str(tmp_path / "claims"))
    proc = subprocess.run(
        [sys.executable, "-m", "pyqvm", "doctor", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    data = json.loads(proc.stdout)
    modes = data["modes"]
    assert list(modes) == ["tcg", "kvm", "vfio", "xen"]
    # TCG needs only QEMU, which the suite needs anyway.
    assert modes["tcg"]["usable"] is True and data["ok"] is True and proc.returncode == 0
    kvm = kvm_status()
    assert modes["kvm"]["usable"] is kvm.usable
    (usable,) = [c for c in modes["kvm"]["checks"] if c["name"] == "usable"]
    assert kvm.reason in usable["reason"]
    # VFIO is unusable whenever the IOMMU is off or vfio-pci is not loaded (both, here).
    vfio_checks = {c["name"]: c for c in modes["vfio"]["checks"]}
    iommu = iommu_status()
    assert (vfio_checks["iommu"]["status"] == "ok") is iommu.enabled
    assert (vfio_checks["vfio_pci"]["status"] == "ok") is vfio_pci_loaded()
    if not (iommu.enabled and vfio_pci_loaded()):
        assert modes["vfio"]["usable"] is False
    # Xen: usable only in a dom0, which a machine without /proc/xen is not.
    if not Path("/proc/xen/capabilities").exists():
        assert modes["xen"]["usable"] is False

    for mode, info in modes.items():
        code = main(["doctor", "--for", mode, "--json", "--root", "/"])
        assert code == (0 if info["usable"] else 1), mode


def test_xen_hvm_argv(tmp_path: Path) -> None:
    from pyqvm.argv.xen import xen_device_model, xen_hvm_argv
    from pyqvm.errors import HostError, SpecError

    argv = xen_hvm_argv(VMSpec(name="hvm", memory="1G", smp=2), qemu=Path("/q"), domid=5)
    assert argv == [
        "/q", "-xen-domid", "5", "-nodefaults", "-no-user-config", "-name", "hvm",
        "-machine", "xenfv", "-m", "1024M", "-smp", "2", "-display", "none",
    ]  # fmt: skip
    pc = xen_hvm_argv(VMSpec(), qemu=Path("/q"), domid=5, machine="pc")
    assert pc[pc.index("-machine") : pc.index("-machine") + 4] == [
        "-machine",
        "pc",
        "-accel",
        "xen",
    ]
    with pytest.raises(SpecError, match="0 is dom0"):
        xen_hvm_argv(VMSpec(), qemu=Path("/q"), domid=0)
    with pytest.raises(HostError, match="apt-get install -y qemu-system-xen"):
        xen_device_model(tmp_path)


@pytest.mark.usefixtures("path_usr_bin")
@pytest.mark.parametrize(
    ("cpuinfo", "status", "words"),
    [
        ("cpu MHz\t\t: 2596.132\n", "ok", "host TSC 2596132 kHz known"),
        ("flags\t\t: fpu\n", "warn", 'machine "auto" uses q35'),
    ],
)
def test_microvm_needs_a_known_tsc_rate(
    tmp_path: Path, cpuinfo: str, status: str, words: str
) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text(cpuinfo)
    report = run_checks(["tcg"], tmp_path)
    check = checks_by_name(report, "tcg")["microvm"]
    assert check.status == status and words in check.reason
