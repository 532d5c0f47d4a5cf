"""SSH into guests with the host's real ssh: the built-in guest's per-VM keys (host key
checked strictly), a guest of your own (its user and key), and `pyqvm ssh` on a named VM."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cli import go_there, own_registry, pyqvm
from fixtures.sshhost import SshHost

from pyqvm import VM, KernelBoot, Network, VMSpec, image
from pyqvm.host.sshkeys import make_keys

pytestmark = [pytest.mark.e2e]


def _ssh(argv: list[str], input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=input, capture_output=True, text=True, timeout=60, check=False,
        stdin=None if input is not None else subprocess.DEVNULL,
    )  # fmt: skip


def test_ssh_into_the_built_in_guest(default_image: object) -> None:
    with VM(VMSpec(image="default", ssh=True, networks=(Network(),))) as vm:
        argv = vm.ssh_argv(["sh", "-c", 'echo "$1 from $(hostname)"; exit 3', "sh", "a b"])
        assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv
        r = _ssh(argv)
        # The words arrive as given (quoted for the remote shell), and so does the status.
        assert (r.returncode, r.stdout, r.stderr) == (3, "a b from pyqvm\n", "")
        r = _ssh(vm.ssh_argv(["cat"]), input="through stdin\n")
        assert (r.returncode, r.stdout) == (0, "through stdin\n")
        # The known-hosts entry is the VM's own: another host key is refused.
        assert vm.runtime_dir is not None
        known = vm.runtime_dir / "ssh" / "known_hosts"
        assert f"UserKnownHostsFile={known}" in argv
        other = make_keys(Path(tempfile.mkdtemp(dir=vm.runtime_dir)))
        port = int(argv[argv.index("-p") + 1])
        known.write_text(f"[127.0.0.1]:{port} {other.host_pub_line()}\n")
        r = _ssh([*argv[: argv.index("--")], "--", "true"])
        assert r.returncode == 255 and "verification failed" in r.stderr, r.stderr


def test_ssh_into_a_guest_of_your_own(default_image: image.GuestImage, tmp_path: Path) -> None:
    # A guest pyqvm did not build: the built-in kernel and initrd booted as plain files
    # (so pyqvm makes no keys), its SSH server given a key of "the user's" by hand.
    keys = make_keys(tmp_path / "mine")
    img = default_image
    spec = VMSpec(
        kernel=KernelBoot(
            kernel=img.kernel, initrd=img.initrd, append=f"{image.KERNEL_CMDLINE} pyqvm.ssh=1"
        ),
        networks=(Network(),),
        ssh=True,
        ssh_key=keys.client_key,
        ssh_user="root",
        extra_args=(
            "-fw_cfg", f"name=opt/pyqvm/ssh/host_key,file={keys.host_key_dropbear}",
            "-fw_cfg", f"name=opt/pyqvm/ssh/authorized_keys,file={keys.client_pub}",
        ),
    )  # fmt: skip
    with VM(spec) as vm:
        assert not (vm.runtime_dir / "ssh" / "client_ed25519").exists()  # type: ignore[operator]
        argv = vm.ssh_argv(["echo", "mine"])
        assert str(keys.client_key) in argv and "StrictHostKeyChecking=accept-new" in argv
        r = _ssh(argv)
        assert (r.returncode, r.stdout) == (0, "mine\n"), r.stderr
        # The first connection recorded the host key; it is the one the guest was given.
        known = vm.runtime_dir / "ssh" / "known_hosts"  # type: ignore[operator]
        assert keys.host_pub_line().split()[1] in known.read_text()


@pytest.fixture(params=["here", "ssh"])
def where(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SshHost | None:
    return go_there(request, monkeypatch)  # "ssh": the named-VM verbs against another host


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch, where: SshHost | None) -> Iterator[Path]:
    with own_registry(monkeypatch, "pq-ssh-") as d:
        yield d


def test_pyqvm_ssh_on_a_named_vm(
    runtime: Path, default_image: object, where: SshHost | None
) -> None:
    r = pyqvm("up", "--ssh", "--name", "s1")
    assert r.returncode == 0, r.stderr
    r = pyqvm("ssh", "s1", "--", "sh", "-c", "echo hi; exit 7")
    assert (r.returncode, r.stdout) == (7, "hi\n"), r.stderr
    printed = pyqvm("ssh", "--print", "s1", "--", "uname", "-m")
    assert printed.returncode == 0 and printed.stdout.startswith(shutil.which("ssh") or "ssh")
    # The printed command is for the VM's host: its port forward listens there.
    inside = [] if where is None else ["ip", "netns", "exec", where.netns]
    r = subprocess.run(
        [*inside, "sh", "-c", printed.stdout], capture_output=True, text=True, timeout=60
    )
    assert (r.returncode, r.stdout) == (0, "x86_64\n"), r.stderr
    assert pyqvm("up", "--name", "plain").returncode == 0
    r = pyqvm("ssh", "plain", "--", "true")
    assert r.returncode != 0 and "--ssh" in r.stderr, r.stderr
