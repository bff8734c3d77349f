"""Name -> class registries for the pluggable parts (policies, layouts, cache replacement).

A YAML spec picks a member with ``type:`` and passes every other key to the constructor, so a
misspelt parameter fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from sim.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes of one family; raises on duplicates and unknown names."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._members: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in self._members:
                raise ValueError(f"duplicate {self.family} name {name!r}")
            self._members[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return decorator

    def names(self) -> list[str]:
        return sorted(self._members)

    def get(self, name: str) -> type[T]:
        try:
            return self._members[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.family} {name!r}; valid: {', '.join(self.names())}"
            ) from None

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
