"""kvsim calibrate: the flash fit against the flash model itself, the roofline's numbers, the
O_DIRECT file and issuer, fio's report, the preset, bad input, and (slow) real measurements."""

from __future__ import annotations

import json
import os
import re
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sim.calibrate import PATTERNS, calibrate
from sim.calibrate.cpu import (
    ATTENTION_ENTRIES,
    SCORING_VECTORS,
    KernelTiming,
    block_shapes,
    fit_compute_rate,
    fit_roofline,
    roofline_time_us,
)
from sim.calibrate.fit import (
    MVA_TOLERANCE,
    Observation,
    fit_flash,
    model_mb_s,
    random_units_per_us,
    simulated_mb_s,
    steady_mb_s,
)
from sim.calibrate.patterns import FioMeasurer, Pattern, fio_available, parse_fio_json
from sim.calibrate.storage import (
    FILE_PREFIX,
    DirectFile,
    Issuer,
    random_commands,
    sequential_commands,
)
from sim.cli import main
from sim.config import load_model_geometry
from sim.errors import StorageError
from sim.hardware import load_device
from sim.hardware.flash import FlashParams
from tests.direct_io import o_direct_refused

KIB = 1024
REPO = Path(__file__).resolve().parents[1]
SAMPLE_TRACE = REPO / "traces" / "sample" / "smollm2-135m_pydoc_p160_d24"


def _synthetic(params: FlashParams) -> list[Observation]:
    """The calibration's read and write patterns, measured on the SimPy flash model."""
    return [
        Observation(p.write, p.io_bytes, p.queue_depth,
                    simulated_mb_s(params, p.io_bytes, p.queue_depth, p.write), p.label)
        for p in PATTERNS
    ]


# --- the fit -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        load_device("ufs40-flagship").flash,
        load_device("ufs31-phone").flash,
        # (a queue deeper than the units never fills: only the deepest measured depth, 32, is
        # distinguishable from the others, see the test below)
        FlashParams(read_bandwidth_mb_s=900, write_bandwidth_mb_s=400, queue_depth=32,
                    parallel_units=3, read_command_latency_us=120,
                    write_command_latency_us=30, page_size_bytes=4096, max_io_bytes=524288),
    ],
    ids=["ufs40", "ufs31", "slow-disk"],
)
def test_fit_recovers_the_parameters_of_a_curve_made_by_the_flash_model(
    params: FlashParams,
) -> None:
    fit = fit_flash(_synthetic(params))
    assert fit.unit_choice == "earliest_free"  # its own curve: the random units fit worse
    assert [other.unit_choice for other in fit.others] == ["random"]
    assert fit.others[0].rms_log_error > fit.rms_log_error
    assert fit.parallel_units == params.parallel_units
    assert fit.queue_depth == params.queue_depth
    assert fit.read_bandwidth_mb_s == pytest.approx(params.read_bandwidth_mb_s, rel=0.01)
    assert fit.read_command_latency_us == pytest.approx(params.read_command_latency_us, rel=0.01)
    assert fit.write_bandwidth_mb_s == pytest.approx(params.write_bandwidth_mb_s, rel=0.01)
    assert fit.write_command_latency_us == pytest.approx(params.write_command_latency_us,
                                                         rel=0.01)
    assert fit.rms_log_error < 0.005
    assert len(fit.residual_lines()) == len(PATTERNS)


def test_a_queue_the_units_never_fill_is_fitted_as_the_deepest_measured() -> None:
    params = load_device("ufs40-flagship").flash.model_copy(
        update={"parallel_units": 3, "queue_depth": 16}
    )
    fit = fit_flash(_synthetic(params), unit_choices=("earliest_free",))
    assert (fit.parallel_units, fit.queue_depth) == (3, 32)
    for r in fit.residuals:
        assert abs(r.error) < 0.01, r.observation.label


