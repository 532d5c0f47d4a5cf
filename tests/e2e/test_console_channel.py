"""The serial console as a channel (issue 25), on the built-in guest's console shell: expect
and sendline, async and blocking and on a named VM, with ``pyqvm console`` attached at
the same time; and a guest panic ending a running ``expect`` and ``run`` at once."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from pyqvm import VM, AsyncVM, KernelBoot
from pyqvm.errors import (
    ConsoleError,
    GuestPanicError,
    PyqvmTimeoutError,
    SpecError,
    VMStateError,
)
from pyqvm.image import GuestImage
from pyqvm.ops.template import Template
from pyqvm.spec import VMSpec
from pyqvm.state import VMState

pytestmark = [pytest.mark.qemu]

#: The guest's shell prompt on its console (busybox sh as root).
PROMPT = r"~ # $"


@pytest.mark.asyncio
async def test_expect_and_sendline_drive_the_console_shell(default_template: Template) -> None:
    async with await AsyncVM.from_template(default_template) as vm:
        await vm.console.sendline("echo $((6 * 7))x")
        m = await vm.console.expect([r"(\d+)x\r?\n", "never"], timeout=30)
        assert (m.index, m.text.strip(), m.groups) == (0, "42x", ("42",))
        # What was matched is taken: the same text is not found again.
        with pytest.raises(PyqvmTimeoutError, match="none of"):
            await vm.console.expect("42x", timeout=0.5)
        # The console is still logged to its file.
        assert "42x" in vm.console_text()
        with pytest.raises(SpecError, match=r"patterns\[1\]"):
            await vm.console.expect(["ok", "(unclosed"])


@pytest.mark.asyncio
async def test_a_fail_on_pattern_ends_the_wait_with_the_console_tail(
    default_template: Template,
) -> None:
    async with await AsyncVM.from_template(default_template) as vm:
        await vm.console.sendline("echo install fa''iled")
        started = time.monotonic()
        with pytest.raises(ConsoleError) as e:
            await vm.console.expect("never", timeout=30, fail_on=[r"install failed"])
        assert time.monotonic() - started < 10
        assert e.value.pattern == "install failed" and "install failed" in e.value.console


def test_the_blocking_face_and_an_attached_interactive_console(
    default_template: Template,
) -> None:
    with VM.from_template(default_template) as vm:
        assert vm.runtime_dir is not None
        viewer = socket.socket(socket.AF_UNIX)
        viewer.connect(str(vm.runtime_dir / "console.sock"))
        viewer.settimeout(10)
        with viewer:
            vm.console.sendline("echo from-py$((1 + 1))")
            assert vm.console.expect("from-py2", timeout=30).text == "from-py2"
            # The viewer saw it too, and what it types reaches the guest as well.
            seen = b""
            while b"from-py2" not in seen:
                seen += viewer.recv(4096)
            viewer.sendall(b"echo from-viewer$((2 + 1))\r")
            assert vm.console.expect("from-viewer3", timeout=30).text == "from-viewer3"


@pytest.mark.asyncio
async def test_a_guest_panic_ends_expect_and_run_within_two_seconds(
    default_template: Template,
) -> None:
    async with await AsyncVM.from_template(default_template) as vm:
        running = asyncio.ensure_future(vm.run(["sleep", "60"]))
        expecting = asyncio.ensure_future(vm.console.expect("never", timeout=60))
        await asyncio.sleep(0.5)
        await vm.console.sendline("echo c > /proc/sysrq-trigger")
        started = time.monotonic()
        done, _ = await asyncio.wait({running, expecting}, timeout=10)
        for task in (running, expecting):
            assert task in done
            error = task.exception()
            assert isinstance(error, GuestPanicError), error
            assert "sysrq triggered crash" in error.detail
            assert "Kernel panic" in error.console
        assert time.monotonic() - started < 2.0


@pytest.mark.asyncio
async def test_a_pvpanic_guest_is_paused_where_it_panicked() -> None:
    """QEMU's own signal: the guest kernel's pvpanic driver tells QEMU, which pauses the
    guest there (``-action panic=pause``), for a look, and says so (``GUEST_PANICKED``).
    On q35 (microvm has no ACPI to find the device by)."""
    async with AsyncVM(VMSpec(image="default", machine="q35")) as vm:
        async with vm.events("GUEST_PANICKED") as events:
            await vm.console.sendline("echo c > /proc/sysrq-trigger")
            event = await asyncio.wait_for(events.get(), 30)
        assert event["data"] == {"action": "pause"}
        status = await vm.execute("query-status")
        assert status["status"] == "guest-panicked"
        with pytest.raises(GuestPanicError):
            await vm.run(["true"], timeout=30)
        assert vm.state is VMState.PAUSED


#: Commands whose exit statuses and outputs must be the same through both ways.
SAME_BOTH_WAYS: list[tuple[list[str], bytes | None]] = [
    (["true"], None),
    (["sh", "-c", "echo out; echo err >&2; exit 1"], None),
    (["sh", "-c", "exit 42"], None),
    (["sh", "-c", "no-such-command"], None),  # 127, and the shell's message on stderr
    (["sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' x"], None),  # 1 MiB
    (["sh", "-c", "printf '\\001\\377\\000'; cat"], b"in\x00put\n"),  # binary, and stdin
    (["env"], None),
]


@pytest.mark.asyncio
async def test_run_over_the_serial_shell_is_run_over_the_agent(
    default_image: object,
) -> None:
    """The built-in guest with and without its agent: the same statuses and outputs."""
    agent_spec = VMSpec(image="default", name="via-agent")
    serial_spec = VMSpec(image="default", name="via-serial", guest_agent=False)
    assert serial_spec.effective_exec_via == "serial"
    async with AsyncVM(agent_spec) as by_agent, AsyncVM(serial_spec) as by_serial:
        for argv, given in SAME_BOTH_WAYS:
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "K": "v w"}
            a = await by_agent.run(argv, input=given, env=env, timeout=120)
            s = await by_serial.run(argv, input=given, env=env, timeout=120)
            assert (s.returncode, s.stdout, s.stderr) == (a.returncode, a.stdout, a.stderr), argv
        assert len(s.stdout) > 0
        await by_serial.write_file("/tmp/f", b"\x00data\xff")
        assert await by_serial.read_file("/tmp/f") == b"\x00data\xff"


@pytest.mark.asyncio
async def test_a_guest_that_panics_while_booting_fails_its_start_at_once(
    default_image: GuestImage,
) -> None:
    """No init to run: the kernel panics, and start() says so instead of waiting out its
    readiness timeout for an agent that will never answer."""
    kernel = KernelBoot(default_image.kernel, default_image.initrd, "console=ttyS0 rdinit=/none")
    vm = AsyncVM(VMSpec(kernel=kernel, ready="agent", ready_timeout=300))
    started = time.monotonic()
    with pytest.raises(GuestPanicError) as e:
        await vm.start()
    assert time.monotonic() - started < 60
    assert "Kernel panic" in e.value.console
    await vm.stop()


@pytest.mark.asyncio
async def test_a_screen_without_a_display_and_a_console_of_a_stopped_vm_are_refused(
    default_template: Template,
) -> None:
    vm = await AsyncVM.from_template(default_template)
    async with vm:
        with pytest.raises(VMStateError, match='display = "vga"'):
            await vm.screenshot()
        with pytest.raises(SpecError, match=r"text\[0\]"):
            await vm.keys.type("é")
    with pytest.raises(VMStateError, match="stopped"):
        await vm.console.expect("anything", timeout=1)
    with pytest.raises(VMStateError, match="stopped"):
        await vm.console.sendline("true")
