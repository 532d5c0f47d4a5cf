"""resolve: what the host decides for a spec (here: machine = "auto")."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pyqvm.host.accel import KvmStatus
from pyqvm.host.facts import HostFacts
from pyqvm.launch.resolve import pick_machine
from pyqvm.spec import KernelBoot, VMSpec

TCG_HOST = HostFacts(kvm=KvmStatus(False, "no vmx/svm"), tsc_khz=2596132)


def test_auto_picks_microvm_for_the_built_in_guest(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "pyqvm.launch.resolve")
    spec = pick_machine(VMSpec(image="default"), "tcg", TCG_HOST)
    assert spec.machine == "auto" and spec.effective_machine == "microvm"
    assert "machine auto: microvm" in caplog.text


def test_auto_avoids_microvm_under_tcg_without_a_known_tsc_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    facts = HostFacts(kvm=TCG_HOST.kvm, tsc_khz=None)
    spec = pick_machine(VMSpec(image="default"), "tcg", facts)
    assert spec.machine == "q35"
    assert "TSC rate is unknown" in caplog.text
    # KVM guests read their TSC rate from the hypervisor: microvm stays.
    assert pick_machine(VMSpec(image="default"), "kvm", facts).effective_machine == "microvm"


def test_explicit_machines_are_kept() -> None:
    facts = HostFacts(kvm=TCG_HOST.kvm, tsc_khz=None)
    for machine in ("q35", "pc", "microvm"):
        spec = VMSpec(image="default", machine=machine)
        assert pick_machine(spec, "tcg", facts) is spec


def test_explicit_microvm_without_a_tsc_rate_warns(caplog: pytest.LogCaptureFixture) -> None:
    facts = HostFacts(kvm=TCG_HOST.kvm, tsc_khz=None)
    spec = VMSpec(image="default", machine="microvm")
    assert pick_machine(spec, "tcg", facts) is spec
    assert "tsc_early_khz=<kHz>" in caplog.text


def test_no_tsc_warning_when_the_command_line_sets_it(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"")
    boot = KernelBoot(kernel=kernel, append="console=ttyS0 tsc_early_khz=2000000")
    facts = HostFacts(kvm=TCG_HOST.kvm, tsc_khz=None)
    spec = pick_machine(VMSpec(kernel=boot), "tcg", facts)
    assert spec.effective_machine == "microvm"
    assert not caplog.text
