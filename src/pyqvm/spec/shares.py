"""Host folders shared into the guest: the `Share` spec and its checks.

A share is a host directory the guest mounts by tag, over virtiofs (``virtiofsd``,
fast, POSIX-faithful) or 9p (QEMU's own server, slower, in every kernel that has
it). Which one ``transport = "auto"`` gets is decided on the host
(`pyqvm.launch.virtiofs`); here is only what the spec itself says.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Literal, get_args

from pyqvm.errors import SpecError
from pyqvm.spec.fields import absolute_path, boolean, choice, show, text

ShareTransport = Literal["auto", "virtiofs", "9p"]

#: Mount tags: virtiofs takes 36 bytes and 9p 31 (``mount_tag``); both are safe here, and
#: the built-in guest reads them from the kernel command line (no ',', no space).
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,30}\Z")
#: Guest paths travel on the kernel command line too; these characters need no quoting.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_.+@-]+\Z")
#: What the built-in guest's init mounts itself.
_RESERVED = ("/proc", "/sys", "/dev", "/run")


@dataclass(frozen=True, slots=True)
class Share:
    """A host directory the guest sees at ``guest`` (default ``/mnt/<tag>``).

    ``readonly`` is enforced on the host (a read-only mount for virtiofsd, QEMU's
    ``readonly`` for 9p), not only by the guest's mount options.
    """

    host: Path
    tag: str = ""
    guest: str = ""
    readonly: bool = False
    transport: ShareTransport = "auto"

    def __post_init__(self) -> None:
        host = absolute_path(self.host, "share.host", must_exist=False)
        if not host.is_dir():
            what = "is a file, not a directory" if host.exists() else "no such directory"
            raise SpecError("share.host", f"{what}: '{host}'; share a directory that exists")
        object.__setattr__(self, "host", host)
        if self.tag != "" and (not isinstance(self.tag, str) or not TAG_RE.match(self.tag)):
            raise SpecError(
                "share.tag",
                f"{show(self.tag)} is not a mount tag: use 1-31 letters, digits, '-', '.', '_'",
            )
        if self.guest != "":
            check_guest_path(self.guest, "share.guest")
        boolean(self.readonly, "share.readonly")
        choice(self.transport, get_args(ShareTransport), "share.transport")


def check_guest_path(value: object, field_name: str) -> None:
    """An absolute, plain path the built-in guest can mount on (not ``/``, not its own mounts)."""
    path = text(value, field_name, "a path")
    parts = path.split("/")[1:]
    if not path.startswith("/") or not parts or any(p in ("", ".", "..") for p in parts):
        raise SpecError(field_name, f"{path!r} is not an absolute path like /mnt/src")
    if not all(_SEGMENT_RE.match(p) for p in parts):
        raise SpecError(
            field_name,
            f"{path!r}: use letters, digits and '_.+@-' between the slashes (the built-in "
            "guest reads it from the kernel command line)",
        )
    p = PurePosixPath(path)
    for reserved in _RESERVED:
        if p == PurePosixPath(reserved) or p.is_relative_to(reserved):
            raise SpecError(field_name, f"{path!r} is under {reserved}, which the guest mounts")


def with_defaults(shares: Sequence[Share]) -> tuple[Share, ...]:
    """Tags (``share<N>``) and guest paths (``/mnt/<tag>``) filled in; two shares on one
    tag or one guest path refused, naming the field."""
    out: list[Share] = []
    tags: dict[str, int] = {}
    paths: dict[str, int] = {}
    for i, s in enumerate(shares):
        if not isinstance(s, Share):
            raise SpecError(f"shares[{i}]", f"expected a Share, got {show(s)}")
        s = s if s.tag else replace(s, tag=f"share{i}")
        s = s if s.guest else replace(s, guest=f"/mnt/{s.tag}")
        if s.tag in tags:
            raise SpecError(
                f"shares[{i}].tag", f"{s.tag!r} is the tag of shares[{tags[s.tag]}]; pick another"
            )
        if s.guest in paths:
            raise SpecError(
                f"shares[{i}].guest",
                f"shares[{paths[s.guest]}] is mounted on {s.guest!r} already; pick another path",
            )
        tags[s.tag], paths[s.guest] = i, i
        out.append(s)
    return tuple(out)


def cmdline_entries(shares: Sequence[Share]) -> list[str]:
    """What the built-in guest's init mounts at boot: ``pyqvm.share=TAG,TYPE,ro|rw,PATH``
    per share (transports decided). A dotted parameter is one the kernel leaves alone."""
    out = []
    for s in shares:
        if s.transport == "auto":
            raise ValueError(f"share {s.tag!r}: decide the transport first")
        out.append(f"pyqvm.share={s.tag},{s.transport},{'ro' if s.readonly else 'rw'},{s.guest}")
    return out


__all__ = [
    "TAG_RE",
    "Share",
    "ShareTransport",
    "check_guest_path",
    "cmdline_entries",
    "with_defaults",
]
