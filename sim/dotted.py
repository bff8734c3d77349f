"""Dotted keys (``flash.queue_depth``) into nested settings mappings.

Sweep axes and device overrides both name a setting by its path through the YAML's mappings;
this is the one place that walks such a path. Callers turn its errors into their own one-line
messages (they know what the mapping is: an experiment, a device).
"""

from __future__ import annotations

from typing import Any


class NotASection(ValueError):
    """A part of a dotted key holds a value where a mapping of settings was needed.

    ``parts``: the key's parts up to and including that one; ``found``: what it holds.
    """

    def __init__(self, parts: list[str], found: Any) -> None:
        super().__init__(f"{'.'.join(parts)} holds {found!r}, not a mapping of settings")
        self.parts = parts
        self.found = found


def is_dotted_key(key: Any) -> bool:
    """``key`` is a non-empty string of non-empty parts separated by dots."""
    return isinstance(key, str) and bool(key) and "" not in key.split(".")


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``"a.b"``, creating missing sections; raises
    :class:`NotASection` if a section on the way is a value. Unknown keys are set like any other:
    validating the result (pydantic) names them."""
    *sections, last = key.split(".")
    node = data
    for depth, section in enumerate(sections):
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise NotASection(sections[: depth + 1], child)
        node = child
    node[last] = value
