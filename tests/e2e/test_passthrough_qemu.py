"""Passthrough with real QEMU: the vfio-pci argv reaches QEMU's device code, host devices
go back to their drivers when QEMU dies (refused, SIGKILLed) or when pyqvm itself is killed,
and a Xen HVM device-model argv is refused for want of Xen, not for its syntax.

The host devices are fake (there is no IOMMU here): a fake sysfs tree under a temp dir
whose writer models the kernel. QEMU itself opens the real /sys, where they do not exist.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fixtures.sysfs import FakeHost

import pyqvm
from pyqvm import AsyncVM
from pyqvm.argv.xen import xen_device_model, xen_hvm_argv
from pyqvm.errors import LaunchError
from pyqvm.host.claims import ClaimStore
from pyqvm.host.facts import read_host_facts
from pyqvm.host.vfio import MemlockStatus
from pyqvm.launch.passthrough import PassthroughHost, recover
from pyqvm.spec import HostDevice, VMSpec

pytestmark = pytest.mark.qemu

# An address no real machine here has (checked below), so QEMU's open must fail.
DEV = "0000:5e:00.0"
TESTS = Path(__file__).resolve().parents[1]
SRC = Path(pyqvm.__file__).resolve().parents[1]
SYNTAX = ("Property '", "invalid", "Parameter '", "unsupported machine", "Invalid parameter")


def fake_host(root: Path) -> FakeHost:
    fake = FakeHost(root)
    fake.add_device(DEV, device="1533", driver="igb", group=12, netdev="enp94s0")
    return fake


@pytest.fixture
def fake(tmp_path: Path) -> FakeHost:
    assert not Path("/sys/bus/pci/devices", DEV).exists()
    return fake_host(tmp_path / "root")


@pytest.fixture
def pt_host(fake: FakeHost, tmp_path: Path) -> PassthroughHost:
    return PassthroughHost(
        fake.root, fake.io, ClaimStore(tmp_path / "claims"), MemlockStatus(None, True)
    )


def spec(**kw: object) -> VMSpec:
    dev = HostDevice(DEV, guest_address="05.0", rombar=False, multifunction=True)
    return VMSpec(
        name="pt",
        accelerator="tcg",
        profile="passthrough",
        host_devices=(dev,),
        guest_agent=False,
        ready="none",
        memory=128,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.asyncio
async def test_qemu_parses_the_vfio_device_and_fails_only_on_the_missing_host_device(
    fake: FakeHost, pt_host: PassthroughHost
) -> None:
    vm = AsyncVM(spec(), passthrough_host=pt_host)
    with pytest.raises(LaunchError) as info:
        await vm.start()
    argv = info.value.argv
    assert '"driver":"vfio-pci"' in " ".join(argv) and f'"host":"{DEV}"' in " ".join(argv)
    stderr = info.value.stderr
    # QEMU accepted every property and got as far as opening the host device.
    assert f"vfio /sys/bus/pci/devices/{DEV}: no such host device" in stderr, stderr
    assert not any(s in stderr for s in SYNTAX), stderr
    # QEMU is gone: pyqvm gave the device back and dropped its claim.
    assert fake.driver_of(DEV) == "igb" and fake.override_of(DEV) is None
    assert pt_host.claims.records() == []
    # During the attempt it really was on vfio-pci.
    assert [v for p, v in fake.io.writes if p.endswith("drivers_probe")] == [DEV, DEV]


WRAPPER = textwrap.dedent(
    """\
    #!{python}
    # QEMU without the vfio-pci devices (their host devices are fake), otherwise unchanged.
    import os, sys
    args, out = sys.argv[1:], []
    while args:
        a = args.pop(0)
        if a == "-device" and args and '"driver":"vfio-pci"' in args[0]:
            args.pop(0)
            continue
        out.append(a)
    os.execv("{qemu}", ["{qemu}", *out])
    """
)


def qemu_without_vfio(tmp_path: Path) -> Path:
    facts = read_host_facts()
    wrapper = tmp_path / "qemu-system-x86_64"
    wrapper.write_text(WRAPPER.format(python=sys.executable, qemu=facts.qemu_binaries["x86_64"]))
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.asyncio
@pytest.mark.parametrize("end", ["stop", "sigkill"])
async def test_device_restored_when_the_vm_ends(
    fake: FakeHost, pt_host: PassthroughHost, tmp_path: Path, end: str
) -> None:
    facts = read_host_facts()
    facts = dataclasses.replace(facts, qemu_binaries={"x86_64": qemu_without_vfio(tmp_path)})
    vm = AsyncVM(spec(), host=facts, passthrough_host=pt_host)
    await vm.start()
    try:
        assert fake.driver_of(DEV) == "vfio-pci"
        assert fake.vfio_nodes() == ["12"]
        assert pt_host.claims.holders() == {DEV: "pt"}
        assert vm.pid is not None
        if end == "sigkill":
            os.kill(vm.pid, signal.SIGKILL)
            assert await vm.wait(30) == -signal.SIGKILL
        else:
            assert await vm.stop() == 0
    finally:
        await vm.stop()
    assert fake.driver_of(DEV) == "igb" and fake.vfio_nodes() == []
    assert fake.override_of(DEV) is None
    assert pt_host.claims.records() == []


CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    import dataclasses
    from fixtures.sysfs import FakeHost
    from pyqvm import AsyncVM
    from pyqvm.host.claims import ClaimStore
    from pyqvm.host.facts import read_host_facts
    from pyqvm.host.vfio import MemlockStatus
    from pyqvm.launch.passthrough import PassthroughHost
    from pyqvm.spec import HostDevice, VMSpec

    root, claims, qemu = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    fake = FakeHost.existing(root)
    host = PassthroughHost(root, fake.io, ClaimStore(claims), MemlockStatus(None, True))
    facts = dataclasses.replace(read_host_facts(), qemu_binaries={"x86_64": qemu})
    spec = VMSpec(name="doomed", accelerator="tcg", host_devices=[HostDevice(sys.argv[4])],
                  guest_agent=False, ready="none", memory=128)

    async def main() -> None:
        vm = AsyncVM(spec, host=facts, passthrough_host=host)
        await vm.start()
        print(vm.pid, flush=True)
        await asyncio.sleep(120)

    asyncio.run(main())
    """
)


