"""Leaderboard tables from the Parquet store (the report reads nothing else).

Seeds of one setting are pooled (docs/DESIGN.md): accuracies get the mean and a Student-t 95 %
interval over seeds (clipped to [0, 1]); ASR, a proportion of evaluation images (backdoors) or targets (targeted
poisoning), gets the pooled proportion and its Wilson 95 % interval. The detection metrics of data
filters (``det_*`` columns, benchmark/detection.py), each a number per cell, get the mean and a
Student-t interval like accuracies; the pairs they removed, the mean; their ROC curves, the mean
curve. A defense's own numbers (``d_*`` columns, its metrics channel) are carried to CSV/JSON.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from rich.markup import escape
from rich.table import Table

from .config import identity, setting_id, settings
from .grid import parse_seeds, split_list
from .store import read_runs
from .utils import hash_json

GROUP = ["attack", "defense", "profile"]
ACCURACIES = ["clean_top1", "clean_top5", "linear_probe_top1"]
COLUMNS = (GROUP + ["setting", "seeds"]
           + [f"{m}{s}" for m in ACCURACIES for s in ("", "_lo", "_hi")]
           + ["asr", "asr_lo", "asr_hi", "asr_n", "n_poison", "poison_rate"])
# data filters' detection metrics (benchmark/detection.py): fractions per cell, the pairs removed, the ROC curve
DETECTION = ["det_auroc", "det_ap", "det_tpr_at_1fpr", "det_tpr_at_5fpr", "det_fpr_at_95tpr"]
REMOVED = ["det_poisons_removed", "det_clean_removed"]
ROC = ["det_roc_fpr", "det_roc_tpr"]
DETECTION_COLUMNS = [f"{m}{s}" for m in DETECTION for s in ("", "_lo", "_hi")] + REMOVED + ROC
# trigger survival (benchmark/survival.py): fractions of the poisoned training views, mean over seeds
SURVIVAL = ["trig_present", "trig_at_eval", "trig_corr"]
# per-epoch curves (benchmark/curves.py): the mean curve over seeds, lists
CURVES = ["curve_epoch", "curve_clean_top1", "curve_asr"]
# the defense's clean top-1 cost: the undefended setting's clean top-1 minus this one's, of the same data
COST = ["clean_cost"]
SEEDS = ["clean_top1_seeds", "asr_seeds"]  # per-seed values (lists), for the figures
LABELS = {"clean_top1": "clean top-1", "clean_top5": "clean top-5", "linear_probe_top1": "linear probe", "asr": "ASR",
          "det_auroc": "detection AUROC"}
CONFIDENCE = 0.95


class EmptyStoreError(LookupError):
    """The results folder holds no finished run."""


def t_interval(values) -> tuple[float, float, float]:
    """Mean and two-sided 95 % Student-t interval of ``values`` (NaNs dropped).

    Returns (mean, low, high); low = high = NaN with fewer than two values, and
    low = high = mean when they are all equal."""
    from scipy import stats

    x = pd.Series(values, dtype="float64").dropna()
    if x.empty:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.nan, math.nan
    sem = float(x.std(ddof=1)) / math.sqrt(len(x))
    if sem == 0:
        return mean, mean, mean
    lo, hi = stats.t.interval(CONFIDENCE, len(x) - 1, loc=mean, scale=sem)
    return mean, float(lo), float(hi)


def clipped_t_interval(values) -> tuple[float, float, float]:
    """``t_interval`` with the bounds clipped to [0, 1], the range of an accuracy."""
    mean, lo, hi = t_interval(values)
    return mean, min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0)


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion ``successes / n``; (NaN, NaN) when n == 0."""
    from scipy import stats

    if n <= 0:
        return math.nan, math.nan
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(CONFIDENCE, method="wilson")
    return float(ci.low), float(ci.high)


