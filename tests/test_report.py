"""Aggregation over seeds (intervals against reference formulas), report formats and plots."""
import json
import math

import pandas as pd
import pytest
from scipy import stats

from poisonbench.report import leaderboard, t_interval, to_html, to_text, wilson_interval


def reference_wilson(k, n, z=stats.norm.ppf(0.975)):
    """Wilson (1927) score interval, written out."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(5, 10), (0, 16), (16, 16), (15, 16), (8886, 9000), (3, 27000)])
def test_wilson_interval_matches_the_formula(k, n):
    assert wilson_interval(k, n) == pytest.approx(reference_wilson(k, n), abs=1e-9)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # textbook value


def test_t_interval_known_values():
    mean, lo, hi = t_interval([0.80, 0.82, 0.84])
    half = 4.302653 * 0.02 / math.sqrt(3)  # t(0.975, df=2) * s / sqrt(n)
    assert mean == pytest.approx(0.82) and (lo, hi) == pytest.approx((0.82 - half, 0.82 + half), abs=1e-6)
    assert t_interval([0.5])[0] == 0.5 and math.isnan(t_interval([0.5])[1])  # one seed: no interval
    assert t_interval([0.7, 0.7]) == (0.7, 0.7, 0.7)


def run(seed, defense="clip", top1=0.8, asr=0.9, asr_n=9000, n_poison=100, attack="badnet"):
    config = json.dumps({"attack": attack, "defense": defense, "profile": "cpu-small", "seed": seed,
                         "attack_params": {"n_poison": n_poison}})
    return {"run_id": f"{defense}{seed}{n_poison}", "status": "ok", "attack": attack, "defense": defense,
            "profile": "cpu-small", "seed": seed, "config": config, "clean_top1": top1, "clean_top5": 0.99,
            "linear_probe_top1": 0.85, "asr": asr, "asr_n": asr_n, "n_poison": n_poison}


def test_seeds_are_pooled_with_intervals_and_the_number_of_seeds():
    df = pd.DataFrame([run(0, top1=0.80, asr=0.5, asr_n=10), run(1, top1=0.82, asr=0.3, asr_n=10),
                       run(2, top1=0.84, asr=0.4, asr_n=10), run(0, "roclip", top1=0.7, asr=0.1, asr_n=10)])
    board = leaderboard(df).set_index("defense")
    clip = board.loc["clip"]
    assert clip["seeds"] == 3
    assert (clip["clean_top1"], clip["clean_top1_lo"], clip["clean_top1_hi"]) == pytest.approx(t_interval([0.80, 0.82, 0.84]))
    # ASR: 12 successes of 30 triggered images over the three seeds
    assert clip["asr"] == pytest.approx(0.4) and clip["asr_n"] == 30
    assert (clip["asr_lo"], clip["asr_hi"]) == pytest.approx(reference_wilson(12, 30))
    assert board.loc["roclip", "seeds"] == 1 and math.isnan(board.loc["roclip", "clean_top1_lo"])
    assert list(board.index) == ["roclip", "clip"]  # ranked by ASR


def test_accuracy_intervals_stay_within_zero_and_one():
    board = leaderboard(pd.DataFrame([run(0, top1=0.02), run(1, top1=0.30)]))
    assert board.loc[0, "clean_top1_lo"] == 0.0 and board.loc[0, "clean_top1_hi"] <= 1.0


def test_formats_carry_the_intervals():
    board = leaderboard(pd.DataFrame([run(s, top1=0.8 + s / 100, asr=0.4, asr_n=10) for s in range(3)]))
    md = to_text(board, "md")
    lo, hi = reference_wilson(12, 30)
    assert "## badnet" in md and f"40.0 ({100 * lo:.1f}-{100 * hi:.1f})" in md and "| 3 " in md
    records = json.loads(to_text(board, "json"))
    assert records[0]["asr_lo"] == pytest.approx(lo) and records[0]["seeds"] == 3
    page = to_html(board, {"asr by attack": "<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'></svg>"})
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<?xml" not in page
    assert "src=" not in page and "href=" not in page  # self-contained
    with pytest.raises(ValueError, match="valid formats"):
        to_text(board, "xlsx")


def test_plots_are_written_for_the_data_there_is(tmp_path):
    from poisonbench.plots import save_plots

    rows = [run(s, d, asr=a, n_poison=n) for s in range(2) for d, a in (("clip", 0.9), ("roclip", 0.05))
            for n in (25, 100)]
    rows.append(run(0, "clip", attack="targeted", asr=0.75, asr_n=16, n_poison=160))
    paths = save_plots(leaderboard(pd.DataFrame(rows)), tmp_path)
    names = sorted(p.name for p in paths)
    # the swept badnet gives asr_vs_poison; targeted, with one setting, gives the bars; roclip beside
    # clip on the same data, the cost
    assert names == sorted(f"{n}-cpu-small.{e}" for n in ("asr_vs_clean", "asr_by_attack", "asr_vs_poison",
                                                           "cost_vs_clip") for e in ("png", "svg"))
    assert all(p.stat().st_size > 1000 for p in paths)
    assert (tmp_path / "asr_vs_poison-cpu-small.png").read_bytes()[:4] == b"\x89PNG"


def test_several_profiles_get_one_set_of_plots_each(tmp_path):
    from poisonbench.plots import save_plots

    def in_profile(row, profile):
        config = {**json.loads(row["config"]), "profile": profile}
        return {**row, "profile": profile, "run_id": row["run_id"] + profile, "config": json.dumps(config)}

    rows = [in_profile(run(s, d, asr=a), p) for s in range(2) for d, a in (("clip", 0.9), ("roclip", 0.05))
            for p in ("cpu-small", "cpu-small-ft")]
    board = leaderboard(pd.DataFrame(rows))
    names = sorted(p.name for p in save_plots(board, tmp_path) if p.suffix == ".png")
    assert names == sorted(f"{n}-{p}.png" for n in ("asr_vs_clean", "asr_by_attack", "cost_vs_clip")
                           for p in ("cpu-small", "cpu-small-ft"))
    page = to_html(board, {"asr_by_attack-cpu-small-ft": "<svg></svg>"})
    assert "ASR by attack and defense (cpu-small-ft)" in page


def test_clean_baseline_rows_report_beside_attacks():
    none = run(0, attack="none", asr=None, asr_n=None, n_poison=0)
    board = leaderboard(pd.DataFrame([none, run(0), run(1)])).set_index("attack")
    assert board.loc["badnet", "seeds"] == 2 and board.loc["badnet", "asr_n"] == 18000
    assert math.isnan(board.loc["none", "asr"]) and board.loc["none", "seeds"] == 1


def test_a_copied_result_file_is_not_counted_twice():
    board = leaderboard(pd.DataFrame([run(0, asr=0.5, asr_n=10), run(0, asr=0.5, asr_n=10)]))
    assert board.loc[0, "asr_n"] == 10 and board.loc[0, "seeds"] == 1


# --- what one setting is: the resolved config up to the seed (config.setting_id) -------------

def cell_row(cfg, top1=0.8, asr=0.5, **extra):
    """A finished row of the resolved cell ``cfg``, its config stored as the runner stores it."""
    return {"run_id": cfg.run_id, "status": "ok", "attack": cfg.attack, "defense": cfg.defense, "profile": cfg.profile,
            "seed": cfg.seed, "config": json.dumps(cfg.to_dict(), sort_keys=True), "clean_top1": top1,
            "clean_top5": 0.99, "asr": asr, "asr_n": 10, "n_poison": 100, "world_size": cfg.world_size, **extra}


def test_cells_of_another_world_size_are_another_setting_and_seeds_alone_pool():
    from poisonbench.config import resolve

    one = [resolve("badnet", "clip", "tiny", seed) for seed in (0, 1)]
    two = [resolve("badnet", "clip", "tiny", seed, world_size=2) for seed in (0, 1)]
    assert len({c.run_id for c in one + two}) == 4  # a cell of 2 processes (global batch 128) is another cell
    board = leaderboard(pd.DataFrame([cell_row(c) for c in one + two])).set_index("setting")
    assert list(board["seeds"]) == [2, 2] and sorted(board.index) == ["", "world_size=2"]


def test_a_row_of_schema_1_run_by_two_processes_is_not_pooled_with_one_process():
    """Before world_size joined the config, a 2-process cell had the run id and config of the
    1-process one; its row's world_size column still tells them apart."""
    from poisonbench.config import resolve

    cfg = resolve("badnet", "clip", "tiny", 0)
    old = {**cell_row(resolve("badnet", "clip", "tiny", 1)), "world_size": 2, "run_id": "old"}
    board = leaderboard(pd.DataFrame([cell_row(cfg), old])).set_index("setting")
    assert sorted(board.index) == ["", "world_size=2"] and list(board["seeds"]) == [1, 1]


