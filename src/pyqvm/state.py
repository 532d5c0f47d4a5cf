"""The states a VM goes through, and the one guard on them.

`Lifecycle` holds a VM's state as a value you can print; operations call
``require`` before they act (it raises `VMStateError` naming the state and
what was required) and ``move`` when they change it, which accepts only the
moves in `TRANSITIONS`: any other is a bug in pyqvm, raised at once rather than
found later as a VM in a state nothing expects. It is the only place a VM's
state is kept.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping

from pyqvm.errors import VMStateError

log = logging.getLogger(__name__)


class VMState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    INMIGRATE = "inmigrate"  # a migration destination waiting for (or receiving) the guest
    RUNNING = "running"
    PAUSED = "paused"
    MIGRATING = "migrating"  # the source of an outgoing migration
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


#: QEMU is up and answers: operations that talk to it need one of these.
LIVE = (VMState.RUNNING, VMState.PAUSED)

_S = VMState
#: Every move a VM may make (staying in a state is always allowed). A stop can come in
#: any state, and a second stop (or a kill) cleans up again, so STOPPED -> STOPPING.
TRANSITIONS: Mapping[VMState, frozenset[VMState]] = {
    _S.CREATED: frozenset({_S.STARTING, _S.STOPPING, _S.STOPPED}),
    _S.STARTING: frozenset({_S.RUNNING, _S.INMIGRATE, _S.FAILED, _S.STOPPING}),
    # A destination runs the guest once it has arrived (paused, if it left paused).
    _S.INMIGRATE: frozenset({_S.RUNNING, _S.PAUSED, _S.FAILED, _S.STOPPING}),
    _S.RUNNING: frozenset({_S.PAUSED, _S.MIGRATING, _S.FAILED, _S.STOPPING}),
    _S.PAUSED: frozenset({_S.RUNNING, _S.MIGRATING, _S.FAILED, _S.STOPPING}),
    # The source of a migration or a save: back to running or paused when it fails or
    # the guest stays here, stopped when it moved.
    _S.MIGRATING: frozenset({_S.RUNNING, _S.PAUSED, _S.FAILED, _S.STOPPING}),
    _S.STOPPING: frozenset({_S.STOPPED, _S.FAILED}),
    _S.STOPPED: frozenset({_S.STOPPING}),
    _S.FAILED: frozenset({_S.STOPPING, _S.STOPPED}),
}


class Lifecycle:
    """The state of one VM, with its guard."""

    __slots__ = ("_name", "_state")

    def __init__(self, name: str) -> None:
        self._name = name
        self._state = VMState.CREATED

    @property
    def state(self) -> VMState:
        return self._state

    def require(self, *states: VMState, what: str = "this") -> None:
        """Raise `VMStateError` unless the state is one of ``states``.

        ``what`` names the operation in the message: "VM 'a' is created;
        hot-plugging a disk needs it running or paused".
        """
        if self._state not in states:
            wanted = " or ".join(s.value for s in states)
            raise VMStateError(
                f"VM {self._name!r} is {self._state.value}; {what} needs it {wanted}",
                state=self._state,
                required=states,
            )

    def move(self, to: VMState) -> None:
        """Change the state (operations do: a migration source is MIGRATING, then RUNNING...).

        Raises `VMStateError` for a move `TRANSITIONS` does not have: a bug in pyqvm.
        """
        if to is self._state:
            return
        allowed = TRANSITIONS[self._state]
        if to not in allowed:
            raise VMStateError(
                f"VM {self._name!r}: no move from {self._state.value} to {to.value} "
                "(a bug in pyqvm; please report it)",
                state=self._state,
                required=tuple(allowed),
            )
        log.debug("%s: %s -> %s", self._name, self._state.value, to.value)
        self._state = to

    def __repr__(self) -> str:
        return f"<Lifecycle {self._name!r} {self._state.value}>"
