"""Building the built-in guest from Debian packages, without installing any of them.

Steps (each logged at INFO): resolve package versions from Debian's archive
(`pyqvm.image.archive`: signed, verified, no apt or dpkg on the host), download
the .debs, unpack them, pick kernel modules (depmod), write the initramfs,
extract the PVH vmlinux, make the data disk. The recipe (init script, module
list, ...) lives in ``recipes/`` next to this file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import lzma
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard

from pyqvm.errors import HostError, ImageError, SpecError
from pyqvm.files import built_aside, locked
from pyqvm.host.kernel import extract_vmlinux
from pyqvm.image import distro, esp, libraries, tools
from pyqvm.image.archive import Archive, DownloadProgress, Package, unpack
from pyqvm.image.bootstrap import SecondStage
from pyqvm.image.cpio import CpioEntry, NewcWriter
from pyqvm.image.guest import (
    DISTRO_FLAVOURS,
    KERNEL_CMDLINES,
    KERNEL_PACKAGES,
    MANIFEST,
    MANIFEST_FORMAT,
    READY_MARKER,
    GuestImage,
    cache_dir,
    cache_key,
    check_flavour,
    find,
    load_image,
)
from pyqvm.image.modules import (
    ModulePlan,
    boot_modules,
    on_demand_modules,
    parse_module_list,
    parse_modules_alias,
    parse_modules_builtin,
    parse_modules_dep,
    plan_modules,
)
from pyqvm.spec.arches import ArchInfo, arch_info, cross_compiler, host_arch

log = logging.getLogger(__name__)

# Bump when the build steps change in a way the recipe files do not show.
# 2: LZ4 initramfs; 3: packages of GUEST_PACKAGES, libraries from .debs; 4: INITRD_PROGRAMS;
# 5: the UEFI boot disk; 6: the manifest says "wake_port"; 7: packages from pyqvm's archive
# client, and every library from the .debs on every arch; 8: /etc/pyqvm/drivers (init loads
# a driver only for a device that is there)
BUILDER_VERSION = "8"
LOADER_PACKAGE = esp.LOADER_PACKAGE  # the boot disk's UEFI loader
#: Called with the bytes downloaded so far and the total (a progress display).
BytesProgress = Callable[[int, int], None]

RECIPES = Path(__file__).with_name("recipes")
DISK_SIZE = "64M"
DISK_LABEL = "pyqvm-data"

# recipe file -> (path in the initramfs, mode)
INITRD_FILES = {
    "init": ("init", 0o755),
    "pyqvm-hotplug": ("sbin/pyqvm-hotplug", 0o755),
    "pyqvm-qga": ("sbin/pyqvm-qga", 0o755),
    "shutdown": ("sbin/shutdown", 0o755),
    "modprobe.conf": ("etc/modprobe.d/pyqvm.conf", 0o644),
}
DISK_FILES = ("hello.txt",)
# C recipe -> path in the initramfs: compiled with the host's cc, statically (a dynamic
# program spends ~25 ms in the loader under TCG; the host is the guest's Debian release).
INITRD_PROGRAMS = {
    "pyqvm-wake.c": "sbin/pyqvm-wake",  # makes a template's clone its own (ops.template)
}

# Debian packages unpacked into the initramfs: package -> the executables taken from it,
# at the same paths, with the shared libraries they load (their ELF headers name them; the
# library packages they depend on are unpacked too, so nothing comes from the host).
GUEST_PACKAGES: dict[str, tuple[str, ...]] = {
    "qemu-guest-agent": ("usr/sbin/qemu-ga",),  # the agent pyqvm drives the guest with
    "dropbear-bin": ("usr/sbin/dropbear",),  # SSH server; init starts it on pyqvm.ssh=1
}
_DIRS = (
    "bin", "sbin", "usr/bin", "usr/sbin", "lib", "lib64", "etc/pyqvm", "etc/modprobe.d",
    "dev", "proc", "sys", "run", "tmp", "mnt/data", "root", "var",
)  # fmt: skip
_ETC = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hostname": "pyqvm\n",
}


@dataclass(frozen=True, slots=True)
class BuildInputs:
    """Everything an image is built from: its cache key (``as_dict``) changes when any does."""

    flavour: str
    arch: ArchInfo
    kernel: Package
    busybox: Package
    packages: tuple[Package, ...]  # GUEST_PACKAGES, in that order
    loader: Package  # LOADER_PACKAGE
    recipes: dict[str, str]  # file name -> sha256
    # GUEST_PACKAGES' library dependencies, the libraries of the initramfs.
    libraries: tuple[Package, ...] = ()
    # A foreign arch only: the host's busybox (to list the applets: the guest's cannot run).
    host_busybox: Package | None = None

    def as_dict(self) -> dict[str, str]:
        d = {
            "flavour": self.flavour,
            "arch": self.arch.name,
            "builder": BUILDER_VERSION,
            "kernel": f"{self.kernel.name}={self.kernel.version}",
            "busybox": f"{self.busybox.name}={self.busybox.version}",
            "loader": f"{self.loader.name}={self.loader.version}",
        }
        d.update({pkg.name: f"{pkg.name}={pkg.version}" for pkg in self.packages})
        d.update({f"lib:{p.name}": p.version for p in self.libraries})
        d.update({f"recipe:{name}": digest for name, digest in self.recipes.items()})
        return d


def recipe_digests(directory: Path = RECIPES) -> dict[str, str]:
    """sha256 of every recipe file, so editing one gives a new image."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def kernel_package(meta: Package) -> tuple[str, str | None]:
    """The versioned kernel a meta package depends on, and its pinned version if any.

    ``linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)`` -> (name, "6.1.192-2")
    """
    for alternative in meta.depends.replace("|", ",").split(","):
        name, _, constraint = alternative.strip().partition("(")
        if name.strip().startswith("linux-image-"):
            op, _, version = constraint.rstrip(")").strip().partition(" ")
            return name.strip(), (version.strip() if op == "=" else None)
    raise ImageError(f"cannot tell which kernel {meta.name} depends on ({meta.depends!r})")


