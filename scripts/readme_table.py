"""Regenerate README.md's reference tables from the committed store (results/reference): per profile,
attack and defense, the mean over seeds of ASR / clean zero-shot top-1 / linear probe, as `bench
report` computes them. Each profile's table sits between its markers (``markers``);
tests/test_readme_table.py checks that README.md holds exactly what this script writes, so no number
in it is typed by hand. The clean baseline (attack ``none``, the fine-tuning profiles' clean models)
has no ASR and is left out.

    python scripts/readme_table.py            # rewrite README.md in place
    python scripts/readme_table.py --check    # exit 1 if README.md's table is out of date
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from poisonbench.report import load_leaderboard

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ["cpu-small", "cpu-small-ft"]


def markers(profile: str) -> tuple[str, str]:
    """The README markers around ``profile``'s table (cpu-small keeps the first table's markers)."""
    name = "" if profile == "cpu-small" else f" {profile}"
    return f"<!-- reference-table{name}: scripts/readme_table.py -->", f"<!-- /reference-table{name} -->"

DEFENSE_ORDER = ["clip", "roclip", "aug-only", "density-filter", "cleanclip", "safeclip"]
ATTACK_ORDER = ["targeted", "badnet", "blended", "sig", "wanet", "badnet-lc"]


def cell_text(row: pd.Series) -> str:
    """"ASR / clean top-1 / probe" in percent (one decimal); a targeted ASR also as targets hit / targets."""
    asr = f"{100 * row['asr']:.1f} %"
    if row["attack"] == "targeted" and pd.notna(row.get("asr_n")):
        asr += f" ({round(row['asr'] * row['asr_n'])}/{int(row['asr_n'])})"
    return f"{asr} / {100 * row['clean_top1']:.1f} % / {100 * row['linear_probe_top1']:.1f} %"


def table(results: str | Path = ROOT / "results" / "reference", profile: str = "cpu-small") -> str:
    """The Markdown table of the store's default settings of ``profile`` (cells without swept
    parameters), with the number of seeds of each entry when it is not 3."""
    board = load_leaderboard(results)
    board = board[(board["setting"].fillna("") == "") & (board["profile"] == profile) & board["asr"].notna()]
    if board.empty:
        return f"(no {profile} cells in the store yet)"
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


def rewrite(readme: str, new_table: str, profile: str = "cpu-small") -> str:
    """``readme`` with the text between ``profile``'s markers replaced by ``new_table``."""
    start, end = markers(profile)
    head, sep, rest = readme.partition(start)
    _, sep2, tail = rest.partition(end)
    if not (sep and sep2):
        raise SystemExit(f"README.md lacks the markers {start} ... {end}")
    return f"{head}{start}\n{new_table}\n{end}{tail}"


DEMO_MARKERS = ("<!-- demo-reference: scripts/readme_table.py -->", "<!-- /demo-reference -->")


def demo_reference(results: str | Path = ROOT / "results" / "reference") -> str:
    """The demo's two cells (badnet against clip and roclip, cpu-small) as the reference grid has
    them over its seeds: clean top-1 with its 95 % interval and the pooled ASR."""
    board = load_leaderboard(results)
    board = board[(board["setting"].fillna("") == "") & (board["profile"] == "cpu-small") & (board["attack"] == "badnet")]
    parts = []
    for d in ("clip", "roclip"):
        hit = board[board["defense"] == d]
        if hit.empty:
            return "(the reference grid has no badnet cells yet)"
        r = hit.iloc[0]
        parts.append(f"`{d}` {100 * r['clean_top1']:.1f} % ({100 * r['clean_top1_lo']:.1f}-{100 * r['clean_top1_hi']:.1f}) "
                     f"clean top-1, {100 * r['asr']:.1f} % ASR")
    seeds = int(board[board["defense"] == "clip"].iloc[0]["seeds"])
    return (f"The demo is one draw (seed 0). Over the reference grid's {seeds} seeds the same cells give "
            f"{parts[0]}; {parts[1]} (mean, 95 % interval).")


def rewrite_all(readme: str, results: str | Path = ROOT / "results" / "reference") -> str:
    """``readme`` with every profile's table and the demo's reference line rewritten."""
    for profile in PROFILES:
        readme = rewrite(readme, table(results, profile), profile)
    start, end = DEMO_MARKERS
    head, sep, rest = readme.partition(start)
    _, sep2, tail = rest.partition(end)
    if not (sep and sep2):
        raise SystemExit(f"README.md lacks the markers {start} ... {end}")
    return f"{head}{start}\n{demo_reference(results)}\n{end}{tail}"


def main(argv: list[str]) -> int:
    path = ROOT / "README.md"
    text = path.read_text(encoding="utf-8")
    new = rewrite_all(text)
    if "--check" in argv:
        if new != text:
            print("README.md's reference tables are out of date: run python scripts/readme_table.py")
            return 1
        return 0
    path.write_text(new, encoding="utf-8")
    print(f"rewrote the reference tables in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
