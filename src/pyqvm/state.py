"""The states a VM goes through, and the one guard on them.

`Lifecycle` holds a VM's state as a value you can print; operations call
``require`` before they act (it raises `VMStateError` naming the state and
what was required) and ``move`` when they change it. It is the only place a
VM's state is kept.
"""

from __future__ import annotations

import enum
import logging

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
        """Change the state (operations do: a migration source is MIGRATING, then RUNNING...)."""
        if to is not self._state:
            log.debug("%s: %s -> %s", self._name, self._state.value, to.value)
        self._state = to

    def __repr__(self) -> str:
        return f"<Lifecycle {self._name!r} {self._state.value}>"
