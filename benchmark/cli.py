"""The ``bench`` command line (click)."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .display import cell_line, console, grid_table, show_row, width
from .registry import ATTACKS, DATASETS, DEFENSES, RegistryError, param_fields
from .utils import WORKERS_ENV

err_console = Console(stderr=True, emoji=False, width=width(sys.stderr))  # user strings are escaped and never turned into emoji (display.py)

DEFAULT_RESULTS = "results"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err_console.print(f"[yellow]warning: {escape(str(message))}[/yellow]")


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
    that runs x threads <= cores, or set OMP_WAIT_POLICY=PASSIVE), POISONBENCH_WORKERS (processes
    decoding lazily loaded images per training process; `bench run --workers` sets it),
    POISONBENCH_SPEED (`bench run --speed`), POISONBENCH_CACHE (machine-local caches: EDA caption
    rewrites of large training sets; default ~/.cache/poisonbench).
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
        kinds = k == "defenses"  # training, task, filter or repair (defenses.base)
        for col in ("kind",) * kinds + ("description", "parameters (default)"):
            table.add_column(col, no_wrap=col == "kind")
        for name in reg.names():
            cls = reg.get(name)
            doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
            params = "\n".join(f"{escape(f'{p}: {t} = {d!r}')}  [dim]{escape(h)}[/dim]"
                               for p, t, d, h in param_fields(cls.Params)) or "-"
            table.add_row(escape(name), *[escape(getattr(cls, "kind", "?") or "?")] * kinds, escape(doc), params)
        console.print(table)
    broken = [(k, b) for k, reg in registries.items() if kind in (None, k) for b in reg.broken()]
    if broken:  # installed entry points whose module failed to import: shown, and the rest still works
        table = Table(title="plugins that failed to load (not usable until fixed or uninstalled)", show_lines=True)
        for col in ("kind", "entry point", "module", "installed by", "error"):
            table.add_column(col)
        for k, b in broken:
            table.add_row(*(escape(c) for c in (k, b.name, b.module, b.dist or "?", b.error)))
        console.print(table)
    if kind in (None, "profiles"):
        table = Table(title="profiles")
        table.add_column("name", no_wrap=True)
        for col in ("description", "model", "starts from", "data", "epochs", "batch", "lr", "parameters it sets"):
            table.add_column(col)
        for p in PROFILES.values():
            data = p.dataset + "".join(f" {k}={v}" for k, v in p.dataset_params.items())
            sets = {**p.attack_params, **p.defense_params}
            overrides = "\n".join(f"{d}: " + ", ".join(f"{k}={v}" for k, v in kv.items()) for d, kv in sets.items())
            init = p.init + (f" ({p.pretrain or p.name}'s clean model)" if p.init == "clean" else "")
            table.add_row(p.name, p.description, p.model, init, data, str(p.epochs), str(p.batch_size), f"{p.lr:g}",
                          overrides or "-")
        console.print(table)


def grid_options(f):
    """The options that select a grid of cells (shared by ``run`` and ``status``)."""
    options = [
        click.option("--attack", "-a", default="badnet", show_default=True,
                     help="Attack(s): a comma list of names, each optionally with parameters, e.g. "
                          "badnet[patch_size=4,location=random],blended; or `all`. See `bench list attacks`."),
        click.option("--defense", "-d", default="clip", show_default=True,
                     help="Defense(s): a comma list, e.g. clip,roclip[pool_size=4096]; or `all`. See `bench list defenses`."),
        click.option("--profile", "-p", default="cpu-small", show_default=True,
                     help="Scale preset (model, data, hyper-parameters). See `bench list profiles`."),
        click.option("--seed", "-s", default="0", show_default=True,
                     help="Seed(s) of data subset, poisoning, init and order: 0,1,2 or 0-2."),
        click.option("--attack-param", "-A", multiple=True, metavar="NAME=V1[,V2..]",
                     help="Attack parameter (repeatable); several values sweep it, e.g. n_poison=25,50,100,200. "
                          "Applies to the selected attacks that have it."),
        click.option("--defense-param", "-D", multiple=True, metavar="NAME=V1[,V2..]",
                     help="Defense parameter (repeatable); several values sweep it."),
        click.option("--data", metavar="csv:PATH|wds:URLS",
                     help="Train on your own image–caption files instead of the profile's data: a CSV/TSV "
                          "(columns filepath,title; paths relative to it) or WebDataset shards "
                          "('wds:shards/{00000..00099}.tar', quoted). Read only; poisoned pairs never touch them."),
        click.option("--eval", "eval_set", metavar="SET",
                     help="Evaluation set for --data: fashion-mnist (default), imagenet:ROOT, cifar10:ROOT, "
                          "cifar100:ROOT or imagefolder:ROOT (local folders; nothing is downloaded)."),
        click.option("--finetune-data", "finetune_data", metavar="csv:PATH|wds:URLS",
                     help="Clean image–caption pairs, in the format of --data, that post-training repairs "
                          "(e.g. cleanclip) fine-tune on; keep them apart from the training data."),
        click.option("--dataset-param", multiple=True, metavar="NAME=V1[,V2..]",
                     help="Dataset parameter (repeatable, one name each; several values sweep it), e.g. "
                          "n_train=20000, or for --data: caption_key=caption. See `bench list datasets`."),
        click.option("--epochs", type=int, help="Override the profile's epochs."),
        click.option("--batch-size", type=int, help="Override the profile's batch size."),
        click.option("--lr", type=float, help="Override the profile's peak learning rate."),
        click.option("--model", help="open_clip architecture instead of the profile's (`python -c \"import open_clip; "
                                     "print(open_clip.list_models())\"`, or poisonbench-tiny / poisonbench-cpu-small)."),
        click.option("--init", metavar="scratch|clean|checkpoint:PATH|pretrained:ARCH/TAG",
                     help="Starting weights instead of the profile's (`bench list profiles`, column \"starts "
                          "from\"): random (seeded by the cell); the clean model of the profile's pre-training "
                          "profile (trained once on the clean data, cached in RESULTS/cache, reused by every cell "
                          "that starts from it); an open_clip state dict or checkpoint file; or open_clip "
                          "pretrained weights already on this machine (the Hugging Face cache; nothing is "
                          "downloaded), e.g. pretrained:RN50/openai with --model RN50."),
        click.option("--nproc", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Processes that train each cell together (torch.distributed DDP, started with torchrun): "
                          "one per GPU on CUDA (process r uses cuda:r), gloo on the CPU, where each gets "
                          "cores/(jobs x nproc) threads. --batch-size is per process: the global batch is "
                          "batch size x nproc, so the processes are part of the cell (its run id)."),
        click.option("--results", "-r", default=DEFAULT_RESULTS, show_default=True, type=click.Path(file_okay=False),
                     help="Results folder: runs/ (Parquet rows), manifests/, checkpoints/, logs/, slurm/ (job logs)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def grid_spec(attack, defense, profile, seed, attack_param, defense_param, data, eval_set, dataset_param,
              epochs, batch_size, lr, nproc, results, finetune_data=None, model=None, init=None):
    """The grid_options as one grid.GridSpec (``nproc``: the processes of each cell);
    click.UsageError naming the problem."""
    from .grid import GridSpec, parse_assignments

    try:
        return GridSpec(
            attack, defense, profile, seed,
            parse_assignments(attack_param), parse_assignments(defense_param), parse_assignments(dataset_param),
            {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "lr": lr, "model": model,
                               "init": init}.items() if v is not None},
            data, eval_set, nproc, str(results), finetune_data,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def expand_grid(spec):
    """The resolved configs of grid.GridSpec ``spec``; click.UsageError naming the problem."""
    from .grid import expand

    try:
        return expand(spec)
    except (RegistryError, ValueError) as e:
        raise click.UsageError(str(e)) from None


class SectionedCommand(click.Command):
    """A command whose --help lists some options under their own titled section, with an
    introduction: ``sections = {title: (intro, [parameter names])}``."""

    def __init__(self, *args, sections: dict[str, tuple[str, list[str]]] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sections = sections or {}

    def format_options(self, ctx, formatter) -> None:
        grouped = {name for _, names in self.sections.values() for name in names}
        params = self.get_params(ctx)
        rows = [r for p in params if p.name not in grouped and (r := p.get_help_record(ctx))]
        with formatter.section("Options"):
            formatter.write_dl(rows)
        for title, (intro, names) in self.sections.items():
            with formatter.section(title):
                formatter.write_text(intro)
                formatter.write_paragraph()
                formatter.write_dl([r for p in params if p.name in names and (r := p.get_help_record(ctx))])


SLURM_HELP = (
    "With --launcher slurm each cell is one SLURM job, submitted through submitit (several cells: one "
    "job array), and `bench run` returns once they are queued, printing their job ids; --wait blocks "
    "until they end. Job logs: RESULTS/slurm/<job id>/ (the output of the cell: <job id>_0_log.out). The "
    "jobs write their rows to RESULTS as local runs do, so the `bench status` command it prints shows "
    "their progress and `bench report` their results; on a cluster RESULTS must be on a filesystem the nodes "
    "share. A job that reaches its time limit or is preempted is requeued and resumes from the cell's "
    "last epoch. --launcher submitit-local runs the same jobs as processes on this machine, to test "
    "the SLURM path without a cluster (it ignores --partition and the --slurm-* options)."
)
SLURM_OPTIONS = ["launcher", "wait", "partition", "gpus_per_node", "cpus_per_task", "mem_gb", "time_min",
                 "slurm_array_parallelism", "slurm_param"]


@main.command(cls=SectionedCommand, sections={"SLURM (--launcher slurm)": (SLURM_HELP, SLURM_OPTIONS)})
@grid_options
@click.option("--jobs", "-j", default=1, show_default=True, type=click.IntRange(min=1),
              help="Cells run at once on this machine; each gets cores/jobs CPU threads.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (with --nproc: auto, cpu or cuda).")
@click.option("--force", is_flag=True, help="Run again the cells that already have a finished result.")
@click.option("--keep-checkpoint", is_flag=True, help="Keep results/checkpoints/<run_id>/last.pt after a cell succeeds.")
@click.option("--workers", type=click.IntRange(min=0),
              help="Processes that decode lazily loaded training images (--data with load=lazy, or auto above "
                   "8 GiB) per training process; the numbers do not depend on it. 0: a thread of the training "
                   "process.  [default: the cell's cores minus one, at most 8 per GPU]")
@click.option("--speed", metavar="OPTIONS",
              help="Speed options, a comma list: compile (torch.compile), fused-adamw, channels-last (ResNets). "
                   "Numbers agree with a plain run to floating-point tolerance, not bit for bit; the row records "
                   "them (speed_options); they are not part of the run id, so a finished cell is not rerun for "
                   "them. compile needs a C++ compiler. `bench perf` measures each.  [default: plain]")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--launcher", type=click.Choice(["local", "slurm", "submitit-local"]), default="local", show_default=True,
              help="local: processes on this machine (--jobs at a time); slurm: one SLURM job per cell; "
                   "submitit-local: the SLURM path's jobs run on this machine, for testing without a cluster.")
@click.option("--wait", is_flag=True, help="Wait for the submitted jobs to end and print the usual summary.")
@click.option("--partition", help="SLURM partition to submit to (`sinfo -s` lists them). Required by --launcher slurm.")
@click.option("--gpus-per-node", default=1, show_default=True, type=click.IntRange(min=0),
              help="GPUs per cell's job (0 for a CPU partition).")
@click.option("--cpus-per-task", type=click.IntRange(min=1), help="CPU cores per job  [default: 8 per GPU]")
@click.option("--mem-gb", type=click.FloatRange(min=0, min_open=True), help="Memory per job in GB  [default: the partition's]")
@click.option("--time-min", default=24 * 60, show_default=True, type=click.IntRange(min=1),
              help="Time limit per job in minutes; a job that reaches it is requeued and resumes.")
@click.option("--slurm-array-parallelism", type=click.IntRange(min=1), help="At most this many of the grid's jobs run at once.")
@click.option("--slurm-param", multiple=True, metavar="KEY=VALUE",
              help="Any other sbatch option (repeatable), e.g. account=myproj, qos=high, constraint=a100.")
def run(attack, defense, profile, seed, attack_param, defense_param, data, eval_set, finetune_data, dataset_param, epochs,
        batch_size, lr, model, init, nproc, results, jobs, device, force, keep_checkpoint, workers, speed, quiet, launcher, wait,
        partition, gpus_per_node, cpus_per_task, mem_gb, time_min, slurm_array_parallelism, slurm_param) -> None:
    """Train CLIP on poisoned data with a defense, evaluate it, and store one result row per cell.

    A cell is one attack x defense x seed x parameter setting; lists and `all` make a grid of
    cells, e.g. `--attack all --defense clip,roclip --seed 0,1,2 -A n_poison=50,100`. Every cell
    is checked before any training starts, then each runs in its own process.

    \b
    A cell is identified by the hash of its resolved config: a cell already finished in RESULTS
    is not rerun (--force reruns it), a failed one is retried, and one interrupted mid-training
    (Ctrl-C, SIGTERM, kill -9) resumes from its last end-of-epoch checkpoint. `bench status`
    with the same options shows what is done.

    \b
    Metrics: clean zero-shot top-1/top-5 on the evaluation set; attack success rate (ASR) by
    the attack's protocol (backdoors: triggered non-target images classified as the target;
    targeted: target images classified as their adversarial class); linear probe (two
    protocols); retrieval; per-epoch curves of clean top-1 and ASR (on the profile's curve_n
    evaluation images); trigger survival in the poisoned training views; a defense's own
    diagnostics (RoCLIP: matches per matching epoch).

    \b
    Several processes per cell: --nproc N here, or on a cluster
    `torchrun --nproc_per_node N [--nnodes ...] -m poisonbench run ...` (the cells then run one
    after the other in the torchrun processes; RESULTS must be on a shared filesystem).

    \b
    Paper scale (RoCLIP's setting: RN50 from scratch, your CC3M-style data, ImageNet zero-shot):
      bench run -p paper -a badnet -d clip,roclip --nproc 2 --device cuda \\
        --data 'wds:/data/cc3m/{00000..00331}.tar' --eval imagenet:/data/imagenet
    on SLURM, --launcher slurm --partition gpu --gpus-per-node 2 in place of --nproc 2. See README.md.
    """
    from . import distributed
    from .grid import EXIT_BUSY, run_cells, state, validate
    from .store import has_finished_row, read_row

    # environment variables reach every cell: in-process, subprocess, torchrun, SLURM
    if workers is not None:
        os.environ[WORKERS_ENV] = str(workers)
    if speed is not None:
        from .speed import SPEED_ENV, SpeedOptions

        try:
            os.environ[SPEED_ENV] = str(SpeedOptions.parse(speed))
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--speed") from None
    submitted = launcher != "local"
    if submitted and nproc > 1:
        raise click.UsageError("with --launcher slurm, --gpus-per-node sets the processes per cell; drop --nproc")
    if submitted:
        from .slurm import processes_per_job

        opts = slurm_options(launcher, jobs, device, partition, gpus_per_node, cpus_per_task, mem_gb, time_min,
                             slurm_array_parallelism, slurm_param)
        nproc = processes_per_job(opts)  # the cells are those of the processes their jobs will run
    elif wait or partition or cpus_per_task or mem_gb or slurm_array_parallelism or slurm_param:
        raise click.UsageError("--wait, --partition and the other SLURM options need --launcher slurm (or submitit-local)")
    if distributed.launched():
        if nproc > 1 or jobs > 1:
            raise click.UsageError(f"this command was started by torchrun ({distributed.launched_world_size()} processes); "
                                   "drop --nproc and --jobs (torchrun's --nproc_per_node sets the processes)")
        nproc = distributed.launched_world_size()  # the cells are those of torchrun's processes
    spec = grid_spec(attack, defense, profile, seed, attack_param, defense_param, data, eval_set, dataset_param,
                     epochs, batch_size, lr, nproc, results, finetune_data, model, init)
    cfgs = expand_grid(spec)
    if distributed.launched():
        run_here(cfgs, results, device, force, keep_checkpoint, quiet)
        return
    if nproc > 1 and not submitted:
        check_nproc(nproc, device)
    pending = cfgs if force else [c for c in cfgs if state(c, results) != "done"]
    if len(cfgs) == 1 and not pending:
        console.print(f"[yellow]cell {cfgs[0].run_id} is already done in {escape(str(results))}; showing it "
                      "(use --force to rerun)[/yellow]")
        show_row(read_row(results, cfgs[0].run_id))
        return
    if len(cfgs) > 1:
        console.print(f"grid of {len(cfgs)} cells: {len(cfgs) - len(pending)} done, {len(pending)} to run"
                      + (f", {jobs} at a time" if jobs > 1 and pending else ""))
    # a job's device is checked on its node; here, the data and parameters
    problems = validate(pending, "cpu" if submitted and (device == "auto" or device.startswith("cuda")) else device)
    if problems:
        raise click.UsageError("these cells cannot run (nothing was started):\n  " + "\n  ".join(problems))
    check_writable(results)
    logged = jobs > 1 or submitted  # a cell's own output goes to its log

    def announce(o) -> None:
        if len(cfgs) > 1 or logged or o.code != 0:
            console.print(cell_line(o, results))
        if len(cfgs) == 1 and logged and o.code == 0:
            show_row(read_row(results, o.cfg.run_id))

    if submitted:
        outcomes = submit_and_wait(spec, pending, launcher, opts, device, force, keep_checkpoint, wait, announce)
        if not wait:
            return
    else:
        outcomes = run_cells(pending, results, jobs, device, force, keep_checkpoint, quiet, on_done=announce)
    if outcomes:  # new rows may bring columns (a defense's d_*) the others lack: one column set for all
        from .store import rewrite_rows

        rewrite_rows(results, only_if_needed=True)
    if len(cfgs) > 1:
        console.print(grid_table(cfgs, results))
    busy = [o for o in outcomes if o.code == EXIT_BUSY]
    if busy:
        console.print(f"[yellow]{len(busy)} cell(s) are being run by another process[/yellow]; "
                      f"`{escape(shlex.join(spec.command('status')))}` shows when they are done", soft_wrap=True)
    bad = [o for o in outcomes if o.code not in (0, EXIT_BUSY) and not has_finished_row(results, o.cfg.run_id)]
    if bad:
        err_console.print(f"[red]{len(bad)} of {len(outcomes)} cells did not finish[/red]; rerun the same command to retry them")
        sys.exit(1)


def slurm_options(launcher, jobs, device, partition, gpus_per_node, cpus_per_task, mem_gb, time_min,
                  slurm_array_parallelism, slurm_param):
    """``bench run``'s SLURM options as slurm.SlurmOptions; click.UsageError, before anything is
    submitted, when the launcher cannot work (no sbatch, no partition, ...)."""
    from .grid import parse_assignments
    from .slurm import LaunchError, SlurmOptions, check_launcher

    if jobs != 1:
        raise click.UsageError("--jobs is for --launcher local; every submitted cell is its own job "
                               "(--slurm-array-parallelism limits how many run at once)")
    try:
        opts = SlurmOptions(partition, gpus_per_node, cpus_per_task, mem_gb, time_min, slurm_array_parallelism,
                            parse_assignments(slurm_param))
        check_launcher(launcher, opts, device)
    except (LaunchError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    return opts


def submit_and_wait(spec, cfgs, launcher, opts, device, force, keep_checkpoint, wait, on_done):
    """Submit the cells ``cfgs`` of grid.GridSpec ``spec``, print their job ids, the log folder and
    the follow-up commands (rendered from ``spec``, so they name the same cells); with ``wait``,
    wait for them and return their outcomes (else an empty list)."""
    from submitit.core.utils import FailedJobError

    from .grid import describe
    from .slurm import LOG_FOLDER, LaunchError, submit_cells, wait_for

    results = spec.results

    if not cfgs:
        console.print("nothing to submit: every cell is done")
        return []
    try:
        submitted = submit_cells(cfgs, results, launcher, opts, device, force, keep_checkpoint)
    except LaunchError as e:
        raise click.UsageError(str(e)) from None
    except (FailedJobError, OSError) as e:
        raise click.ClickException(f"submission failed, check the SLURM options: {e}") from None
    where = f"SLURM partition {opts.partition}" if launcher == "slurm" else "submitit's local executor (this machine)"
    console.print(f"submitted {len(submitted)} cell(s) to {where}:", markup=False)
    for job, cfg in zip(submitted, cfgs):
        console.print(f"  job {job.job_id}  {describe(cfg)}", markup=False)
    console.print(f"logs: {Path(results) / LOG_FOLDER}/<job id>/", soft_wrap=True, markup=False, highlight=False)
    console.print(f"progress: {shlex.join(spec.command('status'))}", soft_wrap=True, markup=False, highlight=False)
    console.print(f"results: {shlex.join(spec.command('report'))}", soft_wrap=True, markup=False, highlight=False)
    if not wait:
        return []
    console.print("waiting for the jobs to end (Ctrl-C stops waiting; the jobs go on)")
    return wait_for(submitted, cfgs, on_done, poll_s=10.0 if launcher == "slurm" else 1.0)


def check_nproc(nproc: int, device: str) -> None:
    """click.UsageError when ``nproc`` processes per cell cannot run on ``device``: a pinned GPU,
    or more processes than GPUs."""
    import torch

    if device.startswith("cuda:"):
        raise click.UsageError(f"--device {device} pins one GPU, but --nproc {nproc} needs one GPU per process; "
                               "give --device cuda (process r uses cuda:r; choose GPUs with CUDA_VISIBLE_DEVICES)")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        n = torch.cuda.device_count()
        if nproc > n:
            raise click.UsageError(f"--nproc {nproc} needs one GPU per process, but {n} GPU(s) are visible; "
                                   f"give --nproc {n} or less, or --device cpu")


def run_here(cfgs, results, device, force, keep_checkpoint, quiet) -> None:
    """``bench run`` in a process started by torchrun: the pending cells one after the other,
    each trained by all of torchrun's processes together (rank 0 decides what is pending, checks,
    prints and writes). A failed cell ends the command (exit 1): torchrun then stops every process."""
    from . import distributed
    from .grid import EXIT_BUSY, EXIT_OK, state, validate
    from .runner import pick_device

    try:
        distributed.init(pick_device(device))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    main = distributed.is_main()
    if not main:
        console.quiet = True
    pending, problems = None, None
    if main:
        pending = cfgs if force else [c for c in cfgs if state(c, results) != "done"]
        console.print(f"{len(cfgs)} cell(s): {len(cfgs) - len(pending)} done, {len(pending)} to run, "
                      f"each by {distributed.world_size()} processes")
        problems = validate(pending, device)
        if not problems:
            try:
                check_writable(results)
            except click.UsageError as e:
                problems = [e.message]
    pending, problems = distributed.broadcast_object((pending, problems))
    if problems:
        raise click.UsageError("these cells cannot run (nothing was started):\n  " + "\n  ".join(problems))
    for cfg in pending:
        code = run_cell_here(cfg, results, device, force, keep_checkpoint, quiet)
        if code not in (EXIT_OK, EXIT_BUSY):  # the ranks may disagree on what comes next: stop them all
            sys.exit(code)
    if len(cfgs) > 1:
        console.print(grid_table(cfgs, results))
    distributed.shutdown()


def check_writable(results) -> None:
    """click.UsageError, before any cell starts, when RESULTS cannot be written."""
    import tempfile

    try:
        Path(results).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=results):
            pass
    except OSError as e:
        raise click.UsageError(f"cannot write to the results folder {results}: {e.strerror or e}; "
                               "choose another with --results") from None


GRID_SELECTORS = ("attack", "defense", "profile", "seed", "attack_param", "defense_param", "data", "eval_set",
                  "finetune_data", "dataset_param", "epochs", "batch_size", "lr", "model", "init", "nproc")


@main.command()
@grid_options
@click.option("--store", "list_store", is_flag=True,
              help="List the cells the store holds, with --attack/--defense/--profile/--seed as filters "
                   "(the default when no grid option is given).")
@click.pass_context
def status(ctx, attack, defense, profile, seed, attack_param, defense_param, data, eval_set, finetune_data, dataset_param,
           epochs, batch_size, lr, model, init, nproc, results, list_store) -> None:
    """List the cells of a grid (same options as `bench run`, --nproc included; for a grid run on
    SLURM with --gpus-per-node N > 1, --nproc N) as done, running, failed or pending.

    With no grid option (or with --store), list every cell the store holds instead: done, failed,
    running, and resumable (a checkpoint without a row), with its attack, defense, setting and
    seed; --attack, --defense, --profile and --seed then filter it, as in `bench report`.
    """
    from collections import Counter

    from .grid import state

    given = [n for n in GRID_SELECTORS if ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT]
    if list_store or not given:
        show_store(results, *(ctx.params[n] if n in given else None for n in ("attack", "defense", "profile", "seed")))
        return
    cfgs = expand_grid(grid_spec(attack, defense, profile, seed, attack_param, defense_param, data, eval_set,
                                 dataset_param, epochs, batch_size, lr, nproc, results, finetune_data, model, init))
    console.print(grid_table(cfgs, results))
    counts = Counter(state(c, results) for c in cfgs)
    console.print(", ".join(f"{counts[k]} {k}" for k in ("done", "running", "failed", "pending")))


def show_store(results, attack=None, defense=None, profile=None, seed=None) -> None:
    """``bench status`` without a grid: the store's cells (``store.select``'s filters), then the
    ones with no row yet (``store.unrecorded_cells``)."""
    import json

    from collections import Counter

    from .config import RunConfig
    from .grid import state
    from .report import select
    from .store import read_runs, unrecorded_cells

    df = read_runs(results)
    try:
        df = select(df, attack, defense, profile, seed) if not df.empty else df
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    cfgs = []
    for text in df.get("config", []):
        try:
            cfgs.append(RunConfig(**json.loads(text)))
        except (TypeError, ValueError):
            continue  # a row without a readable config (older or foreign): not listed
    cfgs.sort(key=lambda c: (c.profile, c.attack, c.defense, c.seed, c.run_id))
    console.print(grid_table(cfgs, results))
    counts = Counter(state(c, results) for c in cfgs)
    extra = unrecorded_cells(results) if not any((attack, defense, profile, seed)) else []
    for run_id, what in extra:
        console.print(f"{run_id}: {what}", markup=False)
    console.print(", ".join(f"{counts[k]} {k}" for k in ("done", "running", "failed"))
                  + (f"; {len(extra)} without a row (running or resumable)" if extra else ""))


@main.command(hidden=True)
@click.argument("config_json")
@click.option("--results", "-r", default=DEFAULT_RESULTS, type=click.Path(file_okay=False))
@click.option("--device", default="auto")
@click.option("--force", is_flag=True)
@click.option("--keep-checkpoint", is_flag=True)
@click.option("--quiet", "-q", is_flag=True)
def cell(config_json, results, device, force, keep_checkpoint, quiet) -> None:
    """Run one resolved cell in this process (what `bench run` starts for each cell), or in each
    of the processes torchrun started (``torchrun --nproc_per_node N -m poisonbench cell ...``),
    which train it together."""
    from . import distributed
    from .config import RunConfig
    from .grid import EXIT_OK, die_with_parent

    die_with_parent()
    code = run_cell_here(RunConfig(**json.loads(config_json)), results, device, force, keep_checkpoint, quiet)
    if code == EXIT_OK:
        distributed.shutdown()
    sys.exit(code)


def run_cell_here(cfg, results, device, force, keep_checkpoint, quiet) -> int:
    """Prepare and execute one cell in this process (joining torchrun's process group when it
    started this one; only rank 0 prints); the exit code (grid.EXIT_*)."""
    from . import distributed
    from .grid import EXIT_BUSY, EXIT_CONFIG, EXIT_FAILED, EXIT_OK
    from .runner import ConfigError, execute, prepare
    from .store import CellBusyError, has_finished_row, runs_dir

    try:
        prepared = prepare(cfg, device)
    except ConfigError as e:
        err_console.print(f"[red]{cfg.run_id}: {escape(str(e))}[/red]")
        return EXIT_CONFIG
    distributed.init(prepared.device)
    if not distributed.is_main():
        console.quiet = True
    world = distributed.world_size()
    console.print(f"[bold]cell {cfg.run_id}[/bold]: "
                  + escape(f"attack={cfg.attack} defense={cfg.defense} profile={cfg.profile} seed={cfg.seed}")
                  + (f", {world} processes" if world > 1 else ""))
    # SIGTERM (a scheduler's time limit, preemption, the grid stopping) unwinds like Ctrl-C: the
    # cell is recorded as failed and resumes from its last checkpoint next time.
    with unwinding(signal.SIGTERM, signal.SIGINT):
        try:
            row = execute(prepared, Path(results), progress=not quiet, keep_checkpoint=keep_checkpoint, force=force)
        except CellBusyError as e:
            err_console.print(f"[yellow]{escape(str(e))}[/yellow]")
            return EXIT_BUSY
        except (Exception, KeyboardInterrupt) as e:  # SIGTERM's SystemExit goes on: exit 128 + 15
            if not distributed.is_main():
                err_console.print(f"[red]process {distributed.rank()}: run failed: {type(e).__name__}: {escape(str(e))}[/red]")
                return EXIT_FAILED
            recorded = (runs_dir(results) / f"{cfg.run_id}.parquet").is_file()
            where = ("the cell's finished row from an earlier run is kept" if has_finished_row(results, cfg.run_id)
                     else "recorded with status=failed; the next run retries it" if recorded else "nothing was recorded")
            err_console.print(f"[red]run failed: {type(e).__name__}: {escape(str(e))}[/red] ({where})")
            return EXIT_FAILED
    if row is not None:
        show_row(row)
    return EXIT_OK


@contextlib.contextmanager
def unwinding(*signums: int):
    """Within the context, each of ``signums`` unwinds the stack (SIGTERM as SystemExit(128 + 15),
    SIGINT as KeyboardInterrupt), so that ``finally`` blocks and context managers run; on leaving
    it, the handlers of SIGTERM and SIGINT are put back as they were (``_terminated`` mutes both
    once one fires), also for an in-process caller."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in signums:
        signal.signal(s, _terminated)
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def _terminated(signum, frame) -> None:
    # Further signals do nothing, so that they cannot interrupt the failed row being written
    # (a no-op handler rather than SIG_IGN, which makes Python raise "ignored due to race condition").
    signal.signal(signal.SIGTERM, _ignore)
    signal.signal(signal.SIGINT, _ignore)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _ignore(signum, frame) -> None:
    pass


