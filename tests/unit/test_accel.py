"""Host accelerator facts on fake trees: KVM status, accelerator choice, TSC rate, binaries."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from pyqvm.errors import HostError
from pyqvm.host.accel import KvmStatus, choose_accelerator, host_tsc_khz, kvm_status
from pyqvm.host.facts import HostFacts, qemu_binary, read_host_facts

CPUINFO = """\
processor\t: 0
vendor_id\t: {vendor}
model name\t: Test CPU
cpu MHz\t\t: {mhz}
flags\t\t: fpu vme de pse tsc msr pae {extra} constant_tsc nonstop_tsc

processor\t: 1
flags\t\t: fpu vme de pse tsc msr pae {extra}
"""


def make_tree(
    root: Path,
    *,
    flags: str = "",
    kvm: bool = True,
    mhz: str = "2596.132",
    kmsg: str | None = None,
    tsc_freq_khz: str | None = None,
) -> Path:
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc/cpuinfo").write_text(CPUINFO.format(vendor="Test", mhz=mhz, extra=flags))
    (root / "dev").mkdir(exist_ok=True)
    if kvm:
        (root / "dev/kvm").touch()
    if kmsg is not None:
        (root / "dev/kmsg").write_text(kmsg)
    if tsc_freq_khz is not None:
        cpu0 = root / "sys/devices/system/cpu/cpu0"
        cpu0.mkdir(parents=True)
        (cpu0 / "tsc_freq_khz").write_text(tsc_freq_khz)
    return root


# --- kvm_status ---------------------------------------------------------------------------


def test_no_vmx_or_svm_is_unusable(tmp_path: Path) -> None:
    status = kvm_status(make_tree(tmp_path, flags="hypervisor"))
    assert not status.usable
    assert "neither vmx nor svm" in status.reason
    assert "nested virtualization" in status.reason


def test_vmx_without_dev_kvm_is_unusable(tmp_path: Path) -> None:
    status = kvm_status(make_tree(tmp_path, flags="vmx", kvm=False))
    assert not status.usable
    assert "/dev/kvm does not exist" in status.reason


@pytest.mark.parametrize("flag", ["vmx", "svm"])
def test_flag_and_dev_kvm_is_usable_on_fake_root(tmp_path: Path, flag: str) -> None:
    status = kvm_status(make_tree(tmp_path, flags=flag))
    assert status.usable
    assert flag in status.reason


def test_unreadable_cpuinfo_is_unusable(tmp_path: Path) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kvm").touch()
    status = kvm_status(tmp_path)
    assert not status.usable
    assert "cpuinfo" in status.reason


def test_non_x86_cpuinfo_leaves_it_to_the_probe(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm\n")
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kvm").touch()
    status = kvm_status(tmp_path)
    assert status.usable
    assert "no x86 flags" in status.reason


def test_flag_must_match_whole_word(tmp_path: Path) -> None:
    # "vmx_foo"-style flags are not vmx.
    assert not kvm_status(make_tree(tmp_path, flags="vmxfoo svm_lock")).usable


def test_real_host_answers() -> None:
    # Whatever this host is, the probe must return a reason and not raise.
    status = kvm_status()
    assert status.reason
    if not os.path.exists("/dev/kvm"):
        assert not status.usable


# --- choose_accelerator -------------------------------------------------------------------

USABLE = KvmStatus(True, "/dev/kvm works")
UNUSABLE = KvmStatus(False, "/dev/kvm exists but the CPU advertises neither vmx nor svm")


def test_auto_picks_kvm_when_usable(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pyqvm.host.accel"):
        assert choose_accelerator("auto", USABLE) == "kvm"
    assert "kvm" in caplog.text


def test_auto_falls_back_to_tcg_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pyqvm.host.accel"):
        assert choose_accelerator("auto", UNUSABLE) == "tcg"
    assert "tcg" in caplog.text
    assert "neither vmx nor svm" in caplog.text


def test_kvm_when_unusable_raises_with_reason_and_fix() -> None:
    with pytest.raises(HostError) as info:
        choose_accelerator("kvm", UNUSABLE)
    message = str(info.value)
    assert "neither vmx nor svm" in message
    assert 'accelerator = "tcg"' in message
    assert "kvm_intel" in message and "kvm group" in message


def test_explicit_choices() -> None:
    assert choose_accelerator("kvm", USABLE) == "kvm"
    assert choose_accelerator("tcg", USABLE) == "tcg"
    assert choose_accelerator("tcg", UNUSABLE) == "tcg"


# --- host_tsc_khz -------------------------------------------------------------------------

KMSG_DETECTED = (
    "4,2,0,-;[Firmware Bug]: TSC doesn't count with P0 frequency!\n"
    "6,3,65,-;tsc: Detected 2596.132 MHz processor\n"
)
KMSG_REFINED = (
    KMSG_DETECTED + "6,90,1200000,-;tsc: Refined TSC clocksource calibration: 2596.991 MHz\n"
)


def test_tsc_from_sysfs_wins(tmp_path: Path) -> None:
    root = make_tree(tmp_path, kmsg=KMSG_REFINED, tsc_freq_khz="2600000\n")
    assert host_tsc_khz(root) == 2600000


def test_tsc_refined_beats_detected(tmp_path: Path) -> None:
    assert host_tsc_khz(make_tree(tmp_path, kmsg=KMSG_REFINED)) == 2596991


def test_tsc_detected_line(tmp_path: Path) -> None:
    assert host_tsc_khz(make_tree(tmp_path, kmsg=KMSG_DETECTED, mhz="1200.000")) == 2596132


def test_tsc_dmesg_style_line(tmp_path: Path) -> None:
    kmsg = "[    0.000065] tsc: Detected 3000.5 MHz processor\n"
    assert host_tsc_khz(make_tree(tmp_path, kmsg=kmsg)) == 3000500


def test_tsc_falls_back_to_cpuinfo(tmp_path: Path) -> None:
    root = make_tree(tmp_path, kmsg="6,1,0,-;nothing about clocks\n", mhz="2400.000")
    assert host_tsc_khz(root) == 2400000


def test_tsc_unreadable_kmsg_falls_back(tmp_path: Path) -> None:
    root = make_tree(tmp_path, kmsg=KMSG_DETECTED, mhz="1800.250")
    (root / "dev/kmsg").chmod(0)
    if os.access(root / "dev/kmsg", os.R_OK):  # root ignores modes; use a directory instead
        (root / "dev/kmsg").unlink()
        (root / "dev/kmsg").mkdir()
    assert host_tsc_khz(root) == 1800250


def test_tsc_bad_sysfs_value_is_ignored(tmp_path: Path) -> None:
    root = make_tree(tmp_path, kmsg=KMSG_DETECTED, tsc_freq_khz="garbage")
    assert host_tsc_khz(root) == 2596132


def test_tsc_none_when_nothing_known(tmp_path: Path) -> None:
    assert host_tsc_khz(tmp_path) is None


# --- HostFacts ----------------------------------------------------------------------------


def test_read_host_facts_on_fake_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_tree(tmp_path, flags="svm", kmsg=KMSG_DETECTED)
    bindir = root / "usr/bin"
    bindir.mkdir(parents=True)
    qemu = bindir / "qemu-system-x86_64"
    qemu.write_text("#!/bin/sh\n")
    qemu.chmod(qemu.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin")

    facts = read_host_facts(root)

    assert facts.kvm.usable
    assert facts.tsc_khz == 2596132
    assert dict(facts.qemu_binaries) == {"x86_64": qemu}
    assert qemu_binary(facts, "x86_64") == qemu


def test_missing_binary_names_the_package() -> None:
    facts = HostFacts(kvm=UNUSABLE, tsc_khz=None, qemu_binaries={})
    with pytest.raises(HostError, match=r"apt-get install -y qemu-system-x86$"):
        qemu_binary(facts, "x86_64")
    with pytest.raises(HostError, match=r"qemu-system-aarch64 not found.*qemu-system-arm"):
        qemu_binary(facts, "aarch64")
