"""The pytest plugin's fixtures, and the console section it adds to a failing test's report."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from _cli import pyqvm

from pyqvm import VM, Pool, VMSpec
from pyqvm.image import GuestImage
from pyqvm.vm import AsyncVM, VMState

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pyqvm_pools() -> Iterator[dict[str, Pool]]:
    """This module's own pools, in place of the plugin's session-wide ones: closed when the
    module ends, so no spare outlives these tests (others count their VMs' processes and
    sockets)."""
    pools: dict[str, Pool] = {}
    yield pools
    for pool in pools.values():
        pool.close()


def test_the_sync_factory_hands_out_pool_clones(
    pyqvm_image: GuestImage, pyqvm_vm: object, pyqvm_pools: dict[str, Pool]
) -> None:
    a, b = pyqvm_vm(), pyqvm_vm()  # type: ignore[operator]
    [pool] = pyqvm_pools.values()
    assert a.name.startswith(pool.template.name) and b.name.startswith(pool.template.name)
    a.write_file("/tmp/x", b"a")
    assert b.run(["cat", "/tmp/x"]).returncode != 0


def test_sync_factory(pyqvm_image: GuestImage, pyqvm_vm: object) -> None:
    vm = pyqvm_vm()  # type: ignore[operator]
    assert isinstance(vm, VM) and vm.state is VMState.RUNNING
    assert vm.run(["uname"]).stdout_text == "Linux\n"


@pytest.mark.asyncio
async def test_async_factory(pyqvm_image: GuestImage, pyqvm_async_vm: object) -> None:
    vm = await pyqvm_async_vm(VMSpec(image="default", smp=2))  # type: ignore[operator]
    assert isinstance(vm, AsyncVM)
    r = await vm.run(["nproc"])
    assert r.stdout_text.strip() == "2"


def test_failure_report_shows_console(
    pyqvm_image: GuestImage, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pytester runs with its own HOME: point it at the image cache this session built.
    monkeypatch.setenv("PYQVM_CACHE_DIR", str(pyqvm_image.directory.parent.parent))
    pytester.makepyfile(
        """
        def test_fails(pyqvm_vm):
            vm = pyqvm_vm()
            assert vm.run(["false"]).returncode == 0
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--pyqvm-no-template")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*pyqvm pyqvm console (last 40 lines)*", "*pyqvm-guest-ready*"])


def test_a_failure_report_names_the_last_screenshot(
    pyqvm_image: GuestImage, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYQVM_CACHE_DIR", str(pyqvm_image.directory.parent.parent))
    pytester.makepyfile(
        """
        import pytest
        from pyqvm import VMSpec

        @pytest.mark.pyqvm(spec=VMSpec(image="default", display="vga"), template=False)
        def test_fails(pyqvm_vm):
            vm = pyqvm_vm()
            vm.screenshot()
            assert False, "the screen was wrong"
        """
    )
    shots = pytester.path / "shots"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--pyqvm-screenshots={shots}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*pyqvm pyqvm screen*", f"*last screenshot: {shots}/*.png*"])
    [png] = shots.iterdir()
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


SAMPLE = """
import pytest

from pyqvm import VMSpec


def test_clone(pyqvm_vm, pyqvm_pools):
    vm = pyqvm_vm()
    assert vm.name.startswith("auto-") and vm.boot_seconds is None  # a clone: no boot
    assert vm.run(["cat", "/proc/uptime"]).returncode == 0
    [pool] = pyqvm_pools.values()  # it came from this process's warm pool
    assert pool.template.name == vm.name.rsplit("-", 2)[0]


@pytest.mark.pyqvm(pool=0)
def test_fresh_clone(pyqvm_vm, pyqvm_pools):
    vm = pyqvm_vm()
    assert vm.name.startswith("auto-") and vm.boot_seconds is None


def test_another_clone(pyqvm_vm):
    vm = pyqvm_vm()
    vm.write_file("/tmp/mine", b"only mine")
    assert vm.name.startswith("auto-") and vm.read_file("/tmp/mine") == b"only mine"


@pytest.mark.pyqvm(template=False)
def test_booted(pyqvm_vm):
    vm = pyqvm_vm()
    assert vm.boot_seconds is not None and not vm.name.startswith("auto-")


@pytest.mark.asyncio
@pytest.mark.pyqvm(spec=VMSpec(image="default", memory=384))
async def test_async_clone_of_the_marker_spec(pyqvm_async_vm):
    vm = await pyqvm_async_vm()
    assert vm.name.startswith("auto-") and vm.spec.memory == 384


def test_fails(pyqvm_vm):
    vm = pyqvm_vm()
    vm.run(["sh", "-c", "echo only-in-ram-$PPID > /tmp/ram.txt"], check=True)
    assert vm.run(["false"]).returncode == 0
"""


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist-2"])
def test_a_sample_project_uses_clones(
    workers: list[str],
    pyqvm_image: GuestImage,
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYQVM_CACHE_DIR", str(pyqvm_image.directory.parent.parent))
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(SAMPLE)
    kept = pytester.path / "kept"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--pyqvm-keep-failed={kept}", *workers
    )
    result.assert_outcomes(passed=5, failed=1)
    # The failing clone's report: its console, which starts with the template's boot.
    result.stdout.fnmatch_lines(
        [
            "*pyqvm auto-* console (last 40 lines)*",
            "*frozen as template auto-*",
            "*cloned from template auto-*",
            "*pyqvm auto-* QMP (last * messages)*",
            "* -> migrate-incoming *",  # the clone's restore, as QMP saw it
            "*pyqvm failure snapshots (teardown)*",
            "*pyqvm restore * --name auto-*",
        ]
    )
    # The one command the report prints brings the VM back in another process, as it was.
    [command] = re.findall(r"^\s*(pyqvm restore \S+ --name \S+)$", result.stdout.str(), re.M)
    name = command.split()[-1]
    restored = pyqvm(*command.split()[1:])
    assert restored.returncode == 0, restored.stderr
    try:
        seen = pyqvm("exec", name, "--", "cat", "/tmp/ram.txt")
        assert re.fullmatch(r"only-in-ram-\d+\n", seen.stdout), (seen.stdout, seen.stderr)
    finally:
        assert pyqvm("stop", name).returncode == 0


def test_a_vm_that_cannot_be_kept_is_named_with_the_reason(
    pyqvm_image: GuestImage, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYQVM_CACHE_DIR", str(pyqvm_image.directory.parent.parent))
    (pytester.path / "shared").mkdir()
    pytester.makepyfile(
        f"""
        import pytest
        from pyqvm import Share, VMSpec

        SPEC = VMSpec(image="default", shares=(Share({str(pytester.path / "shared")!r}),))

        @pytest.mark.pyqvm(spec=SPEC, template=False)
        def test_fails(pyqvm_vm):
            pyqvm_vm()
            assert False, "looked wrong"
        """
    )
    kept = pytester.path / "kept"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--pyqvm-keep-failed={kept}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*pyqvm failure snapshots (teardown)*", "*: not kept: cannot save VM *share*"]
    )
    assert not kept.exists() or not any(kept.iterdir())
