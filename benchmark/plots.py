"""Leaderboard plots (matplotlib, PNG and SVG): the trade-off per attack, ASR by attack and
defense, ASR against the number of poisoned pairs for sweeps, the data filters' ROC curves and
the per-epoch curves."""
from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from .attacks.base import CLEAN
from .utils import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(board: pd.DataFrame, metric: str) -> np.ndarray:
    """[2, N] distances from the value to its interval bounds, in percent (0 without an interval)."""
    v, lo, hi = (100 * board[c].to_numpy(dtype=float) for c in (metric, f"{metric}_lo", f"{metric}_hi"))
    return np.nan_to_num(np.stack([v - lo, hi - v]), nan=0.0).clip(min=0)


PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def defense_colour(name: str) -> str:
    """The one colour of defense ``name`` in every figure: its place among the registered defenses
    (sorted), so it does not depend on which defenses a store holds; a defense that is not
    registered here (a row of a plugin not installed) takes one after them, by its name's hash."""
    from .registry import DEFENSES
    from .utils import hash_json

    names = sorted(DEFENSES.names())
    i = names.index(name) if name in names else len(names) + int(hash_json(name)[:8], 16) % len(PALETTE)
    return PALETTE[i % len(PALETTE)]


def _defense_colours(board: pd.DataFrame) -> dict[str, str]:
    return {d: defense_colour(d) for d in board["defense"].unique()}


def _bars_size(groups: int, bars: int) -> tuple[float, float]:
    """(width, height) in inches of a grouped-bar figure: 6-12 wide, whatever the store holds."""
    return min(12.0, max(6.0, 0.45 * groups * max(1, bars))), 4.2


def _grouped_bars(part: pd.DataFrame, metric: str, err: str, missing: str, plt):
    """(fig, ax) of grouped bars: ``metric`` in percent per attack (groups) and defense (bars, in
    its colour), with ``err``'s 95 % interval as error bars and each bar's value on it (``missing``
    where a defense has no value for an attack)."""
    attacks, defenses = sorted(part["attack"].unique()), sorted(part["defense"].unique())
    fig, ax = plt.subplots(figsize=_bars_size(len(attacks), len(defenses)))
    width = 0.8 / max(1, len(defenses))
    x = np.arange(len(attacks))
    for i, d in enumerate(defenses):
        sub = part[part["defense"] == d].set_index("attack").reindex(attacks)
        heights = 100 * sub[metric].to_numpy(dtype=float)
        bars = ax.bar(x + (i - (len(defenses) - 1) / 2) * width, heights, width, yerr=_err(sub, err),
                      capsize=2, label=d, color=defense_colour(d))
        ax.bar_label(bars, labels=[missing if math.isnan(h) else f"{h:.0f}" for h in heights], fontsize=7, padding=2)
    ax.set_xticks(x, attacks, rotation=20)
    return fig, ax


def _label(r) -> str:
    """A legend label: the defense and its setting, wrapped to lines that fit a 3.6 in column."""
    return textwrap.fill(r["defense"] + (f" ({r['setting']})" if r["setting"] else ""), 48, subsequent_indent="  ")


def _lines(labels) -> int:
    """Lines of text in a legend of ``labels``."""
    return sum(label.count("\n") + 1 for label in labels)