def test_settings_with_the_same_short_label_are_kept_apart():
    """An attack and a defense parameter of one name and value: two settings, named in full."""
    from poisonbench.config import resolve

    base = resolve("badnet", "roclip", "tiny").to_dict()
    by_attack = {**base, "attack_params": {**base["attack_params"], "strength": 1}}
    by_defense = {**base, "defense_params": {**base["defense_params"], "strength": 1}}
    rows = [{**cell_row(resolve("badnet", "roclip", "tiny")), "run_id": f"r{i}", "config": json.dumps(c)}
            for i, c in enumerate((by_attack, by_defense))]
    board = leaderboard(pd.DataFrame(rows))
    assert list(board["seeds"]) == [1, 1]
    assert sorted(board["setting"]) == ["attack_params.strength=1", "defense_params.strength=1"]


def test_cells_of_another_dataset_at_its_defaults_are_another_setting():
    """A dataset whose defaults leave nothing to name (here one that is not installed) is not
    pooled with the profile's dataset."""
    from poisonbench.config import resolve

    cfg = resolve("badnet", "clip", "tiny", 0)
    mine = {**cfg.to_dict(), "dataset": "my-data", "seed": 1}
    rows = [cell_row(cfg), {**cell_row(cfg), "run_id": "mine", "seed": 1, "config": json.dumps(mine)}]
    board = leaderboard(pd.DataFrame(rows))
    assert list(board["seeds"]) == [1, 1] and sorted(board["setting"]) == ["", "dataset=my-data"]


