"""Write docs/FINDINGS.md, the report on what RoCLIP's cpu-small numbers mean, from a store's rows.

Its figures go to docs/findings/. Every number in the file comes from those rows: means over seeds (accuracies,
with a Student-t 95 % interval), ASR pooled over seeds (with a Wilson 95 % interval), as
`bench report` computes them. The cells are run by scripts/findings_grid.sh; a setting with no
rows yet shows as "not run yet".

    python scripts/findings.py [--results results/reference]     # rewrite docs/FINDINGS.md and its figures
    python scripts/findings.py --check                           # exit 1 if docs/FINDINGS.md is out of date
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

from poisonbench.report import clipped_t_interval, wilson_interval
from poisonbench.store import read_runs

ROOT = Path(__file__).resolve().parents[1]
DEFENSES = ["clip", "aug-only", "roclip"]
RANDOM = {"location": "random", "pattern": "fresh"}  # the literature's patch: random place, fresh noise
# (label, attack, attack parameters that differ from the default) of the triggers compared
TRIGGERS = [("badnet, corner patch", "badnet", {}), ("badnet, random fresh patch", "badnet", RANDOM),
            ("blended, fixed key", "blended", {}), ("blended, fresh key", "blended", {"key": "fresh"}),
            ("targeted", "targeted", {})]
# the parameter columns a comparison holds fixed, with their value in rows written before the
# parameter existed (its default), by the attack or defense that has them
DEFAULTS = {"p_attack_location": "bottom-right", "p_attack_pattern": "fixed", "p_attack_key": "noise",
            "p_attack_n_poison": 100, "p_dataset_captions": "templates", "p_defense_pool_size": 2048,
            "p_defense_match_every": 3}
OWNER = {"p_attack_location": ("badnet",), "p_attack_pattern": ("badnet",), "p_attack_key": ("blended",),
         "p_attack_n_poison": ("badnet", "blended"), "p_defense_pool_size": ("roclip",),
         "p_defense_match_every": ("roclip",)}
PAPER = "RoCLIP (Yang et al., NeurIPS 2023), Table 1/2"


def rows(df: pd.DataFrame, attack: str, defense: str, captions: str = "templates", **params) -> pd.DataFrame:
    """Finished cpu-small rows of ``attack`` x ``defense`` with caption style ``captions`` and the
    parameters ``params`` (``location=...`` for ``p_attack_location``, ``pool_size=...`` for
    ``p_defense_pool_size``); the other parameters of DEFAULTS that the attack or defense has are
    at their defaults."""
    keep = (df["status"] == "ok") & (df["profile"] == "cpu-small") & (df["attack"] == attack) & (df["defense"] == defense)
    for column, default in DEFAULTS.items():
        if not set(OWNER.get(column, (attack,))) & {attack, defense}:
            continue
        value = captions if column == "p_dataset_captions" else params.get(column.split("_", 2)[2], default)
        have = df[column].where(df[column].notna(), default) if column in df else pd.Series(default, index=df.index)
        keep &= have == value
    return df[keep].drop_duplicates("run_id")


def summary(r: pd.DataFrame) -> dict:
    """Means over seeds (t intervals) and the pooled ASR (Wilson) of rows ``r``."""
    out = {"seeds": len(r)}
    if r.empty:
        return out
    for m in ("clean_top1", "linear_probe_top1", "linear_probe_paper_top1", "trig_present", "trig_at_eval", "trig_corr"):
        if m in r and r[m].notna().any():
            out[m] = clipped_t_interval(r[m]) if m != "trig_corr" else (float(r[m].mean()), math.nan, math.nan)
    if r["asr"].notna().all():
        k, n = int(round(float((r["asr"] * r["asr_n"]).sum()))), int(r["asr_n"].sum())
        out["asr"] = (k / n, *wilson_interval(k, n))
        out["asr_hits"] = (k, n)
    for m in ("d_match_own_class", "d_match_distinct", "d_match_poison_to_target"):
        if m in r:
            lists = [np.asarray(v, dtype=float) for v in r[m] if isinstance(v, (list, np.ndarray)) and len(v)]
            if lists:
                out[m] = float(np.mean([v[-1] for v in lists]))  # the last matching epoch, mean over seeds
                out[m + "_first"] = float(np.mean([v[0] for v in lists]))
    return out


def pct(v, digits: int = 1) -> str:
    """``84.2`` (percent) of a fraction or of a (mean, lo, hi) triple; ``-`` when missing."""
    if isinstance(v, tuple):
        v = v[0]
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def with_ci(v) -> str:
    """``84.2 (83.1-85.3)`` in percent, or ``84.2`` without an interval."""
    if not isinstance(v, tuple):
        return "-"
    mean, lo, hi = v
    return pct(mean) if math.isnan(lo) else f"{pct(mean)} ({pct(lo)}-{pct(hi)})"


def md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def cost(s: dict, base: dict, key: str = "clean_top1") -> str:
    """``s``'s drop against ``base`` in points (positive: lower than base)."""
    if key not in s or key not in base:
        return "-"
    return f"{100 * (base[key][0] - s[key][0]):+.1f}"


