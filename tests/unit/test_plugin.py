"""The pytest plugin's fixtures and report, with stand-in VMs (no QEMU).

Each test runs a small test file with `pytester`; that file monkeypatches the plugin's
``VM`` / ``AsyncVM`` names with fakes that log their start and stop to ``vms.log``.
"""

from __future__ import annotations

import pytest

FAKES = """
from pathlib import Path

import pytest

import pyqvm.pytest_plugin as plugin

LOG = Path("vms.log")


def log(line):
    with LOG.open("a") as f:
        f.write(line + "\\n")


class FakeVM:
    count = 0
    last_screenshot = None

    def __init__(self, spec):
        FakeVM.count += 1
        self.name = f"vm{FakeVM.count}"
        self.spec = spec

    def console_text(self):
        return f"{self.name} console line 1\\n{self.name} console line 2\\n"

    def qmp_transcript(self):
        return [f"12:00:00 -> {self.name} query-status", f"12:00:00 <- {self.name} running"]

    def _stopping(self):
        log(f"stop {self.name}")
        if self.name in self.spec.fail_stop:
            raise RuntimeError(f"{self.name} would not stop")


class FakeSyncVM(FakeVM):
    def __enter__(self):
        log(f"start {self.name}")
        return self

    def __exit__(self, *exc):
        self._stopping()


class FakeAsyncVM(FakeVM):
    async def start(self):
        log(f"start {self.name}")

    async def stop(self):
        self._stopping()


class Spec:
    image = None  # no built-in image: nothing to build first

    def __init__(self, *fail_stop):
        self.fail_stop = fail_stop


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    FakeVM.count = 0
    monkeypatch.setattr(plugin, "VM", FakeSyncVM)
    monkeypatch.setattr(plugin, "AsyncVM", FakeAsyncVM)
"""


@pytest.fixture
def fakes(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(FAKES)
    pytester.makeini(
        # The fakes boot; they are no templates' clones.
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
        "addopts = --pyqvm-no-template\n"
    )
    return pytester


def stops(pytester: pytest.Pytester) -> list[str]:
    return (pytester.path / "vms.log").read_text().splitlines()


def assert_vm2_failed_to_stop_and_vm1_stopped(fakes: pytest.Pytester) -> None:
    """test_two of the file made: vm2's stop raised; vm1 was still stopped; the run says why."""
    result = fakes.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    assert stops(fakes)[-2:] == ["stop vm2", "stop vm1"]
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_two*",
            "*RuntimeError: vm2 would not stop",
            "*while stopping pyqvm VM 'vm2' at fixture teardown",
        ]
    )


def test_every_vm_is_stopped_newest_first(fakes: pytest.Pytester) -> None:
    fakes.makepyfile(
        """
        from conftest import Spec

        def test_three(pyqvm_vm):
            assert [pyqvm_vm(Spec()).name for _ in range(3)] == ["vm1", "vm2", "vm3"]
        """
    )
    fakes.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert stops(fakes) == [
        "start vm1",
        "start vm2",
        "start vm3",
        "stop vm3",
        "stop vm2",
        "stop vm1",
    ]


def test_a_vm_that_fails_to_stop_does_not_keep_the_others_running(
    fakes: pytest.Pytester,
) -> None:
    fakes.makepyfile(
        """
        from conftest import Spec

        def test_two(pyqvm_vm):
            pyqvm_vm(Spec())
            pyqvm_vm(Spec("vm2"))  # stopped first, and its stop raises
        """
    )
    assert_vm2_failed_to_stop_and_vm1_stopped(fakes)


def test_several_stop_failures_are_all_reported(fakes: pytest.Pytester) -> None:
    fakes.makepyfile(
        """
        from conftest import Spec

        def test_three(pyqvm_vm):
            for _ in range(3):
                pyqvm_vm(Spec("vm1", "vm3"))
        """
    )
    result = fakes.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    assert stops(fakes)[-3:] == ["stop vm3", "stop vm2", "stop vm1"]
    result.stdout.fnmatch_lines(["*pyqvm: 2 VMs failed to stop*"])
    result.stdout.fnmatch_lines(["*RuntimeError: vm3 would not stop"])
    result.stdout.fnmatch_lines(["*RuntimeError: vm1 would not stop"])


def test_the_async_factory_stops_every_vm_too(fakes: pytest.Pytester) -> None:
    fakes.makepyfile(
        """
        import pytest
        from conftest import Spec

        @pytest.mark.asyncio
        async def test_two(pyqvm_async_vm):
            await pyqvm_async_vm(Spec())
            await pyqvm_async_vm(Spec("vm2"))
        """
    )
    assert_vm2_failed_to_stop_and_vm1_stopped(fakes)


def test_a_failing_test_shows_each_vms_console_and_qmp(fakes: pytest.Pytester) -> None:
    fakes.makepyfile(
        """
        from conftest import Spec

        def test_fails(pyqvm_vm):
            pyqvm_vm(Spec())
            pyqvm_vm(Spec())
            assert False
        """
    )
    result = fakes.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*pyqvm vm1 console (last 40 lines)*",
            "vm1 console line 2",
            "*pyqvm vm1 QMP (last 2 messages)*",
            "12:00:00 <- vm1 running",
            "*pyqvm vm2 console (last 40 lines)*",
            "vm2 console line 2",
            "*pyqvm vm2 QMP (last 2 messages)*",
        ]
    )
