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
  (default: ``VMSpec(image="default")``). Every VM is stopped at teardown, newest
  first; when stopping one fails the others are still stopped, then the failure is
  raised (an `ExceptionGroup` when several failed), so the test errors at teardown.
- ``pyqvm_async_vm``: the same for `AsyncVM` in async tests (needs pytest-asyncio).

Templates: the first VM of a spec in a session makes (or reuses, when it is current)
a template of it (`pyqvm.templates.ensure`, named ``auto-<spec hash>``, shared by
pytest-xdist workers through a file lock); every VM of that spec is then a clone of
it, ready without a boot. A spec that cannot be templated boots as before. Opt out
per test with ``@pytest.mark.pyqvm(template=False)``, or for the run with
``--pyqvm-no-template``; ``@pytest.mark.pyqvm(spec=VMSpec(...))`` gives a test's
VMs their spec when the factory is called without one.

Pools: ``pyqvm_vm`` takes its clones from a warm `pyqvm.Pool` of the template, one per
spec and process (each pytest-xdist worker has its own), sized from the host's cores and
memory (`pyqvm.pool.auto_size`), or ``--pyqvm-pool N`` (0: none), or per test
``@pytest.mark.pyqvm(pool=N)`` (0: a fresh clone; N: the size of a pool it makes). An
async test's loop is its own (pytest-asyncio), and a pool's VMs belong to the pool's
loop: ``pyqvm_async_vm`` clones the template as before (use `pyqvm.AsyncPool` on a
session-scoped loop for pooled async VMs).

Failure snapshots: with ``--pyqvm-keep-failed DIR``, the VMs of a failing test are saved
before they are stopped (`AsyncVM.save` with ``portable=True``: the state, standalone
disks, the image, the console log and the QMP transcript) into ``DIR/<test>-<vm>``, and
the report prints the one command that brings each back as a named VM:
``pyqvm restore DIR/... --name NAME``. A VM that cannot be saved (VFIO, shares, private
networks) is named with the reason instead.

The fixtures build their VMs from this module's ``VM`` and ``AsyncVM`` names, so a
test of a plugin user can monkeypatch them with stand-ins.

When a test that used a VM fails, the report gets a section per VM with the
tail of its serial console (a clone's console starts with its template's boot) and
the last QMP commands pyqvm sent it, with QEMU's answers; and, for a VM whose screen the
test looked at, that last screenshot, saved as a PNG (in ``--pyqvm-screenshots DIR``, by
default pytest's temporary directory) and named in the report.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyqvm import image, imagebuild
from pyqvm.errors import PyqvmError
from pyqvm.faces.derived_vm import VM
from pyqvm.faces.loop import ThreadLoop
from pyqvm.ops import template as templates
from pyqvm.pool import Pool, auto_size
from pyqvm.spec import VMSpec
from pyqvm.state import VMState
from pyqvm.vm import AsyncVM

_VMS = pytest.StashKey[list[Any]]()
_TEMPLATES = pytest.StashKey[dict[str, templates.Template]]()
_SHOTS = pytest.StashKey[Path]()
_FAILED = pytest.StashKey[bool]()
_KEPT = pytest.StashKey[list[str]]()
_LIVE = (VMState.RUNNING, VMState.PAUSED)
_CONSOLE_LINES = 40
_QMP_LINES = 30


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("pyqvm").addoption(
        "--pyqvm-no-template",
        action="store_true",
        help="boot every VM of the pyqvm fixtures instead of cloning a template",
    )
    parser.getgroup("pyqvm").addoption(
        "--pyqvm-pool",
        type=int,
        metavar="N",
        help="spares per warm pool of clones (one per spec and process; default: from the "
        "host's cores and memory; 0: no pools)",
    )
    parser.getgroup("pyqvm").addoption(
        "--pyqvm-keep-failed",
        metavar="DIR",
        help="save each VM of a failing test into DIR (portable), and print the command "
        "that restores it",
    )
    parser.getgroup("pyqvm").addoption(
        "--pyqvm-screenshots",
        metavar="DIR",
        help="where a failing test's last screenshot of each VM goes (default: pytest's "
        "temporary directory)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pyqvm(template=True, spec=None, pool=None): pyqvm fixture options: clone a "
        "template or boot; the spec the factory uses when called without one; the size of "
        "the warm pool the clones come from (0: none)",
    )


def _spec_and_template(request: pytest.FixtureRequest, spec: VMSpec | None) -> tuple[VMSpec, bool]:
    """The spec a factory call starts, and whether it is cloned from a template."""
    marker = request.node.get_closest_marker("pyqvm")
    options = marker.kwargs if marker else {}
    spec = spec or options.get("spec") or VMSpec(image="default")
    if spec.image is not None:  # a first use builds it (once: other workers wait for it)
        imagebuild.ensure(spec.image, arch=spec.arch)
    wanted = options.get("template", True) and not request.config.getoption(
        "--pyqvm-no-template", default=False
    )
    return spec, bool(wanted) and templates.templatable(spec)


def _known_template(request: pytest.FixtureRequest, spec: VMSpec) -> templates.Template | None:
    """The template this session already made or checked for ``spec`` (one `ensure` each)."""
    return request.config.stash.get(_TEMPLATES, {}).get(templates.spec_hash(spec))


def _keep_template(
    request: pytest.FixtureRequest, spec: VMSpec, template: templates.Template
) -> templates.Template:
    request.config.stash.setdefault(_TEMPLATES, {})[templates.spec_hash(spec)] = template
    return template


def _pool(request: pytest.FixtureRequest, template: templates.Template) -> Pool | None:
    """This process's warm pool of ``template`` (made on first use), or None when the
    test, the run or the host says no pool."""
    marker = request.node.get_closest_marker("pyqvm")
    size = marker.kwargs.get("pool") if marker else None
    if size is None:
        size = request.config.getoption("--pyqvm-pool", default=None)
    if size == 0:
        return None
    pools: dict[str, Pool] = request.getfixturevalue("pyqvm_pools")
    if template.name in pools:
        return pools[template.name]
    if size is None:
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        size = auto_size(template, workers)
        if size == 0:
            return None
    pool = pools[template.name] = Pool(template, size)
    pool.open()
    return pool


def _keep_failed_dir(request: pytest.FixtureRequest, vm: VM | AsyncVM) -> Path | None:
    """Where a VM of a failed test is kept (``--pyqvm-keep-failed``), or None."""
    where = request.config.getoption("--pyqvm-keep-failed", default=None)
    if where is None or not request.node.stash.get(_FAILED, False) or vm.state not in _LIVE:
        return None
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid).strip("_")[-100:]
    return Path(where).resolve() / f"{stem}-{vm.name}"