def _is_library(pkg: Package) -> bool:
    return pkg.name.startswith("lib") or pkg.name == "zlib1g"


def _resolve(flavour: str, arch: ArchInfo, archive: Archive) -> BuildInputs:
    meta = KERNEL_PACKAGES[flavour].format(debian=arch.debian)
    names = [meta, "busybox-static", LOADER_PACKAGE, *GUEST_PACKAGES]
    log.info("resolving %s (%s)", ", ".join(names), arch.debian)
    found = archive.candidates(names, arch.debian)
    name, pinned = kernel_package(found[meta])
    kernel = archive.candidates([name], arch.debian)[name]
    if pinned is not None and kernel.version != pinned:
        kernel = next(
            (p for p in archive.index(arch.debian).versions(name) if p.version == pinned), kernel
        )
    libs = archive.closure(GUEST_PACKAGES, arch.debian, follow=_is_library)
    host_busybox = None
    if arch.name != host_arch():
        host = arch_info(host_arch()).debian
        host_busybox = archive.candidates(["busybox-static"], host)["busybox-static"]
    return BuildInputs(
        flavour=flavour,
        arch=arch,
        kernel=kernel,
        busybox=found["busybox-static"],
        packages=tuple(found[name] for name in GUEST_PACKAGES),
        loader=found[LOADER_PACKAGE],
        recipes=recipe_digests(),
        libraries=tuple(p for p in libs if p.name not in GUEST_PACKAGES),
        host_busybox=host_busybox,
    )


#: Builds an image's files into the directory given; returns its manifest's fields.
Assemble = Callable[[Path], dict[str, object]]
#: The host tools a busybox image is built with (a distribution's: `distro.TOOLS`).
TOOLS = ("depmod", "mkfs.ext4", "qemu-img", "lz4", *esp.TOOLS)


