"""Every registered policy, layout and replacement policy through the shared invariants, and
the registries' discovery rule.

Generated from the registries, so a new member cannot go untested: on a small synthetic trace
(written with the real trace writer, all queries stored) each run must keep recall in [0, 1]
(exactly 1 for full attention), never exceed the DRAM budget, account every byte once, and
never lose or duplicate a KV entry on flash. Discovery: each registry's members are exactly the
classes its package's modules register, found without any list, and importing a package loads
none of them.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sim.figures import FIGURES
from sim.footprint import PARTS, StaticFootprint, floor_lower_bound
from sim.hardware import load_device
from sim.kv.layouts import LAYOUTS
from sim.kv.replacement import REPLACEMENTS
from sim.outputs import STEP_COLUMNS
from sim.policies import POLICIES
from sim.policies.base import BudgetedPolicy
from sim.policy_pass import run_policy_pass
from sim.registry import Registry
from sim.replay import Replay, SimSetup
from sim.trace.format import open_trace
from sim.trace.writer import TraceWriter

PROMPT, STEPS, LAYERS, HEADS, GROUP, DIM = 96, 10, 3, 2, 2, 16


@pytest.fixture(scope="module")
def synthetic_trace(tmp_path_factory):
    """Keys drawn around a few directions (so clusters exist), queries near some of them;
    speculative queries (layers >= 1, for InfiniGen) are the decode queries plus noise."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("trace") / "synthetic"
    total = PROMPT + STEPS
    model = {"name": "synthetic", "n_layers": LAYERS, "n_q_heads": HEADS * GROUP,
             "n_kv_heads": HEADS, "head_dim": DIM, "params_per_layer": 50_000}
    with TraceWriter(path, model=model, prompt_len=PROMPT, decode_steps=STEPS, query_start=0,
                     text={"source": "synthetic"}, capture={"seed": 7}) as writer:
        for layer in range(LAYERS):
            centres = rng.normal(size=(HEADS, 6, DIM)) * 3
            pick = rng.integers(0, 6, size=(HEADS, total))
            keys = np.take_along_axis(centres, pick[..., None], axis=1)
            keys = keys + rng.normal(size=(HEADS, total, DIM))
            values = rng.normal(size=(HEADS, total, DIM))
            queries = np.repeat(keys, GROUP, axis=0) * 0.5 + rng.normal(size=(HEADS * GROUP,
                                                                                total, DIM))
            speculative = None
            if layer >= 1:
                speculative = queries[:, PROMPT:] + 0.5 * rng.normal(size=(HEADS * GROUP, STEPS,
                                                                           DIM))
            writer.write_layer(layer, keys, values, queries, speculative)
        writer.write_tokens(np.arange(total, dtype=np.int32))
    return open_trace(path)


def _policy(name: str):
    params = {}
    cls = POLICIES.get(name)
    if issubclass(cls, BudgetedPolicy):
        params = {"budget": 24, "sink_tokens": 2, "recent_tokens": 4}
        fields = set(POLICIES.parameters(name))
        if "tokens_per_cluster" in fields:
            params["tokens_per_cluster"] = 8
        if "full_layers" in fields:
            params["full_layers"] = 1
        if "update_interval" in fields:
            params["update_interval"] = 4
        if "buffer_max" in fields:
            params["buffer_max"] = 1  # forced load-and-split early: exercises extra reads
    return POLICIES.create({"type": name, **params})


_PASSES: dict[str, object] = {}


def _pass(trace, name):
    if name not in _PASSES:
        _PASSES[name] = run_policy_pass(trace, _policy(name), seed=1, workers=1)
    return _PASSES[name]