def _keep_failed(request: pytest.FixtureRequest, vm: VM) -> None:
    """A blocking VM of a failed test, saved (the async fixture awaits the same steps)."""
    if (where := _keep_failed_dir(request, vm)) is None:
        return
    try:
        vm.save(where, portable=True)
    except PyqvmError as e:
        _not_kept(request, vm, e)
    else:
        _kept(request, vm, where)


def _kept(request: pytest.FixtureRequest, vm: VM | AsyncVM, where: Path) -> None:
    (where / "console.log").write_text(vm.console_text())
    (where / "qmp.log").write_text("\n".join(vm.qmp_transcript()) + "\n")
    request.node.stash.setdefault(_KEPT, []).append(
        f"{vm.name}: kept in {where}; bring it back with:\n"
        f"    pyqvm restore {where} --name {vm.name}"
    )


def _not_kept(request: pytest.FixtureRequest, vm: VM | AsyncVM, error: PyqvmError) -> None:
    request.node.stash.setdefault(_KEPT, []).append(f"{vm.name}: not kept: {error}")


def _remember(request: pytest.FixtureRequest, vm: VM | AsyncVM) -> None:
    request.node.stash.setdefault(_VMS, []).append(vm)
    if _SHOTS not in request.node.stash:  # where a failure's screenshots go
        where = request.config.getoption("--pyqvm-screenshots", default=None)
        if where is None:
            factory: pytest.TempPathFactory = request.getfixturevalue("tmp_path_factory")
            where = factory.getbasetemp() / "pyqvm-screenshots"
        request.node.stash[_SHOTS] = Path(where)


def _stop_failed(vm: VM | AsyncVM, error: BaseException, errors: list[BaseException]) -> None:
    error.add_note(f"while stopping pyqvm VM {vm.name!r} at fixture teardown")
    errors.append(error)


def _raise_stop_errors(errors: list[BaseException]) -> None:
    """After every VM was stopped: raise what stopping them raised, if anything."""
    if not errors:
        return
    if len(errors) == 1:
        raise errors[0]
    fatal = [e for e in errors if not isinstance(e, Exception)]
    if fatal:
        # Ctrl-C or cancellation must keep its meaning; the other failures become notes.
        for e in errors:
            if e is not fatal[0]:
                fatal[0].add_note(f"also while stopping VMs: {e!r}")
        raise fatal[0]
    group = [e for e in errors if isinstance(e, Exception)]
    raise ExceptionGroup(f"pyqvm: {len(group)} VMs failed to stop", group)


