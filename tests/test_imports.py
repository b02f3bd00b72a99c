"""The package's module structure (issue 13 item 3): no import cycles, the plugin base classes
import no plugin, and data code does not import the evaluator.

The import graph is built with ``ast`` from every module of the four source folders, counting
imports inside functions too (those are what hid the cycles). Importing ``a.b.c`` also runs the
packages ``a`` and ``a.b``, so those count as imported, except the importing module's own
packages (they are always initialised before it runs). ``registry.Registry`` imports the plugin
modules with ``importlib.import_module`` by name at its first look-up: that is not an import
statement, and it is not counted (the plugins import the registry to register themselves).
"""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"benchmark": "poisonbench", "attacks": "poisonbench.attacks", "defenses": "poisonbench.defenses",
            "datasets": "poisonbench.datasets"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module ``name`` (file ``path``) imports, anywhere in it."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            if node.level == 0:
                base = node.module
            elif node.module:
                base = f"{base}.{node.module}"
            targets.add(base)
            targets |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}  # from pkg import mod
    out = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # a.b.c runs a and a.b first
            mod = ".".join(parts[:i])
            own_package = name == mod or name.startswith(mod + ".")
            if mod in known and not own_package:
                out.add(mod)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of the directed graph, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_relative_local_and_package_imports():
    edges = graph()
    assert "poisonbench.datasets.images" in edges["poisonbench.datasets.lazy"]  # from .images import ...
    assert "poisonbench.runner" in edges["poisonbench.grid"]  # inside a function
    assert "poisonbench.wordnet" in edges["poisonbench.augment"]  # from . import wordnet
    # importing poisonbench.datasets.base runs poisonbench.datasets (its __init__) first
    assert {"poisonbench.datasets", "poisonbench.datasets.base"} <= edges["poisonbench.attacks.base"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_the_package_imports_one_that_imports_it():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_data_code_does_not_import_the_evaluator():
    edges = graph()
    for name, targets in edges.items():
        if name.startswith("poisonbench.datasets"):
            assert "poisonbench.evaluate" not in targets, name


def test_importing_the_plugin_bases_loads_no_plugin_and_no_open_clip():
    code = (
        "import sys\n"
        "import poisonbench.attacks.base, poisonbench.defenses.base\n"
        "from poisonbench.datasets import CaptionDataset, DatasetBundle, EvalSet\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith(('poisonbench', 'open_clip')))))\n"
    )
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                timeout=120).stdout.split())
    # preprocess: the leaf module of image geometry (torch/torchvision only) attacks apply triggers with;
    # survival: the leaf (torch and preprocess) whose TriggerViews an attack describes its poisons with
    assert loaded == {"poisonbench", "poisonbench.registry", "poisonbench.utils", "poisonbench.losses", "poisonbench.preprocess",
                      "poisonbench.survival",
                      "poisonbench.attacks", "poisonbench.attacks.base", "poisonbench.defenses",
                      "poisonbench.defenses.base", "poisonbench.datasets", "poisonbench.datasets.base"}, loaded
