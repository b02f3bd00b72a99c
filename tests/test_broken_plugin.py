"""A third-party plugin whose module fails to import does not break the tool (issue 13 item 2):
it is reported by `bench list` and when asked for by name, and everything else works. The plugins
here are real entry points: a ``*.dist-info`` folder on the import path declaring them."""
import os
import subprocess
import sys
import textwrap

import pytest

from poisonbench.registry import ATTACKS, Registry, RegistryError

MISSING = "poisonbench_test_missing_dependency"


def install(folder, group: str, entries: dict[str, str], modules: dict[str, str]) -> None:
    """Write modules and a distribution ``brokenplug`` declaring ``entries`` (name -> module) in ``group``."""
    dist = folder / "brokenplug-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{n} = {m}\n" for n, m in entries.items()))
    for name, code in modules.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(code))


BROKEN = f"""
from dataclasses import dataclass
from poisonbench.registry import register_attack

@register_attack("halfway")  # registered before the import fails: must not stay usable
class Halfway:
    @dataclass
    class Params:
        pass

import {MISSING}
"""

GOOD = """
from dataclasses import dataclass
from poisonbench.registry import register_attack
from poisonbench.attacks.none import NoAttack

@register_attack("good-plugin")
class Good(NoAttack):
    '''A working third-party attack beside the broken one.'''
    @dataclass
    class Params:
        pass
"""


def request_plugins(tmp_path, monkeypatch, request):
    """Install the two plugins under ``tmp_path/site`` and put it on the import path; returns the folder."""
    folder = tmp_path / "site"
    install(folder, "poisonbench.attacks", {"brokenattack": "brokenplug_mod", "good-plugin": "goodplug_mod"},
            {"brokenplug_mod": BROKEN, "goodplug_mod": GOOD})
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("goodplug_mod", None)  # imported afresh, and forgotten afterwards
    request.addfinalizer(lambda: sys.modules.pop("goodplug_mod", None))
    return folder


@pytest.fixture
def plugins(tmp_path, monkeypatch, request):
    return request_plugins(tmp_path, monkeypatch, request)


@pytest.fixture
def reg(monkeypatch, tmp_path, request):
    """The attack registry as a fresh process sees it with the plugins installed (the modules
    register themselves in ``ATTACKS``; its state is restored afterwards)."""
    ATTACKS.names()  # built-ins loaded into the real registry first, so that restoring it keeps them
    request_plugins(tmp_path, monkeypatch, request)
    for attr, value in (("_items", dict(ATTACKS._items)), ("_broken", {}), ("_loaded", False)):
        monkeypatch.setattr(ATTACKS, attr, value)
    return ATTACKS


def test_a_broken_entry_point_is_recorded_and_the_rest_loads(reg):
    names = reg.names()
    assert "badnet" in names and "good-plugin" in names  # built-ins and the working plugin
    assert "brokenattack" not in names and "halfway" not in names
    [broken] = reg.broken()
    assert (broken.name, broken.module, broken.dist) == ("brokenattack", "brokenplug_mod", "brokenplug")
    assert broken.error == f"ModuleNotFoundError: No module named {MISSING!r}"
    with pytest.raises(RegistryError, match=r"'brokenattack' cannot be used.*module brokenplug_mod.*" + MISSING):
        reg.get("brokenattack")
    # a name the broken module would have registered: unknown, and the message names the broken entry point
    with pytest.raises(RegistryError, match=r"unknown attack 'halfway'.*brokenplug_mod.*" + MISSING):
        reg.get("halfway")


