"""Run a grid's cells as SLURM jobs through submitit (``bench run --launcher slurm``).

One job per cell; several cells are submitted as one job array. A job's callable (``CellJob``)
runs the cell's ``bench cell`` command (``grid.cell_command``) as a subprocess, so the cell's own
locking, row writing and SIGTERM handling are those of the local launcher, and returns its exit
code (``grid.EXIT_*``). Rows land in the same store (RESULTS, which on a cluster must be on a
filesystem the nodes share), so ``bench status`` and ``bench report`` read them as usual.
Job logs: ``RESULTS/slurm/<job id>/``.

``--launcher submitit-local`` submits the same jobs through submitit's LocalExecutor (processes on
this machine): it tests the SLURM path without a cluster.

Time limits and preemption: submitit sends SIGUSR2 to the job shortly before the end;
``CellJob.checkpoint`` stops the cell with SIGTERM (it records a failed row and keeps its
end-of-epoch checkpoint) and submitit requeues the job, whose rerun resumes from that checkpoint.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from . import grid
from .config import RunConfig

LAUNCHERS = ("local", "slurm", "submitit-local")
LOG_FOLDER = "slurm"  # under RESULTS; one subfolder per job id


class LaunchError(ValueError):
    """A submission that cannot work; the message says what to do."""


@dataclass
class SlurmOptions:
    """What each cell's job asks the scheduler for.

    Attributes:
        partition: SLURM partition (``sinfo -s`` lists them); required by ``--launcher slurm``.
        gpus_per_node: GPUs per job (0 for a CPU partition); more than 1 runs the cell under
            torchrun with one process per GPU.
        cpus_per_task: CPU cores per job; None: 8 per GPU (8 without a GPU).
        mem_gb: memory per job in GB; None: the partition's default.
        time_min: time limit per job in minutes; a job that reaches it is requeued and resumes.
        array_parallelism: at most this many jobs of an array run at once; None: submitit's 256.
        extra: further ``#SBATCH`` options, KEY -> VALUE (e.g. ``account``, ``qos``, ``constraint``).
    """

    partition: str | None = None
    gpus_per_node: int = 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int = 24 * 60
    array_parallelism: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


def check_launcher(launcher: str, opts: SlurmOptions, device: str = "auto") -> None:
    """Raise LaunchError, before anything is submitted, when ``launcher`` with ``opts`` cannot work:
    ``slurm`` without ``sbatch``/``srun`` on PATH or without a partition, ``--device cuda`` without
    GPUs, several GPUs per cell where this version cannot run a cell on several GPUs."""
    if launcher not in LAUNCHERS:
        raise LaunchError(f"unknown launcher {launcher!r}; valid launchers: {', '.join(LAUNCHERS)}")
    problems = []
    if launcher == "slurm":
        if not (shutil.which("sbatch") and shutil.which("srun")):
            problems.append("`sbatch`/`srun` are not on PATH, so SLURM jobs cannot be submitted from here: run this on "
                            "the cluster's login node (after `module load slurm` if your site needs it), or try the "
                            "same jobs on this machine with --launcher submitit-local")
        if not opts.partition:
            problems.append("--launcher slurm needs --partition NAME (`sinfo -s` lists the partitions)")
    if device.startswith("cuda") and opts.gpus_per_node < 1:
        problems.append(f"--device {device} needs --gpus-per-node 1 or more (or use --device cpu)")
    if problems:
        raise LaunchError("; ".join(problems))


def cell_job_command(cfg: RunConfig, results: str | Path, device: str = "auto", force: bool = False,
                     keep_checkpoint: bool = False) -> list[str]:
    """The command a cell's job runs: ``grid.cell_command`` without a progress bar (the output goes
    to the job's log); for a cell of several processes (``cfg.world_size``) under torchrun, one
    process per GPU."""
    return grid.cell_command(cfg, results, device, force, keep_checkpoint, True)


def processes_per_job(opts: SlurmOptions) -> int:
    """The processes that train a cell in one job of ``opts``: one per GPU with several GPUs,
    else 1. The cells must be resolved with this world size (``GridSpec.world_size``)."""
    return opts.gpus_per_node if opts.gpus_per_node > 1 else 1


def _ignore_preemption_signal() -> None:
    # SLURM sends submitit's SIGUSR2 to every process of the job; its default action would kill
    # the cell before it records anything. The job's callable stops the cell with SIGTERM instead.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class CellJob(Checkpointable):
    """The callable of one cell's job: runs ``command`` in a subprocess and returns its exit code
    (``grid.EXIT_*``; negative: killed by that signal).

    Args:
        command: the cell's command line (``cell_job_command``).
        stop_timeout_s: seconds the cell gets to record its failed row after SIGTERM before it is
            killed (SLURM kills the whole job 30 s after a requeue by default).
    """

    def __init__(self, command: list[str], stop_timeout_s: float = 25.0) -> None:
        self.command = list(command)
        self.stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen | None = None
        self._terminated = False  # SIGTERM sent once: a second could interrupt the cell's recording

    def __call__(self) -> int:
        # PARENT_ENV: the cell gets SIGTERM from the kernel if this process dies (grid.die_with_parent)
        env = {**os.environ, grid.PARENT_ENV: str(os.getpid())}
        self._proc = subprocess.Popen(self.command, env=env, preexec_fn=_ignore_preemption_signal)
        try:
            return self._proc.wait()
        finally:  # also when submitit's signal handler exits to requeue: let the cell finish recording
            self._stop()

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """Called by submitit on a time limit or preemption (in its SIGUSR2 handler): ask the cell to
        stop (SIGTERM; it records a failed row and keeps its last end-of-epoch checkpoint) and return
        the same command for submitit to requeue; the rerun resumes from the checkpoint."""
        self._terminate()
        return DelayedSubmission(CellJob(self.command, self.stop_timeout_s))

    def _terminate(self) -> None:
        if self._proc is not None and self._proc.poll() is None and not self._terminated:
            self._terminated = True
            self._proc.send_signal(signal.SIGTERM)

    def _stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        self._terminate()
        try:
            proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_proc": None, "_terminated": False}  # a process does not pickle (nor requeue)


def make_executor(launcher: str, folder: str | Path, opts: SlurmOptions, name: str) -> submitit.AutoExecutor:
    """A submitit executor for ``launcher`` (``slurm``: SLURM; ``submitit-local``: processes on this
    machine) writing its files under ``folder`` (may contain ``%j``, the job id), with the
    resources of ``opts`` and job name ``name``. Raises LaunchError (see ``check_launcher``)."""
    check_launcher(launcher, opts)
    if launcher == "local":
        raise LaunchError("--launcher local runs cells with grid.run_cells, not through submitit")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm" if launcher == "slurm" else "local")
    params = dict(name=name, timeout_min=int(opts.time_min), nodes=1, tasks_per_node=1,
                  gpus_per_node=opts.gpus_per_node, cpus_per_task=opts.cpus_per_task or 8 * max(1, opts.gpus_per_node),
                  mem_gb=opts.mem_gb, stderr_to_stdout=True)  # one log per job
    if launcher == "slurm":
        params.update(slurm_partition=opts.partition, slurm_additional_parameters=dict(opts.extra) or None,
                      slurm_array_parallelism=opts.array_parallelism)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def job_name(cfgs: list[RunConfig]) -> str:
    """``pb-<run_id>`` for one cell; an array (whose jobs share one name in SLURM) is
    ``pb-<first run_id>+<number of other cells>``."""
    return f"pb-{cfgs[0].run_id}" + (f"+{len(cfgs) - 1}" if len(cfgs) > 1 else "")


def submit_cells(cfgs: list[RunConfig], results: str | Path, launcher: str, opts: SlurmOptions,
                 device: str = "auto", force: bool = False, keep_checkpoint: bool = False) -> list[submitit.Job]:
    """Submit one job per config (several: one job array) and return the jobs, in the order of
    ``cfgs``, without waiting. ``results`` is made absolute, since the jobs may start elsewhere.

    Each job's result is the cell's exit code. Raises LaunchError before submitting anything
    when the launcher cannot work or a cell was resolved for another number of processes than a
    job runs (``processes_per_job``), and submitit's FailedJobError when ``sbatch`` refuses the jobs.
    """
    if not cfgs:
        return []
    nproc = processes_per_job(opts)
    wrong = [c.run_id for c in cfgs if c.world_size != nproc]
    if wrong:
        raise LaunchError(f"cells {', '.join(wrong)} are cells of another number of processes than the {nproc} "
                          f"a job with --gpus-per-node {opts.gpus_per_node} runs; resolve them with world_size={nproc}")
    results = Path(results).absolute()
    executor = make_executor(launcher, results / LOG_FOLDER / "%j", opts, job_name(cfgs))
    with executor.batch():
        jobs = [executor.submit(CellJob(cell_job_command(c, results, device, force, keep_checkpoint)))
                for c in cfgs]
    return jobs


def wait_for(jobs: list[submitit.Job], cfgs: list[RunConfig], on_done: Callable[[grid.CellOutcome], None] | None = None,
             poll_s: float = 10.0) -> list[grid.CellOutcome]:
    """Wait for the jobs of ``submit_cells`` (``cfgs`` in the same order) and return their outcomes
    in order of completion, checking every ``poll_s`` seconds. A job that ended without a result
    (cancelled, out of requeues, node failure) counts as ``grid.EXIT_FAILED``; its log says why."""
    by_job = {id(j): c for j, c in zip(jobs, cfgs)}
    outcomes = []
    for job in submitit.helpers.as_completed(jobs, poll_frequency=poll_s):
        try:
            code = int(job.result())
        except Exception:  # submitit raises what ended the job; the cell's own errors are in its log
            code = grid.EXIT_FAILED
        outcome = grid.CellOutcome(by_job[id(job)], code, job.paths.stdout)
        outcomes.append(outcome)
        if on_done:
            on_done(outcome)
    return outcomes
