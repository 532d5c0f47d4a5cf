"""pytest plugin: fixtures that give a test a running VM, and the guest's console on failure.

Registered through the ``pytest11`` entry point, so installing pyqvm is enough::

    def test_uname(pyqvm_vm):
        vm = pyqvm_vm()                        # the built-in guest, started and ready
        assert vm.run(["uname"]).stdout_text == "Linux\\n"

    async def test_async(pyqvm_async_vm):      # with pytest-asyncio
        vm = await pyqvm_async_vm(VMSpec(image="default", smp=2))

Fixtures:

- ``pyqvm_image``: the built-in ``default`` guest image (built once if missing).
- ``pyqvm_vm``: a factory; each call starts a synchronous `VM` from a spec
  (default: ``VMSpec(image="default")``). Every VM is stopped at teardown.
- ``pyqvm_async_vm``: the same for `AsyncVM` in async tests (needs pytest-asyncio).

When a test that used a VM fails, the report gets a section per VM with the
tail of its serial console.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from pyqvm import image
from pyqvm.spec import VMSpec
from pyqvm.sync import VM
from pyqvm.vm import AsyncVM

_VMS = pytest.StashKey[list[Any]]()
_CONSOLE_LINES = 40


def _remember(request: pytest.FixtureRequest, vm: VM | AsyncVM) -> None:
    request.node.stash.setdefault(_VMS, []).append(vm)


@pytest.fixture(scope="session")
def pyqvm_image() -> image.GuestImage:
    """The built-in default guest image, built if it is not cached yet."""
    return image.build("default")


@pytest.fixture
def pyqvm_vm(request: pytest.FixtureRequest) -> Iterator[Callable[..., VM]]:
    """Factory: ``pyqvm_vm(spec=None)`` -> a started `VM`; all are stopped at teardown."""
    started: list[VM] = []

    def start(spec: VMSpec | None = None) -> VM:
        vm = VM(spec or VMSpec(image="default"))
        _remember(request, vm)
        vm.__enter__()
        started.append(vm)
        return vm

    yield start
    for vm in reversed(started):
        vm.__exit__(None, None, None)


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the async fixture needs pytest-asyncio
    pass
else:

    @pytest_asyncio.fixture
    async def pyqvm_async_vm(
        request: pytest.FixtureRequest,
    ) -> AsyncIterator[Callable[..., Awaitable[AsyncVM]]]:
        """Factory: ``await pyqvm_async_vm(spec=None)`` -> a started `AsyncVM`."""
        started: list[AsyncVM] = []

        async def start(spec: VMSpec | None = None) -> AsyncVM:
            vm = AsyncVM(spec or VMSpec(image="default"))
            _remember(request, vm)
            await vm.start()
            started.append(vm)
            return vm

        yield start
        for vm in reversed(started):
            await vm.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for vm in item.stash.get(_VMS, []):
            tail = "\n".join(vm.console_text().splitlines()[-_CONSOLE_LINES:])
            report.sections.append((f"pyqvm {vm.name} console (last {_CONSOLE_LINES} lines)", tail))
    return report