def test_a_broken_builtin_module_fails_loudly(tmp_path, monkeypatch):
    pkg = tmp_path / "fakeplugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("BUILTIN_MODULES = ('bad',)\n")
    (pkg / "bad.py").write_text(f"import {MISSING}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ModuleNotFoundError, match=MISSING):
            Registry("thing", "fakeplugins", "poisonbench.things").names()
    finally:
        sys.modules.pop("fakeplugins", None)


def bench(plugins, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "poisonbench", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_bench_list_shows_the_broken_plugin_and_run_refuses_it_before_training(plugins, tmp_path):
    out = bench(plugins, "list", "attacks")
    assert out.returncode == 0, out.stderr
    assert "badnet" in out.stdout and "good-plugin" in out.stdout
    section = out.stdout[out.stdout.index("plugins that failed to load"):]
    assert "brokenattack" in section and "brokenplug_mod" in section and MISSING in section

    res = tmp_path / "res"
    run = bench(plugins, "run", "-p", "tiny", "-a", "brokenattack", "-r", str(res), "-q")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "brokenplug_mod" in run.stderr and MISSING in run.stderr
    assert not (res / "runs").exists()  # refused before any training or writing


NO_DEFAULT = """
from dataclasses import dataclass, field
from poisonbench.registry import register_attack
from poisonbench.attacks.none import NoAttack

@register_attack("nodefault")
class NoDefault(NoAttack):
    '''Its Params has a field without a default: `bench list` could not show it.'''
    @dataclass
    class Params:
        target: str = field(metadata={"help": "no default"})
"""

EXITS = """
import sys
sys.exit(3)
"""

INTERRUPTS = """
raise KeyboardInterrupt
"""


def fresh_attacks(monkeypatch, tmp_path, entries: dict[str, str], modules: dict[str, str]):
    """ATTACKS as a fresh process sees it with ``modules`` installed as the entry points ``entries``."""
    ATTACKS.names()
    folder = tmp_path / "site"
    install(folder, "poisonbench.attacks", entries, modules)
    monkeypatch.syspath_prepend(str(folder))
    for attr, value in (("_items", dict(ATTACKS._items)), ("_broken", {}), ("_loaded", False)):
        monkeypatch.setattr(ATTACKS, attr, value)
    return folder


def test_a_plugin_without_defaults_or_exiting_on_import_is_a_broken_plugin(monkeypatch, tmp_path):
    fresh_attacks(monkeypatch, tmp_path, {"nodefault": "nodefault_mod", "exits": "exits_mod"},
                  {"nodefault_mod": NO_DEFAULT, "exits_mod": EXITS})
    try:
        assert "badnet" in ATTACKS.names() and not {"nodefault", "exits"} & set(ATTACKS.names())
        broken = {b.name: b.error for b in ATTACKS.broken()}
        assert broken == {"exits": "SystemExit: 3",
                          "nodefault": "RegistryError: attack 'nodefault': parameter target has no default; every "
                                       "parameter needs one (declare it with registry.param(default, help))"}
    finally:
        for m in ("nodefault_mod", "exits_mod"):
            sys.modules.pop(m, None)


def test_a_plugin_raising_keyboardinterrupt_on_import_propagates_naming_the_entry_point(monkeypatch, tmp_path, capsys):
    fresh_attacks(monkeypatch, tmp_path, {"interrupts": "interrupts_mod"}, {"interrupts_mod": INTERRUPTS})
    try:
        with pytest.raises(KeyboardInterrupt):
            ATTACKS.names()
    finally:
        sys.modules.pop("interrupts_mod", None)
    assert "interrupted while importing the attack plugin entry point interrupts -> interrupts_mod" in capsys.readouterr().err


def test_bench_list_survives_plugins_without_defaults_or_exiting_on_import(tmp_path):
    folder = tmp_path / "site"
    install(folder, "poisonbench.attacks", {"nodefault": "nodefault_mod", "exits": "exits_mod"},
            {"nodefault_mod": NO_DEFAULT, "exits_mod": EXITS})
    out = bench(folder, "list", "attacks")
    assert out.returncode == 0, out.stderr
    section = out.stdout[out.stdout.index("plugins that failed to load"):]
    assert "badnet" in out.stdout[:out.stdout.index("plugins that failed to load")]
    assert "nodefault" in section and "has no default" in section and "SystemExit: 3" in section
