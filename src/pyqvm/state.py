"""The states a VM goes through; a value you can print, guarded by `AsyncVM` methods."""

from __future__ import annotations

import enum


class VMState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    INMIGRATE = "inmigrate"  # a migration destination waiting for (or receiving) the guest
    RUNNING = "running"
    PAUSED = "paused"
    MIGRATING = "migrating"  # the source of an outgoing migration
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
