"""Parameter sweeps: expand an experiment's ``sweep:`` block into concrete config points.

A sweep names config keys by dotted path and gives each a list of values::

    sweep:
      grid:                       # every combination (product) of these axes
        policy.budget: [0.02, 0.05, 0.1]
        device: [ufs31-phone, ufs40-flagship]
      zip:                        # these axes advance together (equal lengths) ...
        cache.capacity: [0.05, 0.1]
        cache.replacement: [lru, belady]
                                  # ... and combine with the grid as one more product axis

Paths address the experiment YAML itself, with two conveniences:

- ``policy.<param>`` sets ``<param>`` on every policy entry whose type has that parameter
  (``full`` has no budget, so ``policy.budget`` leaves it alone); ``policies.<label>.<param>``
  sets it on one entry, named by its ``label`` (default: its ``type``).
- ``device.<section>.<key>`` overrides one number of the device preset
  (``device.flash.read_bandwidth_mb_s``); ``device`` alone swaps the preset.

Points are validated like hand-written configs (see :mod:`sim.experiment.planning`), so a grid
over a key that does not exist fails with the same one-line error as a misspelt key would.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from typing import Any

from sim.config import SweepSpec
from sim.dotted import NotASection, set_dotted
from sim.errors import ConfigError
from sim.hardware.device import DEFAULT_PRESET
from sim.policies import POLICIES

# keys of a policy entry that are not policy parameters: its label, its flash layout, and its
# own cache / pipeline settings (merged over the experiment-wide ones)
RUN_KEYS = ("label", "layout", "cache", "pipeline")
#: most points a sweep may have: each is at least one run of seconds to minutes, so more is
#: days of work and almost surely a mistake (a grid's axes multiply; expanding 10**8 points
#: alone would exhaust memory)
MAX_POINTS = 10_000


def expand(sweep: SweepSpec | None, where: str = "sweep") -> list[dict[str, Any]]:
    """The sweep's points, each a ``{dotted key: value}`` mapping, in a stable order (grid axes
    vary slowest-first in the order written, the zipped axes last). No sweep: one empty point."""
    if sweep is None:
        return [{}]
    if not sweep.grid and not sweep.zip:
        raise ConfigError(f"{where}: empty sweep; give 'grid' and/or 'zip' axes")
    for section, axes in (("grid", sweep.grid), ("zip", sweep.zip)):
        for key, values in axes.items():
            if not values:
                raise ConfigError(f"{where}.{section}.{key}: empty list of values")
            if not key or any(not part for part in key.split(".")):
                raise ConfigError(f"{where}.{section}: malformed key {key!r}")
            if section == "grid":
                _check_distinct([[value] for value in values], f"{where}.grid.{key}")
    overlap = sorted(set(sweep.grid) & set(sweep.zip))
    if overlap:
        raise ConfigError(f"{where}: {', '.join(overlap)} is both a grid and a zip axis")
    lengths = {key: len(values) for key, values in sweep.zip.items()}
    if len(set(lengths.values())) > 1:
        shown = ", ".join(f"{key} has {n}" for key, n in lengths.items())
        raise ConfigError(f"{where}.zip: axes must have equal lengths ({shown})")
    n_points = math.prod(len(values) for values in sweep.grid.values()) * max(
        lengths.values(), default=1
    )
    if n_points > MAX_POINTS:
        raise ConfigError(
            f"{where}: {n_points} points is more than {MAX_POINTS}; split the experiment"
        )
    zipped: list[dict[str, Any]] = [{}]
    if sweep.zip:
        rows = [list(row) for row in zip(*sweep.zip.values(), strict=True)]
        _check_distinct(rows, f"{where}.zip")
        zipped = [dict(zip(sweep.zip, row, strict=True)) for row in rows]
    points = []
    for combo in itertools.product(*sweep.grid.values()):
        for row in zipped:
            points.append({**dict(zip(sweep.grid, combo, strict=True)), **row})
    return points


def _check_distinct(rows: list[list[Any]], where: str) -> None:
    seen: set[str] = set()
    for row in rows:
        text = json.dumps(row, sort_keys=True, default=str)
        if text in seen:
            shown = row[0] if len(row) == 1 else row
            raise ConfigError(f"{where}: value {shown!r} is listed twice")
        seen.add(text)


def apply_point(config: dict[str, Any], point: dict[str, Any], where: str) -> dict[str, Any]:
    """A deep copy of the raw experiment ``config`` with the point's values set."""
    data = copy.deepcopy(config)
    data.pop("sweep", None)
    for key, value in point.items():
        _set(data, key, copy.deepcopy(value), f"{where}: sweep key {key!r}")
    return data


def _set(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    head, _, rest = key.partition(".")
    if head == "policy" and rest:
        _set_on_policies(data, rest, value, where)
    elif head == "policies" and rest:
        label, _, param = rest.partition(".")
        entries = [e for e in _policy_entries(data, where) if _label(e) == label]
        if not entries:
            labels = ", ".join(_label(e) for e in _policy_entries(data, where))
            raise ConfigError(f"{where}: no policy labelled {label!r}; labels: {labels}")
        if not param:
            raise ConfigError(f"{where}: name a parameter, e.g. policies.{label}.budget")
        _set_nested(entries[0], param, value, where)
    elif head == "device" and rest and isinstance(data.get("device", DEFAULT_PRESET), str):
        # a preset name becomes a preset with overrides
        data["device"] = {"preset": data.get("device", DEFAULT_PRESET)}
        _set_nested(data["device"], rest, value, where)
    else:
        _set_nested(data, key, value, where)


def _policy_entries(data: dict[str, Any], where: str) -> list[dict[str, Any]]:
    entries = data.get("policies")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"{where}: the experiment's 'policies' must be a list of mappings")
    return entries


def _label(entry: dict[str, Any]) -> str:
    return str(entry.get("label", entry.get("type")))


def _set_on_policies(data: dict[str, Any], param: str, value: Any, where: str) -> None:
    name = param.split(".")[0]
    hit = False
    for entry in _policy_entries(data, where):
        accepts = name in RUN_KEYS
        if not accepts and isinstance(entry.get("type"), str):
            try:
                accepts = name in POLICIES.parameters(entry["type"])
            except ConfigError:
                accepts = False  # unknown type: reported when the point is validated
        if accepts:
            _set_nested(entry, param, value, where)
            hit = True
    if not hit:
        types = ", ".join(sorted({str(e.get("type")) for e in _policy_entries(data, where)}))
        raise ConfigError(f"{where}: no policy of this experiment ({types}) has parameter {name!r}")


def _set_nested(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    try:
        set_dotted(data, key, value)
    except NotASection as exc:
        raise ConfigError(
            f"{where}: {exc.parts[-1]!r} holds {exc.found!r}, not a mapping of settings"
        ) from None


def describe_point(point: dict[str, Any]) -> str:
    """``policy.budget=0.05, device=ufs31-phone`` (empty point: ``base``)."""
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "base"