def trigger_section(df) -> tuple[str, dict]:
    body, table = [], {}
    for label, attack, params in TRIGGERS:
        base = summary(rows(df, attack, "clip", **params))
        for d in DEFENSES:
            s = summary(rows(df, attack, d, **params))
            table[(label, d)] = s
            if not s["seeds"]:
                body.append([label, d, "not run yet"] + ["-"] * 7)
                continue
            body.append([label, d, str(s["seeds"]), with_ci(s.get("asr")), with_ci(s.get("clean_top1")), cost(s, base),
                         with_ci(s.get("linear_probe_top1")), pct(s.get("linear_probe_paper_top1")),
                         pct(s.get("trig_present")) + " / " + pct(s.get("trig_at_eval")),
                         "-" if "trig_corr" not in s else f"{s['trig_corr'][0]:.2f}"])
    header = ["trigger", "defense", "seeds", "ASR (%)", "clean top-1 (%)", "cost vs clip (pts)", "linear probe (%)",
              "paper's probe (%)", "patch in view / as evaluated (%)", "trigger corr."]
    return md_table(header, body), table


def caption_section(df) -> tuple[str, dict]:
    body, table = [], {}
    for style in ("templates", "attributes", "web"):
        for label, params in (("corner", {}), ("random fresh", RANDOM)):
            base = summary(rows(df, "badnet", "clip", style, **params))
            for d in DEFENSES:
                s = summary(rows(df, "badnet", d, style, **params))
                table[(style, label, d)] = s
                if not s["seeds"]:
                    body.append([style, label, d, "not run yet"] + ["-"] * 5)
                    continue
                own = "-" if "d_match_own_class" not in s else f"{pct(s['d_match_own_class_first'])} → {pct(s['d_match_own_class'])}"
                body.append([style, label, d, str(s["seeds"]), with_ci(s.get("clean_top1")), cost(s, base),
                             with_ci(s.get("linear_probe_top1")), with_ci(s.get("asr")), own])
    header = ["captions", "patch", "defense", "seeds", "clean top-1 (%)", "cost vs clip (pts)", "linear probe (%)",
              "ASR (%)", "own-class matches, first → last matching epoch (%)"]
    return md_table(header, body), table


def pool_section(df) -> str:
    body = []
    for label, params in (("pool 256, K 3", {"pool_size": 256}), ("pool 2048, K 3 (profile default)", {}),
                          ("pool 8192, K 3", {"pool_size": 8192}), ("pool 2048, K 2", {"match_every": 2}),
                          ("pool 2048, K 5", {"match_every": 5})):
        s = summary(rows(df, "badnet", "roclip", **params))
        if not s["seeds"]:
            body.append([label, "not run yet"] + ["-"] * 5)
            continue
        own = "-" if "d_match_own_class" not in s else pct(s["d_match_own_class"])
        distinct = "-" if "d_match_distinct" not in s else f"{s['d_match_distinct']:.0f}"
        body.append([label, str(s["seeds"]), with_ci(s.get("asr")), with_ci(s.get("clean_top1")),
                     with_ci(s.get("linear_probe_top1")), own, distinct])
    table = md_table(["RoCLIP under badnet", "seeds", "ASR (%)", "clean top-1 (%)", "linear probe (%)",
                      "own-class matches, last matching epoch (%)", "distinct entries matched per batch of 128"], body)
    return table + pool_reading(df)


