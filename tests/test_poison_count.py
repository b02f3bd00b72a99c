"""An attack that would poison nothing is refused before training; the leaderboard shows the count."""
import pandas as pd
import pytest
from click.testing import CliRunner

from poisonbench.attacks.backdoor import BackdoorAttack
from poisonbench.cli import main
from poisonbench.config import resolve
from poisonbench.registry import ATTACKS, build_params
from poisonbench.report import display, leaderboard, rich_tables, to_text
from poisonbench.runner import prepare
from poisonbench.store import read_runs

BACKDOORS = sorted(n for n in ATTACKS.names() if issubclass(ATTACKS.get(n), BackdoorAttack))


def test_a_poison_rate_that_rounds_to_zero_is_refused_by_bench_run(tmp_path):
    res = tmp_path / "res"
    out = CliRunner().invoke(main, ["run", "-A", "poison_rate=0.0001", "--profile", "tiny", "--results", str(res)])
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())  # rich wraps long lines
    assert "nothing was started" in text and "poison_rate=0.0001 of 512 clean pairs" in text
    assert "gives 0 poisoned pairs" in text and "poison_rate >= 0.002" in text
    assert read_runs(res).empty and not (res / "checkpoints").exists()


@pytest.mark.parametrize("name", BACKDOORS)
def test_zero_poisoned_pairs_are_refused_for_every_backdoor(bundle, name):
    cls = ATTACKS.get(name)
    for params, origin in (({"n_poison": 0}, "n_poison=0 gives 0"), ({"poison_rate": 0.001}, "poison_rate=0.001 of 30")):
        attack = cls(build_params(cls.Params, {"target": "bag", **params}, name), 0)
        with pytest.raises(ValueError, match=f"{name}: {origin}.*raise it"):
            attack.check(bundle)


def test_the_clean_baseline_still_runs_and_the_engine_refuses_any_empty_attack(monkeypatch):
    cell = prepare(resolve("none", "clip", "tiny"), "cpu")
    assert cell.plan.n_poison == 0
    from poisonbench.attacks.targeted import Targeted
    from poisonbench.runner import ConfigError

    monkeypatch.setattr(Targeted, "poison", lambda self, data: ATTACKS.get("none").poison(self, data))
    with pytest.raises(ConfigError, match="attack targeted: these parameters poison 0 training pairs"):
        prepare(resolve("targeted", "clip", "tiny"), "cpu", data=cell.data)


def test_leaderboard_tables_show_the_poisoned_pairs():
    rows = [dict(run_id=str(i), status="ok", attack="badnet", defense="clip", profile="tiny", seed=i, clean_top1=0.8,
                 clean_top5=0.9, linear_probe_top1=0.7, asr=0.5, asr_n=100, n_poison=20, config="{}") for i in range(2)]
    rows.append(dict(rows[0], run_id="n", attack="none", asr=None, asr_n=None, n_poison=0))
    board = leaderboard(pd.DataFrame(rows))
    shown = display(board)
    assert shown["badnet"]["poisoned pairs"].tolist() == ["20"] and shown["none"]["poisoned pairs"].tolist() == ["0"]
    assert all("poisoned pairs" in [c.header for c in t.columns] for t in rich_tables(board))
    assert to_text(board, "md").count("poisoned pairs") == 2  # one table per attack
    assert "n_poison" in to_text(board, "csv").splitlines()[0]  # the CSV keeps its column names