def test_more_units_than_slots_fit_as_the_same_model_with_units_equal_to_slots() -> None:
    # 16 units behind 8 slots: never more than 8 busy, so P = 8 is the same model
    params = load_device("ufs40-flagship").flash.model_copy(
        update={"parallel_units": 16, "queue_depth": 8}
    )
    fit = fit_flash(_synthetic(params), unit_choices=("earliest_free",))
    assert (fit.parallel_units, fit.queue_depth) == (8, 8)
    for r in fit.residuals:
        assert abs(r.error) < 0.01, r.observation.label


def _steady_synthetic(params: FlashParams) -> list[Observation]:
    """The calibration's patterns measured on the SimPy model in steady state (random units:
    the very simulation the fit refines on, same draws)."""
    return [
        Observation(p.write, p.io_bytes, p.queue_depth,
                    steady_mb_s(params, p.io_bytes, p.queue_depth, p.write), p.label)
        for p in PATTERNS
    ]


@pytest.mark.parametrize(
    ("units", "depth"), [(6, 32), (3, 8), (40, 32)], ids=["6-units", "depth-8", "40-units"]
)
def test_fit_recovers_random_units_from_a_curve_made_by_the_flash_model(
    units: int, depth: int
) -> None:
    """A device with random units (this machine's order of magnitude; a queue shallower than
    the deepest measured; more units than slots, which random units can use) measured on the
    SimPy model: the fit keeps random units and finds every parameter again."""
    params = FlashParams(
        read_bandwidth_mb_s=1200, write_bandwidth_mb_s=2800, queue_depth=depth,
        parallel_units=units, read_command_latency_us=55, write_command_latency_us=65,
        page_size_bytes=4096, max_io_bytes=524288, unit_choice="random",
    )
    fit = fit_flash(_steady_synthetic(params))
    assert fit.unit_choice == "random"
    assert (fit.parallel_units, fit.queue_depth) == (units, depth)
    assert fit.read_bandwidth_mb_s == pytest.approx(1200, rel=0.01)
    assert fit.read_command_latency_us == pytest.approx(55, rel=0.01)
    assert fit.write_bandwidth_mb_s == pytest.approx(2800, rel=0.01)
    assert fit.write_command_latency_us == pytest.approx(65, rel=0.01)
    assert fit.rms_log_error < 0.005
    assert fit.others[0].unit_choice == "earliest_free"
    assert fit.others[0].rms_log_error > 5 * fit.rms_log_error


@settings(max_examples=40, deadline=None)
@given(
    units=st.integers(1, 16), depth=st.integers(1, 32), pages=st.integers(1, 128),
    bandwidth=st.floats(200, 8000),
)
@example(units=1, depth=2, pages=100, bandwidth=4096 * 100 / 50)  # the worst case: -20%
@example(units=2, depth=4, pages=1, bandwidth=8000)  # the worst overestimate found: +14%
def test_random_units_approximation_is_within_its_tolerance_of_the_simpy_model(
    units: int, depth: int, pages: int, bandwidth: float
) -> None:
    """The mean-value approximation that seeds the random-unit fit, against the SimPy model's
    steady state (4,000 commands: sampling error about 1%)."""
    params = FlashParams(
        read_bandwidth_mb_s=bandwidth, write_bandwidth_mb_s=bandwidth, queue_depth=depth,
        parallel_units=units, read_command_latency_us=50, write_command_latency_us=50,
        page_size_bytes=4096, max_io_bytes=524288, unit_choice="random",
    )
    size = pages * 4096
    simulated = steady_mb_s(params, size, depth, n_commands=4000)
    approximated = model_mb_s(size, depth, bandwidth, 50, units, depth, "random")
    assert approximated == pytest.approx(simulated, rel=MVA_TOLERANCE)


@pytest.mark.parametrize("units", [1, 2, 4, 8])
def test_random_units_approximation_two_in_flight(units: int) -> None:
    """Two commands in flight, a near-instant link: the SimPy model's exact rate is
    (2 - 1/P) / L (tests/test_flash.py). The approximation gives 4P / ((2P + 1) L), which
    is 4P^2 / (4P^2 - 1) times that (+6.7% with 2 units, +1.6% with 4), and the unit ceiling
    1 / L, exact, with one unit."""
    sizes, two = np.array([4096.0]), np.array([2])
    rate = random_units_per_us(sizes, two, 4.096e9, 10.0, units)[0]
    exact = (2 - 1 / units) / 10.0
    expected = exact if units == 1 else exact * 4 * units**2 / (4 * units**2 - 1)
    assert rate == pytest.approx(expected, rel=1e-5)