def _present(v) -> bool:
    """A stored cell value that is there: not None and not a float NaN (lists and arrays are there)."""
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def _carried(values: pd.Series):
    """A metrics-channel column (``d_<key>``) over the seeds of a setting: the mean when every
    value is a number (bools count 0/1), else the list of the values (arrays as lists), NaN when
    no seed has one."""
    present = [v.tolist() if hasattr(v, "tolist") else v for v in values if _present(v)]
    if not present:
        return math.nan
    if all(isinstance(v, (int, float)) for v in present):  # np.generic.tolist() gave Python numbers
        return float(sum(present)) / len(present)
    return present


def _aggregate(group: pd.DataFrame, extra: list[str]) -> pd.Series:
    # a row of an older schema without a seed is one run all the same (the rows are distinct cells)
    seeds = group["seed"].nunique() + int(group["seed"].isna().sum()) if "seed" in group else len(group)
    out: dict[str, float] = {"seeds": seeds}
    for m in ACCURACIES:
        out[m], out[f"{m}_lo"], out[f"{m}_hi"] = clipped_t_interval(group[m])
    asr = group["asr"].dropna()
    n = group.loc[asr.index, "asr_n"] if "asr_n" in group else pd.Series(dtype="float64")
    if asr.empty:
        out.update(asr=math.nan, asr_lo=math.nan, asr_hi=math.nan, asr_n=0)
    elif n.notna().all() and len(n):
        # pooled over seeds: the successes of every seed over all their images (or targets)
        k, total = int(round(float((asr * n).sum()))), int(n.sum())
        out["asr"], out["asr_n"] = k / total, total
        out["asr_lo"], out["asr_hi"] = wilson_interval(k, total)
    else:  # rows of an older schema without asr_n: the mean, no interval
        out.update(asr=float(asr.mean()), asr_lo=math.nan, asr_hi=math.nan, asr_n=0)
    out["n_poison"] = float(group["n_poison"].mean()) if "n_poison" in group else math.nan
    out["poison_rate"] = float(pd.to_numeric(group["poison_rate"], errors="coerce").mean()) if "poison_rate" in group \
        else math.nan
    # each seed's own values, for the figures' per-seed points (NaN where a seed has none)
    out["clean_top1_seeds"] = [float(v) for v in pd.to_numeric(group["clean_top1"], errors="coerce")]
    out["asr_seeds"] = [float(v) for v in pd.to_numeric(group["asr"], errors="coerce")]
    if "det_auroc" in extra:
        for m in DETECTION:
            out[m], out[f"{m}_lo"], out[f"{m}_hi"] = clipped_t_interval(group[m])
        for m in REMOVED:
            out[m] = float(group[m].mean())  # NaN for a defense that is not a filter
        curves = [(f, t) for f, t in zip(group["det_roc_fpr"], group["det_roc_tpr"])
                  if _present(f) and _present(t) and len(f)]
        from .detection import mean_roc

        out["det_roc_fpr"], out["det_roc_tpr"] = mean_roc(curves) if curves else (math.nan, math.nan)
    for m in SURVIVAL:
        out[m] = float(pd.to_numeric(group[m], errors="coerce").mean()) if m in group else math.nan
    out.update(mean_curves(group))
    for c in extra:
        if c.startswith("d_"):
            out[c] = _carried(group[c])
    order = ["seeds"] + [c for c in COLUMNS + SURVIVAL + CURVES + SEEDS + extra if c in out and c != "seeds"]
    return pd.Series({k: out[k] for k in order})  # the same keys in the same order for every group


def mean_curves(group: pd.DataFrame) -> dict:
    """The setting's per-epoch curves (``curve_*`` lists), averaged over the seeds whose curves
    cover the epochs most of its seeds' do (a seed resumed from a checkpoint of an older version
    lacks the first epochs and is left out); NaN when no seed has one."""
    out = {c: math.nan for c in CURVES}
    if "curve_epoch" not in group:
        return out
    runs = [r for _, r in group.iterrows() if _present(r.get("curve_epoch")) and len(r["curve_epoch"])]
    if not runs:
        return out
    # the epochs most seeds have (a seed resumed from an older checkpoint may lack the first ones)
    epochs = pd.Series([tuple(int(e) for e in r["curve_epoch"]) for r in runs]).mode().iloc[0]
    runs = [r for r in runs if tuple(int(e) for e in r["curve_epoch"]) == epochs]
    out["curve_epoch"] = list(epochs)
    for c in CURVES[1:]:
        lists = [np.asarray(r[c], dtype=float) for r in runs if _present(r.get(c)) and len(r[c]) == len(out["curve_epoch"])]
        if lists:
            out[c] = np.mean(lists, axis=0).tolist()
    return out


