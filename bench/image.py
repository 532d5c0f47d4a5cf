"""Building the default image: pyqvm's archive client vs the same packages through the host's
apt, both from a warm download cache; and one build from a cold cache.

Both sides run pyqvm's whole builder (``image.build(force=True)``): depmod, the initramfs,
the disks are the same code. Only the package phase differs. The baseline swaps it for what
the builder did before the archive client (by hand here, as bench/handmade.py does for
QEMU's argv): versions from ``apt-cache show``, library dependencies from ``apt-cache
depends --recurse``, ``.deb`` files from ``apt-get download`` (skipped when the file is
there: the warm cache), unpacked with ``dpkg-deb -x``. It needs a Debian host with apt lists.

    python bench/image.py [-n 3]

Rounds alternate the sides. The last line is ``result: image pyqvm=<median s>
baseline=<median s> ratio=<r> cold=<s>``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from pyqvm.image import builder
from pyqvm.image.archive import Archive, Package
from pyqvm.spec.arches import ArchInfo


def _apt_show(names: list[str]) -> dict[str, Package]:
    out = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *names],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    found: dict[str, Package] = {}
    for para in out.split("\n\n"):
        f = dict(re.findall(r"^([\w-]+):[ \t]*(.*)$", para, re.MULTILINE))
        if "Package" in f and f["Package"] not in found:
            found[f["Package"]] = Package(
                f["Package"], f["Version"], f["Architecture"], f["Filename"], f["SHA256"],
                int(f["Size"]), "apt", f.get("Depends", ""),
            )  # fmt: skip
    return found


def _apt_libraries(names: list[str]) -> list[str]:
    out = subprocess.run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *names],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    found: list[str] = []
    for line in out.splitlines():
        m = re.fullmatch(r"\s*(?:\|?(?:Pre)?Depends: )?([a-z0-9][a-z0-9.+-]+)", line)
        name = m.group(1) if m else ""
        if (name.startswith("lib") or name == "zlib1g") and name not in (*found, *names):
            found.append(name)
    return found


def apt_resolve(flavour: str, arch: ArchInfo, archive: Archive) -> builder.BuildInputs:
    meta = builder.KERNEL_PACKAGES[flavour].format(debian=arch.debian)
    names = [meta, "busybox-static", builder.LOADER_PACKAGE, *builder.GUEST_PACKAGES]
    found = _apt_show(names)
    kernel_name, _ = builder.kernel_package(found[meta])
    libs = _apt_libraries(list(builder.GUEST_PACKAGES))
    shown = _apt_show([kernel_name, *libs])
    return builder.BuildInputs(
        flavour=flavour,
        arch=arch,
        kernel=shown[kernel_name],
        busybox=found["busybox-static"],
        packages=tuple(found[n] for n in builder.GUEST_PACKAGES),
        loader=found[builder.LOADER_PACKAGE],
        recipes=builder.recipe_digests(),
        libraries=tuple(shown[n] for n in libs),
    )


def apt_download(
    inputs: builder.BuildInputs, archive: Archive, progress: object
) -> dict[str, Path]:
    downloads = archive.cache / "apt-downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    named = {
        "kernel": inputs.kernel, "busybox": inputs.busybox, "loader": inputs.loader,
        **{p.name: p for p in inputs.packages},
        **{f"lib:{p.name}": p for p in inputs.libraries},
    }  # fmt: skip
    out: dict[str, Path] = {}
    for role, pkg in named.items():
        dest = downloads / pkg.deb_name
        if not dest.is_file():  # the old builder's warm cache: no apt call at all
            subprocess.run(
                ["apt-get", "download", "-q", f"{pkg.name}={pkg.version}"],
                cwd=downloads, capture_output=True, check=True,
            )  # fmt: skip
        out[role] = dest
    return out


def dpkg_unpack(deb: Path, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)


@contextlib.contextmanager
def through_apt() -> Iterator[None]:
    saved = (builder._resolve, builder._download, builder.unpack)
    builder._resolve = apt_resolve  # type: ignore[assignment]
    builder._download = apt_download  # type: ignore[assignment]
    builder.unpack = dpkg_unpack
    try:
        yield
    finally:
        builder._resolve, builder._download, builder.unpack = saved


def timed_build(cache: Path) -> float:
    t0 = time.monotonic()
    builder.build("default", force=True, cache=cache)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=3, help="warm builds a side")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyqvm-bench-image-") as tmp:
        ours, theirs = Path(tmp) / "archive", Path(tmp) / "apt"
        t0 = time.monotonic()
        builder.build("default", cache=ours)  # the cold build, and it warms our cache
        cold = time.monotonic() - t0
        print(f"cold build (empty cache, packages from the mirror): {cold:.2f} s")
        with through_apt():
            builder.build("default", cache=theirs)  # warms apt's side
        times: dict[str, list[float]] = {"pyqvm": [], "apt": []}
        for i in range(args.n):
            for side in ("pyqvm", "apt") if i % 2 == 0 else ("apt", "pyqvm"):
                if side == "apt":
                    with through_apt():
                        took = timed_build(theirs)
                else:
                    took = timed_build(ours)
                times[side].append(took)
                print(f"round {i + 1} {side}: {took:.2f} s")
        shutil.rmtree(tmp, ignore_errors=True)
    p, b = statistics.median(times["pyqvm"]), statistics.median(times["apt"])
    print(f"warm builds: pyqvm {times['pyqvm']}, apt {times['apt']}")
    print(f"result: image pyqvm={p:.3f} baseline={b:.3f} ratio={p / b:.3f} cold={cold:.3f}")


if __name__ == "__main__":
    main()