def _plan(
    flavour: str,
    info: ArchInfo,
    root: Path,
    progress: BytesProgress | None,
    second_stage: SecondStage | None,
) -> tuple[dict[str, str], Assemble]:
    """What ``flavour`` for ``info`` is made of (the cache key's inputs) and how it is
    assembled, once the host tools it needs are known to be there."""
    is_distro = flavour in DISTRO_FLAVOURS
    if is_distro and second_stage is None:
        raise ImageError(
            f"the {flavour} flavour is finished in a helper guest: build it with "
            "pyqvm.imagebuild.build (or `pyqvm image build`), which boots one"
        )
    for name in distro.TOOLS if is_distro else TOOLS:
        tools.tool(name)
    compiler, packages = cross_compiler(info)
    tools.tool(compiler, package=packages)  # the guest's static helper (pyqvm-wake)
    archive = Archive(root)
    if second_stage is not None and is_distro:
        stage = second_stage
        return distro.inputs(archive, info), lambda out: distro.assemble(
            out, arch=info, archive=archive, second_stage=stage
        )
    inputs = _resolve(flavour, info, archive)
    return inputs.as_dict(), lambda out: _assemble(
        out, inputs, _download(inputs, archive, progress)
    )


def build(
    flavour: str = "default",
    *,
    force: bool = False,
    cache: Path | None = None,
    arch: str = "x86_64",
    progress: BytesProgress | None = None,
    second_stage: SecondStage | None = None,
) -> GuestImage:
    """Build (or reuse) the built-in guest image of ``flavour`` for guests of ``arch``.

    Packages come from Debian's archive through `pyqvm.image.archive` (signed and
    verified; the mirror is configurable, the downloads cached by hash), on any host
    and for any arch; a foreign ``arch`` needs its cross compiler.

    Inputs are the resolved Debian package versions, the recipe files and the
    builder version; an image with the same inputs is returned at once unless
    ``force``. ``progress`` is called with the bytes downloaded so far and the
    total, as downloads go; several processes building one image build it once.
    A distribution flavour is finished by ``second_stage`` in a helper guest
    (`pyqvm.imagebuild` provides it).

    Raises:
        SpecError: unknown flavour.
        HostError: a host tool is missing (the message names its package).
        ImageError: a download or a build step failed (`ArchiveError`: the archive
            could not be read or a file failed its check).
    """
    check_flavour(flavour)
    root = cache or cache_dir()
    inputs_dict, assemble = _plan(flavour, arch_info(arch), root, progress, second_stage)
    key = cache_key(inputs_dict)
    images = root / "images"
    target = images / f"{flavour}-{key}"
    if not force and (image := load_image(target)) is not None:
        log.info("guest image %s is up to date (%s)", flavour, target)
        return image
    what = f"{flavour} image" + ("" if arch == "x86_64" else f" for {arch}")
    waiting = f"another process is building the {what}; waiting for it"
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f".build-{flavour}-{arch}.lock", waiting=waiting, mode=0o644, logger=log):
        # Another process may have built it while we waited for the lock.
        if not force and (image := load_image(target)) is not None:
            log.info("guest image %s is up to date (%s)", flavour, target)
            return image
        started = time.monotonic()
        with built_aside(images, target.name) as aside:
            manifest = {"format": MANIFEST_FORMAT, "flavour": flavour, "arch": arch}
            manifest |= assemble(aside.path)
            manifest |= {"key": key, "inputs": inputs_dict, "built_at": time.time()}
            (aside.path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            aside.place(target)
        log.info("built guest image %s in %.1f s: %s", flavour, time.monotonic() - started, target)
    image = load_image(target)
    if image is None:
        raise ImageError(f"the guest image at {target} is incomplete after building it")
    return image


def _download(
    inputs: BuildInputs, archive: Archive, progress: BytesProgress | None
) -> dict[str, Path]:
    named = {
        "kernel": inputs.kernel,
        "busybox": inputs.busybox,
        "loader": inputs.loader,
        **{pkg.name: pkg for pkg in inputs.packages},
        **{f"lib:{pkg.name}": pkg for pkg in inputs.libraries},
    }
    if inputs.host_busybox is not None:
        named["host-busybox"] = inputs.host_busybox
    wanted = set(named.values())
    total = sum(pkg.size for pkg in wanted)
    log.info("fetching %d packages (%.1f MiB; cached ones are not fetched again)",
             len(wanted), total / (1 << 20))  # fmt: skip
    fetched = archive.download(wanted, progress=_summed(total, progress) if progress else None)
    return {role: fetched[pkg] for role, pkg in named.items()}


def _summed(total: int, progress: BytesProgress) -> DownloadProgress:
    """Per-package progress (from several download threads) as one running sum."""
    done: dict[Package, int] = {}
    lock = threading.Lock()

    def report(pkg: Package, got: int) -> None:
        with lock:
            done[pkg] = got
            progress(sum(done.values()), total)

    return report


def ensure(
    flavour: str = "default",
    *,
    arch: str = "x86_64",
    cache: Path | None = None,
    progress: BytesProgress | None = None,
    second_stage: SecondStage | None = None,
) -> GuestImage:
    """The newest built image of ``flavour`` for ``arch``, built first when there is none
    (as ``docker run`` pulls a missing image): what every face calls before a launch."""
    try:
        return find(flavour, cache=cache, arch=arch)
    except ImageError:
        pass
    log.info(
        "the %s image%s is not built yet: building it once (later runs reuse it)",
        flavour, "" if arch == "x86_64" else f" for {arch}",
    )  # fmt: skip
    return build(flavour, cache=cache, arch=arch, progress=progress, second_stage=second_stage)


def _assemble(out: Path, inputs: BuildInputs, debs: dict[str, Path]) -> dict[str, object]:
    work = out / "work"
    kroot, broot = work / "kernel", work / "busybox"
    unpack(debs["kernel"], kroot)
    unpack(debs["busybox"], broot)
    roots = {name: work / "packages" / name for name in GUEST_PACKAGES}
    roots |= {f"lib:{p.name}": work / "packages" / p.name for p in inputs.libraries}
    for name, root in roots.items():
        unpack(debs[name], root)
    applets = broot
    if "host-busybox" in debs:  # the guest's busybox cannot run here: list the host's
        applets = work / "host-busybox"
        unpack(debs["host-busybox"], applets)

    vmlinuzes = sorted((kroot / "boot").glob("vmlinuz-*"))
    if len(vmlinuzes) != 1:
        raise ImageError(f"{debs['kernel'].name} holds {len(vmlinuzes)} vmlinuz files, not one")
    version = vmlinuzes[0].name.removeprefix("vmlinuz-")
    moddir = next(
        (d for d in (kroot / "lib/modules" / version, kroot / "usr/lib/modules" / version)
         if d.is_dir()),
        None,
    )  # fmt: skip
    if moddir is None:
        raise ImageError(f"{debs['kernel'].name} has no modules for {version}")

    initrd = work / "initrd"
    plan = _modules(moddir, version, inputs.flavour, initrd)
    _userland(initrd, broot, roots, inputs.arch, applets)
    log.info("writing initramfs")
    _write_initramfs(initrd, out / "initrd.img")

    shutil.copyfile(vmlinuzes[0], out / "vmlinuz")
    kernel = "vmlinuz"  # on aarch64, an uncompressed Image QEMU boots as it is
    if inputs.arch.name == "x86_64":
        try:
            extract_vmlinux(out / "vmlinuz", out / "vmlinux")
            kernel = "vmlinux"
        except (SpecError, HostError) as e:
            log.warning("booting the bzImage: no PVH vmlinux for %s: %s", version, e)

    _disk(work / "disk", out / "disk.qcow2")
    unpack(debs["loader"], work / "loader")
    esp.boot_disk(
        out / "boot.qcow2",
        arch=inputs.arch,
        loader=esp.systemd_boot(work / "loader", inputs.arch),
        kernel=out / "vmlinuz",
        initrd=out / "initrd.img",
        cmdline=KERNEL_CMDLINES[inputs.arch.name],
        title=f"pyqvm {inputs.flavour} guest ({inputs.arch.name})",
    )
    shutil.rmtree(work)
    return {
        "kind": "busybox",
        "kernel_version": version,
        "kernel_package": f"{inputs.kernel.name}={inputs.kernel.version}",
        # Debian package -> version, of everything in the initramfs (dropbear-bin's too).
        "packages": {pkg.name: pkg.version for pkg in (inputs.busybox, *inputs.packages)},
        "kernel": kernel,
        "bzimage": "vmlinuz",
        "initrd": "initrd.img",
        "disk": "disk.qcow2",
        "boot_disk": "boot.qcow2",  # firmware boot: systemd-boot, the kernel, the initrd
        "ready_marker": READY_MARKER,
        "wake_port": True,  # init starts pyqvm-wake on its port (pyqvm.ops.wake)
        "cmdline": KERNEL_CMDLINES[inputs.arch.name],
        "modules": {
            "loaded": list(plan.load),
            "files": list(plan.files),
            "builtin": list(plan.builtin),
            "missing": list(plan.missing),
        },
    }


def _modules(moddir: Path, version: str, flavour: str, initrd: Path) -> ModulePlan:
    # Debian's package ships no modules.dep; depmod makes one in the unpacked tree.
    log.info("depmod %s", version)
    tools.run(["depmod", "-b", str(moddir.parents[2]), version], what="depmod")
    builtin_file = moddir / "modules.builtin"
    builtin = parse_modules_builtin(builtin_file.read_text() if builtin_file.exists() else "")
    listed = (RECIPES / "modules.txt").read_text()
    wanted = parse_module_list(listed, flavour)
    on_demand = on_demand_modules(listed, flavour)
    plan = plan_modules(wanted, parse_modules_dep((moddir / "modules.dep").read_text()), builtin)
    log.info(
        "modules: load %s (%d files); built in: %s; not in this kernel: %s",
        " ".join(plan.load) or "-",
        len(plan.files),
        " ".join(plan.builtin) or "-",
        " ".join(plan.missing) or "-",
    )
    dest = initrd / "lib/modules" / version
    for rel in plan.files:
        _copy_module(moddir / rel, dest / rel)
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (moddir / name).exists():
            shutil.copyfile(moddir / name, dest / name)
    # busybox modprobe reads modules.dep; depmod writes it for the copied subset.
    tools.run(["depmod", "-b", str(initrd), version], what="depmod (initramfs)")
    (initrd / "etc/pyqvm").mkdir(parents=True, exist_ok=True)
    at_boot = [name for name in plan.load if name not in on_demand]
    # Device drivers load by the modalias of a device that is there (init's coldplug, and
    # pyqvm-hotplug for one that comes later): a module costs ~10 ms to load under TCG
    # (its signature is checked, its BTF parsed) and most of the list drives devices a
    # guest may lack (virtio_pci on microvm, the SCSI stack without a SCSI disk).
    aliases = parse_modules_alias((dest / "modules.alias").read_text())
    boot = boot_modules(at_boot, aliases)
    (initrd / "etc/pyqvm/modules").write_text(" ".join(boot.always) + "\n")
    (initrd / "etc/pyqvm/drivers").write_text(
        "".join(f"{pattern} {module}\n" for pattern, module in boot.drivers)
    )
    return plan


def _copy_module(src: Path, dest: Path) -> None:
    """Copy a module, decompressed: busybox modprobe may lack xz/zstd support."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    name = src.name
    if name.endswith(".ko"):
        shutil.copyfile(src, dest)
        return
    plain = dest.with_name(name[: name.rindex(".ko") + 3])
    if name.endswith(".ko.xz"):
        plain.write_bytes(lzma.decompress(src.read_bytes()))
    elif name.endswith(".ko.gz"):
        plain.write_bytes(gzip.decompress(src.read_bytes()))
    elif name.endswith(".ko.zst"):
        with src.open("rb") as f, plain.open("wb") as out:
            zstandard.ZstdDecompressor().copy_stream(f, out)
    else:
        raise ImageError(f"unknown kernel module compression: {src}")


def _userland(
    initrd: Path, broot: Path, roots: dict[str, Path], arch: ArchInfo, applets_from: Path
) -> None:
    log.info("adding busybox, %s and the init recipe to the initramfs", ", ".join(roots))
    for d in _DIRS:
        (initrd / d).mkdir(parents=True, exist_ok=True)
    (initrd / "var/run").symlink_to("../run")
    # cpio keeps the mode; dropbear refuses keys under a home others can write to.
    (initrd / "root").chmod(0o700)

    busybox = broot / "bin/busybox"
    _install(busybox, initrd / "bin/busybox", 0o755)
    applets = subprocess.run(
        [str(applets_from / "bin/busybox"), "--list-full"],
        capture_output=True,
        text=True,
        check=False,
    )
    if applets.returncode != 0:
        raise ImageError(f"cannot list busybox applets: {applets.stderr.strip()}")
    for applet in applets.stdout.split():
        link = initrd / applet
        if not os.path.lexists(link):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")

    _packages(initrd, roots, arch)
    _programs(initrd, initrd.parent / "programs", arch)

    for recipe, (path, mode) in INITRD_FILES.items():
        dest = initrd / path
        if dest.is_symlink():
            dest.unlink()  # our script replaces a busybox applet of that name
        _install(RECIPES / recipe, dest, mode)
    for path, text in _ETC.items():
        (initrd / path).write_text(text)


def _install_executables(initrd: Path, roots: dict[str, Path]) -> list[tuple[str, Path]]:
    """GUEST_PACKAGES' executables, at their paths in the initramfs; returns them
    with their packages."""
    exes: list[tuple[str, Path]] = []
    for name, executables in GUEST_PACKAGES.items():
        for rel in executables:
            exe = roots[name] / rel
            if not exe.is_file():
                raise ImageError(f"the {name} package has no {rel}")
            _install(exe, initrd / rel, 0o755)
            exes.append((name, exe))
    return exes


def _packages(initrd: Path, roots: dict[str, Path], arch: ArchInfo) -> None:
    """GUEST_PACKAGES' executables, with the libraries their ELF headers name, found in
    the unpacked library packages: the host's libraries (another distribution's, or
    another arch's) never go into the guest."""
    exes = [exe for _, exe in _install_executables(initrd, roots)]
    for lib, guest_path in libraries.library_closure(exes, list(roots.values()), arch):
        _install(lib, initrd / guest_path.lstrip("/"), 0o755)


def _programs(initrd: Path, build: Path, arch: ArchInfo) -> None:
    build.mkdir(parents=True, exist_ok=True)
    compiler, _ = cross_compiler(arch)
    for recipe, rel in INITRD_PROGRAMS.items():
        exe = tools.compile_static(compiler, RECIPES / recipe, build / Path(rel).name)
        _install(exe, initrd / rel, 0o755)


def _install(src: Path, dest: Path, mode: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    dest.chmod(mode)


def _write_initramfs(tree: Path, dest: Path) -> None:
    """cpio newc, LZ4-compressed in the legacy frame (the one the kernel unpacks).

    LZ4 unpacks about twice as fast as gzip under TCG (0.1 s vs 0.19 s for this
    initramfs), which shortened boot-to-ready by ~0.1-0.2 s (bench/boot.py).
    """
    cpio = dest.with_suffix(".cpio")
    with cpio.open("wb") as raw:
        writer = NewcWriter(raw)
        writer.add_tree(tree)
        # The kernel opens /dev/console for init before devtmpfs is mounted.
        writer.add(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev_major=5, rdev_minor=1))
        writer.add(CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev_major=1, rdev_minor=3))
        writer.close()
    tools.run(
        ["lz4", "-l", "-9", "-q", "-f", str(cpio), str(dest)], what="compressing the initramfs"
    )
    cpio.unlink()


def _disk(staging: Path, dest: Path) -> None:
    log.info("making the data disk (ext4 %s, label %s)", DISK_SIZE, DISK_LABEL)
    staging.mkdir(parents=True, exist_ok=True)
    for name in DISK_FILES:
        shutil.copyfile(RECIPES / name, staging / name)
    raw = staging.with_name("disk.raw")
    tools.run(
        ["mkfs.ext4", "-q", "-F", "-L", DISK_LABEL, "-E", "root_owner=0:0",
         "-d", str(staging), str(raw), DISK_SIZE],
        what="mkfs.ext4",
    )  # fmt: skip
    tools.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(dest)],
        what="qemu-img convert",
    )
    raw.unlink()
