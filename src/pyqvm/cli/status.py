"""Exit statuses of the commands that run something in a guest (``run``, ``exec``).

As ``ssh`` and ``docker exec`` do: the command's own code; 128+N when a signal N
killed it; 126 when it exists but cannot be executed, 127 when it is not found
(the guest agent says so in its error); 125 for pyqvm's own failures; 2 for a
usage error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyqvm.errors import GuestCommandError, PyqvmError

if TYPE_CHECKING:
    from pyqvm.channels.agent import ExecResult

EXIT_USAGE = 2  # argparse's own
EXIT_ERROR = 125  # pyqvm itself failed
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
EXIT_INTERRUPTED = 130


def of_result(result: ExecResult) -> int:
    """The exit status that stands for ``result``."""
    return 128 + result.signal if result.signal is not None else result.returncode


def of_error(error: PyqvmError) -> int:
    """The exit status for a command that did not run: 126/127 when the guest could not
    execute it, else 125."""
    if isinstance(error, GuestCommandError) and error.command == "guest-exec":
        # qemu-ga's words: "Failed to execute child process “x” (No such file or directory)"
        if "(No such file or directory)" in error.description:
            return EXIT_NOT_FOUND
        if "(Permission denied)" in error.description or "(Exec format error)" in error.description:
            return EXIT_CANNOT_EXECUTE
    return EXIT_ERROR


__all__ = [
    "EXIT_CANNOT_EXECUTE",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_USAGE",
    "of_error",
    "of_result",
]
