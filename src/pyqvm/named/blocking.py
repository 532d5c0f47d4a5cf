"""`NamedVMBase`: the part of the blocking `pyqvm.NamedVM` written by hand.

Each call connects to the VM's owner, runs, and hangs up, on this thread's event loop
(`pyqvm.faces.loop.ThreadLoop`): a `NamedVM` holds no connection between calls, so it is
as cheap to keep as a name, and a VM that another process stopped meanwhile is reported
by the next call (`NamedVMError`). Its other methods are AsyncVM's, carried by `_op`, and
`AsyncNamedVM`'s own (`info`, `record`, `migrate`), each on a connection of its own
(`pyqvm.faces.derived_named` writes them all).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from pyqvm.faces.loop import ThreadLoop
from pyqvm.named import registry
from pyqvm.named.client import CONNECT_TIMEOUT, AsyncNamedVMBase
from pyqvm.named.ssh import Host
from pyqvm.spec import VMSpec

_T = TypeVar("_T")


class NamedVMBase:
    """A named VM (``pyqvm up``) from blocking code: a name, and a connection per call."""

    #: The async handle each call makes (`pyqvm.AsyncNamedVM`, set by the derived class).
    handle: ClassVar[type[AsyncNamedVMBase]] = AsyncNamedVMBase

    def __init__(
        self, name: str, *, timeout: float = CONNECT_TIMEOUT, host: str | Host | None = None
    ) -> None:
        self._name = name
        self.timeout = timeout
        #: Where the VM lives (None: this host); see `pyqvm.named.ssh`.
        self.host = None if host is None else host if isinstance(host, Host) else Host.parse(host)
        self._loop = ThreadLoop.current()

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def _do(self, fn: Callable[[AsyncNamedVMBase], Awaitable[_T]]) -> _T:
        async def go() -> _T:
            vm = await self.handle.attach(self.name, timeout=self.timeout, host=self.host)
            try:
                return await fn(vm)
            finally:
                await vm.close()

        return self._loop.run(go())

    def _op(self, operation: str, returns: object, /, **arguments: tuple[object, object]) -> Any:
        """`AsyncNamedVMBase._op` on a connection of its own."""
        return self._do(lambda vm: vm._op(operation, returns, **arguments))

    @classmethod
    def attach(
        cls, name: str, *, timeout: float = CONNECT_TIMEOUT, host: str | Host | None = None
    ) -> Self:
        """The running VM called ``name`` (on ``host``, ``ssh://[user@]HOST``); `NamedVMError`
        if there is none."""
        if host is None:
            registry.find(name)
            return cls(name, timeout=timeout)
        vm = cls(name, timeout=timeout, host=host)
        vm._do(lambda handle: handle.close())  # asks that host's registry, as here
        return vm

    @classmethod
    def up(
        cls,
        spec: VMSpec | None = None,
        *,
        name: str,
        template: str | None = None,
        templates_dir: Path | None = None,
        restore: Path | None = None,
        image_cache: Path | None = None,
        timeout: float = 600.0,
        host: str | Host | None = None,
    ) -> Self:
        """Start VM ``name`` in an owner process of its own (see `AsyncNamedVMBase.up`)."""

        async def go() -> None:
            vm = await cls.handle.up(
                spec,
                name=name,
                template=template,
                templates_dir=templates_dir,
                restore=restore,
                image_cache=image_cache,
                timeout=timeout,
                host=host,
            )
            await vm.close()

        ThreadLoop.current().run(go())
        return cls(name, host=host)


__all__ = ["NamedVMBase"]
