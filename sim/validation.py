"""Turning pydantic validation failures into one-line user errors (YAML problems: sim.yaml_input).

Every config in kvsim (device presets, experiment files) is a frozen pydantic v2 model with
``extra="forbid"``. A :class:`pydantic.ValidationError` lists every problem with a location tuple;
users get one line naming the first problem's dotted key and the offending value, e.g.
``device.flash.read_bandwidth_mb_s: Input should be greater than 0 (got -5)``.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

_MAX_SHOWN_CHARS = 60

#: The model config of every config model (experiments, device parameters): unknown keys are
#: errors, values are immutable, and every float must be finite (``.inf``, ``.nan`` or the
#: strings ``"inf"``/``"nan"`` would otherwise reach the results as Infinity or NaN).
STRICT_CONFIG = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _unwrap_optional(annotation: Any) -> Any:
    """``X`` of ``X | None`` (an optional block), else the annotation as it is."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return args[0] if len(args) == 1 and typing.get_args(annotation) else annotation


def _valid_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the (nested) model that owns the key at ``loc`` (the key itself excluded)."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _unwrap_optional(field.annotation)
    current = _unwrap_optional(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def pydantic_error_line(
    exc: ValidationError, where: str, model: type[BaseModel] | None = None
) -> str:
    """One line describing the first error of ``exc``: ``<where>.<dotted.key>: <message> (got X)``.

    ``where`` names the config being validated (``"device"``, a file path, ...). If ``model`` is
    given, an unknown key also lists the valid keys at that level. Further errors are counted,
    not shown, so the line stays short; fixing one at a time is the usual workflow.
    """
    errors = exc.errors()
    if not errors:  # pragma: no cover - pydantic never raises an empty ValidationError
        return f"{where}: invalid"
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    key = ".".join([where, *(str(p) for p in loc)]) if where else ".".join(str(p) for p in loc)
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    got = ""
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
        valid = _valid_keys(model, loc) if loc else None
        if valid:
            msg += f" (valid: {', '.join(valid)})"
    elif err.get("type") != "missing" and "input" in err:
        shown = repr(err["input"])
        if len(shown) > _MAX_SHOWN_CHARS:
            shown = shown[: _MAX_SHOWN_CHARS - 3] + "..."
        got = f" (got {shown})"
    more = f" [+{len(errors) - 1} more error(s)]" if len(errors) > 1 else ""
    return f"{key or '(top level)'}: {msg}{got}{more}"
