"""Named VMs, driven the way a user drives them: ``pyqvm up`` in one process, ``exec``, ``ps``,
``console``, ``qmp``, ``stop``... from others (each a ``pyqvm`` subprocess)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.sshhost import SshHost

from pyqvm import AsyncNamedVM, MigrationProgress, NamedVMError, Template, VMSpec, attach, up

pytestmark = [pytest.mark.e2e]

PYQVM = [sys.executable, "-m", "pyqvm"]


def pyqvm(
    *args: str, input: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """One ``pyqvm`` command, as a user would type it (stdin closed unless ``input``)."""
    r = subprocess.run(
        [*PYQVM, *args],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
    )
    return subprocess.CompletedProcess(
        r.args, r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    )


def up_clone(name: str) -> subprocess.CompletedProcess[str]:
    """``pyqvm up --template`` of the session's template (see the ``runtime`` fixture)."""
    return pyqvm("up", "--template", os.environ["PQ_TEST_TEMPLATE"], "--name", name)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def gone_within(pids: list[int], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while any(alive(p) for p in pids):
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(params=["here", "ssh"])
def where(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SshHost | None:
    """Where the test's VMs live: this host, or the namespace host of `fixtures.sshhost`
    driven with ``--host ssh://`` (PYQVM_HOST); every test here runs both ways."""
    if request.param == "here":
        return None
    there: SshHost = request.getfixturevalue("remote_env")
    monkeypatch.setenv("PYQVM_HOST", there.url)
    return there


@pytest.fixture
def host(where: SshHost | None) -> str | None:
    """The ``host`` a Python API call takes (None: this one)."""
    return None if where is None else where.url


@pytest.fixture
def runtime(
    default_template: Template, monkeypatch: pytest.MonkeyPatch, where: SshHost | None
) -> Iterator[Path]:
    """A registry of this test's own (a short path: sockets live in it); nothing may be left.
    Over SSH, its path reaches the other host too (`fixtures.sshhost.PASSED_ON`).

    `up_clone` starts a clone of the session's template: these tests are about named VMs,
    not about booting, so most skip the boot.
    """
    d = Path(tempfile.mkdtemp(prefix="pq-rt-"))
    d.chmod(0o700)
    monkeypatch.setenv("PYQVM_RUNTIME_DIR", str(d))
    monkeypatch.setenv("PYQVM_TEMPLATES_DIR", str(default_template.directory.parent))
    monkeypatch.setenv("PQ_TEST_TEMPLATE", default_template.name)
    try:
        yield d
    finally:
        vms = d / "vms"
        # A dot name is an owner's directory on its way out (renamed, then removed): the
        # registry skips those, and so does this check.
        left = (
            sorted(p.name for p in vms.iterdir() if not p.name.startswith("."))
            if vms.is_dir()
            else []
        )
        if left:
            pyqvm("stop", "--all", "--force")
            for lock in vms.glob("*/lock"):  # what stop could not end (a stopped owner...)
                with contextlib.suppress(ValueError, OSError):
                    os.kill(int(lock.read_text()), signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
        assert left == [], f"named VMs left running: {left}"


def test_up_exec_ps_console_qmp_stop_from_other_processes(runtime: Path) -> None:
    r = pyqvm("up", "--name", "web", "--memory", "384M")
    assert (r.returncode, r.stdout) == (0, "web\n"), r.stderr
    ps = pyqvm("ps", "--json")
    (info,) = json.loads(ps.stdout)
    assert info["name"] == "web" and info["state"] == "running" and info["status"] == "running"
    assert info["memory"] == 384 and info["machine"] == "microvm" and info["accelerator"] == "tcg"
    owner, qemu = info["owner_pid"], info["qemu_pid"]
    assert alive(owner) and alive(qemu)
    assert "web" in pyqvm("ps").stdout.splitlines()[1]

    # exec: stdout and stderr apart, stdin passed through, the exit status table.
    r = pyqvm("exec", "web", "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    r = pyqvm("exec", "web", "--", "tr", "a-z", "A-Z", input=b"piped in\n")
    assert (r.returncode, r.stdout) == (0, "PIPED IN\n")
    assert pyqvm("exec", "web", "--", "no-such-command").returncode == 127
    assert pyqvm("exec", "web", "--", "/etc/passwd").returncode == 126  # not executable
    assert pyqvm("exec", "web", "--", "sh", "-c", "kill -TERM $$").returncode == 128 + 15
    assert pyqvm("exec", "web").returncode == 2  # no command: a usage error
    r = pyqvm("exec", "nosuch", "--", "true")
    assert r.returncode == 125 and "no VM named 'nosuch'" in r.stderr and "web" in r.stderr

    # qmp: QEMU's answer as JSON; QEMU's error as JSON, exit 1.
    r = pyqvm("qmp", "web", "query-status")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "running"
    r = pyqvm("qmp", "web", "qom-get", '{"path": "/machine", "property": "type"}')
    assert json.loads(r.stdout) == "microvm-machine"
    r = pyqvm("qmp", "web", "no-such-command")
    assert r.returncode == 1 and json.loads(r.stdout)["error"]["class"] == "CommandNotFound"

    # console: typed into, its answer read back (stdin not a terminal); logs has it too.
    r = pyqvm("console", "web", "--idle", "0.5", input=b"echo console-$((6*7))\n")
    assert r.returncode == 0 and "console-42" in r.stdout
    assert "console-42" in pyqvm("logs", "web").stdout

    # The name is taken while web runs.
    r = pyqvm("up", "--name", "web")
    assert r.returncode == 125 and "taken by a running VM" in r.stderr

    r = pyqvm("stop", "web")
    assert r.returncode == 0, r.stderr
    assert gone_within([owner, qemu], 1.0)
    assert json.loads(pyqvm("ps", "--json").stdout) == []
    assert not Path(info["runtime_dir"]).exists()
    assert list((runtime / "vms").iterdir()) == []


def test_a_failed_up_reports_the_launch_error_and_leaves_nothing(
    runtime: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text('image = "default"\nextra_args = ["-device", "no-such-device-xyz"]\n')
    r = pyqvm("up", str(spec), "--name", "bad")
    assert r.returncode == 125
    assert "LaunchError" not in r.stderr and "no-such-device-xyz" in r.stderr  # QEMU's stderr
    assert list((runtime / "vms").iterdir()) == []
    r = pyqvm("up", "--name", "x", "--memory", "1G", "--smp", "0")
    assert r.returncode == 125 and "smp" in r.stderr  # refused before anything starts
    assert list((runtime / "vms").iterdir()) == []


def test_concurrent_execs_a_console_and_a_stop_during_an_exec(runtime: Path) -> None:
    assert up_clone("c").returncode == 0
    slow = subprocess.Popen(
        [*PYQVM, "exec", "c", "--", "sh", "-c", "sleep 1.5; echo slow"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    console = subprocess.Popen(
        [*PYQVM, "console", "c", "--idle", "2"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)
    fast = pyqvm("exec", "c", "--", "echo", "fast")  # not held up by the slow one
    assert (fast.returncode, fast.stdout) == (0, "fast\n")
    busy = pyqvm("console", "c", "--idle", "0.1", input=b"")
    assert busy.returncode == 125 and "in use" in busy.stderr
    out, _ = slow.communicate(timeout=30)
    assert (slow.returncode, out) == (0, "slow\n")
    console_out, _ = console.communicate("echo from-console\n", timeout=30)
    assert console.returncode == 0 and "from-console" in console_out

    long = subprocess.Popen(
        [*PYQVM, "exec", "c", "--", "sleep", "30"],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)
    t0 = time.monotonic()
    assert pyqvm("stop", "c").returncode == 0
    _, err = long.communicate(timeout=30)
    assert long.returncode == 125 and "VM 'c' stopped during run" in err, err
    assert time.monotonic() - t0 < 10


def test_sigkilled_owner_takes_qemu_with_it_and_ps_prunes_it_once(runtime: Path) -> None:
    assert up_clone("k").returncode == 0
    info = json.loads(pyqvm("ps", "--json").stdout)[0]
    os.kill(info["owner_pid"], signal.SIGKILL)
    assert gone_within([info["owner_pid"], info["qemu_pid"]], 1.0)  # PR_SET_PDEATHSIG
    r = pyqvm("ps")
    assert "removed dead VM k: its owner process" in r.stderr
    assert r.stdout.splitlines() == [r.stdout.splitlines()[0]]  # the header only
    assert not Path(info["runtime_dir"]).exists()
    assert pyqvm("ps").stderr == ""  # reported once
    r = pyqvm("exec", "k", "--", "true")
    assert r.returncode == 125 and "no VM named 'k'" in r.stderr


def test_sigkilled_client_mid_exec_leaves_the_vm_usable(runtime: Path) -> None:
    assert up_clone("u").returncode == 0
    client = subprocess.Popen([*PYQVM, "exec", "u", "--", "sleep", "2"], stdin=subprocess.DEVNULL)
    time.sleep(0.7)
    client.kill()
    client.wait()
    r = pyqvm("exec", "u", "--", "echo", "still here")
    assert (r.returncode, r.stdout) == (0, "still here\n")
    time.sleep(1.5)  # the killed client's command ends in the guest; its answer is dropped
    assert pyqvm("exec", "u", "--", "true").returncode == 0
    assert pyqvm("stop", "u").returncode == 0


def test_an_owner_that_does_not_answer_is_named_in_the_error(runtime: Path) -> None:
    assert up_clone("s").returncode == 0
    owner = json.loads(pyqvm("ps", "--json").stdout)[0]["owner_pid"]
    os.kill(owner, signal.SIGSTOP)
    try:
        r = pyqvm("exec", "s", "--", "true")
        assert r.returncode == 125
        assert "'s'" in r.stderr and "does not answer" in r.stderr and str(owner) in r.stderr
        ps = json.loads(pyqvm("ps", "--json").stdout)
        assert ps[0]["state"] == "unresponsive"
    finally:
        os.kill(owner, signal.SIGCONT)
    # A broken record is said so by the commands that read it; the owner still serves.
    record = runtime / "vms" / "s" / "record.json"
    record.write_text("{not json")
    r = pyqvm("logs", "s")
    assert r.returncode == 125 and "record" in r.stderr and "unreadable" in r.stderr
    assert pyqvm("exec", "s", "--", "true").returncode == 0
    # stop --force ends an owner that does not answer, and its QEMU with it.
    (info,) = json.loads(pyqvm("ps", "--json").stdout)
    os.kill(owner, signal.SIGSTOP)
    r = pyqvm("stop", "--force", "s")
    assert r.returncode == 0, r.stderr
    assert gone_within([owner, info["qemu_pid"]], 1.0)
    assert json.loads(pyqvm("ps", "--json").stdout) == []


def test_snapshot_hotplug_save_and_restore_from_the_command_line(
    runtime: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "vm.toml"
    spec.write_text(
        'image = "default"\nhotplug_slots = 2\nmax_smp = 2\nmax_memory = "1G"\nmemory_slots = 1\n'
    )
    assert pyqvm("up", str(spec), "--name", "h").returncode == 0
    assert pyqvm("exec", "h", "--", "sh", "-c", "echo one > /tmp/f").returncode == 0
    assert pyqvm("snapshot", "h", "save", "s1").returncode == 0
    assert pyqvm("exec", "h", "--", "sh", "-c", "echo two > /tmp/f").returncode == 0
    listed = json.loads(pyqvm("snapshot", "h", "list", "--json").stdout)
    assert [s["tag"] for s in listed] == ["s1"]
    assert pyqvm("snapshot", "h", "load", "s1").returncode == 0
    assert pyqvm("exec", "h", "--", "cat", "/tmp/f").stdout == "one\n"
    assert pyqvm("snapshot", "h", "delete", "s1").returncode == 0
    assert json.loads(pyqvm("snapshot", "h", "list", "--json").stdout) == []

    disk = tmp_path / "extra.img"
    disk.write_bytes(b"\0" * (8 << 20))
    r = pyqvm("hotplug", "h", "disk", str(disk), "--format", "raw", "--id", "extra")
    assert (r.returncode, r.stdout) == (0, "extra\n"), r.stderr
    wait_vdb = "for i in $(seq 100); do [ -b /dev/vdb ] && break; sleep 0.1; done; [ -b /dev/vdb ]"
    assert pyqvm("exec", "h", "--", "sh", "-c", wait_vdb).returncode == 0
    assert pyqvm("unplug", "h", "extra").returncode == 0
    nic = pyqvm("hotplug", "h", "nic", "--mac", "52:54:00:12:34:99")
    assert nic.returncode == 0, nic.stderr
    macs = pyqvm("exec", "h", "--", "sh", "-c", "sleep 1; cat /sys/class/net/*/address").stdout
    assert "52:54:00:12:34:99" in macs
    cpu = pyqvm("hotplug", "h", "cpu")
    assert cpu.returncode == 0, cpu.stderr
    mem = pyqvm("hotplug", "h", "memory", "128M")
    assert mem.returncode == 0, mem.stderr
    q = json.loads(pyqvm("qmp", "h", "query-memory-devices").stdout)
    assert [d["data"]["size"] for d in q] == [128 * 2**20]
    r = pyqvm("hotplug", "h", "cpu")
    assert r.returncode == 125 and "max_smp" in r.stderr  # full now: says what to raise

    saved = tmp_path / "saved"
    r = pyqvm("save", "h", str(saved))
    assert r.returncode == 0 and (saved / "spec.json").is_file(), r.stderr
    assert json.loads(pyqvm("ps", "--json").stdout) == []  # saved means stopped
    assert pyqvm("restore", str(saved), "--name", "h2").returncode == 0
    assert pyqvm("exec", "h2", "--", "cat", "/tmp/f").stdout == "one\n"  # RAM came back
    assert pyqvm("stop", "h2").returncode == 0


def test_ten_clones_up_then_stop_leave_nothing_behind(
    runtime: Path, default_template: Template
) -> None:
    names = [f"n{i}" for i in range(10)]
    procs = [
        subprocess.Popen(
            [*PYQVM, "up", "--template", default_template.name, "--name", n],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in names
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    infos = json.loads(pyqvm("ps", "--json").stdout)
    assert sorted(i["name"] for i in infos) == names
    assert {i["template"] for i in infos} == {default_template.name}
    pids = [i["owner_pid"] for i in infos] + [i["qemu_pid"] for i in infos]
    dirs = [Path(i["runtime_dir"]) for i in infos]
    consoles = [Path(i["console_socket"]) for i in infos]
    assert pyqvm("stop", "--all").returncode == 0
    assert gone_within(pids, 2.0)
    assert not any(d.exists() for d in dirs) and not any(c.exists() for c in consoles)
    assert list((runtime / "vms").iterdir()) == []


def test_the_python_api_attach_and_up(
    runtime: Path, default_template: Template, host: str | None
) -> None:
    vm = up(name="py", template=default_template.name, host=host)
    assert vm.run(["echo", "hi"]).stdout == b"hi\n"
    again = attach("py", host=host)
    again.write_file("/tmp/x", b"data")
    assert vm.read_file("/tmp/x") == b"data"
    assert again.execute("query-status")["status"] == "running"
    assert again.info()["name"] == "py"

    async def concurrently() -> list[bytes]:
        a = await AsyncNamedVM.attach("py", host=host)
        b = await AsyncNamedVM.attach("py", host=host)
        try:
            results = await asyncio.gather(
                a.run(["sh", "-c", "sleep 0.5; echo a"]), b.run(["echo", "b"])
            )
            return [r.stdout for r in results]
        finally:
            await a.close()
            await b.close()

    assert asyncio.run(concurrently()) == [b"a\n", b"b\n"]
    vm.stop()
    with pytest.raises(NamedVMError, match="no VM named 'py'"):
        attach("py", host=host)


def test_migrate_a_named_vm_into_a_new_one(
    runtime: Path, where: SshHost | None, host: str | None
) -> None:
    port = free_port()
    assert pyqvm("up", "--name", "m1", "--forward", f"{port}:8080").returncode == 0
    serve = "mkdir -p /tmp/www && echo served > /tmp/www/hello && httpd -p 8080 -h /tmp/www"
    script = f"{serve}; echo kept > /mnt/data/kept; sync; echo in-ram > /tmp/ram"
    assert pyqvm("exec", "m1", "--", "sh", "-c", script).returncode == 0
    before = json.loads(pyqvm("ps", "--json").stdout)[0]

    r = pyqvm("migrate", "m1", "--to", "m2")  # copied storage, over a unix socket
    assert r.returncode == 0 and r.stdout.startswith("m1 -> m2: "), r.stderr
    assert gone_within([before["owner_pid"], before["qemu_pid"]], 2.0)
    (after,) = json.loads(pyqvm("ps", "--json").stdout)
    assert after["name"] == "m2" and after["status"] == "running"
    r = pyqvm(
        "exec",
        "m2",
        "--",
        "sh",
        "-c",
        "cat /tmp/ram; echo 3 > /proc/sys/vm/drop_caches; cat /mnt/data/kept",
    )
    assert r.stdout == "in-ram\nkept\n"
    assert fetch(f"http://127.0.0.1:{port}/hello", where) == b"served\n"  # the port moved

    # From Python, with progress, and with shared storage this time.
    seen: list[MigrationProgress] = []
    stats = attach("m2", host=host).migrate("m3", storage="shared", progress=seen.append)
    assert stats.transferred > 0 and seen and seen[-1].status == "completed"
    assert attach("m3", host=host).run(["cat", "/mnt/data/kept"]).stdout == b"kept\n"
    with pytest.raises(NamedVMError, match="taken by a running VM"):
        attach("m3", host=host).migrate("m3")  # the destination's name must be free
    assert attach("m3", host=host).run(["true"]).returncode == 0
    assert pyqvm("stop", "m3").returncode == 0


def fetch(url: str, where: SshHost | None) -> bytes:
    """``url``'s body, fetched on the host the VMs live on (a forward listens there)."""
    if where is None:
        with urllib.request.urlopen(url, timeout=10) as page:
            return bytes(page.read())
    code = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=10).read().decode())"
    argv = ["ip", "netns", "exec", where.netns, sys.executable, "-c", code]
    out = subprocess.run(argv, capture_output=True, timeout=30, check=True).stdout
    return out[:-1]  # print's newline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_wait_returns_when_the_guest_powers_off_and_logs_follow_until_then(
    runtime: Path,
) -> None:
    assert up_clone("w").returncode == 0
    waiter = subprocess.Popen([*PYQVM, "wait", "w"], stdin=subprocess.DEVNULL)
    follower = subprocess.Popen(
        [*PYQVM, "logs", "--follow", "w"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    time.sleep(0.5)
    assert waiter.poll() is None and follower.poll() is None
    marker = "echo written-late > /dev/console"
    assert pyqvm("exec", "w", "--", "sh", "-c", marker).returncode == 0
    # The guest powers off on its own: the agent answers, then the VM ends.
    pyqvm("exec", "w", "--", "sh", "-c", "(sleep 0.3; poweroff -f) >/dev/null 2>&1 &")
    assert waiter.wait(timeout=30) == 0
    out, _ = follower.communicate(timeout=30)
    assert follower.returncode == 0 and b"written-late" in out
    assert json.loads(pyqvm("ps", "--json").stdout) == []


def test_console_on_a_terminal_is_read_write_and_ctrl_close_bracket_detaches(
    runtime: Path,
) -> None:
    assert up_clone("t").returncode == 0
    pid, fd = pty.fork()
    if pid == 0:  # the child: `pyqvm console t` on a terminal
        os.execv(sys.executable, [*PYQVM, "console", "t"])
    try:
        seen = b""

        def read_until(marker: bytes, timeout: float = 20) -> None:
            nonlocal seen
            end = time.monotonic() + timeout
            while marker not in seen:
                assert time.monotonic() < end, seen
                if select.select([fd], [], [], 0.2)[0]:
                    seen += os.read(fd, 4096)

        read_until(b"Escape character is ^]")
        os.write(fd, b"echo tty-$((6*7))\r")
        read_until(b"tty-42")
        os.write(fd, b"\x1d")  # Ctrl-]
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    # Detaching left the VM as it was.
    assert pyqvm("exec", "t", "--", "true").returncode == 0
    assert pyqvm("stop", "t").returncode == 0


def test_the_console_channel_travels_and_has_verbs(
    runtime: Path, default_template: Template, host: str | None
) -> None:
    """``vm.console`` of a named VM, here and over ``--host``, and its CLI verbs."""
    vm = up(name="con", template=default_template.name, host=host)
    try:
        vm.console.sendline("echo named$((3 + 4))")
        assert vm.console.expect(r"named(\d)", timeout=30).groups == ("7",)
        assert pyqvm("send", "con", "--line", "echo verb$((4 + 4))").returncode == 0
        out = pyqvm("expect", "con", r"verb(\d)", "--json", "--timeout", "30")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["groups"] == ["8"]
        late = pyqvm("expect", "con", "never", "--timeout", "0.5")
        assert late.returncode == 125 and "none of ['never']" in late.stderr
    finally:
        vm.stop()


def test_a_named_vm_shows_its_screen_and_takes_keys(runtime: Path, host: str | None) -> None:
    """A named VM with a display: screenshots and keys through its owner, and ``pyqvm vnc``
    opening its screen to a viewer on a unix socket (no TCP port)."""
    vm = up(VMSpec(image="default", display="vga", name="scr"), name="scr", host=host)
    try:
        assert vm.screenshot().startswith(b"\x89PNG\r\n\x1a\n")
        vm.keys.type("a!")  # the guest has no keyboard driver: the keys just have to go out
        vm.keys.press("ctrl-alt-f2")
        out = pyqvm("vnc", "scr")
        assert out.returncode == 0, out.stderr
        where = out.stdout.strip()
        assert where.startswith("unix:") and where.endswith("/vnc.sock")
        with socket.socket(socket.AF_UNIX) as viewer:
            viewer.settimeout(10)
            viewer.connect(where.removeprefix("unix:"))
            assert viewer.recv(12) == b"RFB 003.008\n"
    finally:
        vm.stop()
