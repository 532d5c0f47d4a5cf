"""The ``pyqvm`` command as the e2e tests run it, and a registry of a test's own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fixtures.sshhost import SshHost

PYQVM = [sys.executable, "-m", "pyqvm"]


def pyqvm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One ``pyqvm`` command, stdin closed, its output as text."""
    return subprocess.run(
        [*PYQVM, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def go_there(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SshHost | None:
    """For a fixture parametrized ``["here", "ssh"]``: nothing here; over SSH, the namespace
    host of `fixtures.sshhost`, with PYQVM_HOST set so that every command goes there."""
    if request.param == "here":
        return None
    there: SshHost = request.getfixturevalue("remote_env")
    monkeypatch.setenv("PYQVM_HOST", there.url)
    return there


@contextmanager
def own_registry(monkeypatch: pytest.MonkeyPatch, prefix: str) -> Iterator[Path]:
    """A runtime dir of the test's own (short: sockets live in it); its named VMs are
    stopped at the end, whatever happened."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    monkeypatch.setenv("PYQVM_RUNTIME_DIR", str(d))
    try:
        yield d
    finally:
        pyqvm("stop", "--all", "--force", timeout=60)
        shutil.rmtree(d, ignore_errors=True)