def test_fit_needs_reads_and_writes() -> None:
    reads = [Observation(False, 4096, q, 10.0 * q, f"r{q}") for q in (1, 2)]
    with pytest.raises(ValueError, match="two read and two write"):
        fit_flash(reads)
    with pytest.raises(ValueError, match="finite"):
        Observation(False, 4096, 1, float("nan"), "bad")


@settings(max_examples=25, deadline=None)
@given(
    units=st.integers(1, 16), depth=st.integers(1, 32), host=st.integers(1, 32),
    pages=st.integers(1, 128), latency=st.floats(5, 500), bandwidth=st.floats(100, 8000),
)
def test_closed_form_throughput_matches_the_simpy_model(
    units: int, depth: int, host: int, pages: int, latency: float, bandwidth: float
) -> None:
    params = FlashParams(
        read_bandwidth_mb_s=bandwidth, write_bandwidth_mb_s=bandwidth, queue_depth=depth,
        parallel_units=units, read_command_latency_us=latency, write_command_latency_us=latency,
        page_size_bytes=4096, max_io_bytes=524288,
    )
    size = pages * 4096
    simulated = simulated_mb_s(params, size, host, n_commands=3000)
    closed = model_mb_s(size, host, bandwidth, latency, units, depth)
    # the simulation includes the start-up (one command's time of 3000) the steady state lacks
    assert simulated == pytest.approx(closed, rel=0.01)
    assert simulated <= closed * (1 + 1e-9)


# --- the roofline ------------------------------------------------------------------------


def test_roofline_numbers_come_from_their_kernels() -> None:
    gflops, mb_s, overhead = 40.0, 12_000.0, 3.0

    def kernel(name: str, flops: float, size: float) -> KernelTiming:
        return KernelTiming(name, flops, size, roofline_time_us(flops, size, gflops, mb_s,
                                                                overhead))

    kernels = (
        kernel("matvec block (cold)", 2e8, 4e8),
        kernel("matvec 32x2048 (hot)", 131072.0, 0.0),
        KernelTiming("matvec 1x16 (call)", 32.0, 0.0, overhead),
        kernel("attention N=256", 4 * 256 * 64 * 4, 2 * 256 * 64 * 4),
        kernel("attention N=4096", 4 * 4096 * 64 * 4, 2 * 4096 * 64 * 4),
    )
    fit = fit_roofline(kernels)
    assert fit.cpu_gflops == pytest.approx(gflops)
    assert fit.bandwidth_mb_s == pytest.approx(mb_s)
    assert fit.kernel_overhead_us == pytest.approx(overhead)
    for k, predicted in fit.predictions:
        assert predicted == pytest.approx(k.time_us, rel=1e-3), k.name  # the call: 32 FLOP
    assert len(fit.residual_lines()) == len(kernels)
    with pytest.raises(ValueError, match="no longer than an empty call"):
        fit_roofline((kernels[0], KernelTiming("matvec 8x8 (hot)", 128.0, 0.0, 2.0),
                      kernels[2]))


def _attention(n: int, gflops: float, mb_s: float, overhead: float, d: int = 64,
               g: int = 4) -> KernelTiming:
    """The attention kernel over ``n`` entries as the roofline at ``gflops`` times it."""
    flops, size = 4.0 * n * d * g, 2.0 * n * d * 4
    return KernelTiming(f"attention N={n}", flops, size,
                        roofline_time_us(flops, size, gflops, mb_s, overhead))


@settings(max_examples=60, deadline=None)
# (the cold matvec block, 0.5 FLOP per byte, must be memory-bound for its bandwidth to be
# measured: mb_s < 2 * gflops * 1e3)
@given(gflops=st.floats(100.0, 1e3), attention=st.floats(0.1, 1e3), mb_s=st.floats(1e3, 1e5),
       overhead=st.floats(0.0, 20.0), g=st.sampled_from([1, 4, 8]))
