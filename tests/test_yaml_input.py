"""The YAML loader users' files go through (sim/yaml_input.py): duplicate keys, hostile alias
graphs, non-finite and out-of-range numbers, binary and huge files all end in one-line
ConfigError naming the file (and the line when there is one)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sim.errors import ConfigError
from sim.yaml_input import MAX_DEPTH, MAX_EXPANDED_VALUES, MAX_YAML_BYTES, parse_yaml, read_yaml


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "f.yaml")
    line = str(info.value)
    assert "\n" not in line and line.startswith("f.yaml: ")
    return line


# -- duplicate keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "line", "first"),
    [
        ("name: a\nseed: 1\nname: b\n", "name", 3, 1),
        ("cache:\n  capacity: 0.1\n  replacement: lru\n  capacity: 0.5\n", "capacity", 4, 2),
        ("device: {preset: x, preset: y}\n", "preset", 1, 1),
        ("policies:\n  - type: full\n  - type: h2o\n    budget: 3\n    budget: 4\n", "budget",
         5, 4),
    ],
)
def test_duplicate_key_names_the_key_and_both_lines(text, key, line, first):
    message = _error(text)
    assert f"duplicate key {key!r}" in message
    assert f"at line {line}," in message and f"first given at line {first}" in message


def test_merge_keys_override_without_counting_as_duplicates():
    text = "base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  x: 3\n"
    assert parse_yaml(text, "f.yaml") == {"base": {"x": 1, "y": 2}, "m": {"x": 3, "y": 2}}


def test_same_key_in_sibling_mappings_is_fine():
    assert parse_yaml("a: {k: 1}\nb: {k: 2}\n", "f.yaml") == {"a": {"k": 1}, "b": {"k": 2}}


# -- aliases and nesting ----------------------------------------------------------------------


def _laughs(levels: int, width: int = 10) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_billion_laughs_fails_fast_in_one_line():
    started = time.perf_counter()
    message = _error(_laughs(9))  # 10**9 values once expanded
    assert time.perf_counter() - started < 1.0
    assert f"beyond {MAX_EXPANDED_VALUES} values" in message and "line 5" in message


def test_aliases_within_the_limit_are_expanded():
    # 10**4 values expanded (just under the limit with the containers), shared as YAML says
    data = parse_yaml(_laughs(4), "f.yaml")
    assert len(data["a3"]) == 10 and data["a3"][0][0][0] == ["lol"] * 10


def test_recursive_alias_is_refused():
    assert "recursive alias" in _error("loop: &l [1, *l]\n")


def test_nesting_beyond_the_limit_is_refused():
    levels = MAX_DEPTH + 5
    deep = "".join("  " * i + f"k{i}:\n" for i in range(levels)) + "  " * levels + "v"
    assert f"nested more than {MAX_DEPTH} levels" in _error(deep)
    flow = "x: " + "[" * 5000 + "]" * 5000
    assert "invalid YAML" in _error(flow)


# -- numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [".inf", "-.inf", ".nan", ".NaN", "+.Inf", "1.0e+400", "-1.0e+400"]
)
def test_non_finite_numbers_are_refused_at_their_line(value):
    message = _error(f"name: x\nseed: 1\nthing: {value}\n")
    assert "at line 3" in message and "finite" in message


def test_finite_numbers_and_strings_that_look_numeric_still_load():
    data = parse_yaml("a: 1.5e+3\nb: -0.25\nc: 'inf'\nd: nan\ne: 1e9\n", "f.yaml")
    # YAML 1.1 reads 1e9 (no dot, no exponent sign) and a bare nan as strings, as PyYAML did
    assert data == {"a": 1500.0, "b": -0.25, "c": "inf", "d": "nan", "e": "1e9"}


def test_integers_must_fit_in_64_bits():
    assert parse_yaml(f"n: {2**63 - 1}\nm: {-(2**63)}\n", "f.yaml") == {
        "n": 2**63 - 1, "m": -(2**63)
    }
    assert "out of range" in _error(f"n: {2**63}\n")
    assert "out of range" in _error("n: " + "9" * 5000 + "\n")  # no int-conversion ValueError


# -- plain data only --------------------------------------------------------------------------


@pytest.mark.parametrize("tag", ["!!binary aGVsbG8=", "!!set {a, b}", "!!omap [{a: 1}]"])
def test_non_plain_tags_are_refused(tag):
    assert "is not supported" in _error(f"x: {tag}\n")


def test_python_tags_are_refused():
    assert "invalid YAML" in _error("x: !!python/object/apply:os.system ['true']\n")


def test_dates_read_as_strings():
    assert parse_yaml("name: 2024-01-01\n", "f.yaml") == {"name": "2024-01-01"}


# -- files ------------------------------------------------------------------------------------


def _read_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    line = str(info.value)
    assert "\n" not in line and str(path) in line
    return line


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (bytes(range(256)) * 4, "not UTF-8 text"),
        ("name: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at line 1)"),
        ("name: x\n".encode("utf-16"), "not UTF-8 text"),
        (b"name: a\x00b\n", "NUL bytes"),
    ],
)
def test_binary_and_foreign_encodings_are_one_line(tmp_path, data, expected):
    path = tmp_path / "exp.yaml"
    path.write_bytes(data)
    assert expected in _read_error(path)


def test_utf8_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_bytes(b"\xef\xbb\xbfname: x\n")
    assert read_yaml(path) == {"name": "x"}


def test_huge_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "big.yaml"
    with path.open("wb") as handle:
        handle.truncate(8 * 2**30)  # sparse: 8 GiB that would take long to read
    started = time.perf_counter()
    message = _read_error(path)
    assert time.perf_counter() - started < 1.0
    assert f"({MAX_YAML_BYTES // 1024} KiB)" in message


def test_directories_devices_and_missing_files(tmp_path):
    assert "is a directory" in _read_error(tmp_path)
    assert "not a regular file" in _read_error(Path("/dev/null"))
    assert "no such file" in _read_error(tmp_path / "nope.yaml")