@main.command()
@click.option("--attack", "-a", default="badnet", show_default=True, help="Attack name, optionally NAME[key=value,...].")
@click.option("--attack-param", "-A", multiple=True, metavar="NAME=VALUE", help="Attack parameter (repeatable).")
@click.option("--profile", "-p", default="cpu-small", show_default=True, help="Profile whose data to poison.")
@click.option("--seed", "-s", default=0, show_default=True, type=int, help="Seed (the trigger and rows follow it).")
@click.option("-n", "count", default=6, show_default=True, type=click.IntRange(1, 50), help="Pairs to show.")
@click.option("--data", metavar="csv:PATH|wds:URLS", help="Poison your own image–caption files, as `bench run --data`.")
@click.option("--eval", "eval_set", metavar="SET", help="Evaluation set for --data (the backdoor's target label is one "
                                                        "of its classes), as `bench run --eval`.")
@click.option("--dataset-param", multiple=True, metavar="NAME=VALUE",
              help="Dataset parameter (repeatable), e.g. captions=web to see Fashion-MNIST's web captions.")
@click.option("--out", "-o", default="preview.png", show_default=True, type=click.Path(dir_okay=False),
              help="File to write: .png, .pdf or .svg (the format follows the extension).")
@click.option("--results", "-r", default=DEFAULT_RESULTS, show_default=True, type=click.Path(file_okay=False),
              help="Results folder whose cache holds (or receives) what an attack that needs a model makes.")