def tradeoff(board: pd.DataFrame, plt):
    """One panel per attack: ASR (y) against clean top-1 (x), one point per defense setting with
    its 95 % intervals and, small and faint, each seed's; lower right is better."""
    attacks = sorted(board.loc[board["asr"].notna(), "attack"].unique())  # the clean baseline has no ASR
    cols = min(4, len(attacks))
    clean = board[(board["attack"] == CLEAN) & (board["setting"] == "")]["clean_top1"].dropna()
    scored = board[board["asr"].notna()]
    lines = [_lines(scored[scored["attack"] == a].apply(_label, axis=1)) + (1 if len(clean) else 0) for a in attacks]
    fig, axes, legend_axes = _panels_with_legends(plt, lines, cols, (3.6, 3.3))
    colours = _defense_colours(board)
    markers = "osD^vP*X"
    for ax, attack in zip(axes.flat, attacks):
        part = board[(board["attack"] == attack) & board["asr"].notna()]
        shapes = {st: markers[i % len(markers)] for i, st in enumerate(sorted(part["setting"].unique()))}
        if len(clean):  # the clean baseline (no poison) as a reference line
            ax.axvline(100 * clean.iloc[0], color="#555555", ls=":", lw=1, label="clean model (no poison)")
        for _, r in part.iterrows():
            one = part.loc[[r.name]]
            ax.errorbar(100 * r["clean_top1"], 100 * r["asr"], xerr=_err(one, "clean_top1"), yerr=_err(one, "asr"),
                        fmt=shapes[r["setting"]], color=colours[r["defense"]], capsize=3, label=_label(r))
            seeds = r.get("clean_top1_seeds")
            if isinstance(seeds, list) and len(seeds) > 1:  # each seed beside the mean, small and faint
                ax.scatter(100 * np.asarray(seeds), 100 * np.asarray(r["asr_seeds"]), s=9, alpha=0.35,
                           marker=shapes[r["setting"]], color=colours[r["defense"]], linewidths=0)
        ax.set_title(attack)
        ax.set_xlabel("clean zero-shot top-1 (%)")
        ax.set_ylabel("attack success rate (%)")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    for ax, below in zip(axes.flat, legend_axes.flat):
        _legend_below(ax, below)
    return _finish(fig, axes, len(attacks), "ASR vs clean accuracy per attack (mean over seeds, 95 % intervals; lower right is better)")


def asr_bars(board: pd.DataFrame, plt):
    """Grouped bars: ASR per attack (groups) and defense (bars), at the profile's default
    parameters only (rows whose ``setting`` is empty)."""
    part = board[board["asr"].notna() & (board["setting"] == "")]
    # the value on every bar, so that 0 % reads as a measurement and a missing cell as "n/a"
    fig, ax = _grouped_bars(part, "asr", "asr", "n/a", plt)
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(0, 112)
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, title="defense", fontsize=8)
    ax.set_title("ASR by attack and defense at the profile's default parameters\n"
                 "(pooled over seeds, Wilson 95 % intervals; lower is better)", fontsize=10)
    fig.tight_layout()
    return fig


def cost_rows(board: pd.DataFrame) -> pd.DataFrame:
    """Settings at the profile's defaults whose clean top-1 cost against the undefended defense is
    known (the undefended defense itself left out)."""
    from .defenses.base import UNDEFENDED

    if "clean_cost" not in board:
        return board.iloc[:0]
    return board[(board["setting"] == "") & board["clean_cost"].notna() & (board["defense"] != UNDEFENDED)
                 & (board["attack"] != CLEAN)]


def cost_bars(board: pd.DataFrame, plt):
    """Grouped bars: each defense's clean top-1 cost against clip on the same data (points), per
    attack, at the profile's default parameters, with the t interval of the defense's own clean
    top-1 as error bars."""
    part = cost_rows(board)
    fig, ax = _grouped_bars(part, "clean_cost", "clean_top1", "", plt)
    defenses = part["defense"].unique()
    ax.axhline(0, color="#333333", lw=0.8)
    ax.set_ylabel("clean top-1 lost against clip (points)")
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, fontsize=8, ncols=min(3, len(defenses)))
    fig.suptitle("Clean-accuracy cost of each defense (clip's clean top-1 minus the defense's, same data)")
    fig.tight_layout()
    return fig


def _other_setting(setting: str) -> str:
    """A setting label without its poison count: the settings one poison sweep connects."""
    return ", ".join(p for p in setting.split(", ") if p and not p.startswith(("n_poison=", "poison_rate=")))


def sweep_groups(board: pd.DataFrame) -> pd.DataFrame:
    """Rows of the groups (attack, defense, profile, the setting but its poison count) with at least
    two poison counts (a sweep), with that setting in ``sweep``."""
    part = board[board["asr"].notna() & board["n_poison"].notna()].copy()
    part["sweep"] = part["setting"].map(_other_setting)
    counts = part.groupby(["attack", "defense", "profile", "sweep"])["n_poison"].transform("nunique")
    return part[counts >= 2]