def pool_reading(df) -> str:
    """What the pool and K sweep says, once every setting has rows: K moves clean top-1 with the
    own-class share, the pool size hardly does (per-seed extremes, since K 2's interval is wide)."""
    top = {k: rows(df, "badnet", "roclip", match_every=k)["clean_top1"] for k in (2, 3, 5)}
    pools = [rows(df, "badnet", "roclip", pool_size=p)["clean_top1"] for p in (256, 2048, 8192)]
    if any(t.empty for t in [*top.values(), *pools]):
        return ""
    spread = 100 * (max(p.mean() for p in pools) - min(p.mean() for p in pools))
    shares = {k: summary(rows(df, "badnet", "roclip", match_every=k)).get("d_match_own_class") for k in (2, 3, 5)}
    own = {k: pct(v) for k, v in shares.items()}
    known = [v for v in shares.values() if v is not None]
    other = f"{pct(1 - max(known), 0)} to {pct(1 - min(known), 0)} %" if known else "some"
    return (f"\n\nClean top-1 follows how often RoCLIP matches: {pct(top[2].mean())} % when every 2nd epoch "
            f"matches (seeds from {pct(top[2].min())} to {pct(top[2].max())} %), {pct(top[3].mean())} % at every "
            f"3rd and {pct(top[5].mean())} % at every 5th, with {own[2]}, {own[3]} and {own[5]} % of the images "
            f"matched to a caption of their own class in the last matching epoch; pools of 256 to 8,192 captions "
            f"move it by {spread:.1f} points. By the last matching epoch, each matching epoch still trains "
            f"{other} of the images towards another class's caption (more in the first); fewer matching epochs "
            f"leave fewer such updates.")


def implant_section(df) -> str:
    """Plain CLIP under the BadNets patch styles: what implants at all on cpu-small."""
    body = []
    for location in ("bottom-right", "random"):
        for pattern in ("fixed", "fresh"):
            for n in (100, 300, 1000):
                s = summary(rows(df, "badnet", "clip", location=location, pattern=pattern, n_poison=n))
                if not s["seeds"]:
                    continue
                body.append([location, pattern, str(n), str(s["seeds"]), with_ci(s.get("asr")), with_ci(s.get("clean_top1"))])
    return md_table(["patch location", "pattern", "poisoned pairs", "seeds", "ASR against clip (%)", "clean top-1 (%)"],
                    body)


def verdict(ok: bool | None) -> str:
    return "not measured yet" if ok is None else ("reproduced" if ok else "not reproduced")


