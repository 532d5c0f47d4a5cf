"""`Lifecycle`: the one guard on a VM's state accepts only the moves of its table."""

from __future__ import annotations

import pytest

from pyqvm.errors import (
    OperationError,
    PyqvmError,
    PyqvmTimeoutError,
    SnapshotError,
    VMStateError,
)
from pyqvm.ops import migration
from pyqvm.spec import VMSpec
from pyqvm.state import TRANSITIONS, Lifecycle, VMState
from pyqvm.vm import AsyncVM


def at(state: VMState) -> Lifecycle:
    """A lifecycle brought to ``state`` by moves of the table (a shortest path)."""
    paths: dict[VMState, list[VMState]] = {VMState.CREATED: []}
    todo = [VMState.CREATED]
    while todo:
        here = todo.pop(0)
        for nxt in sorted(TRANSITIONS[here], key=lambda s: s.value):
            if nxt not in paths:
                paths[nxt] = [*paths[here], nxt]
                todo.append(nxt)
    life = Lifecycle("t")
    for step in paths[state]:
        life.move(step)
    assert life.state is state
    return life


def test_every_state_is_in_the_table_and_reachable() -> None:
    assert set(TRANSITIONS) == set(VMState)
    for state in VMState:
        at(state)


@pytest.mark.parametrize("start", list(VMState), ids=lambda s: s.value)
def test_a_move_is_accepted_exactly_when_the_table_has_it(start: VMState) -> None:
    for to in VMState:
        life = at(start)
        if to is start or to in TRANSITIONS[start]:
            life.move(to)
            assert life.state is to
        else:
            with pytest.raises(VMStateError) as e:
                life.move(to)
            assert f"no move from {start.value} to {to.value}" in str(e.value)
            assert e.value.state is start and set(e.value.required) == TRANSITIONS[start]
            assert life.state is start  # a refused move changes nothing


def test_the_moves_a_vm_makes_are_in_the_table() -> None:
    life = Lifecycle("vm")
    for step in ("starting", "running", "paused", "migrating", "running", "stopping",
                 "stopped", "stopping", "stopped"):  # fmt: skip
        life.move(VMState(step))
    with pytest.raises(VMStateError, match="no move from stopped to running"):
        life.move(VMState.RUNNING)  # a stopped VM is never started again


# -- the operations' one error boundary (pyqvm.vm) ---------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (OSError(28, "No space left on device"), OperationError),
        (PermissionError(13, "Permission denied"), OperationError),
        (TimeoutError(), PyqvmTimeoutError),
        (SnapshotError("kept as it is"), SnapshotError),
    ],
)
async def test_every_operation_fails_with_the_pyqvm_family_and_keeps_the_cause(
    raised: BaseException, expected: type[PyqvmError], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def save(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(migration, "save", save)
    vm = AsyncVM(VMSpec(name="eb"))
    with pytest.raises(expected) as e:
        await vm.save("/nonexistent/dir")
    assert ("eb" in str(e.value) and "save" in str(e.value)) or e.value is raised
    assert e.value is raised or e.value.__cause__ is raised


def test_the_boundary_keeps_each_operations_signature_and_docstring() -> None:
    import inspect

    assert inspect.iscoroutinefunction(AsyncVM.save)
    assert list(inspect.signature(AsyncVM.save).parameters)[:2] == ["self", "directory"]
    assert AsyncVM.save.__doc__ and "Save the guest's state" in AsyncVM.save.__doc__
