"""UEFI firmware chosen through QEMU's firmware descriptors, not by file paths.

QEMU documents a JSON descriptor per firmware build (``docs/interop/firmware.json``
in QEMU's tree); distributions install them where every management tool looks:
``/usr/share/qemu/firmware`` (the distribution's), ``/etc/qemu/firmware`` (the
host administrator's) and ``$XDG_CONFIG_HOME/qemu/firmware`` (the user's). A file
in a later directory of that list hides one of the same name in an earlier one
(an empty file just hides it), and the descriptors are then tried in the order
of their file names. The first that fits wins: UEFI, mapped as flash, built for
the guest's architecture and machine type, and with the features asked for
(Secure Boot and enrolled keys) and none of those that need what pyqvm does not
set up (SMM).

Debian, Ubuntu, Fedora, openSUSE and Arch all ship these descriptors with their
edk2 packages, so the same spec boots firmware on each, wherever its files are.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

log = logging.getLogger(__name__)

__all__ = ["DESCRIPTOR_DIRS", "MACHINE_PREFIXES", "Firmware", "choose_firmware", "read_firmware"]

#: Descriptor directories under the root, lowest precedence first (the user's come last).
DESCRIPTOR_DIRS = ("usr/share/qemu/firmware", "etc/qemu/firmware")
#: pyqvm's machine types -> the prefix of QEMU's versioned names that descriptors match.
MACHINE_PREFIXES: Mapping[str, str] = MappingProxyType(
    {"q35": "pc-q35-", "pc": "pc-i440fx-", "virt": "virt-"}
)
#: Features a descriptor may carry only when asked for: without them it is the plain build.
_ON_REQUEST = frozenset({"secure-boot", "enrolled-keys"})
#: Features that need machine setup pyqvm does not do: never chosen.
_UNSUPPORTED = frozenset({"amd-sev-es", "amd-sev-snp", "intel-tdx"})


@dataclass(frozen=True, slots=True)
class Firmware:
    """One UEFI firmware build, as its descriptor describes it."""

    descriptor: Path
    description: str
    code: Path
    vars_template: Path | None
    targets: tuple[tuple[str, tuple[str, ...]], ...]  # (architecture, machine globs)
    features: frozenset[str]

    def fits(self, arch: str, machine: str) -> bool:
        prefix = MACHINE_PREFIXES.get(machine, f"{machine}-")
        return any(
            a == arch and any(fnmatch.fnmatchcase(f"{prefix}99.0", glob) or glob == machine
                              for glob in globs)
            for a, globs in self.targets
        )  # fmt: skip


def _descriptor_files(root: Path, user_dir: Path | None) -> list[Path]:
    dirs = [root / d for d in DESCRIPTOR_DIRS]
    if user_dir is not None:
        dirs.append(user_dir)
    chosen: dict[str, Path] = {}
    for d in dirs:
        try:
            names = sorted(p for p in d.iterdir() if p.name.endswith(".json"))
        except OSError:
            continue
        for p in names:
            chosen[p.name] = p  # a later directory's file of that name hides the earlier one
    return [chosen[name] for name in sorted(chosen)]


def _parse(path: Path, root: Path) -> Firmware | None:
    try:
        text = path.read_text()
        if not text.strip():
            return None  # an empty file masks a descriptor of that name
        d = json.loads(text)
        mapping = d["mapping"]
        if "uefi" not in d.get("interface-types", ()) or mapping.get("device") != "flash":
            return None
        if mapping.get("mode", "split") != "split":
            return None  # combined or stateless images are not what pflash0 takes
        code = Path(mapping["executable"]["filename"])
        template = mapping.get("nvram-template", {}).get("filename")
        targets = tuple(
            (str(t["architecture"]), tuple(str(m) for m in t.get("machines", ())))
            for t in d.get("targets", ())
        )
        return Firmware(
            descriptor=path,
            description=str(d.get("description", path.name)),
            code=root / str(code).lstrip("/"),
            vars_template=root / template.lstrip("/") if template else None,
            targets=targets,
            features=frozenset(str(f) for f in d.get("features", ())),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring the firmware descriptor %s: %s", path, e)
        return None


def read_firmware(root: Path = Path("/"), *, user_dir: Path | None = None) -> tuple[Firmware, ...]:
    """Every usable UEFI descriptor under ``root``, in the order QEMU's spec gives.

    ``user_dir`` defaults to ``$XDG_CONFIG_HOME/qemu/firmware`` for the real root.
    """
    if user_dir is None and root == Path("/"):
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        user_dir = Path(base) / "qemu" / "firmware"
    found = (_parse(p, root) for p in _descriptor_files(root, user_dir))
    return tuple(f for f in found if f is not None)


def choose_firmware(
    available: Iterable[Firmware],
    arch: str,
    machine: str,
    *,
    secure_boot: bool = False,
    enrolled_keys: bool = False,
) -> Firmware | None:
    """The first descriptor that fits ``arch`` and ``machine`` and whose code file exists,
    with Secure Boot exactly when ``secure_boot``, and with the distribution's keys
    (Microsoft's, which signed shim) enrolled exactly when ``enrolled_keys``. A build that
    needs SMM is chosen only for Secure Boot (pyqvm turns SMM on for it: SMM is what keeps
    the guest from writing its own keys)."""
    wanted = {"secure-boot"} if secure_boot else set()
    if enrolled_keys:
        wanted.add("enrolled-keys")
    unsupported = _UNSUPPORTED if secure_boot else _UNSUPPORTED | {"requires-smm"}
    for fw in available:
        if not fw.fits(arch, machine) or fw.features & unsupported:
            continue
        if (fw.features & _ON_REQUEST) != wanted or not fw.code.is_file():
            continue
        return fw
    return None