def claims_section(t: dict) -> str:
    """The paper's four claims against the 'today's captions' cells."""
    def get(label, d, key):
        s = t.get((label, d), {})
        return s[key][0] if key in s else None

    body = []
    clip_t, roclip_t = get("targeted", "clip", "asr"), get("targeted", "roclip", "asr")
    ok = None if None in (clip_t, roclip_t) else (clip_t >= 0.75 and roclip_t <= 0.25)
    aug_t = get("targeted", "aug-only", "asr")
    body.append(["targeted ASR 93.75 % → 12.5 %", f"{pct(clip_t)} → {pct(roclip_t)}", verdict(ok),
                 f"aug-only alone: {pct(aug_t)}"])
    for label, _, _ in TRIGGERS[:4]:
        c, r, a = get(label, "clip", "asr"), get(label, "roclip", "asr"), get(label, "aug-only", "asr")
        ok = None if r is None else r <= 0.05
        view = t.get((label, "roclip"), {}).get("trig_present")
        if c is not None and c < 0.5:  # nothing to defend: the attack does not implant into clip
            body.append([f"backdoor ASR → 0 % ({label})", f"{pct(c)} → {pct(r)}", "moot: hardly implants into clip (ASR < 50 %)",
                         f"aug-only alone: {pct(a)}"])
            continue
        why = f"aug-only alone: {pct(a)}" + ("" if view is None else f"; patch whole in {pct(view)} % of roclip's poisoned views")
        body.append([f"backdoor ASR → 0 % ({label})", f"{pct(c)} → {pct(r)}", verdict(ok), why])
    c, r = get("badnet, corner patch", "clip", "linear_probe_top1"), get("badnet, corner patch", "roclip", "linear_probe_top1")
    cp, rp = (get("badnet, corner patch", d, "linear_probe_paper_top1") for d in ("clip", "roclip"))
    ok = None if None in (c, r) else r - c >= 0.05
    body.append(["linear probe +10 % (badnet)", f"{pct(c)} → {pct(r)}", verdict(ok),
                 f"the paper's probe (AdamW on frozen features): {pct(cp)} → {pct(rp)}"])
    c, r = get("badnet, corner patch", "clip", "clean_top1"), get("badnet, corner patch", "roclip", "clean_top1")
    a = get("badnet, corner patch", "aug-only", "clean_top1")
    ok = None if None in (c, r) else abs(r - c) <= 0.03
    body.append(["zero-shot top-1 similar to CLIP (badnet)", f"{pct(c)} → {pct(r)}", verdict(ok),
                 f"aug-only: {pct(a)}; see the caption styles below"])
    return md_table(["claim (paper)", "here: clip → roclip (%)", "on cpu-small", "diagnostic"], body)


def answer_captions(t: dict) -> str:
    costs, beyond = {}, {}
    for style in ("templates", "attributes", "web"):
        s, b, a = (t.get((style, "corner", d), {}) for d in ("roclip", "clip", "aug-only"))
        if "clean_top1" in s and "clean_top1" in b:
            costs[style] = b["clean_top1"][0] - s["clean_top1"][0]
            if "clean_top1" in a:
                beyond[style] = a["clean_top1"][0] - s["clean_top1"][0]
    if "templates" not in costs or len(costs) < 3:
        return "Not answered yet: the caption-style cells are not all run (`scripts/findings_grid.sh results/reference captions`)."
    t0, rest = costs["templates"], [costs["attributes"], costs["web"]]
    parts = ", ".join(f"{s} {100 * c:+.1f}" for s, c in costs.items())
    if min(rest) >= 0.8 * t0:
        head = "No. RoCLIP's clean top-1 cost against clip stays as large when the captions describe the pixels"
    elif min(rest) >= 0.5 * t0:
        head = ("Mostly not. RoCLIP's clean top-1 cost against clip shrinks when the captions describe the pixels, "
                "but most of it remains")
    elif max(rest) <= 0.25 * t0:
        head = "Largely yes. RoCLIP's clean top-1 cost against clip mostly disappears with captions that describe the pixels"
    else:
        head = "Partly. RoCLIP's clean top-1 cost against clip shrinks with captions that describe the pixels"
    out = f"{head} (cost in points, badnet with the corner patch, clip's mean clean top-1 minus roclip's: {parts})."
    if len(beyond) == 3:
        out += (" The part of it that RoCLIP's matching adds to its augmentation (aug-only's clean top-1 minus "
                "roclip's): " + ", ".join(f"{s} {100 * c:+.1f}" for s, c in beyond.items()) + " points.")
    return out