def test_killed_pyqvm_leaves_a_claim_that_recover_undoes(
    fake: FakeHost, pt_host: PassthroughHost, tmp_path: Path
) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]))
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD,
            str(fake.root),
            str(pt_host.claims.directory),
            str(qemu_without_vfio(tmp_path)),
            DEV,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    with child.stdout:
        qemu_pid = int(child.stdout.readline())
    assert fake.driver_of(DEV) == "vfio-pci"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{qemu_pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # QEMU dies with its launcher (pdeathsig)
    assert not Path(f"/proc/{qemu_pid}").exists()

    assert fake.driver_of(DEV) == "vfio-pci"  # nobody gave it back
    (stale,) = pt_host.claims.stale()
    assert (stale.vm, stale.original_driver, stale.bound) == ("doomed", "igb", True)
    (done,) = recover(pt_host)
    assert done.ok and done.restored_to == "igb"
    assert fake.driver_of(DEV) == "igb" and pt_host.claims.records() == []


# --- Xen -----------------------------------------------------------------------------------


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("machine", ["xenfv", "pc"])
def test_xen_hvm_device_model_argv_is_refused_for_want_of_xen(machine: str) -> None:
    qemu = xen_device_model()
    argv = xen_hvm_argv(VMSpec(name="hvm", memory=256), qemu=qemu, domid=7, machine=machine)
    assert argv[1:3] == ["-xen-domid", "7"]
    proc = _run(argv)
    assert proc.returncode == 1
    # Parsed whole; refused when it tried to reach the hypervisor.
    assert "failed to initialize xen" in proc.stderr, proc.stderr
    assert not any(s in proc.stderr for s in SYNTAX), proc.stderr
    # Options are checked before Xen is reached: a bad one is refused as such, first.
    bad = _run([*argv, "-display", "bogus"])
    assert "Parameter 'type' does not accept value 'bogus'" in bad.stderr, bad.stderr
    assert "failed to initialize xen" not in bad.stderr


def test_plain_qemu_has_no_xen() -> None:
    """Debian's qemu-system-x86_64 is built without Xen: that is why the device model is
    a separate binary (and what `pyqvm doctor --for xen` points to)."""
    qemu = read_host_facts().qemu_binaries["x86_64"]
    out = _run([str(qemu), "-accel", "help"]).stdout
    assert "xen" not in out.split()
    proc = _run(xen_hvm_argv(VMSpec(), qemu=qemu, domid=1))
    assert "-xen-domid 1: Option not supported for this target" in proc.stderr
