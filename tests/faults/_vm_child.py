"""Helper for test_vm_killed: start a paused VM through the sync facade, report, then idle.

``_vm_child.py [SHARE_DIR]``: with a directory, the VM shares it over virtiofs (a virtiofsd
of pyqvm's own runs beside QEMU). Prints one JSON line ``{"pid": ..., "rundir": ...}`` and
sleeps until killed (at most 120 s).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from pyqvm import VM, Share, VMSpec


def main() -> int:
    shares = tuple(Share(host=Path(p), transport="virtiofs") for p in sys.argv[1:])
    spec = VMSpec(
        name="orphan-check", guest_agent=False, ready="none", extra_args=("-S",), shares=shares
    )
    vm = VM(spec)
    vm.start()
    print(json.dumps({"pid": vm.pid, "rundir": str(vm.runtime_dir)}), flush=True)
    time.sleep(120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
