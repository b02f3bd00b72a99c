"""Terminal tables of cells and results (rich): one result row, one finished cell, a grid.

Everything printed goes through rich markup, so a string that comes from the user (a path, a
command, a class name, an error message) is escaped with ``rich.markup.escape`` wherever it is
put into markup or a table cell, and the consoles never replace ``:name:`` codes by emoji
(``emoji=False``): a results folder ``runs:cat:[b]`` prints as typed."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

WIDE = 250  # columns of a table written anywhere but a terminal


def width(stream) -> int | None:
    """The console width for ``stream``: None (the terminal's own) on a terminal; elsewhere (a log,
    ``tee``, a SLURM .out file, where rich would assume 80 columns and cut tables) $COLUMNS or WIDE."""
    if getattr(stream, "isatty", lambda: False)():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else WIDE


console = Console(emoji=False, width=width(sys.stdout))  # ":cat:" in a path stays ":cat:"


def pct(x) -> str:
    """A fraction in [0, 1] as ``84.2%``; ``-`` for None or NaN."""
    return "-" if x is None or x != x else f"{100 * x:.1f}%"


def show_row(row: dict) -> None:
    """Print the headline numbers of one result row (and the per-target outcomes of a targeted attack).
    A row of an older schema, without some of these columns, shows ``-`` for them."""
    table = Table(title=escape(f"{row['attack']} vs {row['defense']} (seed {row.get('seed', '-')}, "
                               f"{row.get('profile', '-')})"))
    for col in ("clean top-1", "clean top-5", "ASR", "linear probe", "poisoned pairs", "wall time"):
        table.add_column(col, justify="right")
    asr, n = row.get("asr"), row.get("asr_n")
    if asr is not None and asr == asr and n:
        asr_cell = f"{pct(asr)} ({round(asr * n)}/{n})"
    else:
        asr_cell = pct(asr)
    n_poison, rate, wall = row.get("n_poison"), row.get("poison_rate"), row.get("wall_s")
    table.add_row(
        pct(row.get("clean_top1")), pct(row.get("clean_top5")), asr_cell, pct(row.get("linear_probe_top1")),
        "-" if n_poison is None else f"{n_poison}" + ("" if rate is None or rate != rate else f" ({100 * rate:.2f}%)"),
        "-" if wall is None or wall != wall else f"{wall:.0f} s",
    )
    console.print(table)
    for key, what in (("n_skipped", "training"), ("n_eval_skipped", "evaluation")):
        if row.get(key):
            console.print(f"[yellow]{row[key]} {what} image(s) could not be read and were left out "
                          f"(column {key} of the row)[/yellow]")
    nontarget = row.get("clean_top1_nontarget")
    if isinstance(nontarget, float) and nontarget == nontarget:
        console.print(f"clean top-1 of the same {n} non-target images without the trigger: {pct(nontarget)}")
    records = row.get("targets")
    if records is not None and not isinstance(records, float) and len(records):  # NaN when read back for other attacks
        targets = Table(title="targets (zero-shot top-1 of each clean target image)")
        for col in ("eval row", "true class", "adversarial class", "predicted", "success"):
            targets.add_column(col)
        for t in records:
            targets.add_row(str(t["eval_row"]), escape(t["true_class"]), escape(t["adversarial_class"]),
                            escape(t["predicted_class"]), "yes" if t["success"] else "no")
        console.print(targets)


def cell_line(outcome, results) -> str:
    """One line on a finished cell process: its result, or why it did not finish."""
    from .grid import EXIT_BUSY, EXIT_CONFIG, describe
    from .store import has_finished_row, read_row, runs_dir

    name, code = escape(describe(outcome.cfg)), outcome.code
    log = escape(f" (log: {outcome.log})") if outcome.log else ""
    if code == 0:
        row = read_row(results, outcome.cfg.run_id)
        wall = row.get("wall_s")
        return (f"[green]done[/green] {name}: clean top-1 {pct(row.get('clean_top1'))}, ASR {pct(row.get('asr'))}"
                + (f", {wall:.0f} s" if wall == wall and wall is not None else ""))
    if code == EXIT_BUSY:
        return f"[yellow]skipped[/yellow] {name}: another process is running it{log}"
    if code == EXIT_CONFIG:
        return f"[red]not started[/red] {name}: bad configuration{log}"
    if has_finished_row(results, outcome.cfg.run_id):  # killed after its row was written: the result stands
        return (f"[yellow]done[/yellow] {name}: the store holds its finished row (written by this run, or kept from an "
                f"earlier one), but the process ended with exit {code}{log}")
    recorded = (runs_dir(results) / f"{outcome.cfg.run_id}.parquet").is_file()
    what = "recorded with status=failed" if recorded else "nothing recorded"
    return f"[red]failed[/red] {name} (exit {code}); {what}, retried next time{log}"


def grid_table(cfgs, results) -> Table:
    """State and headline numbers of every cell of a grid."""
    from .config import settings
    from .grid import state
    from .store import read_row

    table = Table(title=escape(f"{len(cfgs)} cells in {results}"))
    setting = settings([c.to_dict() for c in cfgs])
    cols = ["attack", "defense"] + (["setting"] if any(setting) else []) + ["seed", "state", "clean top-1", "ASR", "cell", "note"]
    for col in cols:
        table.add_column(col, justify="right" if col in ("seed", "clean top-1", "ASR") else "left",
                         overflow="fold", no_wrap=col not in ("setting", "note"),
                         min_width={"setting": 14, "note": 8}.get(col))
    for cfg, st_text in zip(cfgs, setting):
        st = state(cfg, results)
        clean = asr = note = ""
        if st in ("done", "failed"):
            try:
                row = read_row(results, cfg.run_id)
            except Exception as e:  # noqa: BLE001 - an unreadable file at the cell's name: rerun replaces it
                row = {"error": f"unreadable result file ({type(e).__name__}); the next run redoes the cell"}
            if st == "done":
                clean, asr = pct(row.get("clean_top1")), pct(row.get("asr"))
            else:
                note = str(row.get("error", ""))[:120]
        ckpt = Path(results) / "checkpoints" / cfg.run_id / "last.pt"
        if st in ("failed", "pending") and ckpt.is_file():
            note = (note + "; " if note else "") + "resumes from its checkpoint"
        colour = {"done": "green", "failed": "red", "running": "yellow"}.get(st, "white")
        cells = [escape(c) for c in [cfg.attack, cfg.defense] + ([st_text] if any(setting) else [])]
        table.add_row(*cells, str(cfg.seed), f"[{colour}]{st}[/{colour}]", clean, asr, cfg.run_id, escape(note))
    return table


def perf_tables(summary, machine) -> list[Table]:
    """``bench perf``'s medians (``perf.summary``) as one table per stage; ``machine`` (a row of
    the measurement frame) names the profile."""

    def value(stage, variant, measure):
        hit = summary[(summary.stage == stage) & (summary.variant == variant) & (summary.measure == measure)]
        return hit.iloc[0] if len(hit) else None

    def met(r) -> str:
        return "" if r is None or r.met is None else ("[green]yes[/green]" if r.met else "[red]no[/red]")

    def secs(r) -> str:
        return "-" if r is None else f"{r.value:.3f}"

    tables = []
    variants = lambda stage: [v for v in dict.fromkeys(summary[summary.stage == stage].variant) if v != "process"]
    if "training" in set(summary.stage):
        flops, peak = value("training", "model", "train_flops_per_sample"), value("training", "device", "matmul_peak_flops")
        t = Table(title=f"training, {machine['profile']} profile: samples/s, median and range",
                  caption="ratio: clip to the bare loop (target >= 0.95), the others to clip (>= 0.85), clip +option "
                          "(bench run --speed) to the bare loop; data wait, augment: shares of the trainer's wall time "
                          "(data wait target <= 10 %); MFU: model FLOPs/s over the measured matmul peak"
                          + ("" if flops is None else f" ({flops.value / 1e6:.1f} MFLOP per training sample, "
                                                      f"peak {peak.value / 1e9:.0f} GFLOP/s)"),
                  box=box.SIMPLE_HEAD)
        for col in ("variant", "samples/s", "range", "ratio", "met", "data wait", "augment", "MFU"):
            t.add_column(col, justify="left" if col == "variant" else "right", no_wrap=True)
        for v in variants("training"):
            r, wait, aug, mfu = (value("training", v, m) for m in ("samples_per_s", "data_wait_share", "augment_share", "mfu"))
            if r is None:  # the model's and the device's figures, the augmentation's parts
                continue
            t.add_row(v, f"{r.value:.0f}", f"{r.lo:.0f}-{r.hi:.0f}", "" if r.ratio != r.ratio else f"{r.ratio:.2f}", met(r),
                      "" if wait is None else f"{wait.value:.1%}", "" if aug is None else f"{aug.value:.1%}",
                      "" if mfu is None else f"{mfu.value:.1%}")
        tables.append(t)
        parts = summary[summary.measure == "ms_per_batch"]
        if len(parts):
            t = Table(title="where the image augmentation's time goes (aug-only, RoCLIP): ms per batch, median",
                      box=box.SIMPLE_HEAD)
            for r in parts.itertuples():
                t.add_column(r.variant.removeprefix("augment: "), justify="right")
            t.add_column("total", justify="right")
            t.add_row(*(f"{r.value:.1f}" for r in parts.itertuples()), f"{parts.value.sum():.1f}")
            stock = summary[summary.measure == "ms_per_batch_kornia_hue"]
            if len(stock):
                t.caption = f"ColorJitter with kornia's own hue step: {stock.value.iloc[0]:.1f} ms"
            tables.append(t)
    if "poisoning" in set(summary.stage):
        n = int(summary[summary.measure == "n_images"].value.iloc[0])
        t = Table(title=f"poisoning {n} training images: seconds (target <= 1 s)", box=box.SIMPLE_HEAD)
        for col in ("attack", "trigger on every image", "met", "poisoned training set", "met"):
            t.add_column(col, justify="left" if col == "attack" else "right")
        for v in variants("poisoning"):
            trig, plan = value("poisoning", v, "trigger_s"), value("poisoning", v, "poison_s")
            t.add_row(v, secs(trig), met(trig), secs(plan), met(plan))
        tables.append(t)
    if "eval" in set(summary.stage):
        t = Table(title="evaluation: seconds", box=box.SIMPLE_HEAD)
        for col in ("zero-shot", "ASR", "linear probe", "retrieval", "total"):
            t.add_column(col, justify="right")
        t.add_row(*(secs(value("eval", "evaluate", m)) for m in
                    ("zero_shot_s", "attack_eval_s", "probe_s", "retrieval_s", "eval_s")))
        tables.append(t)
    if "data" in set(summary.stage):
        from .perf_data import H200_RN50_SAMPLES_PER_S

        t = Table(title="data: lazily loaded JPEGs decoded at the paper profile's image size, images/s",
                  caption=f"speed-up: over 1 worker (2 workers: target >= 1.8); cores for an H200: worker processes at "
                          f"this rate per worker that keep up with RN50 training from memory on an H200 "
                          f"({H200_RN50_SAMPLES_PER_S:.0f} samples/s)", box=box.SIMPLE_HEAD)
        for col in ("source, decoding", "images/s", "range", "speed-up", "met", "cores for an H200"):
            t.add_column(col, justify="left" if col.startswith("source") else "right", no_wrap=True)
        for v in variants("data"):
            r, up = value("data", v, "images_per_s"), value("data", v, "speedup_vs_1_worker")
            if r is None:
                continue
            per_worker = r.value / int(v.split(", ")[1].split()[0]) if "worker" in v else None
            t.add_row(v, f"{r.value:.0f}", f"{r.lo:.0f}-{r.hi:.0f}", "" if up is None else f"{up.value:.2f}", met(up),
                      "" if per_worker is None else f"{H200_RN50_SAMPLES_PER_S / per_worker:.1f}")
        tables.append(t)
    return tables


def perf_memory(summary) -> str:
    """The process's peak resident memory after each stage of ``bench perf``, as one line."""
    peaks = summary[summary.measure == "peak_rss_mib"]
    return "peak resident memory: " + ", ".join(f"{r.value:.0f} MiB after {r.stage}" for r in peaks.itertuples())
