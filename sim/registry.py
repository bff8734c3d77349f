"""Name -> class registries for the pluggable parts (policies, layouts, cache replacement,
figures).

A YAML spec picks a member with ``type:`` and passes every other key to the constructor, so a
misspelt parameter fails loudly instead of being ignored.

Discovery, the one rule for every family: a registry is bound to a package and its members are
the classes that the package's modules register with ``@REGISTRY.register("name")``. The first
call of :meth:`Registry.names`, :meth:`~Registry.get`, :meth:`~Registry.create` or
:meth:`~Registry.parameters` imports every module of the package (its direct modules and
subpackages as ``pkgutil.iter_modules`` lists them, in sorted order), so adding a member is adding
one module: no list to edit, and importing the package (or the module that defines the registry)
loads no member.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from sim.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes of one family; raises on duplicates and unknown names.

    ``package``: dotted name of the package whose modules define the members (discovered on
    first use, see the module docstring); ``None``: only what is registered explicitly.
    Discovery holds a lock, so threads that look members up at the same time (the policy
    passes' thread pool) all see the complete registry; a module that fails to import fails
    the lookup and is retried at the next one.
    """

    def __init__(self, family: str, package: str | None = None) -> None:
        self.family = family
        self.package = package
        self._members: dict[str, type[T]] = {}
        self._discovered = package is None
        self._discovering = False
        # Re-entrant: a member module that looks the registry up while it is being imported
        # (same thread) sees the members registered so far instead of deadlocking.
        self._lock = threading.RLock()

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in self._members:
                raise ValueError(f"duplicate {self.family} name {name!r}")
            self._members[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def discover(self) -> None:
        """Import every module of :attr:`package` once (sorted by name); idempotent."""
        if self._discovered:
            return
        with self._lock:
            if self._discovered or self._discovering:
                return
            self._discovering = True
            try:
                for module in self.member_modules():
                    importlib.import_module(module)
                self._discovered = True
            finally:
                self._discovering = False

    def member_modules(self) -> list[str]:
        """Dotted names of the modules discovery imports (sorted; empty without a package).

        Every module is imported, helpers and the one defining the registry included:
        importing an already imported module is a no-op, and a helper registers nothing.
        """
        if self.package is None:
            return []
        package = importlib.import_module(self.package)
        return sorted(
            f"{self.package}.{info.name}" for info in pkgutil.iter_modules(package.__path__)
        )

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._members)

    def get(self, name: str) -> type[T]:
        self.discover()
        member = self._members.get(name) if isinstance(name, str) else None
        if member is None:
            raise ConfigError(f"unknown {self.family} {name!r}; valid: {', '.join(self.names())}")
        return member

    def parameters(self, name: str) -> list[str]:
        cls = self.get(name)
        if dataclasses.is_dataclass(cls):
            return [f.name for f in dataclasses.fields(cls) if f.init]
        return [p for p in inspect.signature(cls).parameters if p != "self"]

    def create(self, spec: Mapping[str, Any] | str, where: str | None = None) -> T:
        """Build a member from ``{"type": name, **params}`` (or just a name)."""
        where = where or self.family
        if isinstance(spec, str):
            spec = {"type": spec}
        if not isinstance(spec, Mapping) or "type" not in spec:
            raise ConfigError(f"{where}: expected a mapping with a 'type' key, got {spec!r}")
        params = {k: v for k, v in spec.items() if k != "type"}
        name = spec["type"]
        try:
            cls = self.get(name)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        allowed = self.parameters(name)
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{where}: unknown parameter(s) {', '.join(unknown)} for {self.family} {name!r};"
                f" valid: {', '.join(allowed) or '(none)'}"
            )
        try:
            return cls(**params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where} ({name}): {exc}") from None