def test_fit_recovers_the_attention_rate_of_timings_made_by_the_model(
    gflops: float, attention: float, mb_s: float, overhead: float, g: int
) -> None:
    def kernel(name: str, flops: float, size: float) -> KernelTiming:
        return KernelTiming(name, flops, size, roofline_time_us(flops, size, gflops, mb_s,
                                                                overhead))

    attended = [_attention(n, attention, mb_s, overhead, g=g) for n in ATTENTION_ENTRIES]
    scored = [kernel(f"scoring n={n}", 2.0 * n * 64 * g, n * 64 * 4.0) for n in SCORING_VECTORS]
    fit = fit_roofline((kernel("matvec block (cold)", 2e8, 4e8),
                        kernel("matvec 32x2048 (hot)", 131072.0, 0.0),
                        KernelTiming("matvec 1x16 (call)", 32.0, 0.0, overhead),
                        *attended, *scored))
    # 4 N d g FLOP against 8 N d bytes: compute-bound when g / attention > 2 / mb_s (in
    # FLOP/us and B/us); a memory-bound kernel says nothing about the rate
    if g / (attention * 1e3) > 2.0 / mb_s * (1 + 1e-6):
        assert fit.attention_gflops == pytest.approx(attention, rel=1e-9)
    elif g / (attention * 1e3) < 2.0 / mb_s * (1 - 1e-6):
        assert fit.attention_gflops is None
    for k, predicted in fit.predictions:  # the scoring kernels at the matvec rate
        if k.name.startswith("scoring") or (k.name.startswith("attention")
                                            and fit.attention_gflops is not None):
            assert predicted == pytest.approx(k.time_us, rel=1e-9), k.name


def test_attention_rate_is_a_least_squares_fit_of_relative_error() -> None:
    # two kernels without overhead or DRAM bytes, at 10 and 20 GFLOP/s (1e4 and 2e4 FLOP/us):
    # minimising (1e4 x - 1)^2 + (2e4 x - 1)^2 over x = 1 / G gives x = 3e4 / 5e8, G = 16,667
    # FLOP/us = 16.67 GFLOP/s
    kernels = [KernelTiming("attention N=1", 1e6, 0.0, 100.0),
               KernelTiming("attention N=2", 2e6, 0.0, 100.0)]
    assert fit_compute_rate(kernels, 1e4, 0.0) == pytest.approx(5e8 / 3e4 / 1e3, rel=1e-12)
    # time the bytes alone explain (10,000 B at 1e4 B/us = 1 us, + 1 us overhead) is no
    # evidence of a rate
    assert fit_compute_rate([KernelTiming("attention N=3", 1e6, 1e4, 2.0)], 1e4, 1.0) is None


def test_block_shapes_hold_the_block_weights_less_the_norms() -> None:
    model = load_model_geometry("llama-3.2-1b")
    weights = sum(r * c for _, r, c in block_shapes(model))
    assert weights == model.params_per_layer - 2 * model.hidden_size


# --- the O_DIRECT file and the issuer ----------------------------------------------------


def test_issuer_writes_then_reads_every_command_and_the_file_is_removed(
    direct_dir: Path,
) -> None:
    size = 8 << 20
    with DirectFile(direct_dir, size) as file:
        path = file.path
        assert path.exists() and path.name.startswith(FILE_PREFIX)
        with Issuer(file.fd, 4, 128 * KIB) as issuer:
            written = issuer.run(
                sequential_commands(size, 128 * KIB, write=True, wrap=False), queue_depth=4
            )
            assert (written.commands, written.bytes) == (64, size)
            assert written.latencies_us.shape == (64,) and (written.latencies_us > 0).all()
            file.written_bytes = written.bytes
            commands = [(False, offset, 4096) for offset in range(0, size, 1 << 20)]
            read = issuer.run(iter(commands), queue_depth=2)
            assert (read.commands, read.bytes) == (8, 8 * 4096)
            timed = issuer.run(random_commands(size, 4096, False, seed=1),
                               deadline=time.perf_counter() + 0.2)
            assert timed.commands > 0 and timed.iops > 0
            assert timed.seconds >= 0.2
        # what reached the disk can be neither compressed nor deduplicated: random bytes, and
        # every 4 KiB block different (a stamp in its first 8 bytes)
        with open(path, "rb") as f:
            data = f.read(1 << 20)
        assert len(zlib.compress(data)) > 0.99 * len(data)
        blocks = np.frombuffer(data, dtype=np.uint64).reshape(-1, 512)
        assert len(np.unique(blocks, axis=0)) == len(blocks)
    assert not path.exists()