def data_setting_id(config: dict) -> str:
    """The setting of a config's data and training, whatever its defense: ``setting_id`` of its
    identity without the defense and its parameters (the same for a defense and its undefended
    counterpart)."""
    return hash_json({k: v for k, v in identity(config).items() if k not in ("seed", "defense", "defense_params")})[:16]


def paired_clean_cost(ok: pd.DataFrame) -> dict[str, float]:
    """Per setting id, its clean top-1 cost (fraction): the mean over the seeds it shares with the
    undefended defense's setting (``defenses.base.UNDEFENDED``) of the same data and training, of
    that setting's clean top-1 minus its own at the same seed (each seed draws its own data and
    initial model, so seeds are paired); NaN when they share no seed. ``ok``: finished rows with
    ``setting_id``, ``data_id``, ``seed`` and ``clean_top1``."""
    from .defenses.base import UNDEFENDED

    base = ok[ok["defense"] == UNDEFENDED].groupby(["data_id", "seed"])["clean_top1"].mean()
    out = {}
    for sid, g in ok.groupby("setting_id"):
        diffs = [base[(d, sd)] - v for d, sd, v in zip(g["data_id"], g["seed"], g["clean_top1"])
                 if (d, sd) in base.index and pd.notna(v)]
        out[sid] = float(np.mean(diffs)) if diffs else math.nan
    return out


def leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """One row per comparable setting over finished runs (status ok), seeds pooled.

    Runs are comparable when their resolved configs are equal up to the seed
    (``config.setting_id``, the rule of the run id: dataset, model, every parameter, training
    settings and the number of processes, hence the global batch). ``setting`` names the config
    values in which a setting departs from its profile's defaults, e.g. ``n_poison=50`` or
    ``world_size=2``; it is empty at the defaults. Columns: COLUMNS (fractions in
    [0, 1]; ``_lo``/``_hi`` are the 95 % interval bounds, NaN with one seed for accuracies); then,
    when some row has ``det_*`` columns (a data filter's), DETECTION_COLUMNS: each of DETECTION
    with its Student-t interval, the mean pairs removed (REMOVED), the mean ROC curve (ROC, lists;
    ``detection.mean_roc``), all NaN for defenses that are not filters; then every ``d_<key>``
    metrics-channel column of the rows, sorted: the mean over seeds when numeric, else the list of
    the seeds' values.
    Sorted by attack and setting, then ASR ascending and clean top-1 descending (the most robust
    defense first). Rows of an older schema report too: a missing metric is NaN, and a row
    without a ``seed`` counts as one run.
    """
    if df.empty or "status" not in df:
        return pd.DataFrame(columns=COLUMNS)
    ok = df[df["status"] == "ok"]
    if "finished_at" in ok:
        ok = ok.sort_values("finished_at", kind="stable", na_position="first")
    ok = ok.drop_duplicates("run_id", keep="last").copy()  # a copied file must not count twice
    if ok.empty:
        return pd.DataFrame(columns=COLUMNS)
    detection = any(c.startswith("det_") for c in ok.columns)
    for col in ACCURACIES + ["asr", "asr_n", "n_poison"] + (DETECTION + REMOVED if detection else []):
        ok[col] = pd.to_numeric(ok[col], errors="coerce") if col in ok else math.nan
    for col in ROC if detection else []:
        ok[col] = ok[col] if col in ok else None
    extra = (DETECTION_COLUMNS if detection else []) + sorted(c for c in ok.columns if c.startswith("d_"))
    ok["profile"] = ok["profile"].fillna("?") if "profile" in ok else "?"
    configs = _configs(ok)  # parsed once for the three keys
    ok["setting"], ok["setting_id"] = _settings(ok, configs)
    ok["data_id"] = [data_setting_id(c) for c in configs]
    board = (ok.groupby(GROUP + ["setting", "setting_id", "data_id"], dropna=False)[list(ok.columns)]
             .apply(_aggregate, extra).reset_index())
    board["clean_cost"] = board["setting_id"].map(paired_clean_cost(ok))
    board["seeds"] = board["seeds"].astype(int)
    board["asr_n"] = board["asr_n"].astype(int)
    board["n_poison"] = board["n_poison"].round().astype("Int64")  # equal within a setting
    board = board.sort_values(["attack", "setting", "asr", "clean_top1"], ascending=[True, True, True, False],
                              na_position="last", key=_natural)
    return board[COLUMNS + SURVIVAL + COST + CURVES + SEEDS + extra].reset_index(drop=True)


