"""The ``bench`` command line (click)."""
from __future__ import annotations

import re
import signal
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .registry import ATTACKS, DATASETS, DEFENSES, RegistryError, param_fields

console = Console()
err_console = Console(stderr=True)

DEFAULT_RESULTS = "results"


def parse_assignments(values: tuple[str, ...], what: str) -> dict[str, str]:
    """``("a=1", "b=x")`` -> ``{"a": "1", "b": "x"}``; BadParameter for an item without ``=``."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint=what)
        out[key.strip()] = value.strip()
    return out


def split_name(spec: str, what: str) -> tuple[str, dict[str, str]]:
    """benchopt-style ``badnet[patch_size=4,location=random]`` -> ("badnet", {...})."""
    m = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[(.*)\])?\s*", spec)
    if not m:
        raise click.BadParameter(f"{spec!r} is not NAME or NAME[key=value,...]", param_hint=what)
    params = parse_assignments(tuple(p for p in (m.group(2) or "").split(",") if p.strip()), what)
    return m.group(1), params


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err_console.print(f"[yellow]warning: {message}[/yellow]")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="poisonbench")
def main() -> None:
    """poisonbench: data-poisoning and backdoor attacks on CLIP pre-training, measured on
    identical terms.

    \b
    Typical use:
      bench list                                   what attacks, defenses, datasets exist
      bench run --attack badnet --defense roclip   train and evaluate one cell (cpu-small profile)
      bench report                                 leaderboard of everything in results/

    Environment: POISONBENCH_DATA (Fashion-MNIST IDX folder), POISONBENCH_WORDNET (WordNet dict
    folder), OMP_NUM_THREADS (CPU threads per run; with several runs on one machine set it so
    that runs x threads <= cores, or set OMP_WAIT_POLICY=PASSIVE).
    """
    warnings.showwarning = _show_warning


@main.command("list")
@click.argument("kind", required=False, type=click.Choice(["attacks", "defenses", "datasets", "profiles"]))
def list_cmd(kind: str | None) -> None:
    """Show the registered attacks, defenses, datasets and profiles with their parameters."""
    from .config import PROFILES

    registries = {"attacks": ATTACKS, "defenses": DEFENSES, "datasets": DATASETS}
    for k, reg in registries.items():
        if kind not in (None, k):
            continue
        table = Table(title=k, show_lines=True)
        table.add_column("name", no_wrap=True)
        for col in ("description", "parameters (default)"):
            table.add_column(col)
        for name in reg.names():
            cls = reg.get(name)
            doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
            params = "\n".join(f"{p}: {t} = {d!r}  [dim]{h}[/dim]" for p, t, d, h in param_fields(cls.Params)) or "-"
            table.add_row(name, doc, params)
        console.print(table)
    if kind in (None, "profiles"):
        table = Table(title="profiles")
        table.add_column("name", no_wrap=True)
        for col in ("description", "model", "data", "epochs", "batch", "lr", "parameters it sets"):
            table.add_column(col)
        for p in PROFILES.values():
            data = p.dataset + "".join(f" {k}={v}" for k, v in p.dataset_params.items())
            sets = {**p.attack_params, **p.defense_params}
            overrides = "\n".join(f"{d}: " + ", ".join(f"{k}={v}" for k, v in kv.items()) for d, kv in sets.items())
            table.add_row(p.name, p.description, p.model, data, str(p.epochs), str(p.batch_size), f"{p.lr:g}", overrides or "-")
        console.print(table)


@main.command()
@click.option("--attack", "-a", default="badnet", show_default=True,
              help="Attack name, optionally with parameters: badnet[patch_size=4,location=random]. See `bench list attacks`.")
@click.option("--defense", "-d", default="clip", show_default=True,
              help="Defense name, optionally with parameters: roclip[pool_size=4096]. See `bench list defenses`.")
@click.option("--profile", "-p", default="cpu-small", show_default=True,
              help="Scale preset (model, data, hyper-parameters). See `bench list profiles`.")
@click.option("--seed", "-s", default=0, show_default=True, type=int, help="Seed of data subset, poisoning, init and order.")
@click.option("--attack-param", "-A", multiple=True, metavar="NAME=VALUE", help="Attack parameter (repeatable).")
@click.option("--defense-param", "-D", multiple=True, metavar="NAME=VALUE", help="Defense parameter (repeatable).")
@click.option("--dataset-param", multiple=True, metavar="NAME=VALUE", help="Dataset parameter, e.g. n_train=20000.")
@click.option("--epochs", type=int, help="Override the profile's epochs.")
@click.option("--batch-size", type=int, help="Override the profile's batch size.")
@click.option("--lr", type=float, help="Override the profile's peak learning rate.")
@click.option("--results", "-r", default=DEFAULT_RESULTS, show_default=True, type=click.Path(file_okay=False),
              help="Results folder: runs/ (Parquet rows), manifests/, checkpoints/.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--force", is_flag=True, help="Run again even if this cell already has a finished result.")
@click.option("--keep-checkpoint", is_flag=True, help="Keep results/checkpoints/<run_id>/last.pt after the run succeeds.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def run(attack, defense, profile, seed, attack_param, defense_param, dataset_param, epochs, batch_size, lr,
        results, device, force, keep_checkpoint, quiet) -> None:
    """Train CLIP on poisoned data with a defense, evaluate it, and store one result row.

    The cell (attack, defense, profile, seed, parameters) is identified by the hash of its
    resolved config: a cell already finished in RESULTS is shown, not rerun (use --force), and
    a cell interrupted mid-training resumes from its last end-of-epoch checkpoint.

    \b
    Metrics: clean zero-shot top-1/top-5 on the evaluation set; attack success rate (ASR) by
    the attack's protocol (backdoors: triggered non-target images classified as the target).
    """
    from .config import resolve
    from .runner import ConfigError, execute, prepare
    from .store import read_runs, runs_dir

    a_name, a_params = split_name(attack, "--attack")
    d_name, d_params = split_name(defense, "--defense")
    a_params.update(parse_assignments(attack_param, "--attack-param"))
    d_params.update(parse_assignments(defense_param, "--defense-param"))
    try:
        cfg = resolve(a_name, d_name, profile, seed, a_params, d_params, parse_assignments(dataset_param, "--dataset-param"),
                      epochs=epochs, batch_size=batch_size, lr=lr)
    except (RegistryError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    done = read_runs(results)
    if not force and not done.empty and ((done["run_id"] == cfg.run_id) & (done["status"] == "ok")).any():
        console.print(f"[yellow]cell {cfg.run_id} is already done in {results}; showing it (use --force to rerun)")
        show_row(done[(done["run_id"] == cfg.run_id)].iloc[-1].to_dict())
        return
    try:
        cell = prepare(cfg, device)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    if force:
        (Path(results) / "checkpoints" / cfg.run_id / "last.pt").unlink(missing_ok=True)
    console.print(f"[bold]cell {cfg.run_id}[/bold]: attack={a_name} defense={d_name} profile={profile} seed={seed}")
    # SIGTERM (a scheduler's time limit or preemption) unwinds like Ctrl-C: the cell is recorded
    # as failed and resumes from its last checkpoint next time.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        row = execute(cell, Path(results), progress=not quiet, keep_checkpoint=keep_checkpoint)
    except Exception as e:
        recorded = (runs_dir(results) / f"{cfg.run_id}.parquet").is_file()
        where = "recorded with status=failed; the next run retries it" if recorded else "nothing was recorded"
        err_console.print(f"[red]run failed: {type(e).__name__}: {e}[/red] ({where})")
        sys.exit(1)
    show_row(row)


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def show_row(row: dict) -> None:
    """Print the headline numbers of one result row (and the per-target outcomes of a targeted attack)."""
    def pct(x) -> str:
        return "-" if x is None or x != x else f"{100 * x:.1f}%"

    table = Table(title=f"{row['attack']} vs {row['defense']} (seed {row['seed']}, {row['profile']})")
    for col in ("clean top-1", "clean top-5", "ASR", "linear probe", "poisoned pairs", "wall time"):
        table.add_column(col, justify="right")
    asr, n = row.get("asr"), row.get("asr_n")
    if asr is not None and asr == asr and n:
        asr_cell = f"{pct(asr)} ({round(asr * n)}/{n})"
    else:
        asr_cell = pct(asr)
    table.add_row(
        pct(row["clean_top1"]), pct(row["clean_top5"]), asr_cell, pct(row.get("linear_probe_top1")),
        f"{row['n_poison']} ({100 * row['poison_rate']:.2f}%)", f"{row['wall_s']:.0f} s",
    )
    console.print(table)
    nontarget = row.get("clean_top1_nontarget")
    if isinstance(nontarget, float) and nontarget == nontarget:
        console.print(f"clean top-1 of the same {n} non-target images without the trigger: {pct(row['clean_top1_nontarget'])}")
    records = row.get("targets")
    if records is not None and not isinstance(records, float) and len(records):  # NaN when read back for other attacks
        targets = Table(title="targets (zero-shot top-1 of each clean target image)")
        for col in ("eval row", "true class", "adversarial class", "predicted", "success"):
            targets.add_column(col)
        for t in records:
            targets.add_row(str(t["eval_row"]), t["true_class"], t["adversarial_class"], t["predicted_class"],
                            "yes" if t["success"] else "no")
        console.print(targets)


@main.command()
@click.option("--attack", "-a", default="badnet", show_default=True, help="Attack name, optionally NAME[key=value,...].")
@click.option("--attack-param", "-A", multiple=True, metavar="NAME=VALUE", help="Attack parameter (repeatable).")
@click.option("--profile", "-p", default="cpu-small", show_default=True, help="Profile whose data to poison.")
@click.option("--seed", "-s", default=0, show_default=True, type=int, help="Seed (the trigger and rows follow it).")
@click.option("-n", "count", default=6, show_default=True, type=click.IntRange(1, 50), help="Pairs to show.")
@click.option("--out", "-o", default="preview.png", show_default=True, type=click.Path(dir_okay=False), help="PNG to write.")
def preview(attack, attack_param, profile, seed, count, out) -> None:
    """Show clean training images beside their poisoned versions, with captions, as a PNG,
    so you can see a trigger before spending compute. No training happens."""
    from .config import resolve
    from .preview import save_preview
    from .runner import ConfigError, prepare

    name, params = split_name(attack, "--attack")
    params.update(parse_assignments(attack_param, "--attack-param"))
    try:
        cell = prepare(resolve(name, "clip", profile, seed, params), "cpu")
        pairs = cell.attack.preview_pairs(cell.data, cell.plan, count)
        path = save_preview(pairs, f"{name} (seed {seed}): clean vs poisoned training pairs", out)
    except (ConfigError, RegistryError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    console.print(f"wrote {path}")


@main.command()
@click.option("--results", "-r", default=DEFAULT_RESULTS, show_default=True, type=click.Path(file_okay=False),
              help="Results folder to read (its runs/*.parquet).")
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv"]), default="table", show_default=True,
              help="table: in the terminal; md: Markdown (percent); csv: fractions.")
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="Write the table to this file instead of the terminal (Markdown unless --format csv).")
def report(results, fmt, out) -> None:
    """Leaderboard of the finished runs in RESULTS: per attack, defenses ranked by ASR then clean accuracy."""
    from .report import EmptyStoreError, load_leaderboard, rich_table, to_text
    from .utils import atomic_write

    try:
        board = load_leaderboard(results)
    except EmptyStoreError as e:
        raise click.ClickException(str(e)) from None
    if fmt == "table" and out is None:
        console.print(rich_table(board))
        return
    text = to_text(board, "md" if fmt == "table" else fmt)
    if out:
        atomic_write(out, lambda tmp: Path(tmp).write_text(text))
        console.print(f"wrote {out}")
    else:
        click.echo(text, nl=False)
