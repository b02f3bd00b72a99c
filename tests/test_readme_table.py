"""README.md's reference tables are what scripts/readme_table.py computes from the committed store
(results/reference), so no number in it is typed by hand."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_table_is_generated_from_the_reference_store():
    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "scripts" / "readme_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for profile in module.PROFILES:
        start, end = module.markers(profile)
        assert start in readme and end in readme, profile
    assert module.rewrite_all(readme) == readme, "run python scripts/readme_table.py"
