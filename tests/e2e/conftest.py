"""e2e fixtures: the built-in guest images, built once (a no-op when already cached), and a
template of the default guest for tests that need a running guest but not a boot."""

from __future__ import annotations

import asyncio

import pytest

from pyqvm import Template, VMSpec, image, templates


@pytest.fixture(scope="session")
def default_image() -> image.GuestImage:
    return image.build("default")


@pytest.fixture(scope="session")
def full_image() -> image.GuestImage:
    return image.build("full")


@pytest.fixture(scope="session")
def default_template(
    default_image: image.GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Template:
    """A template of ``VMSpec(image="default")``, made once per session (a few seconds).

    A test whose subject is not the boot itself starts its VMs as clones of it
    (``AsyncVM.from_template(default_template)``, or ``start_from_template``
    for a VM made from ``default_template.clone_spec(name)``): ready in a
    fraction of a second instead of a cold boot.
    """
    where = tmp_path_factory.mktemp("templates")
    return asyncio.run(templates.ensure(VMSpec(image="default"), directory=where))
