"""README.md's "Adding a defense" example is tests/plugins/demo_defenses.py, which the conformance
suite registers and runs end to end (tests/test_conformance.py): so the README's code runs."""
from pathlib import Path

import poisonbench
from poisonbench.registry import DEFENSES

ROOT = Path(__file__).resolve().parent.parent


def readme_block(section: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    after = text[text.index(section):]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_is_the_tested_plugin_module():
    module = (ROOT / "tests" / "plugins" / "demo_defenses.py").read_text(encoding="utf-8")
    code = module.split('"""', 2)[2].lstrip("\n")  # the module without its docstring
    assert readme_block("### Adding a defense") == code


def test_the_example_registers_one_defense_of_each_kind():
    import plugins.demo_defenses  # noqa: F401

    kinds = {name: DEFENSES.get(name).kind for name in ("mine", "my-task", "my-filter", "my-repair")}
    assert sorted(kinds.values()) == ["filter", "repair", "task", "training"]
    assert {"mine", "my-task", "my-filter", "my-repair"} <= set(poisonbench.list_defenses())
