"""`Lifecycle`: the one guard on a VM's state accepts only the moves of its table."""

from __future__ import annotations

import pytest

from pyqvm.errors import VMStateError
from pyqvm.state import TRANSITIONS, Lifecycle, VMState


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