def _natural(col: pd.Series) -> pd.Series:
    """Sort key: settings compare numbers by value (n_poison=25 before n_poison=100)."""
    if col.name != "setting":
        return col
    return col.map(lambda s: tuple(int(t) if t.isdecimal() else t for t in re.split(r"(\d+)", s)))  # "²": not int()


def _config(text) -> dict:
    """A row's stored config; {} (grouped by its identity columns alone) when it is missing or not JSON."""
    if not isinstance(text, str):
        return {}
    try:
        config = json.loads(text)
    except ValueError:
        warnings.warn(f"a result row's config is not JSON ({text[:40]!r}); it is grouped by attack/defense alone")
        return {}
    return config if isinstance(config, dict) else {}


def _configs(ok: pd.DataFrame) -> list[dict]:
    """Each row's stored config (``_config``), completed with its identity columns when missing."""
    configs = [_config(c) for c in ok.get("config", [None] * len(ok))]
    for c, (_, r) in zip(configs, ok.iterrows()):
        for k in GROUP:  # rows without a stored config still group by their identity columns
            c.setdefault(k, r[k])
        # rows of schema 1 (before world_size joined the config) hold it in a column only
        if "world_size" not in c and pd.notna(r.get("world_size")):
            c["world_size"] = int(r["world_size"])
    return configs


def _settings(ok: pd.DataFrame, configs: list[dict] | None = None) -> tuple[pd.Series, pd.Series]:
    """Each row's setting label (``config.settings``) and setting id (``config.setting_id``)."""
    configs = _configs(ok) if configs is None else configs
    return pd.Series(settings(configs), index=ok.index), pd.Series([setting_id(c) for c in configs], index=ok.index)


def select(df: pd.DataFrame, attack: str | None = None, defense: str | None = None, profile: str | None = None,
           seed: str | None = None) -> pd.DataFrame:
    """The rows of ``df`` (``read_runs``) whose attack, defense and profile are in the given comma
    lists and whose seed is in ``seed`` (``0,1,2`` or ``0-2``); None or ``all`` keeps every value.
    Raises ValueError for a malformed seed list."""
    keep = pd.Series(True, index=df.index)
    for column, wanted in (("attack", attack), ("defense", defense), ("profile", profile)):
        if wanted and wanted != "all":
            keep &= df[column].isin(split_list(wanted)) if column in df else False
    if seed and seed != "all":
        keep &= df["seed"].isin(parse_seeds(seed)) if "seed" in df else False
    return df[keep]