def asr_vs_poison(board: pd.DataFrame, plt):
    """ASR (top) and clean top-1 (bottom) against the poison rate, one column per attack, a line
    per defense and setting swept (log scale; the poisoned pairs' count on each point's tick)."""
    part = sweep_groups(board)
    attacks = sorted(part["attack"].unique())
    fig, axes = plt.subplots(2, len(attacks), figsize=(max(6.0, 4.2 * len(attacks)), 6.2), squeeze=False, sharex="col")
    colours = _defense_colours(board)
    for col, attack in enumerate(attacks):
        sub = part[part["attack"] == attack]
        for (d, prof, sweep), g in sub.groupby(["defense", "profile", "sweep"]):
            g = g.sort_values("n_poison")
            rate = 100 * g["poison_rate"] if "poison_rate" in g and g["poison_rate"].notna().all() else g["n_poison"]
            label = d + (f" ({sweep})" if sweep else "")
            axes[0, col].errorbar(rate, 100 * g["asr"], yerr=_err(g, "asr"), marker="o", capsize=3, color=colours[d],
                                  label=label)
            axes[1, col].errorbar(rate, 100 * g["clean_top1"], yerr=_err(g, "clean_top1"), marker="o", capsize=3,
                                  color=colours[d], label=label)
        by_rate = "poison_rate" in sub and sub["poison_rate"].notna().all()
        ticks = sorted((100 * sub["poison_rate"] if by_rate else sub["n_poison"]).unique())
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
        axes[0, col].set_title(attack)
        axes[0, col].set_ylabel("attack success rate (%)")
        axes[0, col].set_ylim(-5, 105)
        axes[1, col].set_ylabel("clean top-1 (%)")
        axes[1, col].set_xlabel("poison rate, % of training pairs (log scale)" if by_rate else
                                "poisoned pairs in the training set (log scale)")
        _legend(axes[0, col], fontsize=7)
    fig.suptitle("ASR and clean accuracy vs poison rate (mean over seeds, 95 % intervals)")
    fig.tight_layout()
    return fig


def roc_rows(board: pd.DataFrame) -> pd.DataFrame:
    """Settings of ``board`` with a ROC curve (data filters with detection metrics)."""
    if "det_roc_fpr" not in board:
        return board.iloc[:0]
    has = board["det_roc_fpr"].map(lambda v: isinstance(v, list) and len(v) > 0)
    return board[has & board["det_auroc"].notna()]


def roc(board: pd.DataFrame, plt):
    """One panel per attack with a data filter: the ROC curve of each filter setting (mean over
    seeds, ``detection.mean_roc``), poisons as the positive class, the AUROC (mean over seeds) in
    the legend, and the diagonal of a random score."""
    part = roc_rows(board)
    attacks = sorted(part["attack"].unique())
    cols = min(4, len(attacks))
    rows = math.ceil(len(attacks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.5 * rows), squeeze=False)
    colours = _defense_colours(board)
    styles = ["-", "--", "-.", ":"]
    for ax, attack in zip(axes.flat, attacks):
        sub = part[part["attack"] == attack]
        dashes = {st: styles[i % len(styles)] for i, st in enumerate(sorted(sub["setting"].unique()))}
        ax.plot([0, 100], [0, 100], color="#999999", lw=0.8, ls=":", label="random score")
        for _, r in sub.iterrows():
            ax.plot(100 * np.asarray(r["det_roc_fpr"]), 100 * np.asarray(r["det_roc_tpr"]), ls=dashes[r["setting"]],
                    color=colours[r["defense"]], label=f"{_label(r)} (AUROC {100 * r['det_auroc']:.1f})")
        ax.set_title(attack)
        ax.set_xlabel("clean pairs flagged, FPR (%)")
        ax.set_ylabel("poisoned pairs flagged, TPR (%)")
        ax.set_xlim(-2, 102)
        ax.set_ylim(-2, 102)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7, loc="lower right")
    return _finish(fig, axes, len(attacks), "Data filters: ROC of their scores per attack (mean over seeds; upper left is better)")


def curve_rows(board: pd.DataFrame) -> pd.DataFrame:
    """Settings of ``board`` with per-epoch curves (``curve_epoch`` a non-empty list)."""
    if "curve_epoch" not in board:
        return board.iloc[:0]
    return board[board["curve_epoch"].map(lambda v: isinstance(v, list) and len(v) > 0)]


