"""The launcher against real QEMU, without a guest OS (QEMU started paused with -S)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pyqvm.errors import LaunchError, SpecError
from pyqvm.spec import Disk, HostDevice, KernelBoot, VMSpec
from pyqvm.vm import AsyncVM, VMState

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio]


def paused(**kw: object) -> VMSpec:
    base: dict[str, object] = {"guest_agent": False, "ready": "none", "extra_args": ("-S",)}
    base.update(kw)
    return VMSpec(**base)  # type: ignore[arg-type]


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


async def test_user_values_cannot_inject_options(tmp_path: Path) -> None:
    """QEMU's own parser sees the literal file names, and no smuggled option takes effect."""
    ro = tmp_path / "a,readonly=off.img"
    nbd = tmp_path / "x,file.driver=nbd,file.host=127.0.0.1.qcow2"
    qemu_img("create", "-f", "raw", str(ro), "1M")
    qemu_img("create", "-f", "qcow2", str(nbd), "1M")
    log = tmp_path / "console,logappend=on.log"
    spec = paused(
        disks=(Disk(ro, readonly=True, ephemeral=False, id="ro"), Disk(nbd, id="nbd")),
        serial_log=log,
    )
    async with AsyncVM(spec) as vm:
        blocks = {
            b["inserted"]["node-name"]: b["inserted"] for b in await vm.execute("query-block")
        }
        assert blocks["ro"]["file"] == str(ro)
        assert blocks["ro"]["ro"] is True
        nbd_node = blocks["nbd"]
        assert nbd_node["image"]["backing-image"]["filename"] == str(nbd)
        assert nbd_node["file"].startswith(str(vm.runtime_dir))  # the overlay, not the base
        # Nothing was split off a name: QEMU created no file but the ones named.
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ro.name, nbd.name, log.name])


async def test_qemu_refusal_carries_stderr_and_leaves_nothing(tmp_path: Path) -> None:
    vm = AsyncVM(paused(extra_args=("-device", "no-such-device-xyz")))
    with pytest.raises(LaunchError) as err:
        await vm.start()
    assert "no-such-device-xyz" in err.value.stderr
    assert "no-such-device-xyz" in str(err.value)
    assert err.value.argv[-1] == "no-such-device-xyz"
    assert vm.state is VMState.FAILED
    assert vm.runtime_dir is None
    assert vm.pid is not None and not Path(f"/proc/{vm.pid}").exists()


async def test_kvm_asked_where_unusable_fails_before_start() -> None:
    from pyqvm.errors import HostError
    from pyqvm.host.facts import read_host_facts

    facts = read_host_facts()
    if facts.kvm.usable:
        pytest.fail("this test expects a host without usable KVM (true of CI here)")
    vm = AsyncVM(paused(accelerator="kvm"), host=facts)
    with pytest.raises(HostError, match="tcg"):
        await vm.start()
    assert vm.pid is None


async def test_absent_host_device_is_a_spec_error() -> None:
    vm = AsyncVM(paused(profile="passthrough", host_devices=[HostDevice("0000:7f:1f.7")]))
    with pytest.raises(SpecError, match=r"host_devices\[0\]\.address.*does not exist"):
        await vm.start()


async def test_not_a_kernel_is_a_spec_error(tmp_path: Path) -> None:
    junk = tmp_path / "vmlinuz"
    junk.write_bytes(b"\x7fELG" + b"\0" * 4096)
    vm = AsyncVM(VMSpec(kernel=KernelBoot(junk)))
    with pytest.raises(SpecError, match=r"kernel\.kernel: .*neither"):
        await vm.start()
    assert vm.pid is None


async def test_exec_failure_closes_everything(tmp_path: Path) -> None:
    """QEMU that cannot even be executed: a LaunchError, and no descriptor or directory left."""
    import dataclasses
    import os

    from pyqvm.host.facts import read_host_facts

    facts = dataclasses.replace(
        read_host_facts(), qemu_binaries={"x86_64": tmp_path / "no-such-qemu"}
    )
    vm = AsyncVM(paused(), host=facts)
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(LaunchError, match="no-such-qemu"):
        await vm.start()
    assert set(os.listdir("/proc/self/fd")) <= fds
    assert vm.state is VMState.FAILED and vm.runtime_dir is None
