"""Regenerate README.md's reference table from the committed store (results/reference): per attack
and defense, the mean over seeds of ASR / clean zero-shot top-1 / linear probe, as `bench report`
computes them. The table sits between the markers below; tests/test_readme_table.py checks that
README.md holds exactly what this script writes, so no number in it is typed by hand.

    python scripts/readme_table.py            # rewrite README.md in place
    python scripts/readme_table.py --check    # exit 1 if README.md's table is out of date
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from poisonbench.report import load_leaderboard

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- reference-table: scripts/readme_table.py -->", "<!-- /reference-table -->"
DEFENSE_ORDER = ["clip", "roclip", "aug-only", "density-filter", "cleanclip", "safeclip"]
ATTACK_ORDER = ["targeted", "badnet", "blended", "sig", "wanet", "badnet-lc"]


def cell_text(row: pd.Series) -> str:
    """"ASR / clean top-1 / probe" in percent (one decimal); a targeted ASR also as targets hit / targets."""
    asr = f"{100 * row['asr']:.1f} %"
    if row["attack"] == "targeted" and pd.notna(row.get("asr_n")):
        asr += f" ({round(row['asr'] * row['asr_n'])}/{int(row['asr_n'])})"
    return f"{asr} / {100 * row['clean_top1']:.1f} % / {100 * row['linear_probe_top1']:.1f} %"


def table(results: str | Path = ROOT / "results" / "reference") -> str:
    """The Markdown table of the store's default settings (cells without swept parameters), with
    the number of seeds of each entry when it is not 3."""
    board = load_leaderboard(results)
    board = board[board["setting"].fillna("") == ""]
    defenses = [d for d in DEFENSE_ORDER if d in set(board["defense"])] + sorted(set(board["defense"]) - set(DEFENSE_ORDER))
    attacks = [a for a in ATTACK_ORDER if a in set(board["attack"])] + sorted(set(board["attack"]) - set(ATTACK_ORDER))
    lines = ["| attack | " + " | ".join(f"`{d}`" for d in defenses) + " |", "|---" * (len(defenses) + 1) + "|"]
    for a in attacks:
        cells = []
        for d in defenses:
            hit = board[(board["attack"] == a) & (board["defense"] == d)]
            if hit.empty:
                cells.append("-")
                continue
            row = hit.iloc[0]
            seeds = int(row["seeds"])
            cells.append(cell_text(row) + ("" if seeds == 3 else f" ({seeds} seed{'s' if seeds != 1 else ''})"))
        lines.append(f"| `{a}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rewrite(readme: str, new_table: str) -> str:
    """``readme`` with the text between the markers replaced by ``new_table``."""
    head, sep, rest = readme.partition(START)
    _, sep2, tail = rest.partition(END)
    if not (sep and sep2):
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    return f"{head}{START}\n{new_table}\n{END}{tail}"


def main(argv: list[str]) -> int:
    path = ROOT / "README.md"
    text = path.read_text(encoding="utf-8")
    new = rewrite(text, table())
    if "--check" in argv:
        if new != text:
            print("README.md's reference table is out of date: run python scripts/readme_table.py")
            return 1
        return 0
    path.write_text(new, encoding="utf-8")
    print(f"rewrote the reference table in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
