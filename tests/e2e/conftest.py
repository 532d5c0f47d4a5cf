"""e2e fixtures: the built-in guest images, built once (a no-op when already cached)."""

from __future__ import annotations

import pytest

from pyqvm import image


@pytest.fixture(scope="session")
def default_image() -> image.GuestImage:
    return image.build("default")


@pytest.fixture(scope="session")
def full_image() -> image.GuestImage:
    return image.build("full")
