"""Shares on this host: which transport each gets, and the virtiofsd daemons behind them.

virtiofs needs a ``virtiofsd`` per share, which pyqvm starts before QEMU and owns
like QEMU (parent-death signal, its log in the runtime dir, stopped with the VM).
QEMU 7.2 ships the C virtiofsd (Debian: ``/usr/lib/qemu/virtiofsd`` in
qemu-system-common), which sandboxes itself in namespaces and so runs as root
only. Where it cannot run, ``transport = "auto"`` falls back to 9p, QEMU's own
server, and says why in the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyqvm.deadline import Deadline
from pyqvm.errors import HostError, LaunchError, SpecError
from pyqvm.host.packages import install_hint
from pyqvm.runtime.children import ChildProcess
from pyqvm.spec import VMSpec
from pyqvm.spec.shares import Share

log = logging.getLogger(__name__)

#: Where virtiofsd lives when it is not on PATH (Fedora/Arch, Debian, older packages).
VIRTIOFSD_PATHS = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd", "/usr/lib/virtiofsd")
VIRTIOFSD_ENV = "PYQVM_VIRTIOFSD"


@dataclass(frozen=True, slots=True)
class VirtiofsdStatus:
    """Whether virtiofsd can serve shares here; ``reason`` says why (not) in words."""

    path: Path | None
    usable: bool
    reason: str


def virtiofsd_status() -> VirtiofsdStatus:
    """Find virtiofsd ($PYQVM_VIRTIOFSD, PATH, then `VIRTIOFSD_PATHS`) and say if it can run."""
    found: str | None = os.environ.get(VIRTIOFSD_ENV) or shutil.which("virtiofsd")
    if found is None:
        found = next((p for p in VIRTIOFSD_PATHS if os.access(p, os.X_OK)), None)
    if found is None or not os.access(found, os.X_OK):
        where = f"'{found}' (${VIRTIOFSD_ENV}) is not executable" if found else "none found"
        return VirtiofsdStatus(
            None,
            False,
            f"no virtiofsd: {where}; install it ({install_hint('qemu-system-common')}) or "
            f"point ${VIRTIOFSD_ENV} at one",
        )
    if os.geteuid() != 0:
        return VirtiofsdStatus(
            Path(found),
            False,
            f"{found} runs as root only (it sandboxes itself in new namespaces)",
        )
    return VirtiofsdStatus(Path(found), True, f"{found}, running as root")


def choose_transports(spec: VMSpec, status: VirtiofsdStatus | None = None) -> VMSpec:
    """``spec`` with each share's transport decided: ``auto`` is virtiofs where virtiofsd
    can run, else 9p. `HostError` naming the share if the one it needs cannot be had."""
    if not spec.shares:
        return spec
    status = status or virtiofsd_status()
    shares = []
    for i, s in enumerate(spec.shares):
        transport = s.transport
        if transport == "auto":
            transport = "virtiofs" if status.usable else "9p"
            if not status.usable:
                if spec.image == "default":
                    raise HostError(
                        f"shares[{i}]: virtiofs cannot be used ({status.reason}), and the "
                        'default image\'s kernel has no 9p: use image = "full" or make '
                        "virtiofsd usable"
                    )
                log.info("share %s: 9p, as virtiofs cannot be used: %s", s.tag, status.reason)
        elif transport == "virtiofs" and not status.usable:
            raise HostError(
                f'shares[{i}].transport: "virtiofs" cannot be used: {status.reason}; '
                'or use transport = "auto" to fall back to 9p'
            )
        shares.append(dataclasses.replace(s, transport=transport))
    return dataclasses.replace(spec, shares=tuple(shares))


def share_blocker(spec: VMSpec) -> str | None:
    """Why ``spec``'s shares keep it from being migrated, saved or snapshotted, or None."""
    if not spec.shares:
        return None
    return (
        f"VM {spec.name!r} has shared folders ({', '.join(s.tag for s in spec.shares)}): the "
        "guest's open files live in the share's server, which QEMU cannot move (it refuses "
        "vhost-user-fs and a mounted 9p export); stop the VM instead"
    )


def socket_path(rundir: Path, share: Share) -> Path:
    return rundir / f"fs-{share.tag}.sock"


def _fuse_value(value: str) -> str:
    # virtiofsd splits -o on commas; libfuse's option parser takes '\' as the escape.
    return value.replace("\\", "\\\\").replace(",", "\\,")


def virtiofsd_argv(binary: Path, share: Share, socket: Path) -> list[str]:
    """virtiofsd for one share: foreground, cache ``auto`` (host-side edits show within a
    second), its vhost-user socket in the runtime dir."""
    return [
        str(binary),
        f"--socket-path={socket}",
        "-o",
        f"source={_fuse_value(str(share.host))}",
        "-o",
        "cache=auto",
        "-o",
        "log_level=warn",
    ]


class Virtiofsds:
    """The virtiofsd daemons of one launch: started before QEMU, stopped after it."""

    def __init__(self) -> None:
        self._running: list[tuple[Share, ChildProcess]] = []

    async def spawn(self, spec: VMSpec, rundir: Path, timeout: float = 10.0) -> None:
        """One daemon per virtiofs share, each listening on its socket when this returns.
        `LaunchError` with its stderr if one fails (the others are stopped)."""
        shares = [s for s in spec.shares if s.transport == "virtiofs"]
        if not shares:
            return
        status = virtiofsd_status()
        if status.path is None or not status.usable:
            raise HostError(f"virtiofs shares cannot be served: {status.reason}")
        deadline = Deadline(timeout)
        try:
            for s in shares:
                await self._start_one(status.path, s, rundir, deadline)
        except BaseException:
            await self.end()
            raise

    async def _start_one(
        self, binary: Path, share: Share, rundir: Path, deadline: Deadline
    ) -> None:
        sock = socket_path(rundir, share)
        if len(os.fsencode(sock)) >= 108:
            raise SpecError(
                f"share {share.tag!r}", f"the socket path '{sock}' is too long for a unix socket"
            )
        proc = ChildProcess()
        stderr = rundir / f"virtiofsd-{share.tag}.log"
        await proc.start(
            virtiofsd_argv(binary, share, sock),
            stderr_path=stderr,
            readonly=(share.host,) if share.readonly else (),
        )
        self._running.append((share, proc))
        # virtiofsd has no readiness message to wait on but its socket, made at start-up.
        while not sock.exists():
            if proc.returncode is not None or deadline.expired:
                why = "exited" if proc.returncode is not None else "did not listen in time"
                raise LaunchError(
                    f"virtiofsd for share {share.tag!r} ('{share.host}') {why}: "
                    f"{proc.stderr_text().strip()[-800:]}",
                    argv=list(proc.argv),
                )
            await asyncio.sleep(0.002)
        log.debug("share %s: virtiofsd pid %d on %s", share.tag, proc.pid, sock)

    @property
    def pids(self) -> Sequence[int]:
        return [p.pid for _, p in self._running]

    async def end(self, timeout: float = 5.0) -> None:
        """Stop every daemon (they end by themselves once QEMU is gone) and reap them."""
        running, self._running = self._running, []
        for _share, proc in running:
            if proc.returncode is None:
                await proc.terminate(timeout)


__all__ = [
    "VIRTIOFSD_ENV",
    "VIRTIOFSD_PATHS",
    "VirtiofsdStatus",
    "Virtiofsds",
    "choose_transports",
    "share_blocker",
    "socket_path",
    "virtiofsd_argv",
    "virtiofsd_status",
]
