"""The benches whose baseline runs a pyqvm argv by hand, run once each as a user would.

Their by-hand side copies a launch's argv and must hand QEMU every socket it names; when
pyqvm gains one (pyqvm-wake's port did), that side breaks while pyqvm's own still works.
One round each, and the result line is read; the figures themselves are not judged here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pyqvm import image

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
RESULT = re.compile(r"^result: (\S+) pyqvm=([0-9.]+) baseline=([0-9.]+) ratio=([0-9.]+)", re.M)


@pytest.mark.parametrize(("script", "name"), [("boot.py", "boot"), ("clone.py", "clone")])
def test_a_by_hand_bench_runs_its_baseline(
    default_image: image.GuestImage, script: str, name: str
) -> None:
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "-n", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = RESULT.search(r.stdout)
    assert m is not None, r.stdout[-2000:]
    assert m.group(1) == name
    pyqvm_s, baseline_s = float(m.group(2)), float(m.group(3))
    assert pyqvm_s > 0 and baseline_s > 0, m.group(0)
