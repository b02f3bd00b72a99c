"""Data filters' detection metrics (det_*) and defenses' own numbers (d_*) in the leaderboard, its
formats and the ROC plot; stores without them report as before."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from poisonbench.detection import detection_metrics, mean_roc
from poisonbench.report import leaderboard, t_interval, to_html, to_text


def run(seed, defense="clip", attack="badnet", asr=0.9, **extra):
    config = json.dumps({"attack": attack, "defense": defense, "profile": "cpu-small", "seed": seed,
                         "attack_params": {"n_poison": 10}})
    return {"run_id": f"{attack}-{defense}{seed}", "status": "ok", "attack": attack, "defense": defense,
            "profile": "cpu-small", "seed": seed, "config": config, "clean_top1": 0.8, "clean_top5": 0.99,
            "linear_probe_top1": 0.85, "asr": asr, "asr_n": 100, "n_poison": 10, **extra}


def filter_run(seed, attack="badnet", separation=2.0, remove=12):
    """A data-filter row whose det_* columns are what detection_metrics gives for scores in which
    10 poisons of 100 pairs are shifted by ``separation``; the ``remove`` highest are dropped."""
    g = torch.Generator().manual_seed(seed)
    flags = torch.zeros(100, dtype=torch.bool)
    flags[:10] = True
    scores = torch.randn(100, generator=g) + separation * flags
    kept = torch.ones(100, dtype=torch.bool)
    kept[scores.argsort(descending=True)[:remove]] = False
    det = detection_metrics(scores, flags, kept)
    return run(seed, "density-filter", attack, asr=0.1, d_threshold=float(seed), d_notes=f"seed {seed}", **det)


def test_filter_rows_carry_detection_metrics_and_plain_defenses_do_not():
    rows = [filter_run(s) for s in range(3)] + [run(s) for s in range(3)]
    board = leaderboard(pd.DataFrame(rows)).set_index("defense")
    dets = [r for r in rows if r["defense"] == "density-filter"]
    filt, clip = board.loc["density-filter"], board.loc["clip"]
    auc = t_interval([r["det_auroc"] for r in dets])
    assert (filt["det_auroc"], filt["det_auroc_lo"], filt["det_auroc_hi"]) == pytest.approx(auc)
    assert filt["det_ap"] == pytest.approx(np.mean([r["det_ap"] for r in dets]))
    assert filt["det_tpr_at_1fpr"] == pytest.approx(np.mean([r["det_tpr_at_1fpr"] for r in dets]))
    assert filt["det_poisons_removed"] == pytest.approx(np.mean([r["det_poisons_removed"] for r in dets]))
    assert filt["det_clean_removed"] == pytest.approx(np.mean([r["det_clean_removed"] for r in dets]))
    assert filt["det_poisons_removed"] + filt["det_clean_removed"] == 12
    # the mean ROC curve: vertical average of the seeds' curves
    fpr, tpr = mean_roc([(r["det_roc_fpr"], r["det_roc_tpr"]) for r in dets])
    assert filt["det_roc_fpr"] == fpr and filt["det_roc_tpr"] == pytest.approx(tpr)
    assert np.trapezoid(filt["det_roc_tpr"], filt["det_roc_fpr"]) == pytest.approx(filt["det_auroc"], abs=0.02)
    # metrics-channel columns: numbers are averaged, other values listed per seed
    assert filt["d_threshold"] == pytest.approx(1.0) and filt["d_notes"] == ["seed 0", "seed 1", "seed 2"]
    assert math.isnan(clip["det_auroc"]) and math.isnan(clip["det_poisons_removed"]) and not isinstance(clip["det_roc_fpr"], list)
    assert math.isnan(clip["d_threshold"])


def test_markdown_shows_detection_columns_for_filters_only():
    rows = [filter_run(s) for s in range(3)] + [run(s) for s in range(3)] + [run(0, attack="blended")]
    board = leaderboard(pd.DataFrame(rows))
    md = to_text(board, "md")
    badnet, blended = md.split("## badnet")[1].split("## blended")
    header = badnet.strip().splitlines()[0]
    assert "detection AUROC (%)" in header and "poisons removed" in header and "clean removed" in header
    assert "detection AUROC" not in blended  # no filter ran on blended: no detection columns there
    filt = board[board["defense"] == "density-filter"].iloc[0]
    line = next(ln for ln in badnet.splitlines() if ln.startswith("| density-filter"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    auc = f"{100 * filt['det_auroc']:.1f} ({100 * filt['det_auroc_lo']:.1f}-{100 * filt['det_auroc_hi']:.1f})"
    removed = f"{filt['det_poisons_removed']:.0f}" if float(filt["det_poisons_removed"]).is_integer() \
        else f"{filt['det_poisons_removed']:.1f}"
    assert auc in cells and removed in cells
    clip = next(ln for ln in badnet.splitlines() if ln.startswith("| clip"))
    assert [c.strip() for c in clip.strip("|").split("|")][-4:-1] == ["-", "-", "-"]
    assert "Data filters: detection AUROC" in md
    assert "detection AUROC" in to_html(board) and "Data filters" in to_html(board)


def test_a_filter_on_clean_data_shows_the_pairs_it_removed():
    """With no poisoned pair (attack none) the AUROC is undefined, the removed counts are not."""
    flags = torch.zeros(50, dtype=torch.bool)
    kept = torch.arange(50) >= 5
    det = detection_metrics(torch.arange(50, dtype=torch.float32), flags, kept)
    board = leaderboard(pd.DataFrame([run(0, "density-filter", attack="none", asr=None, **det), run(0, attack="none")]))
    md = to_text(board, "md")
    line = next(ln for ln in md.splitlines() if ln.startswith("| density-filter"))
    assert [c.strip() for c in line.strip("|").split("|")][-4:-1] == ["-", "0", "5"]


def test_csv_and_json_carry_detection_and_channel_columns():
    board = leaderboard(pd.DataFrame([filter_run(s) for s in range(2)] + [run(0)]))
    records = {r["defense"]: r for r in json.loads(to_text(board, "json"))}
    filt = records["density-filter"]
    for col in ("det_auroc", "det_auroc_lo", "det_ap", "det_tpr_at_5fpr", "det_fpr_at_95tpr", "det_poisons_removed",
                "det_clean_removed", "d_threshold"):
        assert filt[col] == pytest.approx(board.loc[board["defense"] == "density-filter", col].iloc[0]), col
    assert isinstance(filt["det_roc_tpr"], list) and records["clip"]["det_auroc"] is None
    csv = pd.read_csv(__import__("io").StringIO(to_text(board, "csv")))
    row = csv[csv["defense"] == "density-filter"].iloc[0]
    assert row["det_auroc"] == pytest.approx(filt["det_auroc"]) and row["d_threshold"] == pytest.approx(0.5)
    assert json.loads(row["det_roc_fpr"]) == pytest.approx(filt["det_roc_fpr"])  # lists as JSON text
    assert json.loads(row["d_notes"]) == ["seed 0", "seed 1"]


def test_a_store_without_detection_rows_has_no_detection_columns():
    board = leaderboard(pd.DataFrame([run(s) for s in range(2)]))
    assert not any(c.startswith("det_") for c in board.columns)
    assert "detection" not in to_text(board, "md") and "Data filters" not in to_text(board, "md")


def test_the_roc_plot_is_made_only_with_detection_rows(tmp_path):
    from poisonbench.plots import save_plots

    rows = [filter_run(s, a) for s in range(2) for a in ("badnet", "blended")] + [run(0), run(1, attack="blended")]
    names = sorted(p.name for p in save_plots(leaderboard(pd.DataFrame(rows)), tmp_path / "with"))
    assert "roc-cpu-small.png" in names and "roc-cpu-small.svg" in names
    assert (tmp_path / "with" / "roc-cpu-small.png").read_bytes()[:4] == b"\x89PNG"
    svg = (tmp_path / "with" / "roc-cpu-small.svg").read_text()
    assert "AUROC" in svg and "random score" in svg
    names = sorted(p.name for p in save_plots(leaderboard(pd.DataFrame([run(0), run(1)])), tmp_path / "without"))
    assert names and not any(n.startswith("roc") for n in names)


def test_bench_report_reads_detection_rows_from_the_store(tmp_path):
    """Through Parquet (list columns come back as arrays) and the command line."""
    from poisonbench.cli import main
    from poisonbench.store import write_row

    res = tmp_path / "res"
    for r in [filter_run(s) for s in range(2)] + [run(0), run(1)]:
        write_row(r, res)
    out = CliRunner().invoke(main, ["report", "--results", str(res), "--format", "json"])
    assert out.exit_code == 0, out.output
    records = {r["defense"]: r for r in json.loads(out.stdout)}
    assert records["density-filter"]["det_auroc"] == pytest.approx(
        np.mean([filter_run(s)["det_auroc"] for s in range(2)]))
    assert (res / "plots" / "roc-cpu-small.png").is_file() and (res / "plots" / "roc-cpu-small.svg").is_file()