def load_leaderboard(results: str | Path, **filters: str | None) -> pd.DataFrame:
    """The leaderboard of the store under ``results``, of the rows that ``filters`` (attack,
    defense, profile, seed: ``store.select``) keep; EmptyStoreError saying what to run first."""
    df = read_runs(results)
    chosen = {k: v for k, v in filters.items() if v}
    if chosen and not df.empty:
        if select(df, **chosen).empty:
            raise EmptyStoreError(f"no run in {Path(results) / 'runs'} matches "
                                  + " ".join(f"--{k} {v}" for k, v in chosen.items()))
        # the seeds before pooling; the rest after, so that a setting keeps its cost against
        # the undefended defense when that one is filtered out of the table
        df = select(df, seed=chosen.get("seed"))
    board = leaderboard(df)
    if chosen and not board.empty:
        keep = select(board, **{k: v for k, v in chosen.items() if k != "seed"}).index
        board = board.loc[keep].reset_index(drop=True)
    if board.empty:
        failed = int((df["status"] == "failed").sum()) if "status" in df else 0
        extra = f" ({failed} failed run(s) are in the store; see their `error` column)" if failed else ""
        # stores inside this folder (make demo's results/demo, the committed results/reference)
        inner = sorted({p.parent.parent for p in Path(results).glob("*/runs/*.parquet")})
        elsewhere = (f" Stores inside it: {', '.join(map(str, inner))}; e.g. `bench report -r {inner[0]}`."
                     if inner else "")
        raise EmptyStoreError(
            f"no finished runs in {Path(results) / 'runs'}{extra}. Run one first, e.g. "
            f"`bench run --attack badnet --defense clip --results {results}`.{elsewhere}"
        )
    return board


def selected_runs(results: str | Path, **filters: str | None) -> pd.DataFrame:
    """The rows of the store under ``results`` that ``filters`` (attack, defense, profile, seed) keep."""
    df = read_runs(results)
    chosen = {k: v for k, v in filters.items() if v}
    return select(df, **chosen) if chosen and not df.empty else df


def fmt_value(row, metric: str) -> str:
    """``84.2`` or, with an interval, ``84.2 (83.1-85.3)``, in percent; ``-`` when missing."""
    x = row[metric]
    if pd.isna(x):
        return "-"
    lo, hi = row[f"{metric}_lo"], row[f"{metric}_hi"]
    return f"{100 * x:.1f}" if pd.isna(lo) else f"{100 * x:.1f} ({100 * lo:.1f}-{100 * hi:.1f})"


def fmt_count(x) -> str:
    """A count averaged over seeds: ``12``, or ``12.3`` when the seeds differ; ``-`` when missing."""
    if pd.isna(x):
        return "-"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def has_detection(board: pd.DataFrame) -> bool:
    """True when some setting of ``board`` is a data filter's (with detection metrics, or at least
    the pairs it removed: on clean data, ``none``, the AUROC is undefined)."""
    return "det_auroc" in board and bool(board[["det_auroc"] + REMOVED].notna().any(axis=None))


def defense_metric(value, percent: bool) -> str:
    """A ``leaderboard_metrics`` cell: the seeds' values (numbers, or per-epoch lists of which
    the last counts), their mean, in percent or as a number; ``-`` when missing."""
    if isinstance(value, list):
        values = [v[-1] if isinstance(v, list) and v else v for v in value]
        values = [float(v) for v in values if isinstance(v, (int, float))]
        value = sum(values) / len(values) if values else math.nan
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    return f"{100 * value:.1f}" if percent else fmt_count(value)


def leaderboard_metric_labels(defenses) -> dict[str, str]:
    """d_<key> column -> label, of the ``leaderboard_metrics`` of the registered ``defenses``."""
    from .registry import DEFENSES, RegistryError

    out: dict[str, str] = {}
    for name in defenses:
        try:
            metrics = getattr(DEFENSES.get(name), "leaderboard_metrics", {})
        except RegistryError:  # a row of a plugin that is not installed here
            continue
        out.update({f"d_{k}": label for k, label in metrics.items()})
    return out


COST_LABEL = "cost vs clip (pts)"
SURVIVAL_LABELS = {"trig_present": "patch in view (%)", "trig_at_eval": "patch as evaluated (%)",
                   "trig_corr": "trigger corr."}
SURVIVAL_NOTE = ("Clean top-1 cost: the undefended clip's clean top-1 on the same data minus the defense's, in "
                 "points, seed by seed (positive: the defense costs accuracy). Trigger survival, over the poisoned training "
                 "views as trained (mean over seeds): the share that holds the whole patch, the share that "
                 "holds it at its evaluated position and scale, and the correlation of the view's trigger "
                 "residual with the evaluated one (1: the trigger as evaluated; 0: gone).")


