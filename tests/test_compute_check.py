"""benchmarks/compute_check.py: the simulated side of each row by hand (float32 operands on a
hand device), and (slow) one real run's table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from sim.config import load_model_geometry

from .conftest import HAND_DEVICE

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compute_check.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compute_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_simulated_rows_charge_float32_operands_by_hand() -> None:
    check = _load()
    # HAND_DEVICE: 1e5 FLOP/us, 1e4 B/us, no overhead; attention at 10 GFLOP/s = 1e4 FLOP/us
    device = HAND_DEVICE.model_copy(update={"compute": HAND_DEVICE.compute.model_copy(
        update={"attention_gflops": 10.0})})
    model = load_model_geometry("smollm2-135m")  # head_dim 64, 9 / 3 = 3 query heads per KV
    rows = {row.operation: row.simulated_us for row in check.checks(device, model)}
    assert list(rows) == ["dense block", "LM head", "scoring n=32", "scoring n=64",
                          "scoring n=128", "scoring n=512", "attention N=256",
                          "attention N=1024", "attention N=4096", "attention N=16384"]
    # the block's matrices: 3,540,096 weights less the two 576-wide norms = 3,538,944, 4 B each
    # (not the preset's 8 bits): 14,155,776 B / 1e4 = 1415.5776 us > 7,077,888 FLOP / 1e5
    assert rows["dense block"] == pytest.approx(1415.5776, rel=1e-12)
    # 49,152 x 576 float32 weights + 576 norm weights: 113,248,512 B / 1e4 us
    assert rows["LM head"] == pytest.approx(11324.8512, rel=1e-12)
    # 32 vectors of 64 float32: 8,192 B / 1e4 = 0.8192 us > 12,288 FLOP / 1e5
    assert rows["scoring n=32"] == pytest.approx(0.8192, rel=1e-12)
    # 256 entries: 4 * 256 * 64 * 3 = 196,608 FLOP / 1e4 = 19.6608 us > 131,072 B / 1e4
    assert rows["attention N=256"] == pytest.approx(19.6608, rel=1e-12)


def test_a_bad_device_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _load().main(["--device", "nowhere/phone.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere/phone.yaml" in err


@pytest.mark.slow
def test_a_short_check_prints_one_row_per_kernel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    preset = tmp_path / "hand.yaml"
    preset.write_text(yaml.safe_dump(HAND_DEVICE.model_dump(mode="json")))
    code = _load().main(["--device", str(preset), "--model", "smollm2-135m",
                         "--seconds", "0.05"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 10
    failed = 0
    for _operation, _simulated, measured, error, verdict in rows:
        assert float(measured.replace(",", "")) > 0
        percent = float(error.strip().rstrip("%"))
        if abs(abs(percent) - 20) > 0.05:  # the default tolerance, away from the rounding
            assert verdict.strip() == ("pass" if abs(percent) < 20 else "FAIL")
        failed += verdict.strip() == "FAIL"
    assert code == (1 if failed else 0)