@pytest.fixture(scope="session")
def pyqvm_image() -> image.GuestImage:
    """The built-in default guest image, built if it is not cached yet."""
    return imagebuild.ensure("default")


@pytest.fixture(scope="session")
def pyqvm_pools() -> Iterator[dict[str, Pool]]:
    """This process's warm pools (`pyqvm.Pool`), by template name: made by ``pyqvm_vm``
    on first use, closed when the session ends (with every VM they handed out)."""
    pools: dict[str, Pool] = {}
    yield pools
    errors: list[BaseException] = []
    for pool in pools.values():
        try:
            pool.close()
        except BaseException as e:  # close the others first, then report
            errors.append(e)
    _raise_stop_errors(errors)


@pytest.fixture
def pyqvm_vm(request: pytest.FixtureRequest) -> Iterator[Callable[..., VM]]:
    """Factory: ``pyqvm_vm(spec=None)`` -> a started `VM`; all are stopped at teardown."""
    started: list[VM] = []

    def start(spec: VMSpec | None = None) -> VM:
        spec, cloned = _spec_and_template(request, spec)
        if cloned:
            template = _known_template(request, spec) or _keep_template(
                request, spec, ThreadLoop.current().run(templates.ensure(spec))
            )
            if pool := _pool(request, template):
                vm = pool.acquire()
                _remember(request, vm)
            else:
                vm = VM(template.clone_spec())
                _remember(request, vm)
                vm.start_from_template(template)
        else:
            vm = VM(spec)
            _remember(request, vm)
            vm.__enter__()
        started.append(vm)
        return vm

    yield start
    for vm in started:
        _keep_failed(request, vm)
    errors: list[BaseException] = []
    for vm in reversed(started):
        try:
            vm.__exit__(None, None, None)
        except BaseException as e:  # stop the others first, then report
            _stop_failed(vm, e, errors)
    _raise_stop_errors(errors)


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
            spec, cloned = _spec_and_template(request, spec)
            if cloned:
                template = _known_template(request, spec) or _keep_template(
                    request, spec, await templates.ensure(spec)
                )
                vm = AsyncVM(template.clone_spec())
                _remember(request, vm)
                await vm.start_from_template(template)
            else:
                vm = AsyncVM(spec)
                _remember(request, vm)
                await vm.start()
            started.append(vm)
            return vm

        yield start
        for vm in started:
            if (where := _keep_failed_dir(request, vm)) is not None:
                try:
                    await vm.save(where, portable=True)
                except PyqvmError as e:
                    _not_kept(request, vm, e)
                else:
                    _kept(request, vm, where)
        errors: list[BaseException] = []
        for vm in reversed(started):
            try:
                await vm.stop()
            except BaseException as e:  # stop the others first, then report
                _stop_failed(vm, e, errors)
        _raise_stop_errors(errors)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[_FAILED] = True  # for the fixtures' teardown: keep the VMs
    if report.when == "teardown" and (kept := item.stash.get(_KEPT, [])):
        # pytest shows a failed test's teardown sections (only those) with its failure.
        report.sections.append(("pyqvm failure snapshots (teardown)", "\n".join(kept)))
    if report.failed:
        for vm in item.stash.get(_VMS, []):
            tail = "\n".join(vm.console_text().splitlines()[-_CONSOLE_LINES:])
            report.sections.append((f"pyqvm {vm.name} console (last {_CONSOLE_LINES} lines)", tail))
            lines = vm.qmp_transcript()[-_QMP_LINES:]
            report.sections.append(
                (f"pyqvm {vm.name} QMP (last {len(lines)} messages)", "\n".join(lines))
            )
            if (saved := _save_screenshot(item, vm)) is not None:
                report.sections.append((f"pyqvm {vm.name} screen", f"last screenshot: {saved}"))
    return report


def _save_screenshot(item: pytest.Item, vm: VM | AsyncVM) -> Path | None:
    """The VM's last screenshot (if the test took one) as a PNG file for the report."""
    png = vm.last_screenshot
    if not png:
        return None
    directory = item.stash[_SHOTS]
    directory.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid).strip("_")[-120:]
    path = directory / f"{stem}-{vm.name}.png"
    path.write_bytes(png)
    return path