def curves(board: pd.DataFrame, plt):
    """Per-epoch curves (mean over seeds), a pair of panels per attack (four to a row): ASR on top
    (attacks that have one), clean zero-shot top-1 below, a line per defense setting."""
    part = curve_rows(board)
    attacks = sorted(part["attack"].unique())
    from matplotlib.ticker import MaxNLocator

    cols = min(4, len(attacks))
    settings = part.drop_duplicates(["attack", "defense", "setting"])
    lines = [_lines(settings[settings["attack"] == a].apply(_label, axis=1)) for a in attacks]
    fig, axes, legend_axes = _panels_with_legends(plt, lines, cols, (3.6, 2.6), panel_rows=2)
    colours = _defense_colours(board)
    styles = ["-", "--", "-.", ":"]
    for i, attack in enumerate(attacks):
        row, col = divmod(i, cols)
        top, bottom = axes[2 * row, col], axes[2 * row + 1, col]
        sub = part[part["attack"] == attack]
        order = sorted(sub["setting"].unique())
        dashes = {st: styles[k % len(styles)] for k, st in enumerate(order)}
        marks = {st: "o.sD^v*X"[k % 8] for k, st in enumerate(order)}  # with the dashes, settings stay apart
        for _, r in sub.iterrows():
            for ax, metric in ((top, "curve_asr"), (bottom, "curve_clean_top1")):
                if isinstance(r[metric], list):
                    ax.plot(r["curve_epoch"], 100 * np.asarray(r[metric]), marker=marks[r["setting"]],
                            ms=4, ls=dashes[r["setting"]], color=colours[r["defense"]], label=_label(r))
        top.set_title(attack)
        bottom.set_xlabel("epoch")
        top.set_ylabel("ASR on the curve subset (%)")
        bottom.set_ylabel("clean top-1 on the\ncurve subset (%)")
        for ax in (top, bottom):
            ax.set_ylim(-5, 105)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if not ax.lines:  # the clean baseline has no ASR
                ax.axis("off")
        _legend_below(bottom, legend_axes[row, col])
    for i in range(len(attacks), len(legend_axes.flat)):  # the last row's unused panels
        row, col = divmod(i, cols)
        axes[2 * row, col].axis("off")
        axes[2 * row + 1, col].axis("off")
    fig.suptitle("Per-epoch curves (mean over seeds)")
    fig.tight_layout()
    return fig


def _panels_with_legends(plt, entries: list[int], cols: int, size: tuple[float, float], panel_rows: int = 1):
    """A figure of panels of ``size`` (inches), ``cols`` to a row; each row of panels
    (``panel_rows`` deep: a column of them shares one legend) is followed by a row that holds
    their legends, as tall as the longest (``entries``: lines of legend text per column of
    panels, in order), so that a grid with many settings never hides its points. Returns (fig,
    panel axes [rows * panel_rows, cols], legend axes [rows, cols], switched off)."""
    rows = math.ceil(len(entries) / cols)
    legend_h = [0.1 + 0.155 * max(entries[r * cols:(r + 1) * cols]) for r in range(rows)]  # lines of 7 pt
    heights = [h for lh in legend_h for h in [size[1]] * panel_rows + [lh]]
    # the ratios share out what the panels' titles, ticks and labels (about 0.9 in each) and the
    # figure's title leave: the figure is that much taller, so each legend row keeps its height
    fig = plt.figure(figsize=(max(6.0, size[0] * cols), sum(heights) + 0.9 * rows * panel_rows + 0.6))
    grid = fig.add_gridspec(len(heights), cols, height_ratios=heights)
    step = panel_rows + 1
    axes = np.array([[fig.add_subplot(grid[r * step + k, c]) for c in range(cols)]
                     for r in range(rows) for k in range(panel_rows)])
    legend_axes = np.array([[fig.add_subplot(grid[r * step + panel_rows, c]) for c in range(cols)] for r in range(rows)])
    for ax in legend_axes.flat:
        ax.axis("off")
    return fig, axes, legend_axes