def test_issuer_raises_a_failed_command_and_the_file_goes(direct_dir: Path) -> None:
    with pytest.raises(OSError, match="short read"):
        with DirectFile(direct_dir, 1 << 20) as file:
            path = file.path
            with Issuer(file.fd, 2, 4096) as issuer:
                # beyond the end of the file: the read returns 0 bytes
                issuer.run(iter([(False, 0, 4096), (False, 64 << 20, 4096)]))
    assert not path.exists()


def test_refused_o_direct_is_one_line_and_leaves_no_file(tmp_path: Path) -> None:
    with o_direct_refused(), pytest.raises(StorageError, match="refuses O_DIRECT"):
        DirectFile(tmp_path, 1 << 20)
    assert list(tmp_path.iterdir()) == []


# --- fio ---------------------------------------------------------------------------------


def test_parse_fio_json_reads_the_group_report_after_notes() -> None:
    report = {"jobs": [{"read": {"iops": 1234.5, "bw_bytes": 5_056_512,
                                 "lat_ns": {"mean": 810_000.0}, "runtime": 1500},
                        "write": {"iops": 0, "bw_bytes": 0, "lat_ns": {"mean": 0},
                                  "runtime": 0}}]}
    text = "note: both iodepth >= 1 and synchronous I/O engine are selected\n" + json.dumps(
        report)
    assert parse_fio_json(text, write=False) == (1234.5, 5_056_512.0, 810.0, 1.5)
    assert parse_fio_json("fio: no such file", write=False) is None
    assert parse_fio_json('{"jobs": []}', write=False) is None


@pytest.mark.skipif(not fio_available(), reason="fio is not installed")
def test_fio_command_runs_the_builtin_issuing_model(direct_dir: Path) -> None:
    with DirectFile(direct_dir, 8 << 20) as file:
        with Issuer(file.fd, 1, 512 * KIB) as issuer:
            file.written_bytes = issuer.run(
                sequential_commands(8 << 20, 512 * KIB, True, wrap=False)).bytes
        fio = FioMeasurer(file)
        random_args = fio.command(Pattern(4096, 8), 0.5, seed=3)
        assert "--ioengine=psync" in random_args and "--numjobs=8" in random_args
        assert "--rw=randread" in random_args and "--direct=1" in random_args
        assert "--runtime=500ms" in random_args and f"--size={8 << 20}" in random_args
        sequential = fio.command(Pattern(512 * KIB, 8, random=False, write=True), 0.5, seed=3)
        assert "--rw=write" in sequential
        if fio.has_libaio():
            assert "--ioengine=libaio" in sequential and "--iodepth=8" in sequential
        measured = fio.measure(Pattern(4096, 2), 0.3, seed=1)
        assert measured.iops > 0 and measured.mb_s == pytest.approx(
            measured.iops * 4096 / 1e6, rel=0.02)
        if not FioMeasurer(file).has_engine("io_uring"):
            return
        # the io_uring issuer's model: one job, one stream, QD deep, whatever the pattern
        uring = FioMeasurer(file, "io_uring")
        for pattern in (Pattern(4096, 8), Pattern(512 * KIB, 8, random=False, write=True)):
            args = uring.command(pattern, 0.5, seed=3)
            assert "--ioengine=io_uring" in args and "--iodepth=8" in args
            assert not any(a.startswith(("--numjobs", "--offset_increment")) for a in args)
            assert f"--size={8 << 20}" in args
        measured = uring.measure(Pattern(4096, 4), 0.3, seed=1)
        assert measured.iops > 0 and measured.mb_s == pytest.approx(
            measured.iops * 4096 / 1e6, rel=0.02)


