"""The pytest plugin's fixtures, and the console section it adds to a failing test's report."""

from __future__ import annotations

import pytest

from pyqvm import VMSpec
from pyqvm.image import GuestImage
from pyqvm.sync import VM
from pyqvm.vm import AsyncVM, VMState

pytestmark = pytest.mark.e2e


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
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*pyqvm pyqvm console (last 40 lines)*", "*pyqvm-guest-ready*"])
