"""The examples and the getting-started page, run as a user would run them.

Each runs in a fresh Python process (``sys.executable``) from the repository root,
against the built-in guest image the ``default_image`` fixture builds.

Python blocks in docs/getting-started.md that are immediately preceded by a line
``<!-- test -->`` are extracted and run as scripts; they must succeed (exit 0).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyqvm
from pyqvm import image

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
GETTING_STARTED = REPO / "docs" / "getting-started.md"
VM_TOML = REPO / "examples" / "vm.toml"
# One boot under TCG takes seconds; a whole script a few boots. Generous, but bounded.
TIMEOUT = 600

# A python fence right after a "<!-- test -->" line (blank lines allowed in between).
_RUNNABLE = re.compile(
    r"^<!-- test -->[ \t]*\n(?:[ \t]*\n)*```python\n(.*?)^```[ \t]*$", re.M | re.S
)


def runnable_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the fence, code) of each runnable python block in ``text``."""
    out = []
    for m in _RUNNABLE.finditer(text):
        line = text.count("\n", 0, m.start(1))  # the fence line, 1-based
        out.append((line, m.group(1)))
    return out


DOC_BLOCKS = runnable_blocks(GETTING_STARTED.read_text())


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` from the repository root with this interpreter's pyqvm importable."""
    env = dict(os.environ)
    src = str(Path(pyqvm.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return subprocess.run(
        argv,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def explain(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def test_ephemeral_vm_example(default_image: image.GuestImage) -> None:
    proc = run([sys.executable, "examples/ephemeral_vm.py"])
    assert proc.returncode == 0, explain(proc)
    lines = proc.stdout.splitlines()
    assert lines[-1] == "ok", explain(proc)
    assert any(re.fullmatch(r"uname -sr: exit 0: Linux \S+", line) for line in lines), explain(proc)
    assert "read back 36 bytes: 'written by examples/ephemeral_vm.py'" in lines, explain(proc)
    assert "query-status: running" in lines, explain(proc)
    assert "stopped: state stopped, runtime dir None" in lines, explain(proc)
    assert "problem:" not in proc.stderr


def test_reach_example(default_image: image.GuestImage) -> None:
    proc = run([sys.executable, "examples/reach.py"])
    assert proc.returncode == 0, explain(proc)
    lines = proc.stdout.splitlines()
    assert lines[-1] == "ok", explain(proc)
    assert "a pings b: exit 0" in lines, explain(proc)
    assert "over ssh: 'from the host'" in lines, explain(proc)


def test_vm_toml_loads_and_previews() -> None:
    spec = pyqvm.load_spec(VM_TOML)
    assert spec.image == "default"
    assert spec.memory == 768 and spec.smp == 2
    (net,) = spec.networks
    assert net.mode == "user"
    assert [(f.host_port, f.guest_port, f.protocol) for f in net.forwards] == [(10022, 22, "tcp")]


def test_vm_toml_cmdline(default_image: image.GuestImage) -> None:
    proc = run([sys.executable, "-m", "pyqvm", "cmdline", "examples/vm.toml", "--json"])
    assert proc.returncode == 0, explain(proc)
    argv = json.loads(proc.stdout)
    netdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-netdev"]
    assert netdevs == [
        {"id": "net0", "type": "user", "hostfwd": [{"str": "tcp:127.0.0.1:10022-:22"}]}
    ]
    pad = (
        8 if argv[argv.index("-accel") + 1] == "tcg" else 0
    )  # KiB more under TCG (docs/migration.md)
    assert argv[argv.index("-m") + 1] == f"{768 * 1024 + pad}K"
    assert argv[argv.index("-smp") + 1] == "2"
    assert str(default_image.initrd) == argv[argv.index("-initrd") + 1]


def test_vm_toml_runs(default_image: image.GuestImage) -> None:
    proc = run([sys.executable, "-m", "pyqvm", "run", "examples/vm.toml", "--", "uname", "-a"])
    assert proc.returncode == 0, explain(proc)
    assert proc.stdout.startswith("Linux "), explain(proc)


def test_cli_passes_output_and_exit_code(default_image: image.GuestImage) -> None:
    proc = run([sys.executable, "-m", "pyqvm", "run", "--", "sh", "-c", "echo hi; exit 7"])
    assert proc.returncode == 7, explain(proc)
    assert proc.stdout == "hi\n", explain(proc)


def test_getting_started_has_runnable_blocks() -> None:
    # The page promises its marked blocks are run; make sure the marker is still found.
    assert len(DOC_BLOCKS) >= 4, f"found {len(DOC_BLOCKS)} runnable blocks in {GETTING_STARTED}"


@pytest.mark.parametrize(
    "code", [code for _, code in DOC_BLOCKS], ids=[f"line{line}" for line, _ in DOC_BLOCKS]
)
def test_getting_started_block(code: str, default_image: image.GuestImage, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(code)
    proc = run([sys.executable, str(script)])
    assert proc.returncode == 0, f"{code}\n{explain(proc)}"