def matching_epochs_effect(df) -> str:
    """How RoCLIP's clean top-1 moves in its matching epochs against its other epochs, from the
    per-epoch curves of its badnet rows (corner patch, templated captions)."""
    r = rows(df, "badnet", "roclip")
    on, off = [], []
    for curve, matched in zip(r.get("curve_clean_top1", []), r.get("d_match_epoch", [])):
        if not isinstance(curve, (list, np.ndarray)) or not isinstance(matched, (list, np.ndarray)) or not len(curve):
            continue
        for e in range(2, len(curve) + 1):
            (on if e in set(int(m) for m in matched) else off).append(curve[e - 1] - curve[e - 2])
    if not on or not off:
        return "Not measured yet: no roclip row with per-epoch curves."
    return (f"In RoCLIP's matching epochs its clean top-1 on the curve subset changes by {100 * np.mean(on):+.1f} points "
            f"on average ({len(on)} epochs over the seeds with curves), in its other epochs by "
            f"{100 * np.mean(off):+.1f} ({len(off)} epochs)"
            + (": the matching epochs are where the accuracy is lost." if np.mean(on) < np.mean(off) - 0.02 else
               ": the matching epochs do not stand out."))


def answer_random_patch(t: dict, df) -> str:
    label = "badnet, random fresh patch"
    a, c = t.get((label, "aug-only"), {}), t.get((label, "clip"), {})
    corner = t.get(("badnet, corner patch", "aug-only"), {})
    was = (f" Against the corner patch, aug-only's ASR is {pct(corner.get('asr'))} % and the whole patch is in "
           f"{pct(corner.get('trig_present'))} % of its poisoned training views (as evaluated: "
           f"{pct(corner.get('trig_at_eval'))} %).") if "trig_present" in corner else ""
    if "asr" in c and c["asr"][0] < 0.1:
        most = summary(rows(df, "badnet", "clip", n_poison=1000, **RANDOM))
        more = f"; {pct(most['asr'])} % with 1,000 poisoned pairs" if "asr" in most else ""
        fixed_random = summary(rows(df, "badnet", "clip", location="random"))
        fresh_corner = summary(rows(df, "badnet", "clip", pattern="fresh"))
        why = ""
        if "asr" in fixed_random and "asr" in fresh_corner:
            place = fixed_random["asr"][0] < 0.1 and fresh_corner["asr"][0] > 0.3
            why = ((" The place, not the noise, is what stops it:" if place else " For comparison:")
                   + f" a fixed pattern at a random place gives "
                   f"{pct(fixed_random['asr'])} %, a fresh pattern at the fixed corner {pct(fresh_corner['asr'])} %"
                   + (" (likely because this ViT, patch 7 on 28 px, would have to learn the trigger at every token "
                      "position from a few poisons at each)." if place else "."))
        return (f"Moot on cpu-small: the literature's patch does not implant into plain CLIP (ASR {pct(c['asr'])} % "
                f"with 100 poisoned pairs{more}), so there is no backdoor for augmentation to remove.{why}{was}")
    if "asr" not in a or "asr" not in c:
        return ("Not answered yet: the random-patch cells are not all run "
                "(`scripts/findings_grid.sh results/reference random-patch`)." + was)
    head = "Yes" if a["asr"][0] <= 0.1 and c["asr"][0] >= 0.5 else "No"
    view = f"; the whole patch is in {pct(a.get('trig_present'))} % of its poisoned training views" if "trig_present" in a else ""
    return (f"{head}: against the random-location fresh-noise patch, aug-only's ASR is {pct(a['asr'])} % "
            f"(clip {pct(c['asr'])} %){view}.{was}")


