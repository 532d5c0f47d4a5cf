"""A first use builds the image it needs, as ``docker run`` pulls (issue 23): two commands
that need the same missing image at once build it once, the second waits and says so."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from _cli import PYQVM

pytestmark = [pytest.mark.e2e]


def test_two_runs_on_an_empty_cache_build_the_image_once(tmp_path: Path) -> None:
    env = {**os.environ, "PYQVM_CACHE_DIR": str(tmp_path / "cache")}
    run = [*PYQVM, "run", "--", "cat", "/proc/sys/kernel/osrelease"]
    first = subprocess.Popen(
        run, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        # Once the first fetches packages it holds the build lock: start the second then.
        assert first.stderr is not None
        deadline = time.monotonic() + 120
        while not any("fetching" in line and "packages" in line for line in lines):
            line = first.stderr.readline()
            assert line and time.monotonic() < deadline, "".join(lines)
            lines.append(line)
        second = subprocess.run(
            run, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=300, check=False,
        )  # fmt: skip
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
        first.wait()
    lines.append(err)
    assert first.returncode == 0, "".join(lines)
    assert second.returncode == 0, second.stderr
    assert out == second.stdout and out.strip().endswith("-cloud-amd64")
    # One image; the second waited for the first and said so, then built nothing.
    assert len(list((tmp_path / "cache" / "images").glob("default-*"))) == 1
    assert "another process is building the default image; waiting for it" in second.stderr
    assert "fetching" not in second.stderr and "built guest image" not in second.stderr
    # In a pipe the build says what it does in a few plain lines, no progress redraws.
    said = "".join(lines)
    assert "the default image is not built yet: building it once" in said
    assert "built guest image default" in said
    assert "\r" not in said and len(said.splitlines()) <= 15, said
