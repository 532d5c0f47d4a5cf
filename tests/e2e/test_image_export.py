"""An exported image carried to an empty cache boots the same guest (issue 23)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from _cli import PYQVM

pytestmark = [pytest.mark.e2e]


def test_export_delete_the_cache_import_boot_the_same_guest(tmp_path: Path) -> None:
    env = {**os.environ, "PYQVM_CACHE_DIR": str(tmp_path / "cache")}

    def pyqvm(*args: str) -> str:
        proc = subprocess.run(
            [*PYQVM, *args], env=env, capture_output=True, text=True, timeout=300, check=False,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    before = pyqvm("run", "--", "sh", "-c", "cat /proc/version; md5sum /sbin/pyqvm-wake")
    built = sorted(p.name for p in (tmp_path / "cache" / "images").iterdir())
    path, digest = pyqvm("image", "export", "default", "-o", str(tmp_path / "d.pqi")).split()
    assert path == str(tmp_path / "d.pqi") and digest.startswith("sha256:")
    shutil.rmtree(tmp_path / "cache")
    imported = pyqvm("image", "import", path, "--digest", digest)
    assert imported.strip().endswith(f"images/{built[0]}")
    assert sorted(p.name for p in (tmp_path / "cache" / "images").iterdir()) == built
    # The same guest: kernel build and pyqvm's own helper, byte for byte; nothing rebuilt.
    after = pyqvm("run", "--", "sh", "-c", "cat /proc/version; md5sum /sbin/pyqvm-wake")
    assert after == before
    assert not (tmp_path / "cache" / "downloads").exists()