def figures(df: pd.DataFrame, folder: Path | None) -> list[str]:
    """The curves of the badnet cells (corner and random patch) for clip, aug-only and roclip."""
    from poisonbench.plots import _pyplot, curve_rows, curves
    from poisonbench.report import leaderboard

    keep = df[(df["profile"] == "cpu-small") & (df["attack"] == "badnet") & df["defense"].isin(DEFENSES)]
    captions = keep["p_dataset_captions"].fillna("templates") if "p_dataset_captions" in keep else "templates"
    board = leaderboard(keep[captions == "templates"])
    board = board[board["setting"].isin(["", "location=random, pattern=fresh"])]
    if curve_rows(board).empty:
        return []
    name = "curves-badnet.png"
    if folder is not None:
        plt = _pyplot()
        folder.mkdir(parents=True, exist_ok=True)
        fig = curves(board, plt)
        fig.savefig(folder / name, dpi=130)
        plt.close(fig)
    return [f"![per-epoch curves under badnet: clip, aug-only and roclip, corner and random fresh patch](findings/{name})"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="results/reference",
                    help="the store to read (default: the committed reference store, results/reference)")
    ap.add_argument("--check", action="store_true", help="compare with docs/FINDINGS.md instead of writing it")
    args = ap.parse_args()
    results = Path(args.results) if Path(args.results).is_absolute() else ROOT / args.results
    df = read_runs(results)
    if df.empty or not ((df["status"] == "ok") & (df["profile"] == "cpu-small")).any():
        raise SystemExit(f"{results} holds no finished cpu-small row: nothing to report (docs/FINDINGS.md left as it is)")
    text = findings(df, None if args.check else ROOT / "docs" / "findings", args.results)
    out = ROOT / "docs" / "FINDINGS.md"
    if args.check:
        same = out.is_file() and out.read_text() == text
        print(f"{out} is {'up to date' if same else 'out of date: run python scripts/findings.py'}")
        raise SystemExit(0 if same else 1)
    out.write_text(text)
    print(f"wrote {out}")


def findings(df: pd.DataFrame, figure_folder: Path | None, source: str = "results/reference") -> str:
    """The text of docs/FINDINGS.md from the rows ``df`` of the store ``source``; its figures are
    written into ``figure_folder`` (None: not written, only linked)."""
    triggers, t = trigger_section(df)
    captions, c = caption_section(df)
    figs = figures(df, figure_folder)
    n = int(((df["status"] == "ok") & (df["profile"] == "cpu-small")).sum())
    text = f"""# Findings: what the cpu-small numbers of RoCLIP mean

Generated by `scripts/findings.py` from the {n} finished cpu-small rows of `{source}`;
every number below is a mean over the seeds' rows (accuracies, with a Student-t 95 % interval) or
a proportion pooled over them (ASR, with a Wilson 95 % interval), as `bench report` computes them.
The cells are those of `scripts/findings_grid.sh`; the grid grows across sessions, and a setting
with no rows yet reads "not run yet". Rows written before the per-epoch curves, trigger survival and
matching diagnostics existed (seeds 0-2 of the default triggers) have none: their columns pool the
seeds that have them.

## The paper's claims ({PAPER}) on cpu-small

{claims_section(t)}

## Does RoCLIP's accuracy cost on cpu-small come from templated captions?

{answer_captions(c)}

{matching_epochs_effect(df)}

With `templates` every caption is a template around a class word; with `attributes` and `web` it
describes the image's pixels (`datasets/fashion_captions.py`; examples in the README). The last
column is RoCLIP's matching diagnostic: the share of images whose nearest pool caption comes from an
image of their own class. With templated captions that share is what pseudo-labelling by caption
would give; with captions that differ within a class it tells how much of the matching still
follows the class.

{captions}

## Does augmentation alone still defend against the literature's random-location fresh-noise patch?

{answer_random_patch(t, df)}

What implants into plain CLIP at all (4 px patch on 28 px images, 10,000 clean pairs; one seed
where a row says 1):

{implant_section(df)}

The survival columns are read from the augmentation's own parameters of every step (`benchmark/survival.py`):
the share of poisoned training views that keep the whole patch, the share that keep it where and at
the scale evaluation puts it, and the correlation of each view's trigger residual with the evaluated
one ("as evaluated" is relative to where evaluation puts that image's patch, so it applies to a
random-location patch too). `clip` does not augment: in its rows that carry survival its views are
the evaluated trigger (100 / 100 / 1.00). "paper's probe" is RoCLIP's linear probe protocol (a linear
layer trained with AdamW on frozen features; `linear_probe_paper_top1`), beside the
logistic-regression probe.

{triggers}

{chr(10).join(figs)}

## RoCLIP's pool size and matching period K (badnet, corner patch)

{pool_section(df)}
"""
    return text


if __name__ == "__main__":
    main()