def _legend_below(ax, below, fontsize: int = 7) -> None:
    """``ax``'s legend drawn from the top of the (switched-off) axes ``below``."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        legend = below.legend(handles, labels, fontsize=fontsize, loc="upper center", frameon=False)
        legend.set_in_layout(False)  # its row is sized for it; tight_layout leaves it be


def _legend(ax, **kw) -> None:
    """The panel's legend, when something in it has a label (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _finish(fig, axes, used: int, title: str):
    """A figure of per-attack panels made ready: the panels after the first ``used`` hidden, the
    title set, the layout tightened."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _fit_title(fig) -> None:
    """Wrap the figure's title (its suptitle) to lines that fit its width, so a figure of one or
    two panels never clips it."""
    title, width = fig._suptitle, fig.get_figwidth()
    if title is None and fig.axes:  # a one-panel figure titles its axes
        title, width = fig.axes[0].title, fig.axes[0].get_position().width * width
    if title is None:
        return
    per_line = max(20, int(width * 72 / (title.get_fontsize() * 0.62)))
    text = re.sub(r"[ \t\n]+", " ", title.get_text()).replace(" %", "\u00a0%")  # "95 %" never splits
    title.set_text(textwrap.fill(text, per_line))
    if title is fig._suptitle:  # 0.1 in from the top whatever the height (matplotlib's 2 % grows with it)
        title.set_y(1 - 0.1 / fig.get_figheight())


def _name_profile(fig, profile: str) -> None:
    """Add the profile to a figure's title (its suptitle, else its first axes' title)."""
    if fig._suptitle is not None:
        fig.suptitle(f"{fig._suptitle.get_text()} — profile {profile}")
    elif fig.axes:
        fig.axes[0].set_title(f"{fig.axes[0].get_title()} — profile {profile}", fontsize=10)


def make_figures(board: pd.DataFrame) -> dict:
    """The figures the leaderboard has data for, name -> matplotlib figure: one set per profile,
    each named ``<plot>-<profile>``. ``asr_vs_poison`` needs a sweep over the poison count, ``roc``
    a data filter with detection metrics (``det_*`` columns), ``curves`` rows with per-epoch
    curves, ``cost_vs_clip`` defenses beside clip on the same data. The caller closes them."""
    plt = _pyplot()
    figures = {}
    profiles = sorted(board["profile"].dropna().unique()) if "profile" in board else []
    # profiles (pre-training and fine-tuning) are never mixed in one figure: one set each, named
    # <plot>-<profile> (also for a single profile, so a filtered report writes the same files)
    for profile, part in ([(None, board)] if not profiles else [(p, board[board["profile"] == p]) for p in profiles]):
        # a row of an older schema has no profile ("?"); a name is made safe for a file name
        suffix = "" if profile is None else "-" + ("unknown" if profile == "?" else re.sub(r"[^\w.-]", "_", profile))
        made = {}
        if part["asr"].notna().any():
            made["asr_vs_clean"] = tradeoff(part, plt)
            if (part["asr"].notna() & (part["setting"] == "")).any():
                made["asr_by_attack"] = asr_bars(part, plt)
        if not cost_rows(part).empty:
            made["cost_vs_clip"] = cost_bars(part, plt)
        if not sweep_groups(part).empty:
            made["asr_vs_poison"] = asr_vs_poison(part, plt)
        if not roc_rows(part).empty:
            made["roc"] = roc(part, plt)
        if not curve_rows(part).empty:
            made["curves"] = curves(part, plt)
        for name, fig in made.items():
            if profile is not None:
                _name_profile(fig, profile)
            _fit_title(fig)
            fig.tight_layout()  # again: the title may have grown a line
            figures[name + suffix] = fig
    return figures


def save_plots(board: pd.DataFrame, folder: str | Path, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Write ``make_figures``'s figures into ``folder`` (atomically) in ``formats`` (png at 150
    dpi, svg, pdf); return their paths."""
    plt = _pyplot()
    folder = Path(folder)
    paths = []
    for name, fig in make_figures(board).items():
        for ext in formats:
            path = folder / f"{name}.{ext}"
            # no date and fixed SVG ids: the same store gives the same files (the committed figures)
            metadata = {"Date": None} if ext == "svg" else {"CreationDate": None} if ext == "pdf" else {}
            with plt.rc_context({"svg.hashsalt": "poisonbench"}):
                atomic_write(path, lambda tmp, fig=fig, ext=ext, m=metadata: fig.savefig(tmp, format=ext, dpi=150, metadata=m))
            paths.append(path)
        plt.close(fig)
    return paths