def _any(part: pd.DataFrame, column: str) -> bool:
    """True when some row of ``part`` has a value in ``column``."""
    return column in part and bool(part[column].notna().any())


def fmt_percent(x) -> str:
    """A fraction in percent, ``-`` when missing."""
    return "-" if pd.isna(x) else f"{100 * x:.1f}"


def display(board: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per attack, the leaderboard as strings for people: percent with 95 % intervals, the
    poisoned pairs (``n_poison``, so that a count that rounded to nothing shows), the number of
    seeds, and ``setting`` only when some row has one. When a defense of that attack is a data
    filter with detection metrics, the table also shows its detection AUROC (percent, 95 %
    interval) and the poisoned and clean pairs it removed (mean over seeds); and the numbers
    that its defenses declare in ``leaderboard_metrics`` (e.g. SafeCLIP's poisons in the safe
    set); ``-`` for the others."""
    show_setting = board["setting"].astype(bool).any()
    out = {}
    for attack, part in board.groupby("attack", sort=True):
        detection = has_detection(part)
        cost = _any(part, "clean_cost") and (part["defense"] != part["defense"].iloc[0]).any()
        survival, corr = _any(part, "trig_present"), _any(part, "trig_corr")
        own = {c: label for c, label in leaderboard_metric_labels(part["defense"].unique()).items() if c in part}
        rows = []
        for _, r in part.iterrows():
            shown = {"defense": r["defense"], "profile": r["profile"]}
            if show_setting:
                shown["setting"] = r["setting"]
            shown.update({f"{LABELS[m]} (%)": fmt_value(r, m) for m in ["asr"] + ACCURACIES})
            shown["poisoned pairs"] = "-" if pd.isna(r["n_poison"]) else str(r["n_poison"])
            if cost:
                shown[COST_LABEL] = "-" if pd.isna(r["clean_cost"]) else f"{100 * r['clean_cost']:+.1f}"
            if survival:
                shown[SURVIVAL_LABELS["trig_present"]] = fmt_percent(r["trig_present"])
                shown[SURVIVAL_LABELS["trig_at_eval"]] = fmt_percent(r["trig_at_eval"])
            if corr:
                shown[SURVIVAL_LABELS["trig_corr"]] = "-" if pd.isna(r["trig_corr"]) else f"{r['trig_corr']:.2f}"
            if detection:
                shown[f"{LABELS['det_auroc']} (%)"] = fmt_value(r, "det_auroc")
                shown["poisons removed (pairs)"] = fmt_count(r["det_poisons_removed"])
                shown["clean removed (pairs)"] = fmt_count(r["det_clean_removed"])
            for c, label in own.items():
                shown[label] = defense_metric(r[c], label.endswith("(%)"))
            shown["seeds"] = str(r["seeds"])
            rows.append(shown)
        out[attack] = pd.DataFrame(rows)
    return out


TITLE = "poisonbench leaderboard"
NOTE = ("Percent; mean over seeds with a 95 % interval in parentheses (Student t for accuracies; "
        "Wilson for ASR, pooled over the seeds' evaluation images or targets). "
        "Per attack, defenses are ranked by ASR, then clean top-1.")
DETECTION_NOTE = ("Data filters: detection AUROC of their scores against the poison flags (poisons positive; "
                  "mean over seeds, Student t interval) and the poisoned and clean training pairs they "
                  "removed (mean over seeds); \"-\" for defenses that are not filters.")


def rich_tables(board: pd.DataFrame) -> list[Table]:
    """One rich table per attack; the first with detection columns explains them in its caption."""
    tables = []
    for attack, shown in display(board).items():
        title = attack
        if shown["profile"].nunique() == 1:  # one profile: name it in the title, keep the width for numbers
            title, shown = f"{attack} ({shown['profile'].iloc[0]})", shown.drop(columns="profile")
        notes = [DETECTION_NOTE] if "poisons removed (pairs)" in shown else []
        notes += [SURVIVAL_NOTE] if COST_LABEL in shown or SURVIVAL_LABELS["trig_corr"] in shown else []
        notes = [n for n in notes if not any(t.caption and n in t.caption for t in tables)]  # each once
        table = Table(title=escape(title), caption=" ".join(notes) or None)
        # the interval on its own line, so that a narrow terminal never breaks a number
        cells = shown.astype(str).apply(lambda c: c.str.replace(" (", "\n(", regex=False))
        for col in shown.columns:
            text = col not in ("defense", "profile", "setting")
            widest = max((len(line) for v in cells[col] for line in v.split("\n")), default=1)
            table.add_column(col, justify="right" if text else "left", overflow="fold",
                             min_width=widest if text else None)
        for r in cells.itertuples(index=False):
            table.add_row(*map(escape, r))  # settings hold the user's paths and values: no markup
        tables.append(table)
    return tables


def to_text(board: pd.DataFrame, fmt: str) -> str:
    """The leaderboard as ``md`` (one Markdown table per attack, percent), ``csv`` or ``json``
    (one record per setting with every column of ``leaderboard``, fractions in [0, 1], interval
    bounds as ``*_lo``/``*_hi``, missing values empty/null; in CSV a list-valued cell, e.g. the
    ROC curve ``det_roc_fpr``, is JSON text)."""
    if fmt == "csv":
        listed = board.copy()
        for c in listed.columns[listed.dtypes == object]:
            listed[c] = listed[c].map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
        return listed.to_csv(index=False)
    if fmt == "json":
        return board.to_json(orient="records", indent=1) + "\n"
    if fmt == "md":
        parts = [f"# {TITLE}\n", NOTE + (" " + DETECTION_NOTE if has_detection(board) else "") + "\n",
                 SURVIVAL_NOTE + "\n"]
        for attack, shown in display(board).items():
            parts.append(f"## {attack}\n\n" + shown.to_markdown(index=False, disable_numparse=True) + "\n")
        return "\n".join(parts)
    raise ValueError(f"unknown format {fmt!r}; valid formats: md, csv, json, html")


PLOT_CAPTIONS = {
    "asr_vs_clean": ("ASR vs clean accuracy", "One panel per attack; each point is a defense setting (mean over "
                     "seeds) with its 95 % intervals. Lower right is better: the attack fails and the model "
                     "stays accurate."),
    "asr_by_attack": ("ASR by attack and defense", "At the profile's default parameters; bars are the pooled ASR "
                      "with Wilson 95 % intervals, labelled in percent."),
    "asr_vs_poison": ("ASR and clean accuracy vs poison rate", "For attacks whose poison count was swept; one line "
                      "per defense and other setting, ASR on top and clean top-1 below."),
    "cost_vs_clip": ("Clean-accuracy cost against clip", "Per attack, at the profile's default parameters: clip's "
                     "clean top-1 minus the defense's, on the same poisoned data, in points; error bars are the "
                     "95 % interval of the defense's own clean top-1."),
    "curves": ("Per-epoch curves", "ASR (top) and clean zero-shot top-1 (bottom) after each epoch, on a fixed "
               "seeded subset of the evaluation set (the profile's curve_n images), mean over seeds; one line per "
               "defense setting."),
    "roc": ("Data filters: ROC curves", "One panel per attack; one curve per data-filter setting (mean over "
            "seeds), poisons as the positive class; the AUROC in the legend. The diagonal is a filter that "
            "scores at random."),
}


RUN_COLUMNS = {"attack": "attack", "defense": "defense", "profile": "profile", "setting": "setting", "seed": "seed",
               "asr": "ASR (%)", "clean_top1": "clean top-1 (%)", "linear_probe_top1": "linear probe (%)",
               "i2t_r10": "i2t R@10 (%)", "t2i_r10": "t2i R@10 (%)", "poison_rate": "poison rate (%)",
               "n_poison": "poisoned pairs", "run_id": "run id", "git_rev": "git revision", "finished_at": "finished"}


def run_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Every finished run of ``df`` (``read_runs``, already filtered) as strings for people, one row
    per seed: identity, setting, ASR, clean top-1, linear probe, retrieval R@10, poison rate (percent)
    and provenance (run id, git revision, when it finished); sorted by attack, defense, setting, seed."""
    ok = df[df["status"] == "ok"].drop_duplicates("run_id", keep="last").copy() if "status" in df else df.iloc[:0]
    if ok.empty:
        return pd.DataFrame(columns=list(RUN_COLUMNS.values()))
    ok["setting"] = _settings(ok)[0]
    ok = ok.sort_values(["attack", "defense", "setting", "seed"], kind="stable")
    out = pd.DataFrame(index=ok.index)
    for col, label in RUN_COLUMNS.items():
        values = ok[col] if col in ok else pd.Series(math.nan, index=ok.index)
        if col in ("asr", "clean_top1", "linear_probe_top1", "i2t_r10", "t2i_r10", "poison_rate"):
            out[label] = pd.to_numeric(values, errors="coerce").map(lambda v: "-" if pd.isna(v) else f"{100 * v:.2f}"
                                                                     if col == "poison_rate" else f"{100 * v:.1f}")
        else:
            out[label] = values.map(lambda v: "-" if not _present(v) else str(int(v)) if isinstance(v, float) else str(v))
    return out.reset_index(drop=True)


def to_html(board: pd.DataFrame, svgs: dict[str, str] | None = None, runs: pd.DataFrame | None = None) -> str:
    """One self-contained HTML page: the per-attack tables, the plots inlined as SVG (``svgs``:
    plot name, e.g. ``asr_vs_clean``, -> SVG text) and, given the store's rows ``runs``
    (``read_runs``), every run with its provenance (``run_rows``); no external file or script."""
    import html
    import time

    # a wide table scrolls inside the page instead of running off it
    css = ("body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em;display:block;overflow-x:auto;"
           "max-width:100%}th,td{border:1px solid #ccc;padding:.3em .6em}"
           "th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}"
           "figure{margin:1em 0}svg{max-width:100%;height:auto}")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{TITLE}</title><style>{css}</style></head><body>",
             f"<h1>{TITLE}</h1><p>{html.escape(NOTE)}</p>"
             + (f"<p>{html.escape(DETECTION_NOTE)}</p>" if has_detection(board) else "")
             + f"<p>{html.escape(SURVIVAL_NOTE)}</p>",
             f"<p>{int(board['seeds'].sum())} runs in {len(board)} settings; generated {time.strftime('%Y-%m-%d %H:%M %Z')}.</p>"]
    for attack, shown in display(board).items():
        parts.append(f"<h2>{html.escape(attack)}</h2>" + shown.to_html(index=False, border=0, escape=True))
    for i, (name, svg) in enumerate((svgs or {}).items()):
        body = svg[svg.find("<svg"):]  # drop the XML prologue and DOCTYPE
        body = re.sub(r'id="([^"]+)"', rf'id="f{i}-\1"', body)  # ids unique across the inlined figures
        body = re.sub(r'#([A-Za-z_][\w.-]*)\)', rf'#f{i}-\1)', body)  # url(#id) references
        body = re.sub(r'href="#([^"]+)"', rf'href="#f{i}-\1"', body)
        plot, _, profile = name.partition("-")  # <plot>-<profile> when the board has several profiles
        title, caption = PLOT_CAPTIONS.get(plot, (plot, ""))
        title += f" ({profile})" if profile else ""
        parts.append(f"<figure><h2>{html.escape(title)}</h2>{body}<figcaption>{html.escape(caption)}</figcaption></figure>")
    if runs is not None and not runs.empty:
        table = run_rows(runs)
        parts.append(f"<details><summary><h2 style='display:inline'>Every run ({len(table)})</h2></summary>"
                     "<p>One row per seed, with the revision of the code that ran it.</p>"
                     + table.to_html(index=False, border=0, escape=True) + "</details>")
    parts.append("</body></html>")
    return "\n".join(parts)
