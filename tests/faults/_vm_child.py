"""Helper for test_vm_killed: start a paused VM through the sync facade, report, then idle.

Prints one JSON line ``{"pid": ..., "rundir": ...}`` and sleeps until killed (at most 120 s).
"""

from __future__ import annotations

import json
import sys
import time

from pyqvm import VM, VMSpec


def main() -> int:
    vm = VM(VMSpec(name="orphan-check", guest_agent=False, ready="none", extra_args=("-S",)))
    vm.start()
    print(json.dumps({"pid": vm.pid, "rundir": str(vm.runtime_dir)}), flush=True)
    time.sleep(120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