def test_a_defenses_declared_metrics_show_their_last_epoch_mean_over_seeds():
    from poisonbench.report import display

    rows = [run(0), run(1)]
    for seed, last in ((0, 0.02), (1, 0.04)):
        r = run(seed, "safeclip", asr=0.01)
        r.update(d_poison_in_safe=[0.5, 0.1, last], d_safe_fraction=[0.2, 0.3, 0.4])
        rows.append(r)
    shown = display(leaderboard(pd.DataFrame(rows)))["badnet"].set_index("defense")
    assert shown.loc["safeclip", "poisons in safe set, last epoch (%)"] == "3.0"
    assert shown.loc["safeclip", "safe set, last epoch (%)"] == "40.0"
    assert shown.loc["clip", "poisons in safe set, last epoch (%)"] == "-"
    only_clip = display(leaderboard(pd.DataFrame([run(0), run(1)])))["badnet"]
    assert not any("safe set" in c for c in only_clip.columns)


def test_clean_cost_against_clip_of_the_same_data_survival_and_mean_curves():
    rows = [run(0, top1=0.80), run(1, top1=0.84), run(0, "roclip", top1=0.62), run(1, "roclip", top1=0.70),
            run(0, "roclip", top1=0.5, n_poison=50)]  # other data: no clip counterpart in the store
    for r, present, corr, curve in zip(rows, [1.0, 1.0, 0.2, 0.4, 0.3], [1.0, 1.0, 0.1, 0.3, 0.2],
                                       [[0.5, 0.8], [0.6, 0.84], [0.4, 0.62], [0.5, 0.7], [0.4, 0.5]]):
        r.update(trig_present=present, trig_at_eval=present / 2, trig_corr=corr, curve_epoch=[1, 2],
                 curve_clean_top1=curve, curve_asr=[0.1, 0.2])
    rows.append(run(0, "aug-only", top1=0.70))  # one seed: paired with clip's seed 0 alone
    board = leaderboard(pd.DataFrame(rows))
    roclip = board[(board["defense"] == "roclip") & (board["n_poison"] == 100)].iloc[0]
    assert roclip["clean_cost"] == pytest.approx(((0.80 - 0.62) + (0.84 - 0.70)) / 2)  # seed by seed, same data
    assert board[board["defense"] == "aug-only"].iloc[0]["clean_cost"] == pytest.approx(0.80 - 0.70)
    assert roclip["trig_present"] == pytest.approx(0.3) and roclip["trig_corr"] == pytest.approx(0.2)
    assert roclip["curve_clean_top1"] == pytest.approx([0.45, 0.66]) and roclip["curve_epoch"] == [1, 2]
    other = board[board["n_poison"] == 50].iloc[0]
    assert math.isnan(other["clean_cost"])
    assert board[board["defense"] == "clip"].iloc[0]["clean_cost"] == 0
    md = to_text(board, "md")
    assert "cost vs clip (pts)" in md and "+16.0" in md and "patch in view (%)" in md and "30.0" in md
    assert "patch as evaluated (%)" in to_html(board)


def test_a_defense_keeps_its_colour_whatever_else_the_store_holds():
    from poisonbench.plots import _defense_colours, defense_colour

    one = leaderboard(pd.DataFrame([run(0, "roclip"), run(0, "clip")]))
    other = leaderboard(pd.DataFrame([run(0, "roclip"), run(0, "aug-only"), run(0, "safeclip")]))
    assert _defense_colours(one)["roclip"] == _defense_colours(other)["roclip"] == defense_colour("roclip")
    assert len({defense_colour(d) for d in ("clip", "roclip", "aug-only", "cleanclip", "safeclip")}) == 5
    assert defense_colour("a-plugin-not-installed") == defense_colour("a-plugin-not-installed")


