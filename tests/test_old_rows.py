"""Rows of an older schema, and junk or odd rows at a cell's own name: `bench report`, `bench
status` and `bench run` of a done cell still work."""
import json
import re
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from poisonbench.cli import main
from poisonbench.config import resolve
from poisonbench.store import runs_dir, write_row


def old_schema_store(res):
    """Rows as older versions wrote them: no clean_top5, poison_rate, asr_n, schema metadata;
    one without seed, profile or config; an unknown column; a current row; a note."""
    runs = runs_dir(res)
    runs.mkdir(parents=True)

    def config(seed):
        return json.dumps({"attack": "badnet", "defense": "clip", "profile": "tiny", "seed": seed,
                           "attack_params": {"n_poison": 100}})

    pq.write_table(pa.Table.from_pylist([{
        "run_id": "old1", "status": "ok", "attack": "badnet", "defense": "clip", "profile": "tiny", "seed": 0,
        "config": config(0), "clean_top1": 0.5, "asr": 0.8, "n_poison": 100, "legacy_metric": "x"}]),
        runs / "old1.parquet")
    pq.write_table(pa.Table.from_pylist([{
        "run_id": "old2", "status": "ok", "attack": "blended", "defense": "roclip", "clean_top1": 0.4, "asr": 0.1}]),
        runs / "old2.parquet")
    write_row({"run_id": "new", "status": "ok", "attack": "badnet", "defense": "clip", "profile": "tiny", "seed": 1,
               "config": config(1), "clean_top1": 0.6, "clean_top5": 0.9, "asr": 0.7, "asr_n": 100, "n_poison": 100,
               "poison_rate": 0.1, "linear_probe_top1": 0.5, "wall_s": 3.0}, res)
    (runs / "notes.txt").write_text("not a result")


def test_a_store_with_rows_of_an_older_schema_still_reports(tmp_path):
    from poisonbench.report import load_leaderboard, to_html, to_text

    res = tmp_path / "res"
    old_schema_store(res)
    with pytest.warns(UserWarning, match=r"skipping .*notes.txt: not a .parquet file"):
        board = load_leaderboard(res).set_index(["attack", "defense"])
    badnet, blended = board.loc[("badnet", "clip")], board.loc[("blended", "roclip")]
    assert badnet["seeds"] == 2 and badnet["clean_top1"] == pytest.approx(0.55) and badnet["clean_top5"] == 0.9
    assert badnet["asr"] == pytest.approx(0.75) and badnet["n_poison"] == 100
    assert blended["seeds"] == 1 and blended["clean_top1"] == 0.4 and np.isnan(blended["clean_top5"])
    assert blended["profile"] == "?"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "3 runs in 2 settings" in to_html(load_leaderboard(res))
        assert "## blended" in to_text(load_leaderboard(res), "md")

    out = CliRunner().invoke(main, ["report", "--results", str(res), "--format", "json", "--no-plots"])
    assert out.exit_code == 0, out.output
    assert "notes.txt:nota.parquetfile" in re.sub(r"\s", "", out.stderr)  # rich may wrap the long path
    records = {(r["attack"], r["defense"]): r for r in json.loads(out.stdout)}
    assert records[("blended", "roclip")]["seeds"] == 1 and records[("badnet", "clip")]["seeds"] == 2
    out = CliRunner().invoke(main, ["report", "--results", str(res)])  # the terminal tables and the plots
    assert out.exit_code == 0, out.output
    assert "blended" in out.stdout and (res / "plots" / "asr_vs_clean-tiny.png").is_file()
    assert (res / "plots" / "asr_vs_clean-unknown.png").is_file()  # the rows without a profile


def test_a_done_cell_whose_row_is_of_an_older_schema_is_shown(tmp_path):
    """`bench run` of a cell already done shows its stored row; one without clean_top5,
    poison_rate or wall_s shows '-' there (it raised KeyError)."""
    res = tmp_path / "res"
    cfg = resolve("badnet", "clip", "tiny")
    write_row({"run_id": cfg.run_id, "status": "ok", "attack": "badnet", "defense": "clip", "profile": "tiny",
               "seed": 0, "clean_top1": 0.5, "asr": 0.25, "n_poison": 100}, res)
    out = CliRunner().invoke(main, ["run", "-p", "tiny", "--results", str(res)])
    assert out.exit_code == 0, out.output
    assert "already done" in out.output and "50.0%" in out.output and "25.0%" in out.output


def test_status_and_report_survive_junk_or_odd_rows_at_a_cells_own_name(tmp_path):
    from poisonbench.display import grid_table
    from poisonbench.report import load_leaderboard

    cfgs = [resolve("badnet", "clip", "tiny"), resolve("badnet", "roclip", "tiny")]
    res = tmp_path / "res"
    runs_dir(res).mkdir(parents=True)
    (runs_dir(res) / f"{cfgs[0].run_id}.parquet").write_text("garbage")
    write_row({"run_id": cfgs[1].run_id, "status": "ok", "attack": "badnet", "defense": "roclip", "asr": 0.1,
               "config": "not json"}, res)  # no clean_top1, no seed, a config that is not JSON
    table = grid_table(cfgs, res)
    assert table.row_count == 2
    with pytest.warns(UserWarning, match="not JSON"):
        board = load_leaderboard(res)
    assert len(board) == 1 and board.iloc[0]["asr"] == pytest.approx(0.1)