def preview(attack, attack_param, profile, seed, count, data, eval_set, dataset_param, out, results) -> None:
    """Show clean training images beside their poisoned versions and their amplified difference,
    with captions, as a PNG, PDF or SVG, so you can see a trigger before spending compute. No training happens, except for an attack
    that needs a model (badclip's trigger is optimised against the profile's clean model): that
    model and what the attack makes with it are taken from RESULTS/cache, or made and cached there
    once, exactly as `bench run` would."""
    from .config import resolve
    from .grid import GridSpec, parse_assignments, parse_name
    from .preview import save_preview
    from .runner import ConfigError, prepare, start

    try:
        name, params = parse_name(attack)
        params.update(parse_assignments(attack_param))
        dataset, fixed = GridSpec(data=data, eval=eval_set).dataset()
        cell = prepare(resolve(name, "clip", profile, seed, params, dataset=dataset,
                               dataset_params={**fixed, **parse_assignments(dataset_param)}), "cpu")
        if cell.attack.model_init() is not None:
            console.print(f"{name} poisons with a model ({cell.attack.model_init()}): made once, cached in {results}/cache",
                          markup=False)
            start(cell, Path(results), progress=True)
        pairs = cell.attack.preview_pairs(cell.data, cell.plan, count)
        path = save_preview(pairs, f"{name} (seed {seed}): clean vs poisoned training pairs", out)
    except (ConfigError, RegistryError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    console.print(f"wrote {path}", markup=False)


@main.command()
@click.option("--results", "-r", default=DEFAULT_RESULTS, show_default=True, type=click.Path(file_okay=False),
              help="Results folder to read (its runs/*.parquet).")
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv", "json", "html"]), default="table",
              show_default=True,
              help="table: in the terminal; md: Markdown (percent); csv, json: fractions with interval bounds; "
                   "html: a self-contained page with the tables and plots.")
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="Write to this file instead of the terminal (with --format table: Markdown).")
@click.option("--html", "html_page", is_flag=True, help="Also write RESULTS/report.html (tables and plots, self-contained).")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Write the plots (PNG and SVG) to RESULTS/plots/ (or --plots-dir) and put them in the HTML page.")
@click.option("--plots-dir", type=click.Path(file_okay=False),
              help="Folder for the plots instead of RESULTS/plots/.")
