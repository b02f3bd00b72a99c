"""The engine knows no plugin by name (issue 13 item 4): what a dataset does beyond ``load`` is an
optional hook of the dataset (``datasets.base.Dataset``), which a plugin dataset gets by
implementing it, and no plugin's name appears in the engine's logic."""
import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from poisonbench.config import resolve
from poisonbench.datasets.base import CaptionDataset, DatasetBundle, EvalSet
from poisonbench.grid import GridSpec
from poisonbench.registry import ATTACKS, DATASETS, DEFENSES, register_dataset

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog"]


@dataclasses.dataclass
class ToyParams:
    n: int = 128


class Toy:
    """Random 28 px images captioned by one of two classes (a dataset plugin of these tests)."""

    Params = ToyParams

    def __init__(self, params):
        self.params = params

    def load(self, seed: int) -> DatasetBundle:
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(self.params.n) % 2
        images = torch.randint(0, 256, (self.params.n, 3, 28, 28), generator=g, dtype=torch.uint8)
        train = CaptionDataset(images, [f"a photo of a {CLASSES[y]}" for y in labels.tolist()], labels)
        ev = EvalSet(images[:40].clone(), labels[:40].clone(), list(CLASSES), ["a photo of a {}."])
        return DatasetBundle(train, ev, [[c] for c in CLASSES], ["a photo of {}."])


class ToyWriting(Toy):
    """Toy that writes its poisoned pairs out (the optional ``write_poison`` hook)."""

    def write_poison(self, train: CaptionDataset, folder: Path) -> Path:
        folder.mkdir(parents=True)
        rows = train.is_poison.nonzero().squeeze(1).tolist()
        out = folder / "poison.txt"
        out.write_text("".join(f"{train.captions[r]}\n" for r in rows))
        return out


class ToyClaimingData(Toy):
    cli_options = {"data": "n"}


@pytest.fixture
def registered(monkeypatch):
    """Registers the toy datasets for one test (the registry is restored afterwards)."""
    DATASETS.names()  # built-ins loaded first, so that restoring the registry keeps them
    monkeypatch.setattr(DATASETS, "_items", dict(DATASETS._items))
    register_dataset("toy-writing")(ToyWriting)
    register_dataset("toy")(Toy)
    return monkeypatch


def test_a_plugin_dataset_with_the_hook_gets_its_poisoned_file_into_the_row(registered, tmp_path):
    from poisonbench.runner import run_cell

    cfg = resolve("badnet", "clip", "tiny", 0, {"n_poison": 8, "target": "cat"}, dataset="toy-writing", epochs=1)
    row = run_cell(cfg, tmp_path, device="cpu", progress=False)
    assert row["status"] == "ok" and row["n_poison"] == 8
    written = Path(row["poison_files"])
    assert written == tmp_path / "poison" / cfg.run_id / "poison.txt"
    assert written.read_text().count("\n") == 8 and "cat" in written.read_text()


def test_without_the_hook_or_without_poison_nothing_is_written(registered, tmp_path):
    from poisonbench.runner import prepare, write_poisoned_set

    cell = prepare(resolve("badnet", "clip", "tiny", 0, {"n_poison": 8, "target": "cat"}, dataset="toy"), "cpu")
    assert write_poisoned_set(cell, tmp_path) is None
    clean = prepare(resolve("none", "clip", "tiny", 0, dataset="toy-writing"), "cpu")
    assert write_poisoned_set(clean, tmp_path) is None
    assert not (tmp_path / "poison").exists()


def test_data_and_eval_go_to_the_one_dataset_that_claims_them(registered):
    spec = GridSpec(data="csv:pairs.csv", eval="cifar10:/data/cifar")
    assert spec.dataset() == ("files", {"train": "csv:pairs.csv", "eval": "cifar10:/data/cifar"})  # as before
    assert GridSpec(data="wds:a.tar").dataset() == ("files", {"train": "wds:a.tar"})
    register_dataset("toy-claiming")(ToyClaimingData)
    with pytest.raises(ValueError, match=r"several registered datasets claim it \(files, toy-claiming\)"):
        spec.dataset()


# Plugin names may appear in benchmark/ only as data: defaults and tables that name a plugin,
# never in a test of which plugin is running. (file, enclosing top-level definition) -> why.
ALLOWED = {
    ("config.py", "PROFILES"): "the profiles' table names each profile's dataset and per-plugin defaults",
    ("cli.py", "grid_options"): "default --attack/--defense of the command line",
    ("cli.py", "preview"): "default --attack, and the defense needed to resolve a config (it does not change the "
                           "poisoned pairs shown)",
    ("grid.py", "GridSpec"): "default attacks/defenses of a grid, as on the command line",
    ("perf.py", "*"): "bench perf times a fixed menu of defenses (clip, roclip, aug-only) and the clean baseline; "
                      "left for a rework that times every registered defense",
    ("registry.py", "_convert"): "'none' is a spelling of None there, not the attack",
}


def plugin_name_strings() -> list[tuple[str, str, int, str]]:
    """(file, enclosing top-level definition, line, string) of every string constant in
    benchmark/*.py, docstrings aside, that equals a registered plugin's name."""
    names = set(ATTACKS.names()) | set(DEFENSES.names()) | set(DATASETS.names())
    found = []
    for path in sorted((ROOT / "benchmark").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for top in tree.body:
            where = getattr(top, "name", None) or next(
                (t.id for t in getattr(top, "targets", [getattr(top, "target", None)]) if isinstance(t, ast.Name)), "?")
            for n in ast.walk(top):
                if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings \
                        and n.value in names:
                    found.append((path.name, where, n.lineno, n.value))
    return found


def test_the_engine_names_no_plugin_outside_its_tables_of_defaults():
    found = plugin_name_strings()
    assert ("runner.py", "_execute") not in {(f, w) for f, w, _, _ in found}
    bad = [f"benchmark/{f}:{line} ({where}): {name!r}" for f, where, line, name in found
           if (f, where) not in ALLOWED and (f, "*") not in ALLOWED]
    assert not bad, "plugin names in the engine's logic:\n" + "\n".join(bad)
    assert ("config.py", "PROFILES") in {(f, w) for f, w, _, _ in found}  # the scan sees the table it allows
