"""Leaderboard tables from the Parquet store (the report reads nothing else)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from rich.table import Table

from .config import settings
from .store import read_runs

COLUMNS = ["attack", "defense", "profile", "setting", "clean_top1", "clean_top5", "asr", "runs"]
GROUP = ["attack", "defense", "profile"]


class EmptyStoreError(LookupError):
    """The results folder holds no finished run."""


def leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """One row per comparable setting over finished runs (status ok), seeds pooled.

    Runs are comparable when their resolved configs are equal up to the seed. ``setting`` names
    the config values that differ between runs of the same (attack, defense, profile), e.g.
    ``n_poison=50``; it is empty when there is one setting. Columns: mean clean top-1/top-5,
    mean ASR (NaN for attacks without one) and the number of runs. Sorted by attack, then ASR
    ascending and clean top-1 descending (the most robust defense first).
    """
    if df.empty or "status" not in df:
        return pd.DataFrame(columns=COLUMNS)
    ok = df[df["status"] == "ok"].copy()
    if ok.empty:
        return pd.DataFrame(columns=COLUMNS)
    for col in ("clean_top1", "clean_top5", "asr"):
        ok[col] = pd.to_numeric(ok[col], errors="coerce") if col in ok else float("nan")
    ok["profile"] = ok["profile"].fillna("?") if "profile" in ok else "?"
    ok["setting"] = _settings(ok)
    board = ok.groupby(GROUP + ["setting"], as_index=False, dropna=False).agg(
        clean_top1=("clean_top1", "mean"), clean_top5=("clean_top5", "mean"), asr=("asr", "mean"),
        runs=("run_id", "count"),
    )
    board = board.sort_values(["attack", "asr", "clean_top1"], ascending=[True, True, False], na_position="last")
    return board[COLUMNS].reset_index(drop=True)


def _settings(ok: pd.DataFrame) -> pd.Series:
    configs = [json.loads(c) if isinstance(c, str) else {} for c in ok.get("config", [None] * len(ok))]
    # rows without a stored config still group by their identity columns
    for c, (_, r) in zip(configs, ok.iterrows()):
        for k in GROUP:
            c.setdefault(k, r[k])
    return pd.Series(settings(configs), index=ok.index)


def load_leaderboard(results: str | Path) -> pd.DataFrame:
    """The leaderboard of the store under ``results``; EmptyStoreError saying what to run first."""
    df = read_runs(results)
    board = leaderboard(df)
    if board.empty:
        failed = int((df["status"] == "failed").sum()) if "status" in df else 0
        extra = f" ({failed} failed run(s) are in the store; see their `error` column)" if failed else ""
        raise EmptyStoreError(
            f"no finished runs in {Path(results) / 'runs'}{extra}. Run one first, e.g. "
            f"`bench run --attack badnet --defense clip --results {results}`."
        )
    return board


def _pct(x: float) -> str:
    return "-" if pd.isna(x) else f"{100 * x:.1f}"


def rich_table(board: pd.DataFrame) -> Table:
    """The leaderboard as a rich table, accuracies and ASR in percent."""
    table = Table(title="poisonbench leaderboard (mean over seeds; %)")
    show_setting = board["setting"].astype(bool).any()
    cols = [("attack", "left"), ("defense", "left"), ("profile", "left")] + ([("setting", "left")] if show_setting else [])
    for col, just in cols + [("clean top-1", "right"), ("clean top-5", "right"), ("ASR", "right"), ("runs", "right")]:
        table.add_column(col, justify=just, overflow="fold")  # fold, never cut: settings must stay distinguishable
    for r in board.itertuples(index=False):
        ident = [r.attack, r.defense, r.profile] + ([r.setting] if show_setting else [])
        table.add_row(*ident, _pct(r.clean_top1), _pct(r.clean_top5), _pct(r.asr), str(r.runs))
    return table


def to_text(board: pd.DataFrame, fmt: str) -> str:
    """The leaderboard as ``md`` (a Markdown table, percent) or ``csv`` (fractions in [0, 1])."""
    if fmt == "csv":
        return board.to_csv(index=False)
    if fmt == "md":
        shown = board.copy()
        for col in ("clean_top1", "clean_top5", "asr"):
            shown[col] = shown[col].map(_pct)
        shown.columns = ["attack", "defense", "profile", "setting", "clean top-1 (%)", "clean top-5 (%)", "ASR (%)", "runs"]
        return shown.to_markdown(index=False, disable_numparse=True) + "\n"
    raise ValueError(f"unknown format {fmt!r}; valid formats: md, csv")
