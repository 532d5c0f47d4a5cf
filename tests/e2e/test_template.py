"""Templates and their clones, proven by what the guests see."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from pyqvm import (
    AsyncVM,
    KernelBoot,
    Template,
    TemplateError,
    VMSpec,
    VMState,
    image,
    templates,
)
from pyqvm.host.accel import KvmStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio]

DATA = "/mnt/data"  # the built-in guest's disk


@pytest_asyncio.fixture
async def made(default_image: image.GuestImage, tmp_path: Path) -> AsyncIterator[Template]:
    """A template of the built-in guest, with a file written by its setup (on disk and in RAM)."""
    setup = [f"echo from-setup > {DATA}/setup.txt", "echo in-ram > /tmp/ram.txt"]
    yield await templates.create(
        VMSpec(image="default"), "t1", setup=setup, directory=tmp_path / "templates"
    )


async def sh(vm: AsyncVM, script: str) -> str:
    return (await vm.run(["sh", "-c", script], check=True)).stdout_text


async def test_clones_see_the_setup_and_keep_their_writes_to_themselves(
    made: Template, tmp_path: Path
) -> None:
    assert [t.name for t in templates.list_templates(directory=tmp_path / "templates")] == ["t1"]
    a = await AsyncVM.from_template(made)
    b = await AsyncVM.from_template(made)
    try:
        assert a.state is VMState.RUNNING and b.state is VMState.RUNNING
        assert a.boot_seconds is None  # never booted
        # Made their own from the first moment: random bytes differ (without a reseed of
        # their own, clones share the template's CRNG key until the kernel's next one).
        rand_a = await sh(a, "head -c 32 /dev/urandom | od -An -tx1")
        rand_b = await sh(b, "head -c 32 /dev/urandom | od -An -tx1")
        assert rand_a != rand_b
        for vm in (a, b):
            assert await sh(vm, f"cat {DATA}/setup.txt /tmp/ram.txt") == "from-setup\nin-ram\n"
        # A's writes, to RAM (tmpfs) and to its disk, stay A's.
        await sh(a, f"echo a > /tmp/ram.txt; echo a > {DATA}/setup.txt; sync")
        assert await sh(a, f"cat /tmp/ram.txt {DATA}/setup.txt") == "a\na\n"
        assert await sh(b, f"cat /tmp/ram.txt {DATA}/setup.txt") == "in-ram\nfrom-setup\n"
        # Two different workloads at once.
        out_a, out_b = await asyncio.gather(
            sh(a, "i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; echo $i"),
            sh(b, "echo b-$(cat /proc/sys/kernel/hostname)"),
        )
        assert out_a == "2000\n" and out_b.startswith("b-")
        # The clock is the host's.
        for vm in (a, b):
            assert abs(int(await sh(vm, "date +%s")) - time.time()) < 3
    finally:
        await a.stop()
        await b.stop()
    # The template's files were never written by its clones.
    c = await AsyncVM.from_template(made)
    try:
        assert await sh(c, f"cat {DATA}/setup.txt /tmp/ram.txt") == "from-setup\nin-ram\n"
    finally:
        await c.stop()


async def test_a_stale_or_broken_template_is_refused(made: Template) -> None:
    vm = AsyncVM(made.spec)
    made.state_dir.joinpath("vmstate").rename(made.directory / "aside")
    with pytest.raises(TemplateError, match=r"broken.*vmstate.*missing"):
        await vm.start_from_template(made)
    assert vm.state is VMState.CREATED and vm.pid is None
    made.directory.joinpath("aside").rename(made.state_dir / "vmstate")
    os.utime(made.memory_file, (1, 1))  # as if another template had been written there
    with pytest.raises(TemplateError, match=r"stale.*memory.*make it again"):
        await AsyncVM.from_template(made)
    other = AsyncVM(VMSpec(image="default", memory=256))
    with pytest.raises(TemplateError, match="another spec"):
        await other.start_from_template(made)


async def test_a_template_of_an_older_image_is_refused(
    made: Template, default_image: image.GuestImage
) -> None:
    """After `pyqvm image build` makes a newer image, templates of the old one are stale
    (their RAM holds the old kernel and init), even though the old files are still there."""
    assert str(default_image.kernel) in made.stamps
    older = dataclasses.replace(
        made,
        stamps={p: s for p, s in made.stamps.items() if Path(p).parent != default_image.directory},
    )
    with pytest.raises(TemplateError, match=r"stale: it was made with an older 'default' image"):
        older.check()
    vm = AsyncVM(made.clone_spec("old-image-clone"))
    with pytest.raises(TemplateError, match="older 'default' image"):
        await vm.start_from_template(older)
    assert vm.state is VMState.CREATED and vm.pid is None


async def test_a_template_of_another_accelerator_is_refused(made: Template) -> None:
    """A TCG template on a host that has KVM now (and the other way round) cannot be cloned:
    the state holds what the accelerator shaped. Refused before QEMU starts."""
    here = made.accelerator
    assert json.loads((made.directory / "template.json").read_text())["accelerator"] == here
    made.check()
    other = "kvm" if here == "tcg" else "tcg"
    # The host as it would be if KVM came (or went): "auto" would pick the other one.
    changed = KvmStatus(usable=other == "kvm", reason="a fake for this test")
    with pytest.raises(TemplateError, match=f"saved under {here} and would load under {other}"):
        made.check(kvm=changed)
    vm = AsyncVM(made.clone_spec("accel-clone"))
    with pytest.raises(TemplateError, match=f"saved under {other} and would load under {here}"):
        await vm.start_from_template(dataclasses.replace(made, accelerator=other))
    assert vm.state is VMState.CREATED and vm.pid is None


async def test_a_failed_setup_leaves_no_template(
    default_image: image.GuestImage, tmp_path: Path
) -> None:
    where = tmp_path / "templates"
    with pytest.raises(TemplateError, match="setup command 'exit 3' exited 3"):
        await templates.create(VMSpec(image="default"), "bad", setup=["exit 3"], directory=where)
    assert templates.list_templates(directory=where) == []
    assert list(where.iterdir()) == []


async def test_the_command_line_makes_runs_and_removes_a_template(
    default_image: image.GuestImage,
) -> None:
    name = f"e2e-cli-{os.getpid()}"
    pyqvm = [sys.executable, "-m", "pyqvm"]

    async def cli(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *pyqvm, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    try:
        code, out = await cli("template", "create", "--name", name, "--setup", "echo hi > /root/x")
        assert code == 0, out
        code, out = await cli("template", "list")
        assert code == 0 and name in out
        code, out = await cli("run", "--template", name, "--", "sh", "-c", "cat /root/x; exit 4")
        assert (code, out) == (4, "hi\n")
    finally:
        code, out = await cli("template", "rm", name)
    assert code == 0 and f"removed {name}" in out
    code, out = await cli("run", "--template", name, "--", "true")
    assert code == 125 and "no template" in out


async def test_a_clone_migrates_and_is_saved_like_any_vm(made: Template, tmp_path: Path) -> None:
    src = await AsyncVM.from_template(made)
    dst = AsyncVM(src.spec)
    restored = AsyncVM(src.spec)
    try:
        await sh(src, "echo moved > /tmp/ram.txt")
        await src.migrate(dst)  # into a VM with plain (anonymous) RAM
        assert await sh(dst, f"cat /tmp/ram.txt {DATA}/setup.txt") == "moved\nfrom-setup\n"
        await dst.save(tmp_path / "saved")
        await restored.restore(tmp_path / "saved")
        assert await sh(restored, "cat /tmp/ram.txt") == "moved\n"
    finally:
        for vm in (src, dst, restored):
            await vm.stop()


def qemu_pids_mapping(path: Path) -> list[int]:
    """The QEMU processes whose command line names ``path``."""
    out = []
    for proc in Path("/proc").iterdir():
        try:
            argv = proc.joinpath("cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and any(str(path).encode() in a for a in argv):
            out.append(int(proc.name))
    return out


async def test_replacing_a_template_waits_for_a_clone_that_is_starting(
    made: Template, tmp_path: Path
) -> None:
    clone = asyncio.create_task(AsyncVM.from_template(made))
    while not (pids := qemu_pids_mapping(made.memory_file)):
        await asyncio.sleep(0.002)
    os.kill(pids[0], signal.SIGSTOP)  # the clone is held mid-start
    try:
        replaced = asyncio.create_task(
            templates.create(
                made.spec,
                "t1",
                setup=["echo new > /tmp/ram.txt"],
                directory=tmp_path / "templates",
                replace=True,
            )
        )
        # The new template is complete in its hidden dir; it must not replace the old one yet.
        while not list((tmp_path / "templates").glob(".tmp-t1-*/template.json")):
            assert not replaced.done(), replaced.exception()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert not replaced.done()
        assert templates.load("t1", directory=tmp_path / "templates").created == made.created
    finally:
        os.kill(pids[0], signal.SIGCONT)
    vm = await clone
    try:
        assert await sh(vm, "cat /tmp/ram.txt") == "in-ram\n"
    finally:
        await vm.stop()
    new = await replaced
    vm = await AsyncVM.from_template(new)
    try:
        assert await sh(vm, "cat /tmp/ram.txt") == "new\n"
    finally:
        await vm.stop()
    with pytest.raises(TemplateError, match="stale"):
        await AsyncVM.from_template(made)  # the old record no longer matches the files


async def test_a_guest_of_your_own_on_q35_reseeds_through_vmgenid(
    full_image: image.GuestImage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """QEMU's vmgenid device on q35: a guest pyqvm did not build (the full image's
    kernel and initrd as plain files, so no pyqvm-wake) whose kernel has CONFIG_VMGENID
    reseeds its CRNG itself when a clone's QEMU writes a new generation ID; the template
    is frozen at once instead of idling for its seed to age."""
    img = full_image
    spec = VMSpec(
        name="genid",
        machine="q35",
        kernel=KernelBoot(kernel=img.kernel, initrd=img.initrd, append=image.KERNEL_CMDLINE),
    )
    caplog.set_level(logging.INFO, logger="pyqvm.ops.wake")
    made = await templates.create(spec, "genid", directory=tmp_path / "templates")
    assert "the guest drives vmgenid" in caplog.text
    assert "letting the guest's random seed age" not in caplog.text
    a = await AsyncVM.from_template(made)
    b = await AsyncVM.from_template(made)
    try:
        assert a.machine.wake_port is None  # not pyqvm's image: the reseed is vmgenid's
        for vm in (a, b):
            dmesg = (await vm.run(["dmesg"], check=True)).stdout.decode()
            assert "crng reseeded due to virtual machine fork" in dmesg, dmesg[-2000:]
        ids = [(await vm.execute("query-vm-generation-id"))["guid"] for vm in (a, b)]
        assert ids[0] != ids[1], ids
        draws = [await vm.run(["head", "-c", "16", "/dev/urandom"], check=True) for vm in (a, b)]
        assert draws[0].stdout != draws[1].stdout
    finally:
        await asyncio.gather(a.stop(), b.stop())
