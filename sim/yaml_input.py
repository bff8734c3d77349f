"""Reading the YAML files users write (experiments, device presets, model geometries): one
strict, bounded loader, and every problem as one line naming the file and where.

On top of YAML's safe subset (:class:`yaml.SafeLoader`, libyaml's when installed):

* **text only**: a regular file of at most :data:`MAX_YAML_BYTES` of UTF-8 without NUL bytes;
  a binary file, another encoding, a directory, a device or a huge file is refused before it
  is parsed;
* **no silent overrides**: a key given twice in one mapping is an error naming the key and both
  lines (YAML 1.2 forbids it; PyYAML keeps the last value). Merge keys (``<<: *base``) still
  work: keys written beside them override the merged ones, as YAML's merge type says;
* **bounded aliases**: the document's aliases may expand it to at most
  :data:`MAX_EXPANDED_VALUES` values and :data:`MAX_DEPTH` levels of nesting, so a "billion
  laughs" file (nested aliases that expand exponentially) fails in milliseconds instead of
  exhausting memory in whatever copies, prints or validates it later; a recursive alias is
  refused too;
* **finite numbers**: ``.inf``, ``.nan`` and a float that overflows to infinity (``1e400``) are
  errors at the line that holds them, and integers must fit in 64 bits (no setting needs more,
  and numpy and float arithmetic fail on larger ones);
* **plain data**: mappings, lists, strings, numbers, booleans and null. A date-like scalar is
  read as a string; ``!!binary``, ``!!set``, ``!!omap`` and ``!!pairs`` are refused.
"""

from __future__ import annotations

import math
import stat
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from sim.errors import ConfigError

#: largest file read: 256 KiB, over 30x the largest experiment in experiments/ (a sweep list
#: long enough to need more would plan more runs than anyone can wait for)
MAX_YAML_BYTES = 256 * 1024
#: values a document may hold once every alias is expanded (each scalar, list and mapping is
#: one value): a 256 KiB file without aliases holds fewer
MAX_EXPANDED_VALUES = 100_000
#: nesting levels (an experiment needs about 6: sweep.grid.key.[list].{mapping}.value)
MAX_DEPTH = 64
_INT64 = 2**63
_MERGE_TAG = "tag:yaml.org,2002:merge"

_Base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _error(problem: str, node: Node) -> ConstructorError:
    return ConstructorError(None, None, problem, node.start_mark)


def _construct_float(loader: SafeConstructor, node: Node) -> float:
    value = SafeConstructor.construct_yaml_float(loader, node)
    if not math.isfinite(value):
        raise _error(f"{node.value} is not a finite number (every number must be finite)", node)
    return value


def _construct_int(loader: SafeConstructor, node: Node) -> int:
    text = str(node.value).replace("_", "").lstrip("+-")
    # 2**63 has 19 digits (64 in binary); longer literals are refused before conversion, which
    # Python limits to 4300 digits anyway
    if len(text) > 70:
        raise _error(f"integer of {len(text)} digits is out of range (|n| < 2**63)", node)
    value = SafeConstructor.construct_yaml_int(loader, node)
    if not -_INT64 <= value < _INT64:
        raise _error(f"integer {value} is out of range (|n| < 2**63)", node)
    return value


def _refuse_tag(loader: SafeConstructor, node: Node) -> Any:
    tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
    raise _error(f"YAML tag {tag} is not supported (plain data only)", node)


def _check_graph(root: Node) -> None:
    """Refuse duplicate keys, recursive aliases and documents whose aliases expand beyond
    :data:`MAX_EXPANDED_VALUES` values or :data:`MAX_DEPTH` levels, before anything is built.

    Aliases make the node graph a DAG; each node's expanded size and depth is computed once
    (iteratively: no recursion limit), so the check costs time linear in the file.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_EXPANDED_VALUES:
                raise _error(
                    f"aliases expand the document beyond {MAX_EXPANDED_VALUES} values "
                    "(nested aliases, a \"billion laughs\" file?)", node
                )
            if depth[key] > MAX_DEPTH:
                raise _error(f"nested more than {MAX_DEPTH} levels deep", node)
            continue
        if key in size:
            continue
        if isinstance(node, MappingNode):
            _check_duplicate_keys(node)
        on_path.add(key)
        stack.append((node, True))
        for kid in _children(node):
            if id(kid) in on_path:
                raise _error("recursive alias: a node contains itself", kid)
            if id(kid) not in size:
                stack.append((kid, False))


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_duplicate_keys(node: MappingNode) -> None:
    seen: dict[tuple[str, str], Node] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        ident = (str(key_node.tag), str(key_node.value))
        first = seen.setdefault(ident, key_node)
        if first is not key_node:
            raise _error(
                f"duplicate key {key_node.value!r} (first given at line "
                f"{first.start_mark.line + 1})", key_node
            )


class StrictLoader(_Base):
    """:class:`yaml.SafeLoader` with the checks of the module docstring."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_graph(node)
        return self.construct_document(node)


StrictLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)
StrictLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", SafeConstructor.construct_yaml_str)
for _tag in ("binary", "set", "omap", "pairs"):
    StrictLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_tag)


def parse_yaml(text: str, where: str) -> Any:
    """Parse one YAML document with :class:`StrictLoader`; any problem is a one-line
    :class:`ConfigError` starting with ``where`` (and naming the line when YAML knows it)."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from None
    except RecursionError:  # the pure-Python parser recurses per nesting level
        raise ConfigError(f"{where}: invalid YAML: nested too deeply") from None


def decode_text(data: bytes, where: str) -> str:
    """A YAML file's bytes as text: UTF-8 (a byte-order mark allowed) without NUL bytes;
    anything else (a binary file, text in another encoding) is not a kvsim YAML file."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}); a binary "
            "file, or text in another encoding (save it as UTF-8)"
        ) from None
    if "\x00" in text:
        raise ConfigError(f"{where}: contains NUL bytes: a binary file, not YAML text")
    return text


def read_yaml(path: str | Path) -> Any:
    """Read and parse a user's YAML file; every problem is one-line :class:`ConfigError`."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path}: is a directory, not a YAML file")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: not a regular file")
    if info.st_size > MAX_YAML_BYTES:
        raise ConfigError(
            f"{path}: {info.st_size / 2**20:.1f} MiB is larger than a kvsim YAML file may be "
            f"({MAX_YAML_BYTES // 1024} KiB); is this the right file?"
        )
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > MAX_YAML_BYTES:  # grew since stat
        raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES // 1024} KiB")
    return parse_yaml(decode_text(data, str(path)), str(path))
