"""A phone: flash + DRAM + compute parameters, loaded from a preset YAML with overrides.

Presets live in ``configs/devices/<name>.yaml`` (``$KVSIM_CONFIGS/devices`` if that variable is
set). Every number in a preset carries a comment giving its source or derivation.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from sim.dotted import NotASection, is_dotted_key, set_dotted
from sim.errors import ConfigError
from sim.hardware.compute import ComputeParams
from sim.hardware.dram import DramParams
from sim.hardware.flash import FlashParams
from sim.paths import CONFIGS_DIR
from sim.validation import STRICT_CONFIG, pydantic_error_line
from sim.yaml_input import read_yaml

DEVICE_PRESETS_DIR = CONFIGS_DIR / "devices"
DEFAULT_PRESET = "ufs40-flagship"  # an experiment's device when it names none
_MAX_PRESET_NESTING = 8


class DeviceParams(BaseModel):
    """One simulated phone: ``name``, ``description``, ``flash``, ``dram``, ``compute``."""

    model_config = STRICT_CONFIG

    name: str
    description: str = ""
    flash: FlashParams
    dram: DramParams
    compute: ComputeParams


def preset_names(presets_dir: Path | None = None) -> list[str]:
    """Names of the device presets available (file stems in the presets directory)."""
    directory = Path(presets_dir) if presets_dir is not None else DEVICE_PRESETS_DIR
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_device(
    spec: str | Path | Mapping[str, Any] | DeviceParams,
    overrides: Mapping[str, Any] | None = None,
    presets_dir: Path | None = None,
) -> DeviceParams:
    """Build and validate a :class:`DeviceParams`.

    ``spec`` is one of:

    - a preset name (``"ufs40-flagship"`` -> ``<presets_dir>/ufs40-flagship.yaml``);
    - a path to a YAML file (anything containing ``/`` or ending in ``.yaml``/``.yml``);
    - a mapping: ``{"preset": name, "flash": {"queue_depth": 16}, ...}`` deep-merges the nested
      keys over the preset; a mapping without ``preset`` is a complete device;
    - a :class:`DeviceParams` (only ``overrides`` are applied).

    A YAML file may itself start from a preset with a ``preset:`` key. ``overrides`` maps dotted
    keys to values (``{"flash.read_bandwidth_mb_s": 2100}``) and is applied last.

    Raises :class:`ConfigError` with one line naming the key or file for: unknown preset (lists
    the valid names), missing file, malformed YAML, unknown key, wrong type, impossible value.
    """
    directory = Path(presets_dir) if presets_dir is not None else DEVICE_PRESETS_DIR
    if isinstance(spec, DeviceParams):
        data, source = spec.model_dump(), f"{spec.name!r}"
    else:
        data, source = _resolve(spec, directory, depth=0)
    for key, value in (overrides or {}).items():
        _set_override(data, key, value)
    if overrides:
        source += " with overrides"
    try:
        return DeviceParams.model_validate(data)
    except ValidationError as exc:
        line = pydantic_error_line(exc, "device", DeviceParams)
        raise ConfigError(f"{line} [device {source}]") from None


def _resolve(spec: Any, directory: Path, depth: int) -> tuple[dict[str, Any], str]:
    """``spec`` -> (plain nested dict, description of where it came from)."""
    if depth > _MAX_PRESET_NESTING:
        raise ConfigError(f"device: presets nest more than {_MAX_PRESET_NESTING} deep (a cycle?)")
    if isinstance(spec, (str, Path)):
        path, is_preset = _preset_path(spec, directory)
        where = f"preset {path.stem!r}" if is_preset else f"file {path}"
        data = read_yaml(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of device settings at the top level")
        data.setdefault("name", path.stem)
        if "preset" in data:
            merged, _ = _resolve(data, directory, depth + 1)
            return merged, where
        return data, where
    if isinstance(spec, Mapping):
        spec = copy.deepcopy(dict(spec))
        if "preset" not in spec:
            return spec, "given inline"
        base_name = spec.pop("preset")
        if not isinstance(base_name, (str, Path)):
            raise ConfigError(f"device.preset: expected a preset name, got {base_name!r}")
        base, base_source = _resolve(base_name, directory, depth + 1)
        return _deep_merge(base, spec), f"{base_source} with inline changes"
    raise ConfigError(
        f"device: expected a preset name, a YAML path or a mapping, got {type(spec).__name__}"
    )


def is_device_file(spec: str | Path) -> bool:
    """Whether ``spec`` names a YAML file (a path, or a name ending in ``.yaml``/``.yml``)
    rather than a preset of the presets directory."""
    text = str(spec)
    return isinstance(spec, Path) or "/" in text or text.endswith((".yaml", ".yml"))


def _preset_path(spec: str | Path, directory: Path) -> tuple[Path, bool]:
    """The YAML file ``spec`` names, and whether it was a preset name (not a path)."""
    text = str(spec)
    if is_device_file(spec):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"device: no such file {text!r}")
        return path, False
    path = directory / f"{text}.yaml"
    if not path.is_file():
        valid = ", ".join(preset_names(directory)) or f"(none in {directory})"
        raise ConfigError(f"device: unknown preset {text!r}; valid: {valid}")
    return path, True


def _deep_merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` laid over it, recursing into sections present in both."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _set_override(data: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``"a.b"``; unknown keys are left for pydantic to name."""
    if not is_dotted_key(dotted_key):
        raise ConfigError(f"device override {dotted_key!r}: expected a dotted key like flash.x")
    try:
        set_dotted(data, dotted_key, value)
    except NotASection as exc:
        walked = ".".join(["device", *exc.parts])
        raise ConfigError(
            f"device override {dotted_key!r}: {walked} is a value, not a section"
        ) from None
