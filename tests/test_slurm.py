"""`bench run --launcher slurm | submitit-local`: each cell is a submitit job whose row lands in the
same store. SLURM itself is replaced by a fake `sbatch` that records what it was given; jobs run
through submitit's LocalExecutor. Except for the one slow test, the cells are fakes that write an
ok row at once instead of training."""
import os
import stat
import subprocess
import sys
import time

import pytest
import submitit
from click.testing import CliRunner

from poisonbench import grid, slurm
from poisonbench.cli import main
from poisonbench.config import resolve
from poisonbench.grid import GridSpec, expand
from poisonbench.store import read_runs, write_row

GRID = ["-p", "tiny", "-a", "badnet[n_poison=20]", "-d", "clip,roclip"]


def bench(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def ok_row(cfg) -> dict:
    """A finished row of cell ``cfg`` with the columns the terminal tables show."""
    return dict(run_id=cfg.run_id, status="ok", attack=cfg.attack, defense=cfg.defense, seed=cfg.seed,
                profile=cfg.profile, clean_top1=0.5, clean_top5=0.9, asr=0.25, n_poison=20, poison_rate=0.04, wall_s=1.0)


@pytest.fixture
def fake_cells(monkeypatch):
    """Replace the cells' command by one that writes an ok row at once; the list it returns
    records (run_id, nproc) of every command built, i.e. of every cell submitted."""
    built = []

    def fake_command(cfg, results, device, force, keep_checkpoint, quiet):
        built.append((cfg.run_id, cfg.world_size))
        return [sys.executable, "-c", f"from poisonbench.store import write_row; write_row({ok_row(cfg)!r}, {str(results)!r})"]

    monkeypatch.setattr(grid, "cell_command", fake_command)
    return built


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`sbatch` and `srun` on PATH; sbatch appends the script it is given to the returned file and
    answers job 4242."""
    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch-scripts.txt"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncat "$1" >> {record}\necho "=== end" >> {record}\n'
                                    'echo "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return record


def test_two_cells_are_submitted_as_one_batch_and_write_two_rows(tmp_path, fake_cells, monkeypatch):
    batches = []
    real_batch = submitit.AutoExecutor.batch

    def spy(self, *args, **kwargs):
        batches.append(self)
        return real_batch(self, *args, **kwargs)

    monkeypatch.setattr(submitit.AutoExecutor, "batch", spy)
    res = tmp_path / "res"
    out = bench("run", *GRID, "--launcher", "submitit-local", "--gpus-per-node", 0, "--wait", "-r", res)
    assert out.exit_code == 0, out.output
    assert len(batches) == 1 and len(fake_cells) == 2
    df = read_runs(res)
    assert len(df) == 2 and set(df["status"]) == {"ok"} and set(df["defense"]) == {"clip", "roclip"}
    assert out.output.count("  job ") == 2 and "bench status -a 'badnet[n_poison=20]' -d clip,roclip -p tiny" in out.output
    assert out.output.count("done") >= 2  # the per-cell lines and the grid table
    logs = list((res / "slurm").glob("*/*_0_log.out"))
    assert len(logs) == 2  # one log folder per job


def test_slurm_submits_one_array_with_the_requested_resources_and_does_not_wait(tmp_path, fake_cells, fake_slurm):
    res = tmp_path / "res"
    out = bench("run", *GRID, "--launcher", "slurm", "--partition", "gpu", "--gpus-per-node", 2, "--mem-gb", 32,
                "--time-min", 90, "--slurm-array-parallelism", 1, "--slurm-param", "account=proj", "-r", res)
    assert out.exit_code == 0, out.output
    scripts = fake_slurm.read_text().split("=== end")[:-1]
    assert len(scripts) == 1  # one sbatch call for both cells
    cfgs = expand(GridSpec("badnet[n_poison=20]", "clip,roclip", "tiny", world_size=2))  # 2 GPUs: cells of 2 processes
    for line in ["--partition=gpu", "--array=0-1%1", "--gpus-per-node=2", "--cpus-per-task=16", "--mem=32GB",
                 "--time=90", "--account=proj", f"--job-name=pb-{cfgs[0].run_id}+1", "--ntasks-per-node=1",
                 f"--output={res.absolute()}/slurm/%A_%a/%A_%a_0_log.out", "--signal=USR2@"]:
        assert f"#SBATCH {line}" in scripts[0], line
    assert "#SBATCH --error" not in scripts[0]  # the cell's stdout and stderr share one log
    assert fake_cells == [(c.run_id, 2) for c in cfgs]  # several GPUs: the cell runs under torchrun
    assert "job 4242_0" in out.output and "job 4242_1" in out.output and "bench status" in out.output
    assert f"{res}/slurm/<job id>/" in out.output
    assert read_runs(res).empty  # nothing ran: the command returned once the jobs were queued


def test_a_cell_already_done_is_not_submitted_again(tmp_path, fake_cells, fake_slurm):
    res = tmp_path / "res"
    clip, roclip = expand(GridSpec("badnet[n_poison=20]", "clip,roclip", "tiny"))
    write_row(ok_row(clip), res)
    out = bench("run", *GRID, "--launcher", "slurm", "--partition", "gpu", "-r", res)
    assert out.exit_code == 0, out.output
    assert "1 done, 1 to run" in out.output and "4242" in out.output
    assert fake_cells == [(roclip.run_id, 1)]
    assert fake_slurm.read_text().count("#SBATCH --array") == 0  # one cell: a plain job, not an array

    write_row(ok_row(roclip), res)
    fake_slurm.unlink()
    out = bench("run", *GRID, "--launcher", "slurm", "--partition", "gpu", "-r", res)
    assert out.exit_code == 0 and "nothing to submit" in out.output
    out = bench("run", "-p", "tiny", "-a", "badnet[n_poison=20]", "--launcher", "slurm", "--partition", "gpu", "-r", res)
    assert out.exit_code == 0 and "already done" in out.output
    assert len(fake_cells) == 1 and not fake_slurm.exists()  # no sbatch call


@pytest.mark.parametrize("partition, sbatch, messages", [
    (None, True, ["--launcher slurm needs --partition NAME"]),
    ("gpu", False, ["`sbatch`/`srun` are not on PATH", "--launcher submitit-local"]),
    (None, False, ["--partition NAME", "`sbatch`/`srun` are not on PATH"]),
])
def test_slurm_without_partition_or_sbatch_fails_before_any_job(tmp_path, monkeypatch, fake_cells, partition, sbatch,
                                                                 messages):
    empty_bin = tmp_path / "empty-bin"
    empty_bin.mkdir()
    if sbatch:
        for name in ("sbatch", "srun"):
            (empty_bin / name).write_text("#!/bin/sh\necho 'Submitted batch job 1'\n")
            (empty_bin / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(empty_bin))
    res = tmp_path / "res"
    out = CliRunner().invoke(main, ["run", *GRID, "--launcher", "slurm", "-r", str(res)]
                             + (["--partition", partition] if partition else []))
    assert out.exit_code == 2, out.output
    text = " ".join(out.output.split())
    for message in messages:
        assert message in text, out.output
    assert fake_cells == [] and not res.exists()  # nothing built, submitted or written


def test_slurm_options_need_a_submitting_launcher_and_help_explains_them(tmp_path):
    out = CliRunner().invoke(main, ["run", "-p", "tiny", "--partition", "gpu", "-r", str(tmp_path / "r")])
    assert out.exit_code == 2 and "need --launcher slurm" in out.output
    out = CliRunner().invoke(main, ["run", "-p", "tiny", "--launcher", "submitit-local", "-j", "2", "-r", str(tmp_path / "r")])
    assert out.exit_code == 2 and "--jobs is for --launcher local" in out.output
    text = bench("run", "--help").output
    section = text[text.index("SLURM (--launcher slurm):"):]
    for part in ("RESULTS/slurm/<job id>/", "`bench status`", "`bench report`", "--partition", "--time-min",
                 "--slurm-param", "--wait", "submitit-local"):
        assert part in section, part


def test_a_timed_out_job_stops_its_cell_and_is_requeued_and_resumes(tmp_path):
    """The first run of the command waits until it is stopped (SIGTERM, as a cell records a failed
    row); the requeued run finishes. SIGUSR2, which SLURM sends every process of the job, is
    ignored by the cell."""
    runs = tmp_path / "runs.txt"
    script = (
        "import pathlib, signal, sys, time\n"
        f"runs = pathlib.Path({str(runs)!r})\n"
        "ignored = signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN\n"
        "def stop(*args):\n"
        "    runs.open('a').write(f'stopped usr2_ignored={ignored}\\n')\n"
        "    sys.exit(143)\n"
        "if not runs.exists():\n"
        "    signal.signal(signal.SIGTERM, stop)\n"
        "    runs.touch()\n"
        "    time.sleep(120)\n"
        "runs.open('a').write('resumed\\n')\n"
    )
    executor = submitit.LocalExecutor(tmp_path / "slurm" / "%j")
    executor.update_parameters(timeout_min=1, signal_delay_s=50)  # SIGUSR2 after 10 s
    job = executor.submit(slurm.CellJob([sys.executable, "-c", script]))
    assert job.result() == 0
    assert runs.read_text().splitlines() == ["stopped usr2_ignored=True", "resumed"]
    assert "Requeued job" in job.paths.stdout.read_text() + job.paths.stderr.read_text()


@pytest.mark.slow
def test_tiny_cell_through_submitit_local_writes_one_ok_row_and_exits_0(tmp_path):
    res = tmp_path / "res"
    cfg = resolve("badnet", "clip", "tiny", 0, {"n_poison": 20}, epochs=1)
    jobs = slurm.submit_cells([cfg], res, "submitit-local", slurm.SlurmOptions(gpus_per_node=0), device="cpu")
    assert len(jobs) == 1 and jobs[0].result() == 0
    df = read_runs(res)
    assert len(df) == 1 and df["status"][0] == "ok" and df["run_id"][0] == cfg.run_id and df["epochs"][0] == 1
    assert f"cell {cfg.run_id}" in jobs[0].paths.stdout.read_text()  # the cell's output is in the job's log
    # through the CLI, the finished cell is shown, not submitted again
    out = bench("run", "-p", "tiny", "-a", "badnet[n_poison=20]", "--epochs", 1, "--launcher", "submitit-local", "-r", res)
    assert out.exit_code == 0 and "already done" in out.output
    assert len([p for p in (res / "slurm").iterdir() if p.name != "%j"]) == 1


def test_a_stopped_cell_gets_one_sigterm_even_if_slow_to_exit(tmp_path):
    """On a time limit submitit calls ``checkpoint`` (SIGTERM to the cell) and then unwinds out of
    the job's wait, whose clean-up stops the cell too: a cell still recording must not get a
    second SIGTERM, which could interrupt it (this raced in CI)."""
    got, ready = tmp_path / "got.txt", tmp_path / "ready"
    script = (
        "import pathlib, signal, sys, time\n"
        f"got = pathlib.Path({str(got)!r})\n"
        "def stop(*args):\n"
        "    got.open('a').write('SIGTERM\\n')\n"
        "    time.sleep(1.0)\n"  # still recording when the clean-up runs
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    job = slurm.CellJob([sys.executable, "-c", script], stop_timeout_s=10)
    job._proc = subprocess.Popen(job.command)  # as __call__ starts it, without blocking this test
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    requeued = job.checkpoint()
    while not got.exists() and time.monotonic() < deadline:  # the cell has started recording
        time.sleep(0.05)
    job._stop()  # __call__'s clean-up, as when submitit's handler exits to requeue
    assert job._proc.returncode == 143
    assert got.read_text().splitlines() == ["SIGTERM"]
    assert isinstance(requeued.function, slurm.CellJob) and requeued.function.command == job.command


def test_the_printed_status_command_names_the_cells_that_were_submitted(tmp_path, fake_cells, monkeypatch):
    """Every option that selects a cell reaches the printed `bench status` command: own data, its
    evaluation set, dataset parameters, training overrides and the processes of each job."""
    import shlex

    monkeypatch.setattr(grid, "validate", lambda *args, **kwargs: [])  # no real files behind --data
    res = tmp_path / "my res"
    args = ["-p", "tiny", "-a", "badnet[n_poison=20]", "-d", "clip,roclip", "--data", "csv:/data/pairs.csv",
            "--eval", "cifar10:/data/c10", "--dataset-param", "n_train=100,200", "--epochs", 1, "--batch-size", 32,
            "--lr", 0.0005]
    out = bench("run", *args, "--launcher", "submitit-local", "--gpus-per-node", 2, "--device", "cpu", "--wait", "-r", res)
    assert out.exit_code == 0, out.output
    submitted = {run_id for run_id, _ in fake_cells}
    assert len(submitted) == 4 and {n for _, n in fake_cells} == {2}  # cells of 2 processes, one per GPU
    progress = shlex.split(next(line for line in out.output.splitlines() if line.startswith("progress: "))[10:])
    assert progress[:2] == ["bench", "status"]
    status = bench(*progress[1:])
    assert status.exit_code == 0, status.output
    assert "4 done, 0 running, 0 failed, 0 pending" in status.output
    assert {c.run_id for c in expand(cli_spec(progress[2:]))} == submitted
    assert f"results: bench report -r '{res}'" in out.output


def cli_spec(args):
    from poisonbench import cli

    params = cli.status.make_context("status", list(args)).params
    return cli.grid_spec(**{k: v for k, v in params.items() if k != "list_store"})
