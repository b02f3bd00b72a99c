"""Leaderboard tables from the Parquet store (the report reads nothing else)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.table import Table

from .store import read_runs

COLUMNS = ["attack", "defense", "clean_top1", "clean_top5", "asr", "runs"]


class EmptyStoreError(LookupError):
    """The results folder holds no finished run."""


def leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (attack, defense) over finished runs (status ok): mean clean top-1/top-5 and
    mean ASR (NaN for attacks without one), and the number of runs. Sorted by attack, then by
    ASR ascending and clean top-1 descending (the most robust defense first)."""
    if df.empty or "status" not in df:
        return pd.DataFrame(columns=COLUMNS)
    ok = df[df["status"] == "ok"].copy()
    if ok.empty:
        return pd.DataFrame(columns=COLUMNS)
    for col in ("clean_top1", "clean_top5", "asr"):
        ok[col] = pd.to_numeric(ok[col], errors="coerce") if col in ok else float("nan")
    board = (
        ok.groupby(["attack", "defense"], as_index=False)
        .agg(clean_top1=("clean_top1", "mean"), clean_top5=("clean_top5", "mean"), asr=("asr", "mean"),
             runs=("run_id", "count"))
    )
    return board.sort_values(["attack", "asr", "clean_top1"], ascending=[True, True, False], na_position="last")[
        COLUMNS
    ].reset_index(drop=True)


def load_leaderboard(results: str | Path) -> pd.DataFrame:
    """The leaderboard of the store under ``results``; EmptyStoreError saying what to run first."""
    df = read_runs(results)
    board = leaderboard(df)
    if board.empty:
        failed = int((df["status"] == "failed").sum()) if "status" in df else 0
        extra = f" ({failed} failed run(s) are in the store; see their `error` column)" if failed else ""
        raise EmptyStoreError(
            f"no finished runs in {Path(results) / 'runs'}{extra}. Run one first, e.g. "
            "`bench run --attack badnet --defense clip`."
        )
    return board


def _pct(x: float) -> str:
    return "-" if pd.isna(x) else f"{100 * x:.1f}"


def rich_table(board: pd.DataFrame) -> Table:
    """The leaderboard as a rich table, accuracies and ASR in percent."""
    table = Table(title="poisonbench leaderboard (mean over runs; %)")
    for col, just in [("attack", "left"), ("defense", "left"), ("clean top-1", "right"), ("clean top-5", "right"),
                      ("ASR", "right"), ("runs", "right")]:
        table.add_column(col, justify=just)
    for r in board.itertuples(index=False):
        table.add_row(r.attack, r.defense, _pct(r.clean_top1), _pct(r.clean_top5), _pct(r.asr), str(r.runs))
    return table


def to_text(board: pd.DataFrame, fmt: str) -> str:
    """The leaderboard as ``md`` (a Markdown table, percent) or ``csv`` (fractions in [0, 1])."""
    if fmt == "csv":
        return board.to_csv(index=False)
    if fmt == "md":
        shown = board.copy()
        for col in ("clean_top1", "clean_top5", "asr"):
            shown[col] = shown[col].map(_pct)
        shown.columns = ["attack", "defense", "clean top-1 (%)", "clean top-5 (%)", "ASR (%)", "runs"]
        return shown.to_markdown(index=False, disable_numparse=True) + "\n"
    raise ValueError(f"unknown format {fmt!r}; valid formats: md, csv")
