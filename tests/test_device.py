"""Device presets, loading with overrides, one-line config errors, and the roofline costs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from sim.errors import ConfigError
from sim.hardware import (
    ComputeParams,
    DeviceParams,
    DramParams,
    attention_us,
    dense_layer_us,
    load_device,
    preset_names,
    read_bandwidth_curve,
    scoring_us,
)
from sim.validation import pydantic_error_line

PRESETS = ["ufs31-phone", "ufs40-flagship"]


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_device(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- presets -----------------------------------------------------------------------------------


def test_presets_listed() -> None:
    assert set(PRESETS) <= set(preset_names())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_is_plausible(name: str) -> None:
    device = load_device(name)
    assert isinstance(device, DeviceParams)
    assert device.name == name and device.description
    flash = device.flash
    assert flash.max_io_bytes % flash.page_size_bytes == 0
    assert flash.queue_depth >= flash.parallel_units
    # DynaKV Fig. 3b: reads are IOPS-bound below a knee of a few tens of KB.
    assert 16_000 <= flash.read_knee_bytes <= 40_000


def test_flagship_numbers() -> None:
    device = load_device("ufs40-flagship")
    assert device.flash.read_bandwidth_mb_s == 4200
    assert device.flash.write_bandwidth_mb_s == 2800
    assert device.flash.queue_depth == 32
    # Knee ~24 KB: 4.2e9 B/s over ~171K IOPS.
    assert device.flash.read_iops_limit == pytest.approx(4.2e9 / 24_576, rel=0.03)
    assert device.dram.bandwidth_mb_s == pytest.approx(8533e6 * 8 / 1e6, rel=0.01)


def test_ufs31_is_slower_than_ufs40() -> None:
    old, new = load_device("ufs31-phone"), load_device("ufs40-flagship")
    assert old.flash.read_bandwidth_mb_s == 2100 and old.flash.write_bandwidth_mb_s == 1200
    assert old.flash.read_iops_limit < 100_000  # measured phones fall short of the 100K spec
    sizes = [4096, 32768, 524288]
    for slow, fast in zip(
        read_bandwidth_curve(old.flash, sizes, 500),
        read_bandwidth_curve(new.flash, sizes, 500),
        strict=True,
    ):
        assert slow < fast


# --- overrides and sources ---------------------------------------------------------------------


def test_dotted_overrides() -> None:
    device = load_device(
        "ufs40-flagship",
        {"flash.read_bandwidth_mb_s": 2100, "dram.kv_budget_bytes": 1 << 20, "name": "x"},
    )
    assert device.flash.read_bandwidth_mb_s == 2100
    assert device.dram.kv_budget_bytes == 1 << 20
    assert device.name == "x"
    assert device.flash.queue_depth == 32  # untouched keys keep the preset's values


def test_mapping_with_preset_deep_merges() -> None:
    device = load_device({"preset": "ufs40-flagship", "flash": {"queue_depth": 8}})
    assert device.flash.queue_depth == 8
    assert device.flash.read_bandwidth_mb_s == 4200


def test_overrides_apply_to_device_params() -> None:
    base = load_device("ufs40-flagship")
    assert load_device(base, {"compute.cpu_gflops": 1.0}).compute.cpu_gflops == 1.0
    assert base.compute.cpu_gflops != 1.0


def test_yaml_path_and_preset_inheritance(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("preset: ufs31-phone\nflash:\n  parallel_units: 2\n")
    device = load_device(str(path))
    assert device.name == "mine"
    assert device.flash.parallel_units == 2 and device.flash.read_bandwidth_mb_s == 2100


def test_presets_dir_argument(tmp_path: Path) -> None:
    source = Path(__file__).resolve().parent.parent / "configs" / "devices" / "ufs31-phone.yaml"
    (tmp_path / "other.yaml").write_text(source.read_text())
    assert load_device("other", presets_dir=tmp_path).flash.read_bandwidth_mb_s == 2100
    assert preset_names(tmp_path) == ["other"]


# --- one-line errors ---------------------------------------------------------------------------


def test_unknown_preset_lists_valid_names() -> None:
    message = config_error("ufs99")
    assert "'ufs99'" in message and "ufs40-flagship" in message and "ufs31-phone" in message


def test_unknown_key_is_named() -> None:
    message = config_error("ufs40-flagship", {"flash.read_bandwith_mb_s": 1})
    assert "device.flash.read_bandwith_mb_s" in message and "unknown key" in message
    assert "read_bandwidth_mb_s" in message  # the valid keys are listed
    message = config_error({"preset": "ufs40-flagship", "gpu": {"tflops": 1}})
    assert "device.gpu" in message


def test_wrong_type_is_named() -> None:
    message = config_error("ufs40-flagship", {"flash.queue_depth": "many"})
    assert message.startswith("device.flash.queue_depth:") and "'many'" in message


def test_impossible_value_is_named() -> None:
    message = config_error("ufs40-flagship", {"flash.read_bandwidth_mb_s": -5})
    assert message.startswith(
        "device.flash.read_bandwidth_mb_s: Input should be greater than 0 (got -5)"
    )
    assert "ufs40-flagship" in message
    message = config_error("ufs40-flagship", {"flash.max_io_bytes": 5000})
    assert "device.flash.max_io_bytes" in message and "page_size_bytes" in message
    message = config_error("ufs40-flagship", {"compute.kernel_overhead_us": -1})
    assert "device.compute.kernel_overhead_us" in message


def test_missing_section_is_named() -> None:
    message = config_error({"name": "bare", "flash": {}, "dram": {}})
    assert message.startswith("device.")


def test_override_into_a_value_is_rejected() -> None:
    assert "device.name" in config_error("ufs40-flagship", {"name.first": "x"})
    assert "dotted key" in config_error("ufs40-flagship", {"flash..x": 1})


def test_malformed_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("flash: {read_bandwidth_mb_s: 4200\n")
    message = config_error(str(path))
    assert str(path) in message and "invalid YAML" in message


def test_non_mapping_yaml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    assert str(path) in config_error(str(path))
    assert "nope.yaml" in config_error(str(tmp_path / "nope.yaml"))
    assert "expected" in config_error(42)  # type: ignore[arg-type]


def test_pydantic_error_line_reuse() -> None:
    with pytest.raises(ValidationError) as info:
        DramParams(bandwidth_mb_s=0, kv_budget_bytes=1, colour="red")  # type: ignore[call-arg]
    line = pydantic_error_line(info.value, "dram", DramParams)
    assert line.startswith("dram.bandwidth_mb_s: Input should be greater than 0 (got 0)")
    assert "[+1 more error(s)]" in line and "\n" not in line


# --- roofline ----------------------------------------------------------------------------------

COMPUTE = ComputeParams(cpu_gflops=100.0, weight_bits=4.5, kernel_overhead_us=5.0)
DRAM = DramParams(bandwidth_mb_s=50_000.0, kv_budget_bytes=1 << 28)  # 50e3 bytes/us


def test_dense_layer_compute_bound() -> None:
    # 100e6 params: 2e8 FLOP / 1e5 FLOP/us = 2000 us; 56.25e6 B / 5e4 B/us = 1125 us.
    assert dense_layer_us(100e6, COMPUTE, DRAM) == pytest.approx(2000.0 + 5.0)


def test_dense_layer_memory_bound() -> None:
    fast = ComputeParams(cpu_gflops=1000.0, weight_bits=4.5)
    # 2e8 / 1e6 = 200 us < 1125 us of weight streaming; no overhead by default.
    assert dense_layer_us(100e6, fast, DRAM) == pytest.approx(1125.0)


def test_scoring_and_attention() -> None:
    # Scoring 1000 vectors, head_dim 128, 4 query heads, 256 B each:
    # 1.024e6 FLOP -> 10.24 us; 256e3 B -> 5.12 us.
    assert scoring_us(1000, 128, 4, 256, COMPUTE, DRAM) == pytest.approx(10.24 + 5.0)
    # Attention over 1000 entries of 512 B: 2.048e6 FLOP -> 20.48 us; 512e3 B -> 10.24 us.
    assert attention_us(1000, 128, 4, 512, COMPUTE, DRAM) == pytest.approx(20.48 + 5.0)
    # Memory-bound attention: 1 query head, 4096-byte entries -> 4.096e6 B -> 81.92 us.
    assert attention_us(1000, 128, 1, 4096, COMPUTE, DRAM) == pytest.approx(81.92 + 5.0)


def test_costs_are_vectorised() -> None:
    counts = np.array([0, 10, 1000, 50_000])
    times = attention_us(counts, 128, 4, 512, COMPUTE, DRAM)
    assert isinstance(times, np.ndarray) and times.shape == counts.shape
    expected = [attention_us(int(c), 128, 4, 512, COMPUTE, DRAM) for c in counts]
    assert times == pytest.approx(expected)
    assert isinstance(scoring_us(10, 128, 4, 256, COMPUTE, DRAM), float)
    assert DRAM.stream_us(np.array([50e3, 100e3])) == pytest.approx([1.0, 2.0])


def test_compute_and_dram_params_validate() -> None:
    with pytest.raises(ValidationError, match="kernel_overhead_us"):
        ComputeParams(cpu_gflops=1, weight_bits=4, kernel_overhead_us=-1)
    with pytest.raises(ValidationError, match="bandwidth_mb_s"):
        DramParams(bandwidth_mb_s=0, kv_budget_bytes=1)
