"""docs/FINDINGS.md is what scripts/findings.py writes from the committed store, so no number in it
is typed by hand; and its row selection keeps settings apart."""
import importlib.util
from pathlib import Path

import pandas as pd

from poisonbench.store import read_runs

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("findings", ROOT / "scripts" / "findings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_findings_is_generated_from_the_reference_store():
    module = load_script()
    text = module.findings(read_runs(ROOT / "results" / "reference"), None)
    assert (ROOT / "docs" / "FINDINGS.md").read_text() == text, "run python scripts/findings.py"


def test_rows_of_a_setting_exclude_other_triggers_captions_and_pools():
    module = load_script()
    base = {"status": "ok", "profile": "cpu-small", "attack": "badnet", "defense": "roclip"}
    df = pd.DataFrame([
        {**base, "run_id": "old"},  # written before the parameters existed: their defaults
        {**base, "run_id": "random", "p_attack_location": "random", "p_attack_pattern": "fresh"},
        {**base, "run_id": "web", "p_dataset_captions": "web"},
        {**base, "run_id": "pool", "p_defense_pool_size": 256},
        {**base, "run_id": "default", "p_attack_location": "bottom-right", "p_dataset_captions": "templates"},
    ])
    assert module.rows(df, "badnet", "roclip")["run_id"].tolist() == ["old", "default"]
    assert module.rows(df, "badnet", "roclip", **module.RANDOM)["run_id"].tolist() == ["random"]
    assert module.rows(df, "badnet", "roclip", "web")["run_id"].tolist() == ["web"]
    assert module.rows(df, "badnet", "roclip", pool_size=256)["run_id"].tolist() == ["pool"]