# --- the command: bad input --------------------------------------------------------------


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], pattern: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("kvsim: error: "), err
    assert re.search(pattern, err), err


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (["--path", "{tmp}/missing"], "does not exist"),
        (["--path", "{tmp}/afile"], "is not a directory"),
        (["--size", "100TiB"], "GiB free"),
        (["--size", "1MiB"], "at least 16 MiB"),
        (["--size", "lots"], "cannot read 'lots'"),
        (["--seconds", "1"], r"must be in \[5, 86400\]"),
        (["--seconds", "inf"], "got inf"),
        (["--seconds", "nan"], "got nan"),
        (["--out", "{tmp}/preset.txt"], r"must end in \.yaml"),
        (["--out", "{tmp}/afile/preset.yaml"], "is a file"),
        (["--model", "nope"], "unknown model 'nope'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], pattern: str
) -> None:
    (tmp_path / "afile").write_text("x")
    args = {"--path": str(tmp_path), "--out": str(tmp_path / "preset.yaml"),
            "--seconds": "5", "--size": "16MiB"}
    for key, value in zip(extra[::2], extra[1::2], strict=True):
        args[key] = value.replace("{tmp}", str(tmp_path))
    argv = ["calibrate", "--quiet", *[x for kv in args.items() for x in kv]]
    _one_line_error(capsys, argv, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_fio_asked_for_but_not_installed_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sim.calibrate

    monkeypatch.setattr(sim.calibrate, "fio_available", lambda: False)
    for measurer in ("fio", "both"):
        _one_line_error(capsys, ["calibrate", "--path", str(tmp_path), "--out",
                                 str(tmp_path / "p.yaml"), "--measurer", measurer],
                        "fio program is not installed")
    assert list(tmp_path.iterdir()) == []


def test_a_memory_file_system_is_refused(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    from sim.calibrate.storage import mount_of

    if not Path("/dev/shm").is_dir() or mount_of(Path("/dev/shm"))[1] != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    before = set(os.listdir("/dev/shm"))
    _one_line_error(capsys, ["calibrate", "--path", "/dev/shm", "--out",
                             str(tmp_path / "p.yaml"), "--size", "16MiB"], "tmpfs")
    assert set(os.listdir("/dev/shm")) == before
    assert not (tmp_path / "p.yaml").exists()


# --- the command: a preset kvsim run accepts ---------------------------------------------


def _experiment(tmp_path: Path, device: str) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({
        "name": "calibrated", "trace": {"path": str(SAMPLE_TRACE)}, "device": device,
        "model": "llama-3.2-1b", "cache": {"capacity": 0.1},
        "policies": [{"type": "full"}, {"type": "token_topk", "budget": 0.2}],
    }))
    return path


def _numbers_have_sources(text: str) -> None:
    """Every number of the flash, dram and compute sections follows a comment."""
    lines = text.splitlines()
    numbers = [i for i, line in enumerate(lines)
               if re.fullmatch(r"  [a-z_]+: [0-9.e+-]+", line)]
    assert len(numbers) == 9 + 3 + 5  # with attention_gflops
    choice = [i for i, line in enumerate(lines)
              if re.fullmatch(r"  unit_choice: (earliest_free|random)", line)]
    assert len(choice) == 1
    for i in numbers + choice:
        assert lines[i - 1].lstrip().startswith("#"), lines[i]


def test_calibrate_writes_a_preset_that_kvsim_run_accepts(
    direct_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KVSIM_PASS_CACHE", "off")
    out = tmp_path / "presets" / "this-machine.yaml"
    argv = ["calibrate", "--path", str(direct_dir), "--out", str(out), "--seconds", "5",
            "--size", "32MiB", "--measurer", "builtin", "--model", "smollm2-135m", "--quiet"]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert "flash fit (builtin, kept)" in report and "flash fit (builtin, not kept)" in report
    assert f"preset: {out}" in report
    assert not [p for p in direct_dir.iterdir() if p.name.startswith(FILE_PREFIX)]
    text = out.read_text()
    _numbers_have_sources(text)
    device = load_device(out)
    assert device.name == "this-machine"
    assert device.compute.attention_gflops is not None and device.compute.attention_gflops > 0
    assert 1 <= device.flash.parallel_units and device.flash.queue_depth <= 32
    if device.flash.unit_choice == "earliest_free":  # more units than slots: never busy
        assert device.flash.parallel_units <= device.flash.queue_depth
    assert device.flash.max_io_bytes == 512 * KIB
    # relative to the experiment's directory, as kvsim calibrate users will write it
    experiment = _experiment(tmp_path, "presets/this-machine.yaml")
    assert main(["run", str(experiment), "--output", str(tmp_path / "results"), "--quiet",
                 "--no-plot", "-j", "1"]) == 0
    settings_text = next((tmp_path / "results" / "runs").glob("*/run.yaml")).read_text()
    assert "this-machine" in settings_text
    assert "attention_gflops" in settings_text  # the fitted rate reaches the run


def test_a_missing_or_invalid_device_file_stops_the_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _one_line_error(capsys, ["run", str(_experiment(tmp_path, "nowhere/phone.yaml"))],
                    "device: no such file 'nowhere/phone.yaml'")
    (tmp_path / "bad.yaml").write_text("flash: {read_bandwidth_mb_s: -1}\n")
    _one_line_error(capsys, ["run", str(_experiment(tmp_path, "bad.yaml"))],
                    "read_bandwidth_mb_s")
    assert not (tmp_path / "results").exists()


# --- real measurements (slow) ------------------------------------------------------------


@pytest.mark.slow
def test_a_30_second_calibration_measures_sensible_figures(direct_dir: Path,
                                                            tmp_path: Path) -> None:
    result = calibrate(direct_dir, tmp_path / "p.yaml", seconds=30, size_bytes=1 << 30,
                       measurer="builtin", show_progress=False)
    by_label = {m.pattern.label: m for m in result.measurements}
    assert set(by_label) == {p.label for p in PATTERNS}
    qd1, qd32 = by_label["randread 4 KiB QD 1"], by_label["randread 4 KiB QD 32"]
    # deeper queues never slow a device much, and a 4 KiB read takes 1 us to 100 ms
    assert qd32.iops > 0.8 * qd1.iops
    assert 1 < qd1.mean_latency_us < 1e5
    # bigger commands move more bytes per second
    assert by_label["randread 512 KiB QD 32"].mb_s > by_label["randread 4 KiB QD 32"].mb_s
    assert 1 < result.roofline.cpu_gflops < 1e4
    assert result.device.compute.attention_gflops is not None
    assert 0.1 < result.device.compute.attention_gflops < 1e4
    assert 100 < result.cpu.copy_mb_s < 1e7
    assert result.flash.rms_log_error < 1.0
    assert load_device(tmp_path / "p.yaml") == result.device


@pytest.mark.slow
@pytest.mark.skipif(not fio_available(), reason="fio is not installed")
def test_builtin_and_fio_measure_the_same_device(direct_dir: Path, tmp_path: Path) -> None:
    result = calibrate(direct_dir, tmp_path / "p.yaml", seconds=60, size_bytes=1 << 30,
                       measurer="both", show_progress=False)
    pairs: dict[str, dict[str, float]] = {}
    for m in result.measurements:
        pairs.setdefault(m.pattern.label, {})[m.measurer] = m.mb_s
    assert all(set(p) == {"builtin", "fio"} for p in pairs.values())
    # Both measure the same device with the same issuing model, slices alternated; a shared
    # virtual disk varies by tens of percent from second to second, so the test bounds the
    # median ratio, not each pattern's (the report prints each).
    ratios = sorted(p["fio"] / p["builtin"] for p in pairs.values())
    assert 0.75 < ratios[len(ratios) // 2] < 1.33
