"""Shared fixtures: small files for specs, a built guest image for e2e tests; and the check
that the whole suite lost and leaked nothing."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyqvm import Machine, Template, VMSpec, image, templates
from pyqvm.named import registry

# The non-root, no-Debian-tools builds (whose session fixture feeds the debian tests too);
# a network namespace with an sshd, the other host of `--host ssh://`.
pytest_plugins = ["fixtures.nonroot", "fixtures.sshhost"]


def _stamps(root: Path) -> dict[str, tuple[int, int, int]]:
    """Size, modification time and inode of each built image file: any write to one (QEMU
    writing through a backing file, a test's mistake) or a replacement changes them. Hashing
    the contents instead cost ~8 s at each end of every run (a debian disk is ~800 MiB)."""
    out = {}
    for p in sorted(root.glob("images/[!.]*/*")):  # not a build's or import's work dir
        st = p.stat()
        if p.is_file():
            out[str(p)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


#: Set for the whole session: every process the suite starts (pyqvm's CLI, owners, QEMU)
#: inherits it, so the session-end check can tell its own leftovers from anyone else's.
MARK = "PQ_TEST_SESSION"


def _marked(pid: str) -> bool:
    try:
        return f"{MARK}={os.environ[MARK]}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def _ours() -> set[str]:
    """This session's VM runtime dirs whose owner still runs, and its QEMU processes."""
    found = set()
    for d in Path(tempfile.gettempdir()).glob("pyqvm-*"):
        try:
            owner = (d / "owner").read_text().split()[0]
        except (OSError, IndexError):
            continue  # not a VM's runtime dir (the registry root, say)
        if _marked(owner):
            found.add(str(d))
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv0 = proc.joinpath("cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if b"qemu-system-" in argv0 and _marked(proc.name):
                found.add(f"QEMU pid {proc.name}")
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_lost() -> Iterator[None]:
    """After the whole suite: the built-in image files are as before, and no VM runtime dir, QEMU
    process, template temp dir or registry entry is left (issue 12, "nothing lost").

    Things that existed before the suite started are not its doing and are ignored; under
    pytest-xdist another worker's VMs may still run, so only the images are checked there.
    """
    os.environ.setdefault(MARK, f"{os.getpid()}-{time.time_ns()}")
    cache = image.cache_dir()
    vms = registry.root() / "vms"  # made now if missing (it is a pyqvm-* dir in /tmp)
    images, before = _stamps(cache), _ours()
    yield
    problems = []
    now = _stamps(cache)
    changed = [p for p, h in images.items() if now.get(p) != h]
    if changed:
        problems.append(f"built-in image files changed: {changed}")
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        if left := sorted(_ours() - before):
            problems.append(f"left behind: {left}")
        half_made = sorted(str(p) for p in (cache / "templates").glob(".tmp-*"))
        if half_made:
            problems.append(f"half-made templates left: {half_made}")
        if vms.is_dir() and (entries := sorted(p.name for p in vms.iterdir())):
            problems.append(f"named VMs left in {vms}: {entries}")
    assert not problems, "; ".join(problems)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cold-boots",
        action="store_true",
        help="measure what the session template saves (issue 10): a test that starts clones "
        "of default_template in this process cold-boots the template's spec instead "
        "(tests marked 'clones', whose subject is the clone, and VMs that subprocesses "
        "start stay clones)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "clones: the test's subject is cloning (--cold-boots leaves it alone)"
    )


@pytest.fixture(autouse=True)
def cold_boots(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under --cold-boots, a clone of default_template boots the template's spec cold."""
    if not request.config.getoption("--cold-boots"):
        return
    if "default_template" not in request.fixturenames or request.node.get_closest_marker("clones"):
        return

    async def boot(machine: Machine, template: Template) -> None:
        await machine.start()  # the clone's spec is the template's, renamed

    monkeypatch.setattr(templates, "clone_into", boot)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Stand-in kernel, initrd, raw and qcow2 disk files for specs that must point at real files."""
    out = {
        "kernel": tmp_path / "vmlinuz",
        "initrd": tmp_path / "initrd.gz",
        "raw": tmp_path / "disk.img",
        "qcow2": tmp_path / "disk.qcow2",
    }
    for p in out.values():
        p.write_bytes(b"\0" * 512)
    out["qcow2"].write_bytes(b"QFI\xfb" + b"\0" * 508)
    return out


@pytest.fixture(scope="session")
def default_image() -> image.GuestImage:
    return image.build("default")


@pytest.fixture(scope="session")
def full_image() -> image.GuestImage:
    return image.build("full")


@pytest.fixture(scope="session")
def aarch64_image() -> image.GuestImage:
    return image.build("default", arch="aarch64")


@pytest.fixture(scope="session")
def default_template(
    default_image: image.GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Template:
    """A template of ``VMSpec(image="default")``, made once per session (a few seconds).

    A test whose subject is not the boot itself starts its VMs as clones of it
    (``AsyncVM.from_template(default_template)``, or ``start_from_template``
    for a VM made from ``default_template.clone_spec(name)``): ready in a
    fraction of a second instead of a cold boot.
    """
    where = tmp_path_factory.mktemp("templates")
    return asyncio.run(templates.ensure(VMSpec(image="default"), directory=where))