def _check_run(trace, policy_name, layout, replacement):
    pp = _pass(trace, policy_name)
    acc = pp.accuracy
    assert acc["attention_recall"].between(0.0, 1.0 + 1e-6).all()
    assert acc["topk_recall"].between(0.0, 1.0).all()
    if policy_name == "full":
        np.testing.assert_allclose(acc["attention_recall"], 1.0, rtol=1e-6)
    model = trace.model
    capacity_entries = 40  # per layer: below one layer's KV (2 heads x 106 positions)
    entry = model.entry_bytes("fp16")
    setup = SimSetup(device=load_device("ufs40-flagship"), target=model, kv_dtype="fp16",
                     cache_capacity_bytes=capacity_entries * entry * model.n_layers,
                     replacement={"type": replacement}, layout={"type": layout})
    replay = Replay(pp, setup)
    replay.env.process(replay.decode(None))
    replay.env.run()
    records = dict(zip(STEP_COLUMNS, replay.records.sum(axis=0), strict=True))
    for cache in replay.run.caches:
        if cache is not None:
            assert cache.peak_resident_entries <= capacity_entries
    assert records["hits"] + records["misses"] + records["held_entries"] == \
        records["selected_entries"] + records["extra_entries"]
    assert 0 <= records["selected_misses"] <= min(records["misses"],
                                                  records["selected_entries"])
    steps = pd.DataFrame(replay.records, columns=list(STEP_COLUMNS))
    parts = steps[[f"dram_{part}_bytes" for part in PARTS]]
    np.testing.assert_array_equal(parts.sum(axis=1), steps["dram_bytes"])
    assert records["useful_read_bytes"] == records["misses"] * entry
    histogram = (replay.io.io_size_counts * np.arange(len(replay.io.io_size_counts))).sum()
    assert histogram * setup.device.flash.page_size_bytes == records["read_bytes"]
    assert records["read_bytes"] == replay.flash.read_bytes
    for row in replay.run.layouts:
        for region in row:
            slots = region.slots(np.arange(region.n_placed))
            assert region.n_placed == PROMPT + STEPS
            assert len(np.unique(slots)) == region.n_placed  # nothing lost or duplicated


@pytest.mark.parametrize("policy_name", POLICIES.names())
def test_every_policy(synthetic_trace, policy_name):
    has_groups = any(s.prefill_groups is not None for s in _pass(synthetic_trace,
                                                                  policy_name).selections)
    _check_run(synthetic_trace, policy_name, "cluster" if has_groups else "sequence", "lru")


@pytest.mark.parametrize("policy_name", POLICIES.names())
def test_the_dram_bound_before_the_pass_holds_after_it(synthetic_trace, policy_name):
    """What a policy holds without a cache, bounded from its settings before any pass, is at
    most the pass's exact peak; its window is the pass's exactly (at the last step)."""
    pp = _pass(synthetic_trace, policy_name)
    policy = _policy(policy_name)
    model = synthetic_trace.model
    entry = model.entry_bytes("fp16")
    decided = [layer for layer in range(LAYERS) if not policy.is_dense_layer(layer)]
    for stream in (False, True):
        bound = floor_lower_bound(policy, model, [None] * LAYERS, PROMPT, STEPS, model,
                                  "fp16", stream)
        exact = StaticFootprint(pp, model, "fp16", stream)
        assert bound <= exact.rest().max()
        held = policy.dram_held_entries(PROMPT, STEPS - 1)
        assert exact.window[-1] == len(decided) * HEADS * held * entry
    assert [pp.selections[layer].is_full for layer in range(LAYERS)] == \
        [layer not in decided for layer in range(LAYERS)]


@pytest.mark.parametrize("layout", LAYOUTS.names())
def test_every_layout(synthetic_trace, layout):
    _check_run(synthetic_trace, "dynakv", layout, "lru")


@pytest.mark.parametrize("replacement", REPLACEMENTS.names())
def test_every_replacement(synthetic_trace, replacement):
    _check_run(synthetic_trace, "dynakv", "cluster", replacement)


# ---------------------------------------------------------------------------------- discovery

REGISTRIES = {"sim.policies": POLICIES, "sim.kv.layouts": LAYOUTS,
              "sim.kv.replacement": REPLACEMENTS, "sim.figures": FIGURES}


