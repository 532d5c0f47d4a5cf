"""Named VMs on another host (issue 24): ``pyqvm --host ssh://`` and ``attach(host=...)``
against a network namespace with its own sshd (`fixtures.sshhost`). The verbs that are a
call on a VM's owner carry the owner protocol over the ssh stream; the others run on that
host. Its VMs are its own: this host's registry never lists them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.sshhost import SshHost

from pyqvm import AsyncNamedVM, MigrationProgress, NamedVM, NamedVMError, SnapshotInfo, VMSpec

pytestmark = [pytest.mark.e2e]

PYQVM = [sys.executable, "-m", "pyqvm"]


def pyqvm(
    *args: str, host: SshHost | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    env = None
    if host is not None:
        import os

        env = {**os.environ, **host.env, "PYQVM_HOST": host.url}
    return subprocess.run(
        [*PYQVM, *args], capture_output=True, text=True, timeout=timeout, check=False,
        stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip


@pytest.fixture
def there(remote_env: SshHost) -> Iterator[SshHost]:
    yield remote_env
    assert json.loads(pyqvm("ps", "--json", host=remote_env).stdout) == [], "a VM was left"


def test_the_named_verbs_run_against_the_other_host(there: SshHost) -> None:
    r = pyqvm("up", "--name", "far", host=there)  # run by the pyqvm there
    assert r.returncode == 0 and r.stdout.strip() == "far", r.stderr
    try:
        (vm,) = json.loads(pyqvm("ps", "--json", host=there).stdout)
        assert vm["name"] == "far" and vm["status"] == "running"
        assert list(there.runtime.rglob("vms/far"))  # the registry of that host's sessions
        assert "far" not in pyqvm("ps").stdout  # this host's registry does not have it
        # exec, qmp and snapshot go to the owner over the ssh stream.
        r = pyqvm("exec", "far", "--", "sh", "-c", "echo out; echo err >&2; exit 3", host=there)
        assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
        status = json.loads(pyqvm("qmp", "far", "query-status", host=there).stdout)
        assert status["status"] == "running"
        assert pyqvm("snapshot", "far", "save", "s1", host=there).returncode == 0
        listed = json.loads(pyqvm("snapshot", "far", "list", "--json", host=there).stdout)
        assert [s["tag"] for s in listed] == ["s1"]
    finally:
        r = pyqvm("stop", "far", host=there)
    assert r.returncode == 0, r.stderr
    r = pyqvm("exec", "far", "--", "true", host=there)
    assert r.returncode == 125 and "no VM named 'far'" in r.stderr and there.url in r.stderr


def test_the_python_api_drives_a_vm_there_and_migrates_it_there(there: SshHost) -> None:
    async def go() -> None:
        vm = await AsyncNamedVM.up(VMSpec(image="default"), name="py1", host=there.url)
        try:
            assert vm.host is not None and vm.host.url == there.url
            await vm.write_file("/root/f", b"\x00from afar\xff")
            assert await vm.read_file("/root/f") == b"\x00from afar\xff"
            info = await vm.snapshot_save("s1")
            assert isinstance(info, SnapshotInfo) and info.tag == "s1"
            seen: list[MigrationProgress] = []
            stats = await vm.migrate("py2", progress=seen.append)
            assert stats.transferred > 0 and seen and seen[-1].status == "completed"
        finally:
            await vm.close()
        async with await AsyncNamedVM.attach("py2", host=there.url) as moved:
            assert (await moved.read_file("/root/f")) == b"\x00from afar\xff"
            assert await moved.stop() == 0
        with pytest.raises(NamedVMError, match="no VM named 'py1'"):
            await AsyncNamedVM.attach("py1", host=there.url)

    asyncio.run(go())
    blocking = NamedVM.up(VMSpec(image="default"), name="blk", host=there.url)
    assert blocking.run(["echo", "hi"]).stdout == b"hi\n"
    assert blocking.stop() == 0


@pytest.mark.parametrize(
    ("url", "env", "said"),
    [
        ("ssh://root@{addr}:2999", {}, "cannot be reached over SSH"),  # nothing listens
        ("ssh://nobody@{addr}", {}, "refused the login"),  # no key for it: never a prompt
        ("ssh://root@{addr}", {"PYQVM_REMOTE_COMMAND": "/nonexistent/pyqvm"}, "has no pyqvm"),
        ("ssh://root@{addr}", {}, "no VM named 'ghost'"),
        ("ftp://{addr}", {}, "is not an SSH address"),
    ],
)
def test_a_host_that_cannot_serve_is_named_with_the_fix(
    there: SshHost, url: str, env: dict[str, str], said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    url = url.format(addr=there.address)
    with pytest.raises(NamedVMError, match=said) as e:
        NamedVM.attach("ghost", host=url).run(["true"])
    assert url.split("/")[-1].split(":")[0].split("@")[-1] in str(e.value) or "SSH" in said
    # and from the command line, with its status
    r = pyqvm("--host", url, "exec", "ghost", "--", "true")
    assert r.returncode == 125 and said in r.stderr, r.stderr
    assert not _our_ssh_processes(there), "an ssh was left running"


def _our_ssh_processes(host: SshHost) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"ssh") and str(host.directory).encode() in b" ".join(argv):
            found.append(proc.name)
    return found