@click.option("--pdf", is_flag=True, help="Also write each plot as PDF (for a paper).")
@click.option("--attack", "-a", help="Only these attacks (a comma list).")
@click.option("--defense", "-d", help="Only these defenses (a comma list).")
@click.option("--profile", "-p", help="Only these profiles (a comma list).")
@click.option("--seed", "-s", help="Only these seeds: 0,1,2 or 0-2.")
def report(results, fmt, out, html_page, plots, plots_dir, pdf, attack, defense, profile, seed) -> None:
    """Leaderboard of the finished runs in RESULTS, per attack: defenses ranked by ASR, then clean
    accuracy; seeds pooled (mean and 95 % interval: Student t for accuracies, Wilson for ASR).
    Beside them: each defense's clean top-1 cost against clip on the same data (points, seed by
    seed; positive = the defense costs accuracy), and where measured the trigger survival over the
    poisoned training views (whole patch in view, patch as evaluated, trigger residual correlation)
    and a defense's own numbers (e.g. RoCLIP's own-class matches).

    Plots (RESULTS/plots/*.png and *.svg, one set per profile): asr_vs_clean (the trade-off per
    attack), asr_by_attack (grouped bars), cost_vs_clip (clean-accuracy cost), asr_vs_poison (when
    a poison count was swept), roc (the data filters' ROC curves per attack, when the store has
    detection rows), curves (ASR and clean top-1 after each epoch, on a seeded evaluation subset).
    """
    from .report import EmptyStoreError, load_leaderboard, rich_tables, selected_runs, to_html, to_text
    from .utils import atomic_write

    try:
        board = load_leaderboard(results, attack=attack, defense=defense, profile=profile, seed=seed)
    except EmptyStoreError as e:
        raise click.ClickException(str(e)) from None
    except ValueError as e:  # a malformed --seed
        raise click.UsageError(str(e)) from None
    paths = []
    if plots:
        from .plots import save_plots

        try:
            paths = save_plots(board, Path(plots_dir) if plots_dir else Path(results) / "plots",
                               ("png", "svg", "pdf") if pdf else ("png", "svg"))
        except OSError as e:
            err_console.print(f"[yellow]plots not written ({escape(str(e))}); use --no-plots for a read-only results "
                              "folder[/yellow]")
    svgs = {p.stem: p.read_text() for p in paths if p.suffix == ".svg"}

    def write(path, text) -> None:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        console.print(f"wrote {path}", markup=False)

    if fmt == "table" and out is None:
        console.print(f"[bold]poisonbench leaderboard[/bold] ({escape(str(results))}): percent, mean over seeds with a "
                      "95 % interval")
        for table in rich_tables(board):
            console.print(table)
    else:
        runs = selected_runs(results, attack=attack, defense=defense, profile=profile, seed=seed)
        text = to_html(board, svgs, runs) if fmt == "html" else to_text(board, "md" if fmt == "table" else fmt)
        if out:
            write(out, text)
        else:
            click.echo(text, nl=False)
    if html_page:
        write(Path(results) / "report.html",
              to_html(board, svgs, selected_runs(results, attack=attack, defense=defense, profile=profile, seed=seed)))
    if paths and (out or fmt == "table"):
        console.print(f"plots: {', '.join(str(p) for p in paths if p.suffix == '.png')} (and .svg{', .pdf' if pdf else ''})",
                      markup=False)


