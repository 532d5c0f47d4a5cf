"""The modes `pyqvm doctor` checks a host for (apart, so the CLI can offer them cheaply)."""

from __future__ import annotations

from typing import Literal

Mode = Literal["tcg", "kvm", "vfio", "xen"]
MODES: tuple[Mode, ...] = ("tcg", "kvm", "vfio", "xen")

__all__ = ["MODES", "Mode"]
