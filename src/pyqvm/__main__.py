"""``python -m pyqvm``."""

import sys

from pyqvm.cli import main

sys.exit(main())