def test_curves_are_plotted_only_when_rows_have_them(tmp_path):
    from poisonbench.plots import save_plots

    plain = [run(0), run(1)]
    assert not any("curves" in p.name for p in save_plots(leaderboard(pd.DataFrame(plain)), tmp_path / "a"))
    rows = [{**r, "curve_epoch": [1, 2, 3], "curve_clean_top1": [0.2, 0.5, 0.8], "curve_asr": [0.0, 0.4, 0.9]}
            for r in plain]
    names = [p.name for p in save_plots(leaderboard(pd.DataFrame(rows)), tmp_path / "b")]
    assert "curves-cpu-small.png" in names and "curves-cpu-small.svg" in names
    assert (tmp_path / "b" / "curves-cpu-small.png").read_bytes()[:4] == b"\x89PNG"


def test_a_defense_filter_keeps_the_cost_against_the_filtered_out_clip(tmp_path):
    from poisonbench.report import load_leaderboard
    from poisonbench.store import write_row

    for r in (run(0, top1=0.80), run(1, top1=0.84), run(0, "roclip", top1=0.62), run(1, "roclip", top1=0.70)):
        write_row(r, tmp_path)
    board = load_leaderboard(tmp_path, defense="roclip", seed="0")
    assert board["defense"].tolist() == ["roclip"] and board.iloc[0]["seeds"] == 1
    assert board.iloc[0]["clean_cost"] == pytest.approx(0.80 - 0.62)


def test_the_html_page_lists_every_run_with_its_provenance():
    from poisonbench.report import run_rows

    rows = [{**run(s), "git_rev": f"abc{s}", "finished_at": "2026-12-02T01:00:00", "poison_rate": 0.0099,
             "i2t_r10": 0.094} for s in range(3)]
    df = pd.DataFrame(rows)
    table = run_rows(df)
    assert len(table) == 3 and table["seed"].tolist() == ["0", "1", "2"]
    assert table["poison rate (%)"].tolist() == ["0.99"] * 3 and table["i2t R@10 (%)"].iloc[0] == "9.4"
    page = to_html(leaderboard(df), runs=df)
    assert "Every run (3)" in page and "abc2" in page and "git revision" in page
    assert "Every run" not in to_html(leaderboard(df))


@pytest.mark.parametrize("attacks", [1, 2, 5])
def test_every_figure_title_lies_inside_its_canvas(attacks):
    from poisonbench.plots import _pyplot, make_figures

    names = ["badnet", "blended", "sig", "wanet", "targeted"][:attacks]
    rows = [{**run(s, d, asr=a, attack=at, n_poison=n), "run_id": f"{at}{d}{s}{n}"} for at in names for s in range(2)
            for d, a in (("clip", 0.9), ("roclip", 0.05)) for n in (25, 100)]
    figures = make_figures(leaderboard(pd.DataFrame(rows)))
    assert {"asr_vs_clean-cpu-small", "asr_vs_poison-cpu-small", "cost_vs_clip-cpu-small"} <= set(figures)
    for name, fig in figures.items():
        fig.canvas.draw()
        title = fig._suptitle or fig.axes[0].title  # a one-panel figure titles its axes
        box, canvas = title.get_window_extent(), fig.bbox
        assert box.x0 >= 0 and box.x1 <= canvas.x1 + 0.5 and box.y1 <= canvas.y1 + 0.5, name
        _pyplot().close(fig)


def test_plots_on_request_as_pdf(tmp_path):
    from poisonbench.plots import save_plots

    paths = save_plots(leaderboard(pd.DataFrame([run(0), run(1)])), tmp_path, ("png", "svg", "pdf"))
    pdfs = [p for p in paths if p.suffix == ".pdf"]
    assert pdfs and all(p.read_bytes()[:5] == b"%PDF-" for p in pdfs)


def test_legends_of_a_grid_with_many_settings_sit_below_the_panels_and_hide_nothing():
    import warnings

    from poisonbench.plots import make_figures

    curve = {"curve_epoch": [1, 2, 3], "curve_clean_top1": [0.2, 0.5, 0.8], "curve_asr": [0.0, 0.4, 0.9]}
    rows = [{**run(s, d, n_poison=n), **curve} for n in range(100, 2600, 100) for d in ("clip", "roclip") for s in (0, 1)]
    rows += [{**run(0, d, attack="blended"), **curve} for d in ("clip", "roclip")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Tight layout not applied" was the symptom of legends over panels
        figures = make_figures(leaderboard(pd.DataFrame(rows)))
    for name in ("asr_vs_clean-cpu-small", "curves-cpu-small"):
        fig = figures[name]
        renderer = fig.canvas.get_renderer()
        panels = [ax.get_window_extent(renderer) for ax in fig.axes if ax.axison]
        legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        assert max(len(lg.get_texts()) for lg in legends) == 50  # 25 settings x 2 defenses, each named
        for lg in legends:
            box = lg.get_window_extent(renderer)
            assert not any(box.overlaps(p) for p in panels), name
            assert box.y0 >= 0 and box.y1 <= fig.bbox.height, name  # inside the figure