@pytest.mark.parametrize("package", sorted(REGISTRIES))
def test_registry_holds_exactly_what_its_package_modules_register(package):
    """A package scan done here, independently of the registry: every class defined in a
    module of the package that carries a registered name (``register`` sets ``cls.name``)."""
    registry = REGISTRIES[package]
    assert registry.package == package
    registered = {}
    root = importlib.import_module(package)
    for info in pkgutil.iter_modules(root.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        for obj in vars(module).values():
            own_name = vars(obj).get("name") if isinstance(obj, type) else None
            if isinstance(own_name, str) and obj.__module__ == module.__name__:
                registered[own_name] = obj
    assert registry.names() == sorted(registered)
    for name, cls in registered.items():
        assert registry.get(name) is cls


def test_importing_the_packages_loads_no_member():
    """Only a lookup discovers: whoever imports a package (or a registry object, or
    ``sim.figures.Results``) loads no member module."""
    code = (
        "import sys\n"
        "import sim.figures, sim.kv.layouts, sim.kv.replacement, sim.policies\n"
        "from sim.figures import FIGURES, Results\n"
        "from sim.kv.layouts import LAYOUTS\n"
        "from sim.kv.replacement import REPLACEMENTS\n"
        "from sim.policies import POLICIES\n"
        "for registry in (FIGURES, LAYOUTS, REPLACEMENTS, POLICIES):\n"
        "    loaded = set(registry.member_modules()) & set(sys.modules)\n"
        "    assert loaded <= {registry.package + '.base'}, loaded\n"
        "    assert registry.names(), registry.family\n"
        "    assert set(registry.member_modules()) <= set(sys.modules)\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


def _drop_package(tmp_path, monkeypatch, name: str, modules: dict[str, str]):
    """A throwaway package ``name`` with a registry ``THINGS`` bound to it and ``modules``."""
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text(
        "from sim.registry import Registry\n"
        "THINGS = Registry('thing', package=__name__)\n"
    )
    for module, body in modules.items():
        (package / f"{module}.py").write_text(f"from {name} import THINGS\n\n{body}")
    monkeypatch.syspath_prepend(str(tmp_path))
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    return importlib.import_module(name)


@pytest.fixture
def _forget_dropped_packages():
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("dropped_"):
            del sys.modules[name]


def _member(name: str, slow: bool = False) -> str:
    sleep = "import time\ntime.sleep(0.2)\n\n" if slow else ""
    return (f"{sleep}@THINGS.register({name!r})\n"
            f"class {name.capitalize()}:\n    def __init__(self, size: int = 1) -> None:\n"
            "        self.size = size\n")


@pytest.mark.usefixtures("_forget_dropped_packages")
def test_a_module_dropped_into_the_package_is_discovered(tmp_path, monkeypatch):
    package = _drop_package(tmp_path, monkeypatch, "dropped_ok",
                            {"beta": _member("beta"), "alpha": _member("alpha"),
                             "helpers": "HELPER = 1\n"})
    assert "dropped_ok.alpha" not in sys.modules  # the package import loads no member
    assert package.THINGS.names() == ["alpha", "beta"]
    assert package.THINGS.create({"type": "beta", "size": 3}).size == 3
    assert package.THINGS.parameters("alpha") == ["size"]


@pytest.mark.usefixtures("_forget_dropped_packages")
def test_a_duplicate_name_raises(tmp_path, monkeypatch):
    package = _drop_package(tmp_path, monkeypatch, "dropped_dup",
                            {"one": _member("same"), "two": _member("same")})
    with pytest.raises(ValueError, match="duplicate thing name 'same'"):
        package.THINGS.names()
    registry = Registry("thing")
    registry.register("x")(type("X", (), {}))
    with pytest.raises(ValueError, match="duplicate"):
        registry.register("x")(type("Y", (), {}))


@pytest.mark.usefixtures("_forget_dropped_packages")
def test_concurrent_first_lookups_all_see_every_member(tmp_path, monkeypatch):
    """The policy passes run in a thread pool: a lookup that arrives while another thread is
    discovering waits for the whole registry instead of seeing part of it."""
    package = _drop_package(tmp_path, monkeypatch, "dropped_threads",
                            {"alpha": _member("alpha", slow=True), "beta": _member("beta")})
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(package.THINGS.names()))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == [["alpha", "beta"]] * 4
