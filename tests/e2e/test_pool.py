"""Warm pools (`AsyncPool`, `Pool`): what a handed-out VM is, and what a pool leaves behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from pyqvm import (
    AsyncPool,
    AsyncVM,
    Pool,
    PoolError,
    Template,
    TemplateError,
    VMSpec,
    VMState,
    templates,
)

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def pool_template(default_image: object, tmp_path_factory: pytest.TempPathFactory) -> Template:
    """A template of the built-in guest under a name of its own: the pytest plugin's pools
    (other tests of the session) hold clones of ``pool_template``'s name."""
    where = tmp_path_factory.mktemp("pool-templates")
    return asyncio.run(templates.create(VMSpec(image="default"), "pooled", directory=where))


def _spare_pids(template: Template) -> set[int]:
    return set(_clones(template))


def _clones(template: Template) -> dict[int, Path]:
    """The QEMUs of this process's clones of ``template`` (their ``-name``), from /proc,
    with their runtime directories (named in their argv)."""
    mark = f"{template.name}-{os.getpid()}-".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"qemu-system-x86_64") and any(a.startswith(mark) for a in argv):
            dirs = re.findall(rb"(/[^,=]*/pyqvm-[^/,]+)/", b" ".join(argv))
            found[int(entry.name)] = Path(dirs[0].decode())
    return found


async def _sh(vm: AsyncVM, script: str) -> str:
    return (await vm.run(["sh", "-c", script], check=True)).stdout_text


@pytest.mark.asyncio
async def test_acquired_vms_are_ready_their_own_and_isolated(pool_template: Template) -> None:
    async with AsyncPool(pool_template, size=2) as pool:
        a = await pool.acquire()
        b = await pool.acquire()
        assert a.state is VMState.RUNNING and b.state is VMState.RUNNING
        assert a.boot_seconds is None  # clones: no boot
        # Made their own at the hand-out: random bytes of their own, the host's time.
        rand = [await _sh(vm, "head -c 32 /dev/urandom | od -An -tx1") for vm in (a, b)]
        assert rand[0] != rand[1]
        for vm in (a, b):
            guest = float(await _sh(vm, "date +%s"))
            assert abs(guest - time.time()) < 2.0, "the guest clock was not set at the hand-out"
        # Writes (RAM and disk) stay with their VM: a sibling and later ones never see them.
        await _sh(a, "echo mine > /tmp/ram.txt; echo mine > /mnt/data/disk.txt; sync")
        assert await _sh(b, "cat /tmp/ram.txt /mnt/data/disk.txt 2>&1 || true") != "mine\nmine\n"
        await a.stop()
        c = await pool.acquire()
        assert "mine" not in await _sh(c, "cat /tmp/ram.txt /mnt/data/disk.txt 2>&1 || true")
    pool_template.check()  # the template's files are as they were made


@pytest.mark.asyncio
async def test_a_spare_killed_while_idle_is_never_handed_out(pool_template: Template) -> None:
    async with AsyncPool(pool_template, size=2) as pool:
        await _until_full(pool)
        spares = _spare_pids(pool_template)
        assert len(spares) == 2
        victim = min(spares)
        os.kill(victim, signal.SIGKILL)
        handed = []
        for _ in range(3):
            vm = await pool.acquire()
            assert vm.pid != victim
            assert (await vm.run(["true"])).returncode == 0
            handed.append(vm.pid)
        assert len(set(handed)) == 3


@pytest.mark.asyncio
async def test_closing_a_pool_leaves_no_process_and_no_directory(
    pool_template: Template,
) -> None:
    pool = AsyncPool(pool_template, size=2)
    await pool.open()
    try:
        kept = await pool.acquire()  # handed out, never stopped by the test
        await _until_full(pool)
        clones = _clones(pool_template)
        assert kept.pid in clones and len(clones) == 3
        assert all(d.is_dir() for d in clones.values())
    finally:
        await pool.close()
    assert _spare_pids(pool_template) == set()
    assert not any(d.exists() for d in clones.values())
    assert kept.state is VMState.STOPPED
    with pytest.raises(PoolError, match="closed"):
        await pool.acquire()


def test_the_blocking_pool_refills_between_calls(pool_template: Template) -> None:
    with Pool(pool_template, size=1) as pool:
        first = pool.acquire()
        assert first.run(["uname"]).stdout_text == "Linux\n"
        deadline = time.monotonic() + 60
        while pool.ready < 1:  # the refill runs on the pool's thread while this one sleeps
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = pool.acquire()
        second.write_file("/tmp/x", b"second")
        assert second.read_file("/tmp/x") == b"second"
        assert first.run(["cat", "/tmp/x"]).returncode != 0
        # A VM of the pool works from another thread too (one thread at a time).
        out: list[str] = []
        worker = threading.Thread(target=lambda: out.append(first.run(["echo", "t"]).stdout_text))
        worker.start()
        worker.join()
        assert out == ["t\n"]
    assert _spare_pids(pool_template) == set()
    assert first.state is VMState.STOPPED


@pytest.mark.asyncio
async def test_a_missing_template_or_a_closed_pool_is_refused(
    pool_template: Template, tmp_path: Path
) -> None:
    with pytest.raises(TemplateError, match="nope"):
        AsyncPool("nope", directory=tmp_path)
    with pytest.raises(PoolError, match="size"):
        AsyncPool(pool_template, size=0)
    pool = AsyncPool(pool_template, size=1)
    with pytest.raises(PoolError, match="open"):
        await pool.acquire()
    await pool.close()
    with pytest.raises(PoolError, match="closed"):
        await pool.acquire()


async def _until_full(pool: AsyncPool) -> None:
    deadline = time.monotonic() + 120
    while pool.ready < pool.size:
        assert time.monotonic() < deadline, pool
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_a_stale_template_is_refused_before_any_qemu_starts(pool_template: Template) -> None:
    """A template whose files changed since it was made (here: its memory file's time)."""
    memory = pool_template.memory_file
    was = memory.stat()
    os.utime(memory, ns=(was.st_atime_ns, was.st_mtime_ns + 1))
    try:
        with pytest.raises(TemplateError, match="stale"):
            await AsyncPool(pool_template).open()
        assert _spare_pids(pool_template) == set()
    finally:
        os.utime(memory, ns=(was.st_atime_ns, was.st_mtime_ns))
    pool_template.check()
