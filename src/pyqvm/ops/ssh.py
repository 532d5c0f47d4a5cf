"""SSH into a guest: the exact ``ssh`` command for a VM, with no prompts.

``spec.ssh`` forwards a host port pyqvm lets the kernel pick (``hostfwd`` port 0, so two
VMs never race for one) to the guest's port 22; `forwarded_port` reads the port back from
QEMU (``info usernet``: QMP has no command that reports it). The built-in guest's host key
was made on the host before it booted (`pyqvm.host.sshkeys`), so its known-hosts entry is
written before the first connection and checked strictly. A guest of your own
(``ssh_key``, ``ssh_user``) has a host key pyqvm cannot know: its first connection
records it (``accept-new``) in the VM's own known-hosts file, and later ones check it.
"""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Sequence
from pathlib import Path

from pyqvm.errors import HostError, PyqvmError, SpecError
from pyqvm.host.sshkeys import known_hosts_line, ssh_keys_in
from pyqvm.launch.plan import SSH_DIR
from pyqvm.machine import Machine
from pyqvm.spec import VMSpec

KNOWN_HOSTS = "known_hosts"
_FORWARD = re.compile(
    r"^\s*TCP\[HOST_FORWARD\]\s+\d+\s+(?P<src>\S+)\s+(?P<sport>\d+)\s+\S+\s+(?P<dport>\d+)\b",
    re.MULTILINE,
)


def forwarded_port(usernet: str, guest_port: int = 22) -> int:
    """The host port forwarded to ``guest_port`` in ``info usernet``'s table."""
    for m in _FORWARD.finditer(usernet):
        if int(m["dport"]) == guest_port and m["src"] in ("127.0.0.1", "*", "0.0.0.0"):
            return int(m["sport"])
    raise PyqvmError(f"no host port is forwarded to guest port {guest_port}: {usernet.strip()!r}")


async def ssh_port(vm: Machine) -> int:
    """The host port of this VM's SSH forward (the spec needs ``ssh = true``)."""
    if not vm.spec.ssh:
        raise SpecError("ssh", f"VM {vm.name!r} has no SSH forward; start it with ssh = true")
    text = await vm.execute("human-monitor-command", {"command-line": "info usernet"})
    return forwarded_port(str(text))


def ssh_command(
    spec: VMSpec,
    rundir: Path,
    port: int,
    command: Sequence[str] = (),
) -> list[str]:
    """The ``ssh`` argv into a VM of ``spec`` whose runtime dir is ``rundir``: its forward
    ``port``, its key and known-hosts file; ``command`` (each word quoted for the remote
    shell) or a login shell when empty."""
    ssh = shutil.which("ssh")
    if ssh is None:
        raise HostError("ssh is not installed; install Debian's openssh-client package")
    known = rundir / SSH_DIR / KNOWN_HOSTS
    if spec.pyqvm_guest:  # the built-in guest: pyqvm made both keys
        keys = ssh_keys_in(rundir / SSH_DIR)
        key, strict = keys.client_key, "yes"
        line = known_hosts_line("127.0.0.1", port, keys.host_pub_line())
        if not known.exists() or known.read_text() != line + "\n":
            known.write_text(line + "\n")
    else:
        if spec.ssh_key is None:
            raise SpecError("ssh_key", "name the private key the guest's SSH server accepts")
        known.parent.mkdir(mode=0o700, exist_ok=True)
        key, strict = spec.ssh_key, "accept-new"
    argv = [
        ssh,
        "-F",
        "none",  # the user's ssh_config (a ProxyJump for *, say) is not for this VM
        "-i",
        str(key),
        "-p",
        str(port),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",  # never a password or passphrase prompt
        "-o",
        f"StrictHostKeyChecking={strict}",
        "-o",
        f"UserKnownHostsFile={known}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        f"{spec.ssh_user}@127.0.0.1",
    ]
    if command:
        argv += ["--", shlex.join(command)]  # ssh hands the remote shell one string
    return argv


async def ssh_argv(vm: Machine, command: Sequence[str] = ()) -> list[str]:
    """`ssh_command` for a running VM of this process."""
    return ssh_command(vm.spec, vm.launched_dir(), await ssh_port(vm), command)


__all__ = ["KNOWN_HOSTS", "forwarded_port", "ssh_argv", "ssh_command", "ssh_port"]