@main.command(name="rewrite-rows")
@click.option("--results", "-r", default=DEFAULT_RESULTS, show_default=True, type=click.Path(file_okay=False),
              help="Results folder whose rows are rewritten.")
def rewrite_rows_command(results) -> None:
    """Rewrite every row of RESULTS with the current column set, values unchanged (a parameter
    column added since a row was written gets the value of the row's config). After an upgrade of
    poisonbench or of a plugin that added columns, `pandas.read_parquet("RESULTS/runs")` and
    DuckDB's `'RESULTS/runs/*.parquet'` read the store whole again. Running cells are skipped."""
    from .store import rewrite_rows

    n = rewrite_rows(results)
    console.print(f"rewrote {n} row(s) in {results}", markup=False)


@main.command()
@click.argument("run_id")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--results", "-r", default=DEFAULT_RESULTS, show_default=True, type=click.Path(file_okay=False),
              help="Results folder the cell ran in.")
def export(run_id, out_dir, results) -> None:
    """Write cell RUN_ID's final (trained or repaired) model to OUT_DIR as an open_clip local-dir
    folder (open_clip_config.json and the weights). Load it with

    \b
      model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT_DIR")
      tokenizer = open_clip.get_tokenizer("local-dir:OUT_DIR")

    or evaluate it with CLIP_benchmark's --model local-dir:OUT_DIR. Run ids: `bench status` with
    the options of the run.
    """
    from .export import export as export_model

    try:
        out = export_model(results, run_id, out_dir)
    except (FileNotFoundError, FileExistsError) as e:
        raise click.ClickException(str(e)) from None
    console.print(f"wrote {out} (load it as local-dir:{out})", markup=False)


