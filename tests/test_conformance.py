"""Registry-wide conformance (issue 13, item 1): every registered attack, defense and dataset gets
these tests by the fact of its registration, as timm's tests iterate over every registered model.

The test lists are built from the registries when pytest collects this module, so a plugin added
by a built-in module, by an entry point, or by a module the tests import (``plugins.demo_attack``
below, written as a third party would) is tested like the others. Per plugin or pair, without
training: parameters round-trip from their command-line strings; poisoning is deterministic per
seed, leaves the clean data intact and writes a JSON manifest; every attack x defense x dataset
cell passes ``runner.prepare``'s checks. With training (``tiny`` profile, one cell per attack with
the first defense and one per defense with the first attack, to keep the cost down): the cell
runs end to end, every number in its row is in its range, and the defense's state loads with
``torch.load(weights_only=True)``.

A plugin may declare the parameters its tests use in a class attribute ``test_params`` (a dict of
parameter -> value, applied over the tiny profile's defaults), e.g. fewer poisoned pairs so that
the tiny data holds them; its key ``TINY_SKIP`` (not a parameter) says why the plugin cannot run
end to end on the tiny profile, and skips that test. An attack whose poisoning draws nothing at
random declares ``seeded = False`` (a different seed then may give the same manifest).

Defenses of every kind (``defenses.base``: training, task, filter, repair) run end to end: a
filter or a repair cell trains (or loads) the cached undefended model first; the row checker knows
how many steps each kind trains and reads ``d_*`` / ``det_*`` columns by the name after the prefix.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import random
from pathlib import Path

import pytest
import torch

import plugins.demo_attack  # noqa: F401  (registers "demo-frame" before the lists below are built)
import plugins.demo_defenses  # noqa: F401  (one defense of each kind, README "Adding a defense")
from poisonbench.attacks.backdoor import BackdoorAttack
from poisonbench.attacks.base import Attack
from poisonbench.config import PROFILES, resolve
from poisonbench.defenses.base import DefenseBase
from poisonbench.registry import ATTACKS, DATASETS, DEFENSES, Registry, param_fields
from poisonbench.runner import execute, prepare

PROFILE = "tiny"
REGISTRIES = {"attack": ATTACKS, "defense": DEFENSES, "dataset": DATASETS}
PLUGINS = [(kind, name) for kind, reg in REGISTRIES.items() for name in reg.names()]
ATTACK_NAMES, DEFENSE_NAMES, DATASET_NAMES = ATTACKS.names(), DEFENSES.names(), DATASETS.names()
# The cells that train: every attack against one defense, every other defense against one attack.
E2E_DEFENSE = "clip" if "clip" in DEFENSE_NAMES else DEFENSE_NAMES[0]
E2E_ATTACK = "badnet" if "badnet" in ATTACK_NAMES else ATTACK_NAMES[0]
E2E_CELLS = ([(a, E2E_DEFENSE, "fashion-mnist") for a in ATTACK_NAMES]
             + [(E2E_ATTACK, d, "fashion-mnist") for d in DEFENSE_NAMES if d != E2E_DEFENSE]
             + [(E2E_ATTACK, E2E_DEFENSE, ds) for ds in DATASET_NAMES if ds != "fashion-mnist"])
FILES_ROWS = 600  # Fashion-MNIST training images written as PNG files for the `files` dataset


TINY_SKIP = "tiny_skip"  # key of test_params: why the plugin cannot run end to end on the tiny profile


def plugin_test_params(kind: str, name: str) -> dict:
    """The parameters plugin ``name`` asks its tests to use (its ``test_params``, default none)."""
    return {k: v for k, v in getattr(REGISTRIES[kind].get(name), "test_params", {}).items() if k != TINY_SKIP}


# --- data, shared by every test of the session ------------------------------------------------

@pytest.fixture(scope="session")
def files_csv(tmp_path_factory) -> Path:
    """A CSV of FILES_ROWS real Fashion-MNIST training images (PNG files beside it) with
    generated captions: the `files` dataset's input, as open_clip's CSV format has it."""
    import pandas as pd
    from PIL import Image

    from poisonbench.datasets import fashion_mnist as fm

    root = tmp_path_factory.mktemp("conformance_files")
    x, y = fm.load_split(fm.find_root(), "train")
    rng = random.Random(0)
    (root / "img").mkdir()
    for i in range(FILES_ROWS):
        buf = io.BytesIO()
        Image.fromarray(x[i, 0].numpy(), "L").save(buf, format="PNG")
        (root / "img" / f"{i}.png").write_bytes(buf.getvalue())
    captions = [fm.write_caption(int(label), rng) for label in y[:FILES_ROWS]]
    pd.DataFrame({"filepath": [f"img/{i}.png" for i in range(FILES_ROWS)], "title": captions}).to_csv(
        root / "train.csv", index=False)
    return root / "train.csv"


@pytest.fixture(scope="session")
def dataset_params(request):
    """dataset name -> the dataset parameters its tests run with on the tiny profile. The `files`
    dataset reads a CSV written here (all its pairs: the profile's n_train=512 exceeds them); any
    other dataset uses its ``test_params`` and is skipped when it needs files that are not here."""
    def params(name: str) -> dict:
        if name == "files":
            csv = request.getfixturevalue("files_csv")
            # its pairs stand in for a fine-tuning split too (repairs need one; only prepare's checks use it here)
            return {"train": f"csv:{csv}", "finetune": f"csv:{csv}", "n_train": 0, "n_heldout": 100,
                    **plugin_test_params("dataset", name)}
        return plugin_test_params("dataset", name)

    return params


@pytest.fixture(scope="session")
def bundles(dataset_params):
    """dataset name -> its clean DatasetBundle for seed 0 on the tiny profile, loaded once.
    Every test below checks that poisoning leaves it unchanged, so sharing it is safe."""
    cache: dict = {}

    def load(name: str):
        if name not in cache:
            cfg = config(E2E_ATTACK, E2E_DEFENSE, name, dataset_params(name))
            ds_cls = DATASETS.get(name)
            try:
                cache[name] = ds_cls(ds_cls.Params(**cfg.dataset_params)).load(cfg.seed)
            except FileNotFoundError as e:
                cache[name] = e
        if isinstance(cache[name], FileNotFoundError):
            pytest.skip(f"dataset {name!r} needs files that are not here: {cache[name]}")
        return cache[name]

    return load


def config(attack: str, defense: str, dataset: str, ds_params: dict, seed: int = 0, **training):
    """The tiny-profile config of a cell, with each plugin's ``test_params``."""
    return resolve(attack, defense, PROFILE, seed, plugin_test_params("attack", attack), plugin_test_params("defense", defense),
                   ds_params, dataset, **training)


# --- parameters -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, name", PLUGINS, ids=[f"{k}-{n}" for k, n in PLUGINS])
def test_parameters_round_trip_from_their_command_line_strings(kind, name):
    """str(value) -> the registry's conversion -> the same value and type, for every field's
    default, the values the profiles set and the plugin's test parameters."""
    registry = REGISTRIES[kind]
    fields = param_fields(registry.get(name).Params)
    values = [{f: default for f, _, default, _ in fields}, plugin_test_params(kind, name)]
    for prof in PROFILES.values():
        values.append(prof.dataset_params if kind == "dataset" else getattr(prof, f"{kind}_params").get(name, {}))
    names = {f for f, _, _, _ in fields}
    for given in values:
        for key, value in given.items():
            if key not in names:
                continue  # a profile's dataset parameter this dataset does not have
            held = getattr(registry.params(name, {key: value}), key)  # as a resolved config holds it
            back = getattr(registry.params(name, {key: str(held)}), key)
            assert back == held and type(back) is type(held), f"{kind} {name}: {key}={held!r} came back as {back!r}"
    assert isinstance(getattr(registry.get(name), "test_params", {}).get(TINY_SKIP, ""), str)
    for f, _, default, help_text in fields:
        assert help_text, f"{kind} {name}: parameter {f} has no help text for `bench list`"


# --- poisoning --------------------------------------------------------------------------------

def fingerprint(train) -> tuple:
    """Everything of a CaptionDataset that the model sees or the row records."""
    return (train.images.clone(), list(train.captions), train.labels.clone(), train.is_poison.clone())


def assert_same_dataset(a, b, what: str) -> None:
    fa, fb = fingerprint(a), fingerprint(b)
    assert torch.equal(fa[0], fb[0]), f"{what}: images differ"
    assert fa[1] == fb[1], f"{what}: captions differ"
    assert torch.equal(fa[2], fb[2]), f"{what}: labels differ"
    assert torch.equal(fa[3], fb[3]), f"{what}: poison flags differ"


def assert_poison_deterministic(attack_cls: type, params, data) -> None:
    """The conformance check of an attack's ``poison``: two calls with the same seed give the
    same images, captions, labels, poison flags and manifest hash; the manifest survives strict
    JSON (no NaN, only JSON types); the clean data is left intact; another seed gives another
    manifest unless the class declares ``seeded = False``. Raises AssertionError otherwise."""
    before = fingerprint(data.train)
    a, b = attack_cls(params, 0).poison(data), attack_cls(params, 0).poison(data)
    assert_same_dataset(a.train, b.train, f"{attack_cls.name}: two poison() calls with seed 0")
    assert a.manifest_hash() == b.manifest_hash(), f"{attack_cls.name}: the manifest differs between calls with seed 0"
    text = json.dumps(a.manifest, allow_nan=False)
    assert json.loads(text) == a.manifest, f"{attack_cls.name}: the manifest does not survive a JSON round trip"
    assert_same_dataset(data.train, type(data.train)(*before), f"{attack_cls.name}: the clean training set after poison()")
    if getattr(attack_cls, "seeded", True):
        other = attack_cls(params, 1).poison(data)
        assert other.manifest_hash() != a.manifest_hash(), \
            f"{attack_cls.name}: seeds 0 and 1 give the same manifest; declare seeded = False if nothing is drawn at random"


@pytest.mark.parametrize("dataset", DATASET_NAMES)
@pytest.mark.parametrize("attack", ATTACK_NAMES)
def test_poisoning_is_deterministic_per_seed_and_its_manifest_is_json(attack, dataset, bundles, dataset_params):
    data = bundles(dataset)
    cfg = config(attack, E2E_DEFENSE, dataset, dataset_params(dataset))
    cls = ATTACKS.get(attack)
    assert_poison_deterministic(cls, ATTACKS.params(attack, cfg.attack_params), data)


@pytest.mark.parametrize("dataset", DATASET_NAMES)
@pytest.mark.parametrize("defense", DEFENSE_NAMES)
@pytest.mark.parametrize("attack", ATTACK_NAMES)
def test_every_cell_passes_the_checks_before_training(attack, defense, dataset, bundles, dataset_params):
    """Every attack x defense x dataset cell of the tiny profile can run: ``prepare`` (parameters
    against the data, poisoning, the defense's check, one batch) raises nothing."""
    data = bundles(dataset)
    cell = prepare(config(attack, defense, dataset, dataset_params(dataset)), "cpu", data=data)
    assert cell.plan.n_poison == int(cell.plan.train.is_poison.sum()) and len(cell.plan.train) >= cell.cfg.batch_size


# --- one cell end to end ----------------------------------------------------------------------

NOT_RATES = {"final_loss", "linear_probe_c", "trig_corr"}  # numbers of the row that are neither counts, seconds nor fractions
NOT_RATE_PREFIXES = ("final_loss_",)  # a task's loss terms
PROVENANCE = {"seed", "epochs", "batch_size", "world_size"}
COUNTS = {"steps", "resumed_from_epoch", "n", "poisons_removed", "clean_removed"}  # counts not named n_* / *_n


def assert_row_in_range(row: dict, cell) -> None:
    """Every number of a finished row in its range. Names carry the kind: ``n_*`` and ``*_n`` are
    counts (integers >= 0), ``*_s`` seconds (>= 0), the few in NOT_RATES their own, and every
    other number (accuracies, ASR, recall, attack metrics) a fraction in [0, 1]."""
    assert row["status"] == "ok"
    required = ["clean_top1", "clean_top5", "n_eval", "final_loss", "steps", "n_poison", "poison_rate"]
    required += ["linear_probe_top1"] * (cell.data.probe_train is not None)
    required += [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] * (cell.data.heldout is not None)
    required += ["asr"] * (cell.plan.n_poison > 0)
    for key in required:
        value = row.get(key)
        assert isinstance(value, (int, float)) and math.isfinite(value), f"{key} = {value!r} must be a finite number"
    for key, value in row.items():
        if key.startswith("p_") or key in PROVENANCE or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        assert math.isfinite(value), f"{key} = {value}"
        if key.startswith(NOT_RATE_PREFIXES):
            continue
        key = key.removeprefix("d_").removeprefix("det_")  # a defense's own numbers, detection metrics: named alike
        if key.startswith("n_") or key.endswith("_n") or key in COUNTS:
            assert isinstance(value, int) and value >= 0, f"{key} = {value!r} is not a count"
        elif key.endswith("_s"):
            assert value >= 0, f"{key} = {value} seconds"
        elif key == "linear_probe_c":
            assert value > 0
        elif key == "trig_corr":  # a correlation
            assert -1.0 <= value <= 1.0, f"{key} = {value}"
        elif key not in NOT_RATES:
            assert 0.0 <= value <= 1.0, f"{key} = {value} is not in [0, 1]"
    assert row["clean_top1"] <= row["clean_top5"]
    # the per-epoch curves: one fraction per epoch trained (a repair: per fine-tuning epoch)
    assert row["curve_epoch"] == list(range(1, len(row["curve_epoch"]) + 1)) and row["curve_epoch"]
    for key in ("curve_clean_top1",) + ("curve_asr",) * (cell.plan.n_poison > 0):
        assert len(row[key]) == len(row["curve_epoch"]) and all(0.0 <= v <= 1.0 for v in row[key]), key
    if cell.data.heldout is not None:
        for d in ("i2t", "t2i"):
            assert row[f"{d}_r1"] <= row[f"{d}_r5"] <= row[f"{d}_r10"]
    assert row["n_poison"] == cell.plan.n_poison and row["n_train"] == len(cell.plan.train)
    kind = cell.defense.kind
    if kind == "filter":  # the fresh model trains on the kept pairs
        assert row["n_kept"] + row["n_filtered"] == len(cell.plan.train)
        assert row["steps"] == cell.cfg.epochs * (row["n_kept"] // cell.cfg.batch_size)
    elif kind == "repair":  # the fine-tuning phase on the clean split
        phase = cell.defense.phase(cell.cfg)
        assert row["steps"] == phase.epochs * (len(cell.data.finetune) // phase.batch_size)
    else:
        assert row["steps"] == cell.cfg.epochs * (len(cell.plan.train) // cell.cfg.batch_size)
    if kind in ("filter", "repair"):
        assert isinstance(row["start_model"], str) and row["start_model"] != cell.cfg.run_id
    assert row["n_eval"] == len(cell.data.eval)


def assert_equal_state(a, b, where: str = "state") -> None:
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def assert_state_loads_safely(defense: DefenseBase, tmp_path: Path) -> None:
    """``defense.state_dict()`` saves with torch.save, loads with ``weights_only=True`` unchanged,
    and a fresh defense given it returns the same state."""
    state = defense.state_dict()
    torch.save(state, tmp_path / "defense.pt")
    loaded = torch.load(tmp_path / "defense.pt", weights_only=True)
    assert_equal_state(state, loaded)
    fresh = type(defense)(defense.params, defense.seed)
    fresh.load_state_dict(loaded)
    assert_equal_state(fresh.state_dict(), state)


@pytest.mark.parametrize("attack, defense, dataset", E2E_CELLS, ids=["-".join(c) for c in E2E_CELLS])
def test_one_cell_runs_end_to_end_with_every_number_in_range(attack, defense, dataset, bundles, dataset_params, tmp_path):
    """One tiny-profile cell trained and evaluated in this process. Attack cells train 1 epoch;
    defense cells the profile's 2, so that defenses acting from the second epoch on (RoCLIP's
    matching) act and hold state."""
    why = {**getattr(ATTACKS.get(attack), "test_params", {}), **getattr(DEFENSES.get(defense), "test_params", {})}.get(TINY_SKIP)
    if why:
        pytest.skip(f"cannot run on the tiny profile: {why}")
    data = bundles(dataset)
    epochs = 1 if defense == E2E_DEFENSE else None
    cell = prepare(config(attack, defense, dataset, dataset_params(dataset), epochs=epochs), "cpu", data=data)
    row = execute(cell, tmp_path, progress=False)
    assert_row_in_range(row, cell)
    assert_state_loads_safely(cell.defense, tmp_path)


# --- the suite itself -------------------------------------------------------------------------

def test_a_plugin_registered_by_the_tests_gets_every_conformance_test():
    assert "demo-frame" in ATTACK_NAMES
    assert ("attack", "demo-frame") in PLUGINS
    assert any(a == "demo-frame" for a, _, _ in E2E_CELLS)


def test_every_plugin_class_of_the_builtin_packages_is_registered():
    """A concrete plugin class (one with its own ``Params``) in a built-in module that lost its
    ``@register_*`` decorator would drop out of every list above: it must be registered."""
    import importlib
    import inspect
    import pkgutil

    for package, base, registry in (("poisonbench.attacks", Attack, ATTACKS), ("poisonbench.defenses", DefenseBase, DEFENSES)):
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            module = importlib.import_module(f"{package}.{info.name}")
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if cls.__module__ == module.__name__ and issubclass(cls, base) and "Params" in vars(cls):
                    assert registry.get(getattr(cls, "name", "?")) is cls, f"{cls.__qualname__} of {module.__name__} is not registered"
    for info in pkgutil.iter_modules(importlib.import_module("poisonbench.datasets").__path__):
        module = importlib.import_module(f"poisonbench.datasets.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and "Params" in vars(cls) and hasattr(cls, "load"):
                assert DATASETS.get(getattr(cls, "name", "?")) is cls, f"{cls.__qualname__} of {module.__name__} is not registered"


BROKEN = Registry("attack", "poisonbench.attacks", "poisonbench.tests.broken")  # kept out of the real registry


@BROKEN.register("unseeded-rows")
class UnseededRows(BackdoorAttack):
    """A broken plugin: ``poison`` draws its source rows from torch's global RNG (an unseeded
    ``torch.randint``), so two runs of the same cell poison different pairs."""

    Params = ATTACKS.get("badnet").Params

    def poison(self, data):
        plan = super().poison(data)
        n = len(data.train)
        rows = torch.randint(0, n, (plan.n_poison,))  # no generator: not the run's seed
        plan.train.images[n:] = data.train.images[rows]
        plan.manifest["source_rows"] = rows.tolist()
        return plan

    def apply_trigger(self, images, g):
        return images.clone()

    def trigger_manifest(self):
        return {"type": "none"}


def test_a_plugin_that_breaks_determinism_fails_the_check(bundles):
    data = bundles("fashion-mnist")
    with pytest.raises(AssertionError, match="seed 0"):
        assert_poison_deterministic(UnseededRows, UnseededRows.Params(n_poison=20), data)
    # its well-behaved parent, with the same parameters, passes
    assert_poison_deterministic(ATTACKS.get("badnet"), UnseededRows.Params(n_poison=20), data)


def test_the_row_checker_catches_an_out_of_range_number(bundles, tmp_path):
    """assert_row_in_range is not vacuous: a row with an accuracy above 1, a negative count or a
    missing metric that must exist fails it."""
    data = bundles("fashion-mnist")
    cell = prepare(config(E2E_ATTACK, E2E_DEFENSE, "fashion-mnist", {}), "cpu", data=data)
    good = {"status": "ok", "clean_top1": 0.5, "clean_top5": 0.9, "n_eval": len(data.eval), "final_loss": 2.0,
            "steps": cell.cfg.epochs * (len(cell.plan.train) // cell.cfg.batch_size), "n_poison": cell.plan.n_poison,
            "n_train": len(cell.plan.train), "poison_rate": cell.plan.poison_rate, "asr": 0.3, "asr_n": 5,
            "linear_probe_top1": 0.7, **{f"{d}_r{k}": k / 10 for d in ("i2t", "t2i") for k in (1, 5, 10)},
            "curve_epoch": [1, 2], "curve_clean_top1": [0.3, 0.5], "curve_asr": [0.1, 0.3], "trig_corr": -0.2}
    assert_row_in_range(good, cell)
    for bad in ({"asr": 1.5}, {"asr_n": -1}, {"asr_n": 2.5}, {"clean_top1": float("nan")}, {"linear_probe_top1": None},
                {"my_attack_metric": 3.0}, {"clean_top1": 0.95}, {"curve_asr": [0.1]}, {"curve_clean_top1": [0.3, 1.2]},
                {"curve_epoch": []}, {"trig_corr": 1.5}):
        with pytest.raises(AssertionError):
            assert_row_in_range({**good, **bad}, cell)
