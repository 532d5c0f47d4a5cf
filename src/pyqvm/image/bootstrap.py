"""A Debian system bootstrapped in two stages, as ``debootstrap --foreign`` does, with no
Debian tool and no root on the host.

First stage, here (`first_stage`): the package set is resolved from the archive
(every ``Essential: yes`` package, ``apt``, and what the flavour asks for, with
their dependencies, as mmdebstrap's ``apt`` variant has it); the ``.deb`` files
are downloaded and checked (`pyqvm.image.archive`); the essential packages are
unpacked into a tree with a merged ``/usr``, enough for ``dpkg`` and a shell to
run, with the second stage's script; every ``.deb`` goes into a directory of its
own. The caller makes each an ext4 disk image (the packages on a disk apart, so
the system's disk never holds, nor keeps the blocks of, files it deletes).

Second stage, in a guest of the target's architecture (`SecondStage`, which the
caller provides: booting a VM is a floor above this one): the script
(`SECOND_STAGE`) runs in a chroot of the disk and lets the target's own dpkg
install everything, essential packages first: ownership, modes, maintainer
scripts, triggers and dpkg's database are dpkg's own work, so the first stage
needs no root and no fakeroot.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyqvm.image.archive import Archive, Package, unpack
from pyqvm.spec.arches import ArchInfo

log = logging.getLogger(__name__)

#: A merged /usr (Debian 12's default): top-level directories that are links into /usr.
MERGED_USR = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib"}
#: ...and per arch, the ones its ABI adds.
MERGED_USR_ARCH = {"amd64": {"lib64": "usr/lib64"}, "arm64": {}}
SCRIPT = "pyqvm-second-stage"
#: Packages dpkg must find configured before the rest is installed (debootstrap's order).
FIRST = ("base-passwd", "base-files", "dpkg", "libc6")

#: What the helper guest runs (its own busybox, as root): the disk of the tree mounted,
#: made root's (the first stage's files belong to whoever unpacked them; dpkg sets every
#: package file's owner and mode again), the kernel's file systems mounted in it, and the
#: second stage's script run in a chroot of it; its output is kept in the tree.
HELPER_COMMAND = r"""set -e
mount "$(findfs LABEL=@LABEL@)" /mnt
chown -R 0:0 /mnt
mkdir /mnt/pyqvm-debs
mount -o ro "$(findfs LABEL=@DEBS_LABEL@)" /mnt/pyqvm-debs
mount -t proc proc /mnt/proc
mount -t sysfs sysfs /mnt/sys
mount -t devtmpfs devtmpfs /mnt/dev
rc=0
chroot /mnt /bin/sh /pyqvm-second-stage > /mnt/var/log/pyqvm-second-stage.log 2>&1 || rc=$?
log=/mnt/var/log/pyqvm-second-stage.log
[ "$rc" = 0 ] || grep -A3 -e '^dpkg: error' -e '^E: ' "$log" | head -n 40 || true
tail -c 3000 "$log"
umount /mnt/dev /mnt/sys /mnt/proc /mnt/pyqvm-debs
rmdir /mnt/pyqvm-debs
fstrim /mnt || true
sync
umount /mnt
exit $rc
"""

#: The second stage's script, run in the chroot.
SECOND_STAGE = r"""#!/bin/sh
# pyqvm's second stage: dpkg installs everything the first stage put in its apt cache.
set -eu
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C DEBIAN_FRONTEND=noninteractive \
    DEBCONF_NONINTERACTIVE_SEEN=true
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d   # no service starts in here
chmod 755 /usr/sbin/policy-rc.d
cd /pyqvm-debs
dpkg="dpkg --force-depends --force-unsafe-io"
echo "pyqvm: $(date +%s) installing the essential packages"
for p in @FIRST@; do $dpkg --install ${p}_*.deb; done
$dpkg --install @ESSENTIAL@
echo "pyqvm: $(date +%s) unpacking the rest"
$dpkg --unpack @REST@
echo "pyqvm: $(date +%s) configuring"
# INITRD=No: the kernel's postinst does not make its initramfs, which initramfs-tools'
# trigger would make again at the end (the postinsts of udev, dmsetup... configured after
# the kernel activate it): 27-33 s each under TCG. It is made once, here.
INITRD=No dpkg --force-unsafe-io --configure -a
echo "pyqvm: $(date +%s) making the initramfs"
for k in /boot/vmlinuz-*; do
    v=${k#/boot/vmlinuz-}
    [ -e "$k" ] && [ ! -e "/boot/initrd.img-$v" ] || continue
    update-initramfs -c -k "$v"
    linux-update-symlinks install "$v" "$k"  # /initrd.img, which INITRD=No left out
done
@CUSTOMIZE@
rm -f /usr/sbin/policy-rc.d /pyqvm-second-stage
echo "pyqvm: $(date +%s) second stage done"
"""


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """What the first stage made: the tree, the directory of ``.deb`` files dpkg installs
    from, and the packages (every one, and those unpacked already)."""

    tree: Path
    debs: Path
    packages: tuple[Package, ...]
    essential: tuple[Package, ...]


#: Runs the second stage: (the disk images to attach: the system's, then the packages',
#: the guest's arch, a shell command for the guest) -> None; raises on failure. Provided
#: by the caller.
SecondStage = Callable[[Sequence[Path], ArchInfo, str], None]


def package_set(archive: Archive, arch: ArchInfo, include: Iterable[str]) -> list[Package]:
    """Every essential package, apt, ``include``, and their dependencies."""
    index = archive.index(arch.debian)
    names = [*index.essential(), "apt", *include]
    return archive.closure(dict.fromkeys(names), arch.debian)


def first_stage(
    archive: Archive,
    arch: ArchInfo,
    include: Iterable[str],
    tree: Path,
    debs_dir: Path,
    *,
    customize: Iterable[str] = (),
) -> Bootstrap:
    """Resolve, fetch and lay out the first stage in ``tree`` and ``debs_dir`` (made here).

    ``customize`` are shell commands the second stage runs once everything is
    configured (in the chroot, as root).
    """
    packages = package_set(archive, arch, include)
    essential_names = set(archive.index(arch.debian).essential())
    # What dpkg and its maintainer scripts need to run: the essential set's own closure.
    core = {p.name for p in archive.closure(sorted(essential_names), arch.debian)}
    log.info("fetching %d packages (%.1f MiB)", len(packages),
             sum(p.size for p in packages) / (1 << 20))  # fmt: skip
    debs = archive.download(packages)
    tree.mkdir(parents=True)
    for link, target in {**MERGED_USR, **MERGED_USR_ARCH.get(arch.debian, {})}.items():
        (tree / target).mkdir(parents=True, exist_ok=True)
        (tree / link).symlink_to(target)
    essential = [p for p in packages if p.name in core]
    log.info("unpacking the %d packages dpkg needs to run", len(essential))
    for pkg in essential:
        unpack(debs[pkg], tree)
    for d in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers", "var/log"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    for f in ("var/lib/dpkg/status", "var/lib/dpkg/available"):
        (tree / f).touch()
    (tree / "var/lib/dpkg/arch").write_text(f"{arch.debian}\n")
    debs_dir.mkdir(parents=True)
    for pkg in packages:
        shutil.copyfile(debs[pkg], debs_dir / pkg.deb_name)
    rest = [p for p in packages if p.name not in core]
    script = (
        SECOND_STAGE.replace("@FIRST@", " ".join(FIRST))
        .replace("@ESSENTIAL@", " ".join(p.deb_name for p in essential))
        .replace("@REST@", " ".join(p.deb_name for p in rest))
        .replace("@CUSTOMIZE@", "\n".join(customize))
    )
    (tree / SCRIPT).write_text(script)
    (tree / SCRIPT).chmod(0o755)
    return Bootstrap(tree, debs_dir, tuple(packages), tuple(essential))


__all__ = ["FIRST", "SCRIPT", "SECOND_STAGE", "Bootstrap", "SecondStage", "first_stage",
           "package_set"]  # fmt: skip