@main.command()
@click.option("--profile", "-p", default="cpu-small", show_default=True,
              help="Profile whose model, data, batch size, optimizer and defense settings are measured.")
@click.option("--steps", default=16, show_default=True, type=click.IntRange(min=1),
              help="Optimizer steps per epoch of each training measurement, and of the model the eval stage "
                   "evaluates (cpu-small: >= 16 for RoCLIP's pool).")
@click.option("--epochs", default=3, show_default=True, type=click.IntRange(min=1),
              help="Epochs per training measurement (cpu-small's RoCLIP matches in epoch 3 of every 3).")
@click.option("--repeats", default=9, show_default=True, type=click.IntRange(min=1),
              help="Repetitions of each measurement, interleaved; medians are reported.")
@click.option("--poison-images", default=0, show_default=True, type=click.IntRange(min=0),
              help="Training images to poison; 0 = the whole training split (60k for Fashion-MNIST).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="PyTorch CPU threads; 0 = every usable core, as bench run (bench run --jobs N gives cores/N).")
@click.option("--speed", default="compile,fused-adamw,channels-last", show_default=True, metavar="OPTIONS",
              help="Also train clip with each of these speed options of bench run --speed that applies to the "
                   "model (plain: none; compile needs a C++ compiler and about a minute).")
@click.option("--data-images", default=2048, show_default=True, type=click.IntRange(min=256),
              help="Synthetic JPEGs the data stage writes to a temp folder and decodes (in whole batches of 128).")
@click.option("--stage", "stages", multiple=True, type=click.Choice(["training", "poisoning", "eval", "data"]),
              help="Measure only this stage (repeatable)  [default: all four]")
@click.option("--results", "-r", default=DEFAULT_RESULTS, show_default=True, type=click.Path(file_okay=False),
              help="Results folder; the figures go to RESULTS/perf/perf-<time>.parquet.")
def perf(profile, steps, epochs, repeats, poison_images, threads, speed, data_images, stages, results) -> None:
    """Measure the harness on this machine (CPU): medians, ratios, targets.

    \b
    training   samples/s of the real trainer per defense against a bare
               open_clip loop on the same pre-made tensors; the share of
               wall time spent waiting for data and augmenting
    poisoning  seconds to apply each trigger to every training image and
               to build each attack's poisoned training set
    eval       seconds of zero-shot, ASR, linear probe and retrieval on the
               evaluation set, for a model trained --steps steps
    data       images/s of decoding lazily loaded JPEG files and shards at
               the paper profile's image size, with 0, 1, 2, ... worker
               processes, against what an H200 needs

    Also the model's FLOP utilisation (MFU) in training, and the process's peak resident memory
    after each stage.

    With the defaults this takes about 15 minutes on 2 cores; keep the machine otherwise idle.
    Two threads on a shared virtual machine vary by +-15 % from one repetition to the next:
    compare the ratios (each the median of the per-repetition ratios), or use --threads 1.
    """
    from rich.progress import Progress

    from .display import perf_memory, perf_tables
    from .perf import PerfOptions, check, run_perf, summary, write

    opts = PerfOptions(profile, steps, epochs, repeats, poison_images,
                       tuple(stages) or ("training", "poisoning", "eval", "data"), threads,
                       tuple(speed.split(",")), data_images)
    try:
        check(opts)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    check_writable(Path(results) / "perf")
    # SIGTERM unwinds, so that the data stage's temp folder is removed
    with unwinding(signal.SIGTERM), Progress(console=console, transient=True) as progress:
        frame = run_perf(opts, progress)
    m = frame.iloc[0]
    threads = f"{m['threads']} torch thread{'s' if m['threads'] != 1 else ''}"
    console.print(f"[bold]bench perf[/bold]: {m['cpu']}, {m['cores']} cores, {threads}, torch {m['torch']}")
    if "training" in opts.stages:
        console.print("bare loop: a hand-written open_clip training loop on pre-made tensors")
    med = summary(frame)
    for table in perf_tables(med, m):
        console.print(table)
    console.print(perf_memory(med))
    console.print(f"wrote {write(frame, Path(results) / 'perf')}", markup=False)
