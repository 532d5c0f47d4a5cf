"""spec -> ``qemu-system-*`` argv: pure functions, no I/O."""

from pyqvm.argv.build import LaunchContext, RamFile, build_argv
from pyqvm.argv.devices import DiskFile
from pyqvm.argv.escape import escape, opts, qjson

__all__ = ["DiskFile", "LaunchContext", "RamFile", "build_argv", "escape", "opts", "qjson"]
