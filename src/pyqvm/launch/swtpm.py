"""A virtual TPM 2.0 per VM: ``swtpm``, started before QEMU and owned like virtiofsd.

swtpm serves the TPM on a unix socket that QEMU's ``emulator`` TPM backend connects to as a
client, so pyqvm starts it first and waits for its socket. Its state lives in the runtime
dir and goes with the VM: a fresh TPM each launch, as a new machine has (swtpm makes its
state on first use; no ``swtpm_setup`` needed). ``--terminate`` ends it when QEMU hangs
up; pyqvm still ends it itself after QEMU (QEMU may never have connected), and its
parent-death signal ends it with pyqvm.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

from pyqvm.deadline import Deadline
from pyqvm.errors import HostError, LaunchError
from pyqvm.host.packages import install_hint
from pyqvm.runtime.children import ChildProcess
from pyqvm.spec import VMSpec

log = logging.getLogger(__name__)

SWTPM_ENV = "PYQVM_SWTPM"
#: Its control socket and state directory in the runtime dir.
SOCKET = "swtpm.sock"
STATE = "tpm"


def swtpm_binary() -> Path:
    """swtpm ($PYQVM_SWTPM or PATH); `HostError` naming the package when there is none."""
    found = os.environ.get(SWTPM_ENV) or shutil.which("swtpm")
    if found is None or not os.access(found, os.X_OK):
        raise HostError(
            f"tpm = true needs swtpm, the software TPM: install it ({install_hint('swtpm')})"
            + (f"; ${SWTPM_ENV} names '{found}', which is not executable" if found else "")
        )
    return Path(found)


def swtpm_argv(binary: Path, rundir: Path) -> list[str]:
    return [
        str(binary),
        "socket",
        "--tpm2",
        "--tpmstate", f"dir={rundir / STATE}",
        "--ctrl", f"type=unixio,path={rundir / SOCKET}",
        "--terminate",
        "--log", "level=1",
    ]  # fmt: skip


class Swtpm:
    """The swtpm of one launch (if its spec asks for a TPM)."""

    def __init__(self) -> None:
        self._proc: ChildProcess | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def spawn(self, spec: VMSpec, rundir: Path, timeout: float = 10.0) -> None:
        """Start swtpm for ``spec`` (``tpm = true``), listening when this returns;
        `LaunchError` with its log if it does not."""
        if not spec.tpm:
            return
        binary = swtpm_binary()
        if len(os.fsencode(rundir / SOCKET)) >= 108:
            raise HostError(
                f"the runtime dir '{rundir}' is too long for swtpm's unix socket; set "
                "PYQVM_RUNTIME_DIR to a shorter directory"
            )
        (rundir / STATE).mkdir(mode=0o700)
        proc = ChildProcess()
        await proc.start(swtpm_argv(binary, rundir), stderr_path=rundir / "swtpm.log")
        self._proc = proc
        deadline = Deadline(timeout)
        # Its socket, made at start-up, is the one sign that it listens.
        while not (rundir / SOCKET).exists():
            if proc.returncode is not None or deadline.expired:
                why = "exited" if proc.returncode is not None else "did not listen in time"
                await self.end()
                raise LaunchError(
                    f"swtpm {why}: {proc.stderr_text().strip()[-800:]}", argv=list(proc.argv)
                )
            await asyncio.sleep(0.002)
        log.debug("swtpm pid %d on %s", proc.pid, rundir / SOCKET)

    async def end(self, timeout: float = 5.0) -> None:
        """Stop it (it ends by itself once QEMU hangs up) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            await proc.terminate(timeout)


__all__ = ["SOCKET", "SWTPM_ENV", "Swtpm", "swtpm_argv", "swtpm_binary"]
